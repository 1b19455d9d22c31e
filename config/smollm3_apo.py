"""SmolLM3-3B APO-zero: preference pairs against the SFT model as the reference. LR 2e-6 (about SFT's / 10) and
beta 0.1, as the playbook; the rest our choices.
    python posttrain.py dpo config/smollm3_apo.py                                    # one GPU
    torchrun --standalone --nproc_per_node=8 posttrain.py dpo config/smollm3_apo.py  # data parallel, one node"""
init_from = "out/smollm3_sft"
out_dir = "out/smollm3_apo"
data_dir = "data/smollm3"
train_data = "data/smollm3/pref_train.jsonl"  # {"prompt": [...], "chosen": [...], "rejected": [...]} a line
val_data = "data/smollm3/pref_val.jsonl"
seq_len = 8192
overlong = "skip"
loss_type = "apo_zero"
beta = 0.1
ref_logps = "precompute"      # once, before step 1: no second 3B model in GPU memory
# ---- 64 pairs/step (our choice) ----
batch_size = 64
micro_batch_size = 2
max_steps = 2_000
lr = 2e-6                     # SFT's 2e-5 / 10
min_lr = 0.0
warmup_steps = 100
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
dtype = "bfloat16"
attn_impl = "triton"
act_ckpt = True
zero = 1                      # 8 GPUs: 59.7 GB each with AdamW's state sharded, 78.1 without (parallel.py plan)
eval_interval = 250
eval_rows = 512               # held-out pairs scored for rewards, margin and accuracy
ckpt_interval = 250
log_interval = 10
