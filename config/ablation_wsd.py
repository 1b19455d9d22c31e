"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: WSD, constant then linear decay over the last 10%."""
base = "smollm3_1b_ablation.py"
schedule = "wsd"             # baseline: cosine
out_dir = "out/ablation_wsd"
