"""SmolLM3 long-context stage 2: 32k -> 64k at rope_theta 5M, from the 32k stage's final weights.

The model lines repeat config/smollm3.py with rope_theta changed. Weights come from init_from; the
optimizer and schedule start fresh. 50B tokens per stage on the decay-stage mixture, as SmolLM3 did."""
# ---- model: 3,075,098,624 parameters with tied embeddings ----
vocab_size = 128256          # Llama-3.2 tokenizer: 128,000 BPE + 256 special
d_model = 2048
n_layers = 36
n_heads = 16
n_kv_heads = 4               # GQA, 4 query heads per KV head
d_ff = 11008                 # SwiGLU
rope_theta = 5_000_000.0     # 32k -> 64k
nope_interval = 4            # RNoPE: layers 3, 7, ..., 35 have no RoPE
max_position_embeddings = 65536
rms_eps = 1e-6
tie_embeddings = True
doc_masking = True           # intra-document masking
qk_norm = False
z_loss = 0.0
attn_impl = "triton"
init_std = 0.02
# ---- data: the stage-3 (decay) mixture, which upsamples code and math ----
tokenizer = "data/smollm3/tokenizer.json"
dataset = "data/smollm3"
seq_len = 65536
mixture = {"web": 0.63, "code": 0.24, "math": 0.13}
# ---- training: 36 rows x 65536 = 2,359,296 tokens/step (the pretraining batch); 21,200 steps = 50B tokens ----
init_from = "out/smollm3_long_32k"
out_dir = "out/smollm3_long_64k"
batch_size = 36
micro_batch_size = 1
max_steps = 21_200
lr = 1e-4                    # our choice (the blog gives no long-context LR): half the pretraining peak
min_lr = 0.0
warmup_steps = 500
schedule = "wsd"
decay_frac = 0.1
weight_decay = 0.1
wd_embeddings = False
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.0
dtype = "bfloat16"
eval_interval = 1000
eval_rows = 16
ckpt_interval = 1000
log_interval = 10
