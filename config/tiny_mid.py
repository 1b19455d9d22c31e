"""Tiny mid-training (CPU): the tiny pretraining run's model on the embedded conversations, every token in the loss.
    python train.py config/tiny.py && python posttrain.py mid config/tiny_mid.py"""
init_from = "out/tiny"        # the pretraining run (its newest checkpoint)
out_dir = "out/tiny_mid"
data_dir = "data/default"     # train_data / val_data "default": sft_train.jsonl / sft_val.jsonl there
seq_len = 640                 # the longest embedded conversation is 621 tokens: none skipped
overlong = "skip"
# ---- 8 rows x 640 = 5,120 tokens/step; 4,000 conversations (~188 tokens) fill ~1,170 rows: ~1 epoch ----
batch_size = 8
micro_batch_size = 8
max_steps = 150
lr = 1e-3                     # a fifth of pretraining's AdamW 5e-3: the tiny model must learn the chat tokens in few steps
min_lr = 0.0
warmup_steps = 10
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 50
eval_rows = 16                # 16 packed held-out rows (~55 conversations)
ckpt_interval = 50
log_interval = 5
dtype = "float32"             # CPU: no autocast
