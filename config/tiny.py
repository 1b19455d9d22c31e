"""Tiny CPU config: the whole SmolLM3 recipe at toy scale, trains in minutes on 2 cores."""
# ---- model: 1,311,872 parameters; SmolLM3's shape in miniature (GQA, RNoPE, tied, doc masking) ----
# Narrow for speed: a step of the earlier d_model 256 (3.95M parameters) took 2.1-2.2x the CPU time of this one
vocab_size = 4096            # BPE trained on the embedded default corpus
d_model = 128
n_layers = 4
n_heads = 4                  # head_dim 32
n_kv_heads = 2
d_ff = 384                   # 3x d_model (SmolLM3: 11008 / 2048 = 5.4x; smaller here to save CPU time)
rope_theta = 10000.0
nope_interval = 4            # layer 3 is NoPE
max_position_embeddings = 2048
tie_embeddings = True
doc_masking = True
attn_impl = "sdpa"
# ---- data: the embedded default corpus (built on first use): stdlib Python source + worked arithmetic ----
data_dir = "data/default"
seq_len = 256
mixture = {"code": 0.5, "math": 0.5}
# ---- training: 16 rows x 256 = 4,096 tokens/step; 300 steps = 1.23M tokens (~1/5 epoch of the corpus) ----
out_dir = "out/tiny"
batch_size = 16
micro_batch_size = 16
max_steps = 300
# Muon (muon_lr 0.02, the default) for the hidden matrices, AdamW for embeddings and norms: this model in 300
# steps reached val bpb 1.074, the d_model 256 one with AdamW 1.081 in 500 (BENCHMARKS.md)
optimizer = "muon"
lr = 5e-3                    # AdamW's part; small models take large steps
min_lr = 0.0
warmup_steps = 20
schedule = "wsd"
decay_frac = 0.2             # a short run spends a larger share decaying
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 100
eval_rows = 64               # 64 x 256 held-out tokens per source
ckpt_interval = 200
log_interval = 10
dtype = "float32"            # CPU: no autocast
sample_prompts = ["def ", "import os\n", "Problem: ", "Problem: Compute 38 + 45.\nSolution:\n"]
sample_tokens = 96
sample_temperature = 0.7
