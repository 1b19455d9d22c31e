"""Tiny APO-zero (CPU): the tiny SFT checkpoint on the embedded preference pairs (/think: the rejected reply's
answer contradicts its own worked steps; /no_think: it parrots a number of the question), against the SFT model.
    python posttrain.py dpo config/tiny_apo.py          # --loss_type=dpo | ipo | apo_down for the others"""
init_from = "out/tiny_sft"    # the SFT run (its newest checkpoint); also the reference model
out_dir = "out/tiny_apo"
data_dir = "data/default"     # train_data / val_data "default": pref_train.jsonl / pref_val.jsonl there
seq_len = 640                 # the longest embedded pair side is 543 tokens: none skipped
overlong = "skip"
loss_type = "apo_zero"        # SmolLM3's choice
beta = 0.1
ref_logps = "frozen"          # 100 steps x 8 pairs see 800 of the 2,000 pairs: scoring them as they come is cheaper
# ---- 8 pairs/step (16 rows of <= 640 tokens); 100 steps ~ 0.4 epoch ----
batch_size = 8
micro_batch_size = 4
max_steps = 100
lr = 1e-4                     # SFT's 1e-3 / 10, as the 3B recipe (2e-5 -> 2e-6)
min_lr = 0.0
warmup_steps = 10
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 25
eval_rows = 64                # held-out pairs scored for rewards, margin and accuracy
ckpt_interval = 50
log_interval = 5
dtype = "float32"             # CPU: no autocast
