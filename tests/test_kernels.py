"""Tests for kernels.py.

The Triton kernels run on CPU through the Triton interpreter, which must be switched on before triton
is imported, so they run in ONE subprocess: `TRITON_INTERPRET=1 python kernels.py --check --json F
--bench --tiny`. That process compares every kernel (outputs and gradients) with its float64 PyTorch
twin at tiny shapes in fp32 and fp16 and writes one record per case; the tests below read the records.
The same process runs flash_attention under CPU autocast and inside torch.compile(fullgraph=True).
Tolerances (max|x - ref| / max|ref|): attention fp32 2e-5, fp16 5e-3; RMSNorm fp32 1e-5, fp16 2e-3;
cross-entropy fp32 1e-5, fp16 5e-3 (measured errors are ~10x below). The twins themselves are checked
here, in-process, against independent oracles: torch SDPA with hand-built masks, F.rms_norm and
F.cross_entropy. Because the interpreter accepts programs the GPU compiler rejects, the attention
kernels are also compiled for sm_90 (H100) in-process with Triton's compiler and ptxas, no GPU needed.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402


@pytest.fixture(scope="module")
def interp_run(tmp_path_factory):
    """Records of `kernels.py --check` and the stdout of `--bench --tiny`, both under the interpreter."""
    out = tmp_path_factory.mktemp("kernels") / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "kernels.py"), "--check", "--json", str(out), "--bench", "--tiny"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"kernels.py --check crashed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return {r["name"]: r for r in json.loads(out.read_text())}, proc


def _failures(records, prefix):
    chosen = {n: r for n, r in records.items() if n.startswith(prefix)}
    assert chosen, f"no '{prefix}' records"
    return chosen, [f"{n}: {r['errs']}" for n, r in chosen.items() if not r["ok"]]


def test_flash_attention_matches_float64_reference(interp_run):
    """Output, dQ, dK, dV vs attention_ref in float64, every case; padding rows exactly 0, no NaN."""
    records, _ = interp_run
    chosen, bad = _failures(records, "attention:")
    assert not bad, "\n".join(bad)
    names = " | ".join(chosen)
    # the cases must cover what the kernels promise
    for feature in ("causal", "docs fixed", "docs random", "GQA2", "GQA4", "MQA", "window", "padding rows",
                    "D=64", "fp32", "fp16", "fused-qkv", "pointer path", "control", "autocast", "torch.compile"):
        assert feature in names, f"no attention case covers {feature!r}"
    assert any(int(t) % 32 for t in re.findall(r"T=(\d+)", names)), "need T not a multiple of the block"


def test_rms_norm_matches_float64_reference(interp_run):
    records, _ = interp_run
    _, bad = _failures(records, "rms_norm:")
    assert not bad, "\n".join(bad)


def test_linear_cross_entropy_matches_float64_reference(interp_run):
    """Loss, dh, dW for mean/sum/none, z_loss, ignore_index, multi-chunk backward, all rows ignored."""
    records, _ = interp_run
    chosen, bad = _failures(records, "cross_entropy:")
    assert not bad, "\n".join(bad)
    names = " | ".join(chosen)
    for feature in ("mean", "sum", "none", "z=0.01", "ignored=100%", "chunk=32", "float16"):
        assert feature in names, f"no cross-entropy case covers {feature!r}"


def test_bench_tiny_runs_and_is_accurate(interp_run):
    """The benchmark's code path at toy size: our rows timed, fp16 errors vs fp32 small."""
    _, proc = interp_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ours = [ln for ln in lines if "triton (ours)" in ln]
    assert len(ours) == 3 and all("n/a" not in ln for ln in ours), "\n".join(lines)
    acc = [ln for ln in lines if ln.startswith("accuracy")]
    assert len(acc) == 2
    for ln in acc:
        ours_errs = [float(x) for x in re.findall(r"ours ([0-9.e+-]+)", ln)]
        assert len(ours_errs) == 4 and max(ours_errs) < 2e-3, ln


# ---------------------------------------------------------------------------------------------------
# The twins, against independent oracles (CPU, in-process, no Triton)
# ---------------------------------------------------------------------------------------------------

