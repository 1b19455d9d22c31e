"""The benchmark scripts beside the tests: the GPU report's CPU mode, and the training-step peer's loss."""
import os
import re
import subprocess
import sys

import pytest

from model import ModelConfig
from bench_train_step import bench_train_step  # tests/ is on sys.path (no __init__.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_cpu_mode_fills_every_row():
    """tests/bench_gpu.py --cpu runs every stage of the GPU report at toy sizes, so the GPU run cannot die
    of a typo: each row is filled with numbers (or the n/a of a backend a CPU lacks), the errors PASS."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    p = subprocess.run([sys.executable, "tests/bench_gpu.py", "--cpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line.split(" | ") for line in p.stdout.splitlines() if line.startswith("| ") and " | " in line]
    stages = [r[0][2:] for r in rows[2:]]
    assert stages.count("accuracy") == 2 and all(r[2].endswith("PASS |") for r in rows if r[0] == "| accuracy"), p.stdout
    ours = [r for r in rows if r[0] == "| attention" and r[1].endswith("triton (ours)")]
    assert [r[1] for r in ours] == ["T=32 causal: triton (ours)", "T=32 packed docs: triton (ours)"], p.stdout
    assert all(re.match(r"fwd [\d.]+ ms \d+ TF/s, bwd [\d.]+ ms \d+ TF/s", r[2]) for r in ours), p.stdout
    training = [r for r in rows if r[0] == "| training"]
    assert len(training) == 2 and all(re.match(r"[\d,]+ tokens/s, [\d.]+ ms/step, MFU n/a", r[2]) for r in training), p.stdout


def test_bench_train_step_loss_equals_transformers():
    """The peer computes the same loss on the same weights and rows (so the timing compares like with like)."""
    pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, rope_theta=10000.0,
                      max_position_embeddings=64)
    _, _, (ours, theirs) = bench_train_step(cfg, rows=2, seq_len=16, repeats=1)
    assert ours == pytest.approx(theirs, rel=1e-6)
