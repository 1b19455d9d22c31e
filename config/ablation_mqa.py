"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: multi-query attention, a single KV head."""
base = "smollm3_1b_ablation.py"
n_kv_heads = 1               # baseline: GQA with 8 KV heads
out_dir = "out/ablation_mqa"
