"""Ablation vs config/smollm3_1b_ablation.py (the baseline lines repeated): one change, marked CHANGED."""
# ---- model: 1,235,814,400 parameters with tied embeddings ----
vocab_size = 128256
d_model = 2048
n_layers = 16
n_heads = 32                 # head_dim 64
n_kv_heads = 8
d_ff = 8192
rope_theta = 50000.0
nope_interval = 0            # baseline: RoPE everywhere (RNoPE is an ablation)
max_position_embeddings = 4096
tie_embeddings = True
doc_masking = True
attn_impl = "triton"
# ---- data: one fixed mixture at 4k (the playbook's architecture ablations train on web text) ----
tokenizer = "data/smollm3/tokenizer.json"
dataset = "data/smollm3"
seq_len = 4096
mixture = {"web": 1.0}
# ---- training: 256 rows x 4096 = 1,048,576 tokens/step; 43,000 steps = 45B tokens ----
out_dir = "out/ablation_muon"
batch_size = 256
micro_batch_size = 4
max_steps = 43_000
lr = 5e-4
min_lr = 5e-5
warmup_steps = 2000
schedule = "cosine"
weight_decay = 0.1
wd_embeddings = True         # the baseline decays every matrix; ablation_no_wd_embeddings.py is SmolLM3's choice
grad_clip = 1.0
dtype = "bfloat16"
eval_interval = 1000
eval_rows = 64
ckpt_interval = 2000
log_interval = 10
optimizer = "muon"           # CHANGED: Muon for the hidden matrices, AdamW for embeddings and norms (baseline: AdamW)
