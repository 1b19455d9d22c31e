"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: Muon for the hidden matrices, AdamW for embeddings and norms."""
base = "smollm3_1b_ablation.py"
optimizer = "muon"           # baseline: AdamW
out_dir = "out/ablation_muon"
