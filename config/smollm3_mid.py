"""SmolLM3-3B mid-training: reasoning conversations with every token in the loss, from the long-context stage's
final weights. The LR is the SFT one, the rest our choices.
    python posttrain.py mid config/smollm3_mid.py                                    # one GPU
    torchrun --standalone --nproc_per_node=8 posttrain.py mid config/smollm3_mid.py  # data parallel, one node"""
init_from = "out/smollm3_long_64k"
out_dir = "out/smollm3_mid"
data_dir = "data/smollm3"
train_data = "data/smollm3/mid_train.jsonl"   # {"messages": [...], "enable_thinking": bool} a line
val_data = "data/smollm3/mid_val.jsonl"
seq_len = 8192                # our choice; packing keeps rows full
overlong = "skip"
# ---- 128 rows x 8192 = 1,048,576 tokens/step (our choice) ----
batch_size = 128
micro_batch_size = 1
max_steps = 10_000            # ~10.5B tokens (our choice)
lr = 2e-5                     # the playbook's SFT LR; no separate mid-training number
min_lr = 0.0
warmup_steps = 200
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
dtype = "bfloat16"
attn_impl = "triton"
act_ckpt = True               # 36 layers x 8k tokens of activations otherwise
zero = 1                      # 8 GPUs: 55.8 GB each with AdamW's state sharded, 74.2 without (parallel.py plan)
eval_interval = 500
eval_rows = 64
ckpt_interval = 500
log_interval = 10
