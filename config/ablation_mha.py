"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: multi-head attention, one KV head per query head."""
base = "smollm3_1b_ablation.py"
n_kv_heads = 32              # baseline: GQA with 8 KV heads
out_dir = "out/ablation_mha"
