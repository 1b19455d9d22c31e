"""Tiny CPU ablation: config/tiny.py with DeepSeek-V3-style MoE MLPs (the CPU twin of ablation_moe.py)."""
base = "tiny.py"
# ---- 1,867,904 parameters, 1,314,944 active per token (tiny: 1,311,872; +0.23%, the routers) ----
# layers 1-3: 1 shared + top-3 of 8 routed experts of 96 = 384 active FFN width, tiny's d_ff; layer 0 dense
n_experts = 8
n_experts_active = 3
n_shared_experts = 1
d_expert = 96
moe_first_dense = 1
router_score = "sigmoid"
moe_bias_update = 1e-3       # auxiliary-loss-free balancing, with a small load-balancing loss beside it
moe_aux_loss = 1e-4
out_dir = "out/tiny_moe"
