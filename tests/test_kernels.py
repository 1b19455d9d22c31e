"""Tests for kernels.py: the attention kernels against their float64 PyTorch twin, outputs and gradients.

The kernels run on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported when there is no CUDA device), at tiny shapes in fp32 and fp16: the interpreter miscomputes
bfloat16 tl.dot. On a CUDA machine they run compiled on the GPU, the fp32 cases in fp16 (the GPU path refuses fp32).
Tolerances (max|x - ref| / max|ref|): attention fp32 2e-5, fp16 5e-3 (measured errors are ~10x below).
The twin is checked against an independent oracle: torch SDPA with masks built by loops. The interpreter
accepts programs the GPU compiler rejects, so the attention kernels are also compiled for sm_90 (H100)
with Triton's compiler and ptxas, in a subprocess without the interpreter; no GPU needed.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402
from model import doc_causal_mask  # noqa: E402

f32, f16 = torch.float32, torch.float16
ATTN_TOL = {f32: 2e-5, f16: 5e-3}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRETED else "cuda"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs the kernels on CPU tensors (Triton interpreter)")


def kernel_dtype(dtype):
    """The case's dtype, fp32 as fp16 when the kernels run compiled."""
    return f16 if dtype == f32 and not INTERPRETED else dtype


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


def pos_from_docs(rows, T):
    """pos [B, T] from per-row document lengths; a negative length -n is n padding tokens."""
    pos = torch.stack([torch.cat([torch.arange(n) if n > 0 else torch.full((-n,), -1) for n in lens]) for lens in rows])
    assert pos.shape[1] == T
    return pos


