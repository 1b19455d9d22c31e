"""Training-step benchmark: forward + backward time of Model vs transformers' SmolLM3 on the same weights.

    python tests/bench_train_step.py [CONFIG] [--key=value ...]   # default: tiny.py, d_model 256, vocab 8192, [8, 512]

Both compute the mean next-token loss of the same rows in fp32 (the loss values are compared) and run backward;
the two alternate, so a busy machine slows both alike, and the median times give the ratio (ours / theirs,
< 1 is faster). transformers is only the peer: it lives beside the tests, never in project code.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from config import load, pick  # noqa: E402
from data import DataConfig  # noqa: E402
from model import Model, ModelConfig  # noqa: E402
from train import TrainConfig  # noqa: E402

# the shape issue 12 measured: tiny's earlier model (d_model 256, d_ff 688) at a larger vocabulary, 8 rows of 512
DEFAULTS = ["--d_model=256", "--d_ff=688", "--vocab_size=8192", "--micro_batch_size=8", "--seq_len=512"]


def bench_train_step(cfg, rows, seq_len, repeats=10, threads=2):
    """Median seconds of forward + backward for ours and transformers', alternating; returns (ours, theirs, losses)."""
    import tempfile
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = Model(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    x = torch.randint(cfg.vocab_size, (rows, seq_len))
    # transformers shifts its labels inside; ours are the next tokens, the last position ignored
    y = torch.cat([x[:, 1:], torch.full((rows, 1), -100)], dim=1)

    def step_ours():
        loss = ours(x, y)[1]
        loss.backward()
        return loss.item()

    def step_theirs():
        loss = theirs(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item()

    times, losses = {step_ours: [], step_theirs: []}, {}
    for i in range(repeats + 1):                               # the first round warms the allocator, untimed
        for f in (step_ours, step_theirs) if i % 2 else (step_theirs, step_ours):
            t0 = time.perf_counter()
            losses[f] = f()
            if i:
                times[f].append(time.perf_counter() - t0)
    ours.zero_grad(), theirs.zero_grad()
    return statistics.median(times[step_ours]), statistics.median(times[step_theirs]), (losses[step_ours], losses[step_theirs])


def main(argv):
    if not argv or argv[0].startswith("--"):
        argv = ["config/tiny.py", *argv]
    ns = load([argv[0], *DEFAULTS, *argv[1:]], ModelConfig, DataConfig, TrainConfig, prog="python tests/bench_train_step.py")
    cfg = ModelConfig(**pick(ns, ModelConfig))
    t_ours, t_theirs, (l_ours, l_theirs) = bench_train_step(cfg, ns.micro_batch_size, ns.seq_len)
    print(f"train step: {Model(cfg).num_params():,} parameters, vocab {cfg.vocab_size}, fp32, "
          f"[{ns.micro_batch_size}, {ns.seq_len}] rows, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"forward+backward: ours {1000 * t_ours:.0f} ms, transformers {1000 * t_theirs:.0f} ms, "
          f"ratio {t_ours / t_theirs:.3f}x (ours / theirs); loss {l_ours:.6f} vs {l_theirs:.6f}")


if __name__ == "__main__":
    main(sys.argv[1:])
