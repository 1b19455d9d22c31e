"""SmolLM3-3B: the real pretraining run (384 H100s, 11.1T tokens). Numbers from the Smol Training Playbook."""
# ---- model: 3,075,098,624 parameters with tied embeddings ----
vocab_size = 128256          # Llama-3.2 tokenizer: 128,000 BPE + 256 special
d_model = 2048
n_layers = 36
n_heads = 16
n_kv_heads = 4               # GQA, 4 query heads per KV head
d_ff = 11008                 # SwiGLU
rope_theta = 50000.0         # 4k pretraining; 2M for 4k->32k, 5M for 32k->64k
nope_interval = 4            # RNoPE: layers 3, 7, ..., 35 have no RoPE
max_position_embeddings = 65536
rms_eps = 1e-6
tie_embeddings = True
doc_masking = True           # intra-document masking
qk_norm = False
z_loss = 0.0
attn_impl = "triton"
init_std = 0.02
# ---- data: web / code / math shards made with `python data.py prepare` and SmolLM3's tokenizer.json ----
tokenizer = "data/smollm3/tokenizer.json"
dataset = "data/smollm3"
seq_len = 4096
mixture = {"web": 0.85, "code": 0.12, "math": 0.03}                  # stage 1: 0 -> 8T tokens
stages = [[3_391_000, {"web": 0.75, "code": 0.15, "math": 0.10}],     # stage 2: 8T / 2,359,296 -> 10T
          [4_234_500, {"web": 0.63, "code": 0.24, "math": 0.13}]]     # stage 3 = the WSD decay: 9.99T -> 11.1T
# ---- training: 576 rows x 4096 = 2,359,296 tokens/step (DP 192 x micro-batch 3, TP 2: 384 H100s) ----
out_dir = "out/smollm3"
batch_size = 576
micro_batch_size = 3
max_steps = 4_705_000        # x 2,359,296 = 11.1T tokens
lr = 2e-4
min_lr = 0.0
warmup_steps = 2000
schedule = "wsd"
decay_frac = 0.1             # linear to 0 over the last 470,500 steps, from step 4,234,500: stage 3's mixture
decay_shape = "linear"
weight_decay = 0.1
wd_embeddings = False        # no weight decay on embeddings (after OLMo 2)
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.0
dtype = "bfloat16"
eval_interval = 2000
eval_rows = 64
ckpt_interval = 2000         # ~15 min at ~2.3 steps/s
log_interval = 10
