"""Tiny GRPO (CPU): RLVR of the tiny APO checkpoint on the embedded arithmetic prompts, rewarded by eval.py's
answer checker, with DAPO's clip-higher, token-level loss and soft overlong penalty.
    python posttrain.py grpo config/tiny_grpo.py"""
init_from = "out/tiny_apo"    # the APO run (its newest checkpoint)
out_dir = "out/tiny_grpo"
data_dir = "data/default"     # rl_data "default": rl_train.jsonl there
seq_len = 640                 # a prompt (~475 tokens with the /think system block) + max_new_tokens fits
rl_data = "default"
enable_thinking = True        # /think: the worked steps first, where a small model can do the arithmetic
# ---- 4 groups x 8 completions = 32 rows/step, from up to 4 x 4 prompts rolled out; 20 steps ----
batch_size = 32
micro_batch_size = 16
group_size = 8                # the playbook's and DAPO's G is 8-16
max_new_tokens = 96           # the longest embedded reply is 52 tokens
overlong_cache = 32           # penalty from 64 tokens on, -1 at 96
format_reward = 0.0           # the answer alone is rewarded
temperature = 0.8             # at 1.0 this model samples ~3% right answers (greedy: ~15%): too little reward signal
eps_low = 0.2                 # DAPO's clip-higher: [1 - 0.2, 1 + 0.28]
eps_high = 0.28
kl_beta = 0.0                 # no reference model
scale_rewards = True
loss_agg = "dapo"
num_iterations = 1
rollout_batch = 32
sample_rounds = 4             # DAPO's dynamic sampling: without it 75-100% of a step's groups are all wrong (no gradient)
max_steps = 20
# APO's. Trials from one SFT model: 5e-4 collapsed the format, 2e-4 lost exact match. From one APO model (all 500
# math_test questions, greedy /think EM 0.124, format 0.878): this recipe, 30 steps -> 0.138, 0.898; the RL set cut
# to problems of <= 2 solution steps -> 0.134, 0.844; that set with lr 2e-4, num_iterations 2, 40 steps -> 0.100, 0.510
lr = 1e-4
min_lr = 0.0
warmup_steps = 2
schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
spike_factor = 0.0            # the loss sits near 0 and changes sign: only non-finite updates are skipped
eval_interval = 10
eval_questions = 64           # held-out math_test questions for greedy exact match (0: none)
ckpt_interval = 10
log_interval = 1
dtype = "float32"             # CPU: no autocast
