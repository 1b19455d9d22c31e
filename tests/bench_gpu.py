"""GPU report: on a fresh CUDA machine, install the requirements and measure, in one markdown table, what
BENCHMARKS.md's GPU section asks for, within 8 minutes in all.

    python tests/bench_gpu.py          # GPU, from the repository root: pip install, then the three stages
    python tests/bench_gpu.py --cpu    # CPU: every stage's code path at toy sizes (tests/test_bench_gpu.py runs it)

Stages, each with its share of the time (a stage that fails or runs out of time is a table row saying so,
and the stages after it still run):
  accuracy    kernels.flash_attention in bf16, forward and backward, vs attention_ref in float64, on causal
              rows and packed documents (GQA, D=128), next to SDPA's bf16 error on the same inputs
  attention   python kernels.py --bench: causal T = 1k ... 16k and packed documents at 4k / 8k, ours next
              to SDPA flash / cuDNN, SDPA varlen and FlexAttention with the same mask, TFLOP/s
  training    python train.py --bench for config/smollm3_1b_ablation.py (micro-batch 4) and config/smollm3.py
              (micro-batch 3 with activation checkpointing: fp32 weights, grads and AdamW alone take ~49 GB)
"""
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 480
# toy model for the CPU mode: the configs' data and schedule keys, a model that steps in a second
CPU_MODEL = ["--vocab_size=512", "--d_model=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--d_ff=128",
             "--seq_len=64", "--attn_impl=sdpa", "--batch_size=2", "--micro_batch_size=2"]
# (label, train.py arguments on GPU) — micro-batch as each config sets it, one accumulation step
TRAIN_RUNS = [("smollm3_1b_ablation.py, micro-batch 4", ["config/smollm3_1b_ablation.py", "--bench=10", "--batch_size=4"]),
              ("smollm3.py (3B), micro-batch 3, act_ckpt", ["config/smollm3.py", "--bench=5", "--batch_size=3",
                                                              "--act_ckpt=True"])]
BENCH_LINE = re.compile(r"([\d.]+) ms/step, ([\d,]+) tokens/s .*MFU ([\d.]+%|n/a), peak memory ([\d.]+) GB")


def run(cmd, timeout):
    """(return code or 'timeout', stdout + stderr) of a subprocess in the repository root; timeout None: none."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout and max(timeout, 1))
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return "timeout", out


def errors_vs_float64(q, k, v, do, pos):
    """(name, our error, torch's SDPA's) per out/dq/dk/dv in q's dtype, each vs float64 attention_ref: max abs
    error / max abs value. SDPA runs its memory-efficient backend on GPU (the math one on CPU)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels import attention_ref, flash_attention
    from model import doc_causal_mask
    G = q.shape[2] // k.shape[2]
    results = []
    for impl in ("ref", "ours", "sdpa"):
        leaves = [t.detach().to(torch.float64 if impl == "ref" else q.dtype).requires_grad_() for t in (q, k, v)]
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2) for t in leaves)
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH):
                o = F.scaled_dot_product_attention(qh, kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1),
                                                   attn_mask=doc_causal_mask(pos)).transpose(1, 2)
        else:
            o = (attention_ref if impl == "ref" else flash_attention)(*leaves, pos)
        o.backward(do.to(o.dtype))
        results.append([o.detach()] + [t.grad for t in leaves])
    ref, ours, theirs = results
    err = lambda x, r: ((x.double() - r).abs().max() / r.abs().max()).item()   # noqa: E731
    return [(n, err(a, r), err(b, r)) for n, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref)]


