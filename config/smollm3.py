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
