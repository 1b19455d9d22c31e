"""Tiny CPU ablation: config/tiny.py with MLA in place of GQA (the CPU twin of ablation_mla.py)."""
base = "tiny.py"
# ---- 1,305,920 parameters (tiny: 1,311,872, -0.5%); KV cache 480 bytes/token vs GQA's 1,024 ----
attention = "mla"
kv_lora_rank = 48            # latent: 4 heads x (16 + 32) come up from 48 numbers per token
q_lora_rank = 0
qk_nope_head_dim = 16        # + qk_rope 16 = 32 score dims per head, tiny's head_dim (16 in NoPE layer 3)
qk_rope_head_dim = 16
v_head_dim = 32
out_dir = "out/tiny_mla"
