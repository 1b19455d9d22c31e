"""SmolLM3 long-context stage 2: 32k -> 64k, from stage 1's final weights.

config/smollm3_long_32k.py with what changes: rope_theta, seq_len, the batch shape, where the weights come
from and where the run goes. Same 50B tokens on the decay-stage mixture, fresh schedule.
    torchrun --standalone --nproc_per_node=8 train.py config/smollm3_long_64k.py --tp=4   # one node
TP 4: 64.0 GB a GPU (parallel.py plan); at TP 2, 97.5 GB even with ZeRO-1, the vocabulary-parallel loss alone
holding 43.6 GB for the [65,536, 64,128] logits of a row."""
base = "smollm3_long_32k.py"
rope_theta = 5_000_000.0     # 32k -> 64k
seq_len = 65536
# ---- training: 36 rows x 65536 = 2,359,296 tokens/step (the pretraining batch); 21,200 steps = 50B tokens ----
init_from = "out/smollm3_long_32k"
out_dir = "out/smollm3_long_64k"
batch_size = 36
