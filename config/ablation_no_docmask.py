"""Ablation: the 1B baseline (smollm3_1b_ablation.py) with one change: attention crosses document boundaries."""
base = "smollm3_1b_ablation.py"
doc_masking = False          # baseline: intra-document masking
out_dir = "out/ablation_no_docmask"
