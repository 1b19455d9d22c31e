"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: Muon for the hidden matrices, AdamW for embeddings and norms."""
base = "smollm3_1b_ablation.py"
optimizer = "muon"           # baseline: AdamW. Muon LR 0.02 (muon_lr), AdamW's 5e-4 for the rest, one schedule.
# weight_decay 0.1 is inherited and acts at Muon's LR: hidden matrices shrink by 0.02 * 0.1 = 0.2% per step,
# 40x AdamW's 5e-4 * 0.1. A follow-up ablation should sweep it (nanochat and modded-nanogpt tune it separately).
out_dir = "out/ablation_muon"
