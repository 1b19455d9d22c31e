"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: no weight decay on embeddings (SmolLM3's choice)."""
base = "smollm3_1b_ablation.py"
wd_embeddings = False        # baseline: embeddings decayed
out_dir = "out/ablation_no_wd_embeddings"
