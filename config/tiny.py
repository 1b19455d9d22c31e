"""Tiny CPU config: the whole SmolLM3 recipe at toy scale, trains in minutes on 2 cores."""
# ---- model: 3,950,848 parameters; SmolLM3's shape in miniature (GQA, RNoPE, tied, doc masking) ----
vocab_size = 4096            # BPE trained on the embedded default corpus
d_model = 256
n_layers = 4
n_heads = 4                  # head_dim 64
n_kv_heads = 2
d_ff = 688                   # ~2.7x d_model (SmolLM3: 11008 / 2048 = 5.4x; smaller here to save CPU time)
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
# ---- training: 16 rows x 256 = 4,096 tokens/step; 500 steps = 2.05M tokens (~1/3 epoch of the corpus) ----
out_dir = "out/tiny"
batch_size = 16
micro_batch_size = 16
max_steps = 500
lr = 3e-3                    # small models take large steps
min_lr = 0.0
warmup_steps = 30
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
