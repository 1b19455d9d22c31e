"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: RNoPE, no RoPE in layers 3, 7, 11, 15."""
base = "smollm3_1b_ablation.py"
nope_interval = 4            # baseline: RoPE in every layer
out_dir = "out/ablation_rnope"
