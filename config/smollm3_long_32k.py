"""SmolLM3 long-context stage 1: 4k -> 32k at a larger rope_theta, from the previous stage's final weights.

config/smollm3.py with what changes: rope_theta, seq_len, the batch shape, a fresh schedule (init_from loads
weights only; optimizer and schedule start over), and the decay-stage mixture. 50B tokens, as SmolLM3 did.
    torchrun --standalone --nproc_per_node=8 train.py config/smollm3_long_32k.py --tp=2 --zero=1   # one node"""
base = "smollm3.py"
rope_theta = 2_000_000.0     # 4k -> 32k (DESIGN; the SmolLM3 blog text says 1.5M)
seq_len = 32768
mixture = {"web": 0.63, "code": 0.24, "math": 0.13}   # the stage-3 (decay) mixture: more code and math
stages = []
# ---- training: 72 rows x 32768 = 2,359,296 tokens/step (the pretraining batch); 21,200 steps = 50B tokens ----
init_from = "out/smollm3"
out_dir = "out/smollm3_long_32k"
batch_size = 72
micro_batch_size = 1
act_ckpt = True              # one node, TP 2, ZeRO-1: 62.6 GB a GPU with it, 172.8 without (parallel.py plan)
max_steps = 21_200
lr = 1e-4                    # our choice (no published long-context LR): half the pretraining peak
warmup_steps = 500
eval_interval = 1000
eval_rows = 16
ckpt_interval = 1000
