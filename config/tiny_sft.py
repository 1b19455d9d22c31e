"""Tiny SFT (CPU): the tiny mid-training checkpoint on the embedded conversations, loss on the assistant turns only.
    python posttrain.py mid config/tiny_mid.py && python posttrain.py sft config/tiny_sft.py"""
base = "tiny_mid.py"          # the same data, batch and schedule; the method (sft: assistant tokens) is the command's
init_from = "out/tiny_mid"    # the mid-training run (its newest checkpoint)
out_dir = "out/tiny_sft"
