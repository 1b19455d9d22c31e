"""SmolLM3-3B GRPO / RLVR (GPU): the playbook's RL stage with DAPO's settings (Yu et al. 2025): clip-higher
eps 0.2 / 0.28, token-level loss, no KL, soft overlong penalty over the last 4k of a 20k budget, G = 16.
    torchrun --standalone --nproc_per_node=8 posttrain.py grpo config/smollm3_grpo.py --rl_data=math_rl.jsonl"""
init_from = "out/smollm3_apo"
out_dir = "out/smollm3_grpo"
data_dir = "data/smollm3"
tokenizer = "default"         # the tokenizer.json beside the start checkpoint
seq_len = 22528               # a 2k-token prompt + the 20k completion budget
attn_impl = "triton"
act_ckpt = True
zero = 1                      # 8 GPUs: a training step 73.3 GB each with AdamW's state sharded, 91.8 without (parallel.py plan)
rl_data = "default"           # {"prompt", "answer"} lines; a GSM8K / DAPO-Math style set in practice
enable_thinking = True
# ---- 32 prompts x 16 completions = 512 rollouts/step (DAPO: 512 prompts x 16 at 32B; scaled to one 8-GPU node) ----
batch_size = 512
micro_batch_size = 2          # rows per forward/backward: 2 x 22k tokens
group_size = 16
max_new_tokens = 20480        # DAPO: L_max 20,480
overlong_cache = 4096         # DAPO: L_cache 4,096 (penalty from 16,384 tokens)
format_reward = 0.0
temperature = 1.0
top_p = 1.0
eps_low = 0.2
eps_high = 0.28
kl_beta = 0.0
scale_rewards = True
loss_agg = "dapo"
num_iterations = 1
# A GPU at rollout: fp32 weights 12.3 GB + ZeRO-1's state 6.2 and flat buffer 12.3 + the bf16 twin that decodes
# (rollout_dtype "auto") 6.2 + the KV cache, 73,728 bytes/token x 22,528 columns a row: 26.6 GB for one group of
# 16 (63.5 GB in all); 64 rows would need 106 GB of cache
rollout_batch = 16
max_steps = 500
lr = 1e-6                     # DAPO: constant 1e-6 after 20 warmup steps
min_lr = 1e-6
warmup_steps = 20
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
spike_factor = 0.0
eval_interval = 50
eval_questions = 500
ckpt_interval = 50
log_interval = 1
dtype = "bfloat16"
