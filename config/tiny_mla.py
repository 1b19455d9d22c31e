"""Tiny CPU ablation: config/tiny.py with MLA in place of GQA (the CPU twin of ablation_mla.py)."""
base = "tiny.py"
# ---- 3,926,656 parameters (tiny: 3,950,848, -0.6%); KV cache 960 bytes/token vs GQA's 2,048 ----
attention = "mla"
kv_lora_rank = 96            # latent: 4 heads x (32 + 64) come up from 96 numbers per token
q_lora_rank = 0
qk_nope_head_dim = 32        # + qk_rope 32 = 64 score dims per head, tiny's head_dim (32 in NoPE layer 3)
qk_rope_head_dim = 32
v_head_dim = 64
out_dir = "out/tiny_mla"