def attn_inputs(B, T, H, Hkv, D, dtype, docs, seed=0):
    """Leaves, (q, k, v), pos, dO. docs: None, per-row document lengths (negative = padding), "random",
    or "fused" (random documents; q, k, v are strided views of one fused projection, the only leaf)."""
    gen = torch.Generator().manual_seed(seed)
    if docs == "fused":
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen).to(DEV, dtype).requires_grad_()
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        leaves, qkv_views = [qkv], (q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D))
    else:
        leaves = [torch.randn(B, T, n, D, generator=gen).to(DEV, dtype).requires_grad_() for n in (H, Hkv, Hkv)]
        qkv_views = tuple(leaves)
    if docs in ("random", "fused"):
        docs = [kernels._random_doc_lens(T, gen, max(4, T // 3)) for _ in range(B)]
    pos = pos_from_docs(docs, T).to(DEV) if docs is not None else None
    return leaves, qkv_views, pos, torch.randn(B, T, H, D, generator=gen).to(DEV, dtype)


def reference(q, k, v, pos, window, do):
    """attention_ref in float64: output and dq, dk, dv."""
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o = kernels.attention_ref(*ref_in, pos=pos, window=window)
    o.backward(do.double())
    return [o.detach()] + [t.grad for t in ref_in]


# (B, T, H, Hkv, D, dtype, docs, window, tma). T not a multiple of the 16/32-token blocks; the fixed
# documents have length 1, cross block edges, and are long enough for a fully visible dK/dV phase
# between two masked ones; tma=False is the pointer path of pre-Hopper GPUs.
ATTN_CASES = {
    "causal": (1, 50, 2, 2, 32, f32, None, None, True),
    "causal-gqa2-fp16": (2, 33, 4, 2, 32, f16, None, None, True),
    "docs-fixed-gqa2": (2, 100, 2, 1, 16, f32, [[2, 98], [1, 5, 30, 1, 1, 23, 16, 23]], None, True),
    "docs-fused-qkv": (2, 77, 4, 2, 16, f32, "fused", None, True),
    "docs-gqa4-fp16": (1, 48, 8, 2, 16, f16, "random", None, True),
    "docs-mqa-window": (1, 64, 4, 1, 16, f32, "random", 9, True),
    "window-mqa-fp16": (1, 45, 2, 1, 32, f16, None, 20, True),
    "padding": (2, 40, 2, 1, 16, f32, [[10, 22, -8], [10, -3, 13, 1, -13]], None, True),
    "docs-d64": (1, 40, 2, 1, 64, f32, "random", None, True),
    "pointer-path-docs-window-fp16": (1, 50, 4, 2, 32, f16, "random", 5, False),
}


@pytest.mark.parametrize("case", ATTN_CASES.values(), ids=ATTN_CASES.keys())
def test_flash_attention_matches_float64_reference(case):
    B, T, H, Hkv, D, dtype, docs, window, tma = case
    dtype = kernel_dtype(dtype)
    leaves, (q, k, v), pos, do = attn_inputs(B, T, H, Hkv, D, dtype, docs)
    o = kernels.flash_attention(q, k, v, pos, window, tma=tma)
    o.backward(do)
    grads = [t.grad for t in leaves]
    if docs == "fused":
        grads = [g.view(B, T, -1, D) for g in grads[0].split([H * D, Hkv * D, Hkv * D], dim=-1)]
    for name, x, ref in zip(("out", "dq", "dk", "dv"), [o.detach()] + grads, reference(q, k, v, pos, window, do)):
        assert x.dtype == dtype and torch.isfinite(x).all(), name
        assert rel_err(x, ref) <= ATTN_TOL[dtype], f"{name}: {rel_err(x, ref):.2e}"
    if pos is not None and (pos < 0).any():      # padding queries: exactly zero output and dq
        assert o[pos < 0].abs().max() == 0 and grads[0][pos < 0].abs().max() == 0


def test_attention_check_can_fail():
    """A window off by one must show up as a large error: the comparison above has teeth."""
    _, (q, k, v), pos, _ = attn_inputs(1, 40, 2, 1, 16, kernel_dtype(f32), "random", seed=99)
    with torch.no_grad():
        o = kernels.flash_attention(q, k, v, pos, window=7)
        assert rel_err(o, kernels.attention_ref(q.double(), k.double(), v.double(), pos, window=7)) < ATTN_TOL[q.dtype]
        assert rel_err(o, kernels.attention_ref(q.double(), k.double(), v.double(), pos, window=8)) > 1e-2


def test_flash_attention_under_autocast():
    """As model.py calls it: fp32 q/k (an fp32 qk-norm weight promotes them) next to an fp16 v under
    autocast; computed in fp16, gradients in the callers' dtypes."""
    B, T, H, Hkv, D = 1, 40, 4, 2, 16
    (q, k, v), _, pos, do = attn_inputs(B, T, H, Hkv, D, f32, "random", seed=5)
    v = v.detach().half().requires_grad_()
    with torch.autocast(DEV, dtype=f16):
        o = kernels.flash_attention(q, k, v, pos, window=T // 3)
    o.backward(do.half())
    assert (o.dtype, q.grad.dtype, k.grad.dtype, v.grad.dtype) == (f16, f32, f32, f16)
    refs = reference(q.half(), k.half(), v, pos, T // 3, do.half())
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (o.detach(), q.grad, k.grad, v.grad), refs):
        assert rel_err(x, ref) <= 5e-3, name


def test_flash_attention_in_torch_compile_equals_eager_bitwise():
    """torch.compile(fullgraph=True) on views of a fused qkv projection: the custom ops stay opaque."""
    B, T, H, Hkv, D = 1, 40, 4, 2, 16
    (qkv,), _, pos, do = attn_inputs(B, T, H, Hkv, D, kernel_dtype(f32), "fused", seed=6)

    def attend(qkv):
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return kernels.flash_attention(q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), pos, 13)
    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager")):
        qkv.grad = None
        o = fn(qkv)
        o.backward(do)
        results.append((o.detach(), qkv.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------------------------------------
# The twins and the mask folding, against independent oracles
# ---------------------------------------------------------------------------------------------------

def loop_mask(doc_lens, window=None):
    """Block-diagonal causal mask built document by document, with loops (independent of pos)."""
    T = sum(doc_lens)
    mask = torch.zeros(T, T, dtype=torch.bool)
    start = 0
    for n in doc_lens:
        for i in range(start, start + n):
            for j in range(start, i + 1):
                mask[i, j] = window is None or i - j < window
        start += n
    return mask


@pytest.mark.parametrize("doc_lens,H,Hkv,window", [
    ([13], 4, 4, None),                 # plain causal
    ([1, 6, 1, 1, 9, 5], 4, 2, None),   # length-1 documents, GQA 2
    ([10, 13], 4, 1, 4),                # MQA + sliding window
])
def test_attention_ref_matches_sdpa_with_explicit_mask(doc_lens, H, Hkv, window):
    gen = torch.Generator().manual_seed(0)
    T, D = sum(doc_lens), 8
    q = torch.randn(2, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(2, T, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(2, T, Hkv, D, generator=gen, dtype=torch.float64)
    pos = torch.cat([torch.arange(n) for n in doc_lens]).expand(2, T)
    ours = kernels.attention_ref(q, k, v, pos=pos, window=window)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=loop_mask(doc_lens, window), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_mask_by_hand_and_padding_rows_zero():
    """pos [0,1,2,0,1,-1,0,1]: two docs, a padding token that sees and is seen by nobody, a third doc."""
    pos = torch.tensor([[0, 1, 2, 0, 1, -1, 0, 1]])
    visible = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [3], 4: [3, 4], 5: [], 6: [6], 7: [6, 7]}
    want = torch.zeros(8, 8, dtype=torch.bool)
    for i, js in visible.items():
        want[i, js] = True
    assert torch.equal(doc_causal_mask(pos)[0, 0], want)
    x = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    o = kernels.attention_ref(x, x[:, :, :1], x[:, :, :1], pos=pos)
    assert torch.isfinite(o).all() and o[0, 5].abs().max() == 0


@pytest.mark.parametrize("window", [None, 3])
def test_first_visible_key_folds_the_mask(window):
    """The kernels' lo[i] (first visible key) describes exactly model.doc_causal_mask: row i sees
    [lo[i], i], padding rows have lo[i] > i, and lo never decreases (the block skipping needs it)."""
    gen = torch.Generator().manual_seed(1)
    pos = pos_from_docs([kernels._random_doc_lens(40, gen, 6) for _ in range(2)], 40)
    pos[1, 30:33] = -1                      # padding in the middle of a document
    lo = kernels._attn_lo(pos, window)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    assert torch.equal((j >= lo[:, :, None]) & (j <= i), doc_causal_mask(pos, window)[:, 0])
    assert (lo[:, 1:] >= lo[:, :-1]).all()


@interpreter_only
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_implementations_agree_with_the_reference():
    """The benchmark compares like with like: every implementation it times computes attention_ref
    (those this CPU build cannot run are skipped, as the benchmark prints them n/a)."""
    _, qkv, _, _ = attn_inputs(2, 48, 4, 2, 16, f32, None, seed=3)
    q, k, v = (t.detach() for t in qkv)      # FlexAttention refuses CPU inputs that require grad
    for doc_lens in ([[48], [48]], [[20, 28], [1, 47]]):
        pos = pos_from_docs(doc_lens, 48)
        want = kernels.attention_ref(q.double(), k.double(), v.double(), pos)
        ran = []
        for name, fn in kernels._bench_impls(pos, doc_lens, gpu=False).items():
            try:
                with torch.no_grad():
                    o = fn(q, k, v)
            except (NotImplementedError, RuntimeError):   # e.g. SDPA's cuDNN backend: no kernel on a CPU
                continue
            assert rel_err(o, want) < 2e-5, name
            ran.append(name)
        assert len(ran) >= 2 and "triton (ours)" in ran
        assert ("sdpa flash" in ran) == (len(doc_lens[0]) == 1)    # the is_causal backends on causal rows only


# ---------------------------------------------------------------------------------------------------
# Errors, the device guard, strides, the command line, the GPU compiler
# ---------------------------------------------------------------------------------------------------

def test_bad_inputs_raise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, kv = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.flash_attention(torch.randn(1, 8, 4, 48), torch.randn(1, 8, 2, 48), torch.randn(1, 8, 2, 48))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.flash_attention(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError, match="pos"):
        kernels.flash_attention(q, kv, kv, pos=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        kernels.flash_attention(q, kv, kv, window=0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.flash_attention(q[:, :0], kv[:, :0], kv[:, :0])


@interpreter_only
def test_interpreter_refuses_bfloat16_matmuls():
    """The interpreter returns errors ~1e8 from a bfloat16 tl.dot: refuse it instead of returning garbage,
    also when CPU autocast (bfloat16 by default) is what makes the inputs bfloat16."""
    x = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.flash_attention(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="bfloat16"):
        kernels.flash_attention(x.float(), x.float(), x.float())


def test_rows_view_copies_only_what_tma_cannot_read():
    """TMA descriptors need a 16-byte aligned base and row stride, and rows that do not overlap."""
    qkv = torch.randn(2, 8, 6 * 16)
    q = qkv[..., :4 * 16].view(2, 8, 4, 16)                  # a fused projection's view: read in place
    assert kernels._rows_view(q) is q
    for bad in (torch.randn(2, 4, 8, 16).transpose(1, 2),    # heads before tokens
                torch.randn(1, 1, 1, 16).expand(1, 8, 1, 16),  # row stride 0
                torch.randn(2, 8, 65)[..., :64].view(2, 8, 4, 16),  # row stride 260 bytes
                torch.randn(2 * 8 * 64 + 1)[1:].view(2, 8, 4, 16)):  # base 4 bytes off
        out = kernels._rows_view(bad)
        assert out.is_contiguous() and torch.equal(out, bad)


def test_command_line(capsys):
    """No arguments: usage, exit 2; --help: exit 0; --compile takes only the architectures it supports."""
    assert kernels.main([]) == 2
    assert "usage: kernels.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        kernels.main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        kernels.main(["--compile", "sm_75"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(arch in err for arch in kernels.COMPILE_ARCHS)


def test_attention_kernels_compile_for_h100():
    """The training configuration (head_dim 128, TMA descriptors, plain causal and document/window
    masks) compiles for sm_90 on this CPU; a subprocess, because the interpreter is on here."""
    code = ("import sys, kernels; "
            "sys.exit(0 if kernels.compile_attention('sm_90', head_dims=(128,), tma=(True,)) else 1)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert len(compiled) == 3, proc.stdout      # forward, dK/dV, dQ
