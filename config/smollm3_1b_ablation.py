"""The playbook's ablation baseline: Llama-3.2-1B layout, SmolLM3 tokenizer, 4k context."""
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
