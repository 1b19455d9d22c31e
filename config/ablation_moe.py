"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: DeepSeek-V3-style MoE MLPs."""
base = "smollm3_1b_ablation.py"
# Matched active parameters: 1,236,060,160 per token vs the baseline's 1,235,814,400 (+0.02%, the routers); each
# MoE layer runs 1 shared + top-3 of 8 routed experts of 2048 = 8192 active FFN width, the baseline's d_ff.
# Total 2,179,778,560 parameters (15 MoE layers x 9 experts of 3 x 2048 x 2048; layer 0 stays dense).
n_experts = 8
n_experts_active = 3
n_shared_experts = 1
d_expert = 2048
moe_first_dense = 1          # DeepSeek-V2/V3: the first layer(s) dense
router_score = "sigmoid"     # DeepSeek-V3: sigmoid scores, top-k renormalised
moe_bias_update = 1e-3       # DeepSeek-V3's auxiliary-loss-free balancing (bias step per update) ...
moe_aux_loss = 1e-4          # ... beside a small load-balancing loss (V3's complementary loss coefficient)
out_dir = "out/ablation_moe"