def accuracy(cpu):
    """Rows for flash_attention's errors next to SDPA's, both vs float64; PASS when ours <= 2x SDPA's."""
    import torch
    import kernels
    # the Triton interpreter refuses bf16 matmuls (tests/test_kernels.py): the CPU mode checks in fp32
    dev, dtype, (H, Hkv, D, T) = ("cpu", torch.float32, (2, 1, 16, 32)) if cpu else ("cuda", torch.bfloat16, (16, 4, 128, 2048))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case, doc_lens in (("causal", [T]), ("packed docs", kernels._random_doc_lens(T, gen, max(T // 8, 2)))):
        pos = kernels._pos_of([doc_lens]).to(dev)
        q, k, v, do = (torch.randn(1, T, n, D, generator=gen).to(dev, dtype) for n in (H, Hkv, Hkv, H))
        errs = errors_vs_float64(q, k, v, do, pos)
        # bf16: ours within 2x torch's own error; fp32 errors (~1e-7) are rounding noise, a bug shows far above 1e-5
        ok = all(e <= (2 * b if dtype == torch.bfloat16 else 1e-5) for _, e, b in errs)
        rows.append(("accuracy", f"{case} T={T} H={H} Hkv={Hkv} D={D} {str(dtype)[6:]}, vs float64",
                     "; ".join(f"{n} {e:.2e} (sdpa {b:.2e})" for n, e, b in errs) + f" -> {'PASS' if ok else 'FAIL'}"))
    return rows


def attention(cpu, timeout):
    """Rows of kernels.py --bench's markdown table."""
    code, out = run([sys.executable, "kernels.py", "--bench"] + ["--tiny"] * cpu, timeout)
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| T=")]
    table = [("attention", f"{c[0]}: {c[1]}", c[2] if c[2].startswith("n/a") else
              f"fwd {c[2]} ms {c[3]} TF/s, bwd {c[4]} ms {c[5]} TF/s" + (f"; ours x{c[6]} / x{c[7]}" if c[6] else ""))
             for c in rows]
    if code != 0:
        table.append(("attention", "kernels.py --bench", f"exit {code}: {out.strip().splitlines()[-1] if out.strip() else ''}"))
    return table


def training(cpu, label, args, timeout):
    args = [args[0], "--bench=1"] + CPU_MODEL if cpu else args
    code, out = run([sys.executable, "train.py"] + args, timeout)
    m = BENCH_LINE.search(out)
    if code != 0 or not m:
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        return [("training", label, f"exit {code}: {tail[:200]}")]
    return [("training", label, f"{m[2]} tokens/s, {m[1]} ms/step, MFU {m[3]}, peak memory {m[4]} GB")]


def main(argv):
    cpu = argv == ["--cpu"]
    if argv and not cpu:
        sys.exit("usage: python tests/bench_gpu.py [--cpu]")
    t0 = time.perf_counter()
    # the CPU mode checks code paths, not time: a loaded CI machine must not turn its stages into timeouts
    left = lambda: None if cpu else BUDGET_S - (time.perf_counter() - t0)  # noqa: E731
    rows = []
    if cpu:
        rows.append(("install", "pip install -r requirements.txt", "skipped (--cpu)"))
    else:
        code, out = run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], 180)
        rows.append(("install", "pip install -r requirements.txt", "ok" if code == 0 else f"exit {code}: {out[-200:]}"))
    sys.path.insert(0, ROOT)
    try:
        import torch
        if not cpu and not torch.cuda.is_available():
            sys.exit("tests/bench_gpu.py: no CUDA device; on a CPU run it with --cpu")
        if cpu:
            os.environ["TRITON_INTERPRET"] = "1"     # read when triton is imported (by kernels)
        rows += accuracy(cpu)
    except Exception as e:
        rows.append(("accuracy", "flash_attention vs float64", f"failed: {type(e).__name__}: {e}"))
    # what is left after install and accuracy: ~45% to the attention table, the rest to the two training runs
    rows += attention(cpu, left() and 0.45 * left())
    for i, (label, args) in enumerate(TRAIN_RUNS):
        rows += training(cpu, label, args, left() and left() / (len(TRAIN_RUNS) - i))
    print("\n| stage | case | result |\n|---|---|---|")
    for stage, case, result in rows:
        print(f"| {stage} | {case} | {result} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all" + (" (CPU mode: toy sizes, timings meaningless)" if cpu else ""))
    return 0 if all("FAIL" not in r and "exit" not in r and "failed" not in r for _, _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
