"""SmolLM3-3B SFT: loss on the assistant turns, from the mid-training checkpoint. LR 2e-5 (the playbook); the
rest our choices.
    python posttrain.py sft config/smollm3_sft.py                                    # one GPU
    torchrun --standalone --nproc_per_node=8 posttrain.py sft config/smollm3_sft.py  # data parallel, one node"""
init_from = "out/smollm3_mid"
out_dir = "out/smollm3_sft"
data_dir = "data/smollm3"
train_data = "data/smollm3/sft_train.jsonl"   # {"messages": [...], "enable_thinking": bool} a line
val_data = "data/smollm3/sft_val.jsonl"
seq_len = 8192                # our choice
overlong = "skip"             # never cut a reasoning trace: skip it, counted in log.jsonl
# ---- 128 rows x 8192 = 1,048,576 tokens/step (our choice) ----
batch_size = 128
micro_batch_size = 1
max_steps = 4_000             # ~4.2B tokens (our choice)
lr = 2e-5                     # the playbook
min_lr = 0.0
warmup_steps = 100
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
dtype = "bfloat16"
attn_impl = "triton"
act_ckpt = True
zero = 1                      # 8 GPUs: 55.8 GB each with AdamW's state sharded, 74.2 without (parallel.py plan)
eval_interval = 250
eval_rows = 64
ckpt_interval = 250
log_interval = 10