def _doc_causal_mask(doc_lens, window=None):
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
    mask = _doc_causal_mask(doc_lens, window)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_attention_mask_by_hand():
    """pos [0,1,2,0,1,-1,0,1]: two docs, a padding token that sees and is seen by nobody, a third doc."""
    pos = torch.tensor([[0, 1, 2, 0, 1, -1, 0, 1]])
    visible = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [3], 4: [3, 4], 5: [], 6: [6], 7: [6, 7]}
    want = torch.zeros(8, 8, dtype=torch.bool)
    for i, js in visible.items():
        want[i, js] = True
    assert torch.equal(kernels.attention_mask(8, pos)[0], want)
    # window 2 on top: i sees j when 0 <= i - j < 2
    want_w = want & (torch.arange(8)[:, None] - torch.arange(8)[None, :] < 2)
    assert torch.equal(kernels.attention_mask(8, pos, window=2)[0], want_w)
    # padding rows come out as exact zeros, not NaN
    x = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    o = kernels.attention_ref(x, x[:, :, :1], x[:, :, :1], pos=pos)
    assert torch.isfinite(o).all() and o[0, 5].abs().max() == 0


@pytest.mark.parametrize("window", [None, 3])
def test_first_visible_key_folds_the_mask(window):
    """The kernels' lo[i] (first visible key) must describe exactly the reference mask: row i sees
    [lo[i], i], and padding rows have lo[i] > i."""
    gen = torch.Generator().manual_seed(1)
    rows = [kernels._random_doc_lens(40, gen, 6) for _ in range(2)]
    pos = kernels._pos_from_docs(rows, 40)
    pos[1, 30:33] = -1                      # padding in the middle of a document
    lo = kernels._attn_lo(pos, 2, 40, window, "cpu")
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    folded = (j >= lo[:, :, None]) & (j <= i)
    assert torch.equal(folded, kernels.attention_mask(40, pos, window))
    assert (lo[:, 1:] >= lo[:, :-1]).all(), "lo must be non-decreasing for the block skipping"


def test_rms_norm_ref_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(24, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kernels.rms_norm_ref(x, w, 1e-6), F.rms_norm(x, (24,), w, 1e-6),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_linear_cross_entropy_ref_matches_torch(reduction, z_loss):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    W = torch.randn(19, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 19, (11,), generator=gen)
    y[[2, 5]] = -100
    logits = h @ W.t()
    keep = y != -100
    z = z_loss * torch.logsumexp(logits, -1) ** 2 * keep
    want = F.cross_entropy(logits, y, ignore_index=-100, reduction="none") + z
    want = {"none": want, "sum": want.sum(), "mean": want.sum() / keep.sum()}[reduction]
    got = kernels.linear_cross_entropy_ref(h, W, y, z_loss=z_loss, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if reduction == "mean" and z_loss == 0.0:
        torch.testing.assert_close(got, F.cross_entropy(logits, y), rtol=1e-12, atol=1e-12)


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
    with pytest.raises(ValueError, match="reduction"):
        kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                     reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.rms_norm(torch.randn(3, 4), torch.randn(4), 1e-6)


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="targets"):
        kernels.linear_cross_entropy(torch.randn(3, 16), torch.randn(5, 16), torch.tensor([0, 5, -100]))


def test_interpreter_refuses_bfloat16_matmuls(monkeypatch):
    """The interpreter returns errors ~1e8 from a bfloat16 tl.dot: refuse it instead of returning garbage,
    also when CPU autocast (bfloat16 by default) is what makes the inputs bfloat16."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.flash_attention(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="bfloat16"):
        kernels.flash_attention(x.float(), x.float(), x.float())
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.linear_cross_entropy(torch.randn(3, 16, dtype=torch.bfloat16),
                                     torch.randn(5, 16, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long))


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


def test_attention_kernels_compile_for_h100(capsys):
    """The interpreter runs programs the GPU compiler rejects: compile the training configuration
    (head_dim 128, TMA descriptors, plain causal and document/window masks) for sm_90 on this CPU."""
    assert kernels.compile_attention("sm_90", head_dims=(128,), paths=("desc",))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(lines) == 8 and all(ln.startswith("ok") for ln in lines), "\n".join(lines)
    assert sum("USE_DESC=True" in ln for ln in lines) == 6
