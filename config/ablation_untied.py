"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: a separate output head, +262M parameters."""
base = "smollm3_1b_ablation.py"
tie_embeddings = False       # baseline: tied
out_dir = "out/ablation_untied"
