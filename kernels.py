"""Triton kernels for nanosmol: FlashAttention (forward + backward) with document masking, GQA and
sliding windows; fused RMSNorm; fused linear + cross-entropy. Each has a plain PyTorch twin.

    flash_attention(q, k, v, pos=None, window=None) -> o      q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]
    attention_ref(q, k, v, pos=None, window=None)  -> o      explicit boolean mask, any dtype (float64 too)
    rms_norm(x, weight, eps) / rms_norm_ref(...)
    linear_cross_entropy(h, W, y, ignore_index=-100, z_loss=0.0, reduction="mean") / linear_cross_entropy_ref(...)

Masking. Query i sees key j when j <= i, both are in the same document (doc id = cumsum(pos == 0) per
row, as in model.py), and i - j < window when a window is given. Because documents are contiguous, all
of this folds into one number per query: lo[i], the first key it may see, so the visible keys of i
are exactly [lo[i], i]. lo is non-decreasing along a row, which gives the block skipping for free: a
query block [m0, m0+BM) needs keys from lo[m0] to m0+BM-1, and a key block [n0, n0+BN) is needed by
queries from n0 up to the last i with lo[i] <= n0+BN-1 (one torch.searchsorted per backward). Cost is
therefore ~ sum of L_i^2 over documents, not T^2. Each loop runs in three phases -- masked blocks
before the fully visible ones, fully visible blocks with no mask arithmetic at all, masked blocks on
the diagonal -- so the mask costs only where a block straddles a boundary. pos < 0 marks padding: such
a token attends to nothing (its output and gradients are exactly 0, no NaN) and ends the document
before it, so nothing attends to it either.

Algorithm (FlashAttention-2, Dao 2023). Forward: online softmax in base 2 (exp2 with the 1/sqrt(D)
scale folded into log2(e)), the row max starts at -1e30 rather than -inf so that a row which has seen
no key yet never computes (-inf) - (-inf); the log-sum-exp is saved (+inf for rows that saw nothing,
which makes every recomputed probability 0). Backward: delta = rowsum(dO * O) in a small preprocess
kernel, then two kernels that recompute P from the saved log-sum-exp: one per key block for dK/dV,
one per query block for dQ. Keeping dQ in its own kernel costs two extra matmuls per tile but needs
no atomics, so gradients are deterministic. GQA: the dK/dV program of a KV head loops over the query
heads of its group and sums their contributions in registers; K/V are never repeated in memory.
Grids put (batch, head) on axis 0 and blocks on axis 1 ordered heaviest first (last query blocks in
forward/dQ, first key blocks in dK/dV), so causal imbalance does not leave a long tail.

Hopper. Matmul inputs stay in the storage dtype (bf16/fp16; a tl.constexpr, so the CPU interpreter
tests run fp32/fp16 -- the interpreter miscomputes bf16 tl.dot), accumulation is fp32. On compute
capability >= 9 the tiles read inside the loops come through TMA tensor descriptors over the
[B*T, heads*D] view of each tensor (rows past a sequence end belong to the next one and are masked in
the math); older GPUs use masked pointer loads. Block sizes come from a small table per head_dim
(_attn_config; 128x64 tiles, 8 warps, 3 stages for D=128), no autotuning, so that the interpreter
runs the very same launch path.

Training integration. The attention forward and backward are torch custom ops joined by
register_autograd, so torch.compile(fullgraph=True) keeps them as opaque nodes (no graph break, no
tracing of Triton launches); q/k/v may be strided views of a fused projection (TMA needs 16-byte
aligned row strides, anything else is copied); under torch.autocast the inputs are cast to the autocast
dtype and the gradients come back in the callers' dtypes. The interpreter miscomputes bfloat16 tl.dot,
so under TRITON_INTERPRET=1 the matmul kernels refuse bfloat16 instead of returning garbage.

RMSNorm: one row per program forward (fp32 math, saves 1/rms); backward writes dX and per-program
partial dW sums that torch adds up. Cross-entropy: the logits h @ W^T are computed tile by tile inside
a Triton matmul whose epilogue keeps an online log-sum-exp and picks the target logit, so the forward
writes no [N, V] tensor at all; the backward recomputes logits per vocabulary chunk in the same way,
writes softmax - onehot (+ the z-loss term) for that chunk in the input dtype, and lets cuBLAS do the
two gradient matmuls. Rows with y == ignore_index are dropped before any matmul (SFT masks many).

Run:
    TRITON_INTERPRET=1 python kernels.py --check     # CPU: every kernel vs its float64 twin, tiny shapes
    python kernels.py --check                        # GPU: real shapes in bf16/fp16; tolerance 2x torch's error
    python kernels.py --bench [--head_dim 64]        # GPU: TFLOP/s vs SDPA flash/cuDNN, varlen, FlexAttention
    python kernels.py --bench --tiny                 # CPU: the benchmark's code path at toy size
    python kernels.py --tune [--head_dim 64]         # GPU: search block sizes for _ATTN_CONFIGS
    python kernels.py --compile sm_90                # CPU: compile the attention kernels for an H100
    python kernels.py                                # all of the above that this machine can run
On CPU the script re-runs itself under TRITON_INTERPRET=1 (triton reads it at import). The pytest
suite (tests/test_kernels.py) runs `--check --bench --tiny` in one interpreter subprocess.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(t, what, matmul=True):
    """Triton runs on CUDA, or on CPU under the interpreter; say so plainly otherwise. The interpreter
    returns garbage (errors ~1e8) from a bfloat16 tl.dot, so kernels with matmuls refuse bf16 there."""
    if t.device.type == "cpu" and _interpreting():
        if matmul and t.dtype == torch.bfloat16:
            raise ValueError(f"kernels.{what}: the Triton interpreter miscomputes bfloat16 matmuls; use "
                             f"float16 or float32 under TRITON_INTERPRET=1")
        return
    if not t.is_cuda:
        raise ValueError(f"kernels.{what}: needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got a tensor on {t.device}; use the PyTorch twin on CPU")


def _on_device(t):
    """Context for launching on t's GPU: Triton launches on the current CUDA device, which need not be
    the one holding the tensors (e.g. train.py with device="cuda:1"). Autograd already runs backward
    passes on a thread bound to the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _autocast(*tensors):
    """The tensors in the autocast dtype when torch.autocast is on for their device (as F.linear and
    SDPA would compute), else unchanged; autograd casts the gradients back."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


# ----------------------------------------------------------------------------------------------------
# Attention: PyTorch twin
# ----------------------------------------------------------------------------------------------------

def attention_mask(T, pos=None, window=None, device=None):
    """Explicit boolean mask [B or 1, T, T]: True where query i may attend to key j."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    mask = (j <= i)[None]
    if window is not None:
        mask = mask & (i - j < window)[None]
    if pos is not None:
        doc = torch.cumsum(pos <= 0, dim=1)  # = cumsum(pos == 0) without padding; padding ends a doc
        real = pos >= 0
        mask = mask & (doc[:, :, None] == doc[:, None, :]) & real[:, :, None] & real[:, None, :]
    return mask


def attention_ref(q, k, v, pos=None, window=None):
    """Plain softmax attention in the inputs' dtype, same contract as flash_attention."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    qh = q.transpose(1, 2)                                        # [B, H, T, D]
    kh = k.transpose(1, 2).repeat_interleave(G, dim=1)            # [B, H, T, D]
    vh = v.transpose(1, 2).repeat_interleave(G, dim=1)
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(D)                # [B, H, T, T]
    mask = attention_mask(T, pos, window, q.device)[:, None]      # [B or 1, 1, T, T]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~mask, 0.0)          # rows that see nothing: 0, not NaN
    return (p @ vh).transpose(1, 2)                               # [B, T, H, D]


# ----------------------------------------------------------------------------------------------------
# Attention: Triton kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(ptr, desc, row, col, t, T, stride_r, BLOCK: tl.constexpr, D: tl.constexpr,
               USE_DESC: tl.constexpr, BOUNDS: tl.constexpr):
    """[BLOCK, D] tile of the [rows, cols] view at (row, col); t is the token index of `row`.

    Without BOUNDS the caller guarantees t + BLOCK <= T. With a descriptor, rows past T are the next
    sequence's (or zeros past the tensor): callers mask them out in the math, never store them."""
    if USE_DESC:
        x = desc.load([row, col])
    else:
        r = tl.arange(0, BLOCK)
        ptrs = ptr + (row + r)[:, None].to(tl.int64) * stride_r + col + tl.arange(0, D)[None, :]
        if BOUNDS:
            x = tl.load(ptrs, mask=(t + r)[:, None] < T, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _kv_bounds(LO, b, m0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr):
    """Key-block phases of query block [m0, m0+BLOCK_M): masked [start, full_lo), unmasked
    [full_lo, full_hi), masked [full_hi, end). lo is non-decreasing, so its first and last values in
    the block bound it."""
    end = tl.minimum(m0 + BLOCK_M, T)
    if HAS_LO:
        lo_first = tl.load(LO + b * T + m0)
        lo_last = tl.load(LO + b * T + end - 1)
        start = lo_first // BLOCK_N * BLOCK_N
        full_lo = tl.minimum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, end)
    else:
        start = 0
        full_lo = 0
    # a key block is fully visible when its last key n0+BLOCK_N-1 <= m0, the block's first query
    full_hi = tl.maximum((m0 + 1) // BLOCK_N * BLOCK_N, full_lo)
    return start, full_lo, full_hi, end


@triton.jit
def _fwd_steps(acc, l_i, m_i, q, K, V, desc_k, desc_v, kv_row0, col_kv, stride_kr, stride_vr,
               offs_m, lo_m, n_start, n_end, T, qk_scale,
               BLOCK_N: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr, HAS_LO: tl.constexpr,
               MASK: tl.constexpr, USE_DESC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        k = _load_rows(K, desc_k, kv_row0 + n0, col_kv, n0, T, stride_kr, BLOCK_N, D, USE_DESC, MASK)
        v = _load_rows(V, desc_v, kv_row0 + n0, col_kv, n0, T, stride_vr, BLOCK_N, D, USE_DESC, MASK)
        s = tl.dot(q, tl.trans(k))                                          # [BM, BN] raw scores
        if MASK:
            j = n0 + offs_n
            visible = j[None, :] <= offs_m[:, None]
            if HAS_LO:
                visible = visible & (j[None, :] >= lo_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DTYPE), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, LO, desc_k, desc_v, qk_scale, T, H, G,
              stride_qr, stride_kr, stride_vr, stride_or,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
              HAS_LO: tl.constexpr, USE_DESC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M    # heaviest (latest) blocks first
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_seq = offs_m < T
    q = _load_rows(Q, Q, b * T + m0, h * D, m0, T, stride_qr, BLOCK_M, D, False, True)
    if HAS_LO:
        lo_m = tl.load(LO + b * T + offs_m, mask=in_seq, other=0)
    else:
        lo_m = offs_m
    start, full_lo, full_hi, end = _kv_bounds(LO, b, m0, T, BLOCK_M, BLOCK_N, HAS_LO)

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    col_kv = (h // G) * D
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, K, V, desc_k, desc_v, b * T, col_kv, stride_kr, stride_vr,
                               offs_m, lo_m, start, full_lo, T, qk_scale,
                               BLOCK_N, D, DTYPE, HAS_LO, True, USE_DESC)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, K, V, desc_k, desc_v, b * T, col_kv, stride_kr, stride_vr,
                               offs_m, lo_m, full_lo, full_hi, T, qk_scale,
                               BLOCK_N, D, DTYPE, HAS_LO, False, USE_DESC)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, K, V, desc_k, desc_v, b * T, col_kv, stride_kr, stride_vr,
                               offs_m, lo_m, full_hi, end, T, qk_scale,
                               BLOCK_N, D, DTYPE, HAS_LO, True, USE_DESC)
    seen = l_i > 0.0                                       # False only for rows that see no key (padding)
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    rows = (b * T + offs_m).to(tl.int64)
    tl.store(O + rows[:, None] * stride_or + h * D + tl.arange(0, D)[None, :], o.to(DTYPE),
             mask=in_seq[:, None])
    tl.store(LSE + (b * H + h) * T + offs_m, lse, mask=in_seq)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, T, H, stride_or, stride_dor, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward term shared by every key of a row."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    m0 = tl.program_id(1) * BLOCK_M
    o = _load_rows(O, O, b * T + m0, h * D, m0, T, stride_or, BLOCK_M, D, False, True)
    do = _load_rows(DO, DO, b * T + m0, h * D, m0, T, stride_dor, BLOCK_M, D, False, True)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, LO, desc_q, desc_do, row0, col_q, stat0,
                stride_qr, stride_dor, offs_n, m_start, m_end, T, qk_scale,
                BLOCK_M: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr, HAS_LO: tl.constexpr,
                MASK: tl.constexpr, USE_DESC: tl.constexpr):
    # transposed orientation ([BN, BM] tiles): P^T and dS^T feed the next dots as the left operand
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, desc_q, row0 + m0, col_q, m0, T, stride_qr, BLOCK_M, D, USE_DESC, MASK)
        do = _load_rows(DO, desc_do, row0 + m0, col_q, m0, T, stride_dor, BLOCK_M, D, USE_DESC, MASK)
        if MASK:
            # rows past T get lse = +inf, hence P = 0: they add nothing
            in_seq = offs_m < T
            lse = tl.load(LSE + stat0 + offs_m, mask=in_seq, other=float("inf"))
            delta = tl.load(DELTA + stat0 + offs_m, mask=in_seq, other=0.0)
        else:
            lse = tl.load(LSE + stat0 + offs_m)
            delta = tl.load(DELTA + stat0 + offs_m)
        sT = tl.dot(k, tl.trans(q))                                         # [BN, BM]
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        if MASK:
            visible = offs_m[None, :] >= offs_n[:, None]
            if HAS_LO:
                lo_m = tl.load(LO + row0 + offs_m, mask=in_seq, other=0)
                visible = visible & (offs_n[:, None] >= lo_m[None, :])
            pT = tl.where(visible, pT, 0.0)
        dv = tl.dot(pT.to(DTYPE), do, dv)
        dpT = tl.dot(v, tl.trans(do))                                       # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(DTYPE), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, LO, QRANGE, desc_q, desc_do, qk_scale, sm_scale,
                   T, H, G, stride_qr, stride_kr, stride_vr, stride_dor, stride_dkr, stride_dvr,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                   HAS_LO: tl.constexpr, USE_DESC: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    Hkv = H // G
    bhk = tl.program_id(0)
    b = bhk // Hkv
    hk = bhk % Hkv
    nb = tl.program_id(1)          # key block 0 has the most queries: heaviest first already
    n0 = nb * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K, K, b * T + n0, hk * D, n0, T, stride_kr, BLOCK_N, D, False, True)
    v = _load_rows(V, V, b * T + n0, hk * D, n0, T, stride_vr, BLOCK_N, D, False, True)
    if HAS_LO:
        # queries that see any key of the block end at q_end; those before q_full see all of it
        q_end = tl.load(QRANGE + (b * tl.num_programs(1) + nb) * 2)
        q_full = tl.load(QRANGE + (b * tl.num_programs(1) + nb) * 2 + 1)
    else:
        q_end = T
        q_full = T
    diag_end = tl.minimum(n0 + BLOCK_N, q_end)
    full_end = diag_end + tl.maximum(q_full - diag_end, 0) // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        stat0 = (b * H + h) * T
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, LO, desc_q, desc_do, b * T, h * D, stat0,
                             stride_qr, stride_dor, offs_n, n0, diag_end, T, qk_scale,
                             BLOCK_M, D, DTYPE, HAS_LO, True, USE_DESC)
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, LO, desc_q, desc_do, b * T, h * D, stat0,
                             stride_qr, stride_dor, offs_n, diag_end, full_end, T, qk_scale,
                             BLOCK_M, D, DTYPE, HAS_LO, False, USE_DESC)
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, LO, desc_q, desc_do, b * T, h * D, stat0,
                             stride_qr, stride_dor, offs_n, full_end, q_end, T, qk_scale,
                             BLOCK_M, D, DTYPE, HAS_LO, True, USE_DESC)
    rows = (b * T + offs_n).to(tl.int64)
    cols = hk * D + tl.arange(0, D)[None, :]
    keep = (offs_n < T)[:, None]
    tl.store(DK + rows[:, None] * stride_dkr + cols, (dk * sm_scale).to(DTYPE), mask=keep)
    tl.store(DV + rows[:, None] * stride_dvr + cols, dv.to(DTYPE), mask=keep)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, K, V, desc_k, desc_v, kv_row0, col_kv, stride_kr, stride_vr,
              offs_m, lo_m, n_start, n_end, T, qk_scale,
              BLOCK_N: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr, HAS_LO: tl.constexpr,
              MASK: tl.constexpr, USE_DESC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        k = _load_rows(K, desc_k, kv_row0 + n0, col_kv, n0, T, stride_kr, BLOCK_N, D, USE_DESC, MASK)
        v = _load_rows(V, desc_v, kv_row0 + n0, col_kv, n0, T, stride_vr, BLOCK_N, D, USE_DESC, MASK)
        s = tl.dot(q, tl.trans(k))                                          # [BM, BN]
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            j = n0 + offs_n
            visible = j[None, :] <= offs_m[:, None]
            if HAS_LO:
                visible = visible & (j[None, :] >= lo_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))                                        # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DTYPE), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, LO, desc_k, desc_v, qk_scale, sm_scale, T, H, G,
                 stride_qr, stride_kr, stride_vr, stride_dor, stride_dqr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                 HAS_LO: tl.constexpr, USE_DESC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_seq = offs_m < T
    q = _load_rows(Q, Q, b * T + m0, h * D, m0, T, stride_qr, BLOCK_M, D, False, True)
    do = _load_rows(DO, DO, b * T + m0, h * D, m0, T, stride_dor, BLOCK_M, D, False, True)
    lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=in_seq, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=in_seq, other=0.0)
    if HAS_LO:
        lo_m = tl.load(LO + b * T + offs_m, mask=in_seq, other=0)
    else:
        lo_m = offs_m
    start, full_lo, full_hi, end = _kv_bounds(LO, b, m0, T, BLOCK_M, BLOCK_N, HAS_LO)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    col_kv = (h // G) * D
    dq = _dq_steps(dq, q, do, lse, delta, K, V, desc_k, desc_v, b * T, col_kv, stride_kr, stride_vr,
                   offs_m, lo_m, start, full_lo, T, qk_scale, BLOCK_N, D, DTYPE, HAS_LO, True, USE_DESC)
    dq = _dq_steps(dq, q, do, lse, delta, K, V, desc_k, desc_v, b * T, col_kv, stride_kr, stride_vr,
                   offs_m, lo_m, full_lo, full_hi, T, qk_scale, BLOCK_N, D, DTYPE, HAS_LO, False, USE_DESC)
    dq = _dq_steps(dq, q, do, lse, delta, K, V, desc_k, desc_v, b * T, col_kv, stride_kr, stride_vr,
                   offs_m, lo_m, full_hi, end, T, qk_scale, BLOCK_N, D, DTYPE, HAS_LO, True, USE_DESC)
    rows = (b * T + offs_m).to(tl.int64)
    tl.store(DQ + rows[:, None] * stride_dqr + h * D + tl.arange(0, D)[None, :], (dq * sm_scale).to(DTYPE),
             mask=in_seq[:, None])


# ----------------------------------------------------------------------------------------------------
# Attention: host side
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by head_dim. Hopper sizing: the forward keeps
# Q (BM x D) in shared memory plus num_stages K/V tiles; 128x64 at D=128 with 3 stages is ~128 KB.
# dK/dV holds its K/V block and two fp32 accumulators in registers, hence 64-row query steps.
_ATTN_CONFIGS = {
    64: {"fwd": (128, 64, 4, 3), "dkdv": (64, 128, 8, 3), "dq": (128, 64, 8, 3)},
    128: {"fwd": (128, 64, 8, 3), "dkdv": (64, 128, 8, 2), "dq": (128, 64, 8, 2)},
}
# The interpreter costs ~3 ms per program per loop step whatever the tile, and the tests want several
# blocks per sequence at T ~ 50-100, with BLOCK_M != BLOCK_N to catch mixed-up indices.
_INTERP_CONFIG = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "desc": True}


def _attn_config(D, device):
    if _interpreting():
        return _INTERP_CONFIG
    # TMA descriptors: NVIDIA Hopper and later (ROCm reports its own "capabilities"; pointer path there)
    tma = torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    return dict(_ATTN_CONFIGS[64 if D <= 64 else 128], desc=tma)


def _rows_view(x):
    """x [B, T, heads, D] in a layout whose tokens are rows of a 2-D [B*T, heads*D] view with a
    16-byte aligned row stride no smaller than a row (what TMA descriptors need); copies only when x
    is not (a view of a fused qkv projection qualifies; an expanded or transposed tensor does not)."""
    B, T, nh, D = x.shape
    ok = (x.stride(3) == 1 and (nh == 1 or x.stride(2) == D) and x.stride(1) >= nh * D
          and (B == 1 or x.stride(0) == T * x.stride(1))
          and (x.stride(1) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0)
    return x if ok else x.contiguous()


def _desc(x, block_rows, use):
    """TMA descriptor over the [B*T, heads*D] rows of x, or x itself for the pointer path."""
    if not use:
        return x
    B, T, nh, D = x.shape
    return TensorDescriptor(x, [B * T, nh * D], [x.stride(1), 1], [block_rows, D])


def _attn_lo(pos, B, T, window, device):
    """First visible key of each query, int32 [B, T] (non-decreasing along T); None = plain causal."""
    if pos is None and window is None:
        return None
    t = torch.arange(T, device=device, dtype=torch.int32)
    if pos is None:
        lo = torch.zeros(B, T, device=device, dtype=torch.int32)
    else:
        # a document starts at pos == 0; a padding token (pos < 0) starts an empty one after itself
        starts = torch.where(pos == 0, t, torch.where(pos < 0, t + 1, 0)).to(torch.int32)
        lo = starts.cummax(dim=1).values
    if window is not None:
        lo = torch.maximum(lo, t - (window - 1))
    return lo.contiguous()


def _dkdv_query_ranges(lo, BLOCK_N):
    """int32 [B, n_blocks, 2]: per key block [n0, n0+BLOCK_N), the end of the queries that see any of
    it (lo <= n0+BLOCK_N-1) and the end of those that see all of it (lo <= n0)."""
    B, T = lo.shape
    n0 = torch.arange(0, T, BLOCK_N, device=lo.device, dtype=torch.int32)
    targets = torch.stack([n0 + BLOCK_N - 1, n0], dim=1).reshape(1, -1).expand(B, -1).contiguous()
    return torch.searchsorted(lo, targets, right=True).to(torch.int32).contiguous()


# The attention is a pair of torch custom ops (forward, backward) tied by register_autograd rather than
# an autograd.Function: torch.compile then treats each as one opaque node (no graph break, no attempt
# to trace Triton launches or TMA descriptors), and eager autograd works the same way. A launch
# config crosses the op boundary as a flat int list, [] meaning "the default for this head_dim/GPU".
_KERNELS = ("fwd", "dkdv", "dq")


def _cfg_ints(cfg):
    return [x for name in _KERNELS for x in cfg[name]] + [int(cfg["desc"])]


def _cfg_dict(ints, D, device):
    if not ints:
        return _attn_config(D, device)
    return dict({name: tuple(ints[4 * i:4 * i + 4]) for i, name in enumerate(_KERNELS)}, desc=bool(ints[12]))


@torch.library.custom_op("nanosmol::flash_attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: Optional[torch.Tensor],
                 cfg: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, T, H, D] (contiguous, q's dtype) and the log-sum-exp [B, H, T] (fp32, base 2)."""
    q, k, v = _rows_view(q), _rows_view(k), _rows_view(v)
    B, T, H, D = q.shape
    G = H // k.shape[2]
    cfg = _cfg_dict(cfg, D, q.device)
    BM, BN, warps, stages = cfg["fwd"]
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(D)
    with _on_device(q):
        _attn_fwd[(B * H, triton.cdiv(T, BM))](
            q, k, v, o, lse, lo if lo is not None else q,
            _desc(k, BN, cfg["desc"]), _desc(v, BN, cfg["desc"]), sm_scale * LOG2E, T, H, G,
            q.stride(1), k.stride(1), v.stride(1), o.stride(1),
            D=D, BLOCK_M=BM, BLOCK_N=BN, DTYPE=_TL_DTYPE[q.dtype], HAS_LO=lo is not None,
            USE_DESC=cfg["desc"], num_warps=warps, num_stages=stages)
    return o, lse


@_attn_fwd_op.register_fake
def _(q, k, v, lo, cfg):
    B, T, H, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanosmol::flash_attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, lo: Optional[torch.Tensor], cfg: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, contiguous, in q's dtype."""
    q, k, v, do = _rows_view(q), _rows_view(k), _rows_view(v), _rows_view(do)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    cfg = _cfg_dict(cfg, D, q.device)
    sm_scale = 1.0 / math.sqrt(D)
    dtype = _TL_DTYPE[q.dtype]
    has_lo = lo is not None
    delta = torch.empty_like(lse)
    dq = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, T, Hkv, D, device=q.device, dtype=q.dtype)
    dv = torch.empty_like(dk)
    BM1, BN1, warps1, stages1 = cfg["dkdv"]
    BM2, BN2, warps2, stages2 = cfg["dq"]
    qrange = _dkdv_query_ranges(lo, BN1) if has_lo else lse
    with _on_device(q):
        _attn_bwd_delta[(B * H, triton.cdiv(T, 64))](o, do, delta, T, H, o.stride(1), do.stride(1),
                                                      D=D, BLOCK_M=64)
        _attn_bwd_dkdv[(B * Hkv, triton.cdiv(T, BN1))](
            q, k, v, do, dk, dv, lse, delta, lo if has_lo else lse, qrange,
            _desc(q, BM1, cfg["desc"]), _desc(do, BM1, cfg["desc"]), sm_scale * LOG2E, sm_scale, T, H, G,
            q.stride(1), k.stride(1), v.stride(1), do.stride(1), dk.stride(1), dv.stride(1),
            D=D, BLOCK_M=BM1, BLOCK_N=BN1, DTYPE=dtype, HAS_LO=has_lo, USE_DESC=cfg["desc"],
            num_warps=warps1, num_stages=stages1)
        _attn_bwd_dq[(B * H, triton.cdiv(T, BM2))](
            q, k, v, do, dq, lse, delta, lo if has_lo else lse,
            _desc(k, BN2, cfg["desc"]), _desc(v, BN2, cfg["desc"]), sm_scale * LOG2E, sm_scale, T, H, G,
            q.stride(1), k.stride(1), v.stride(1), do.stride(1), dq.stride(1),
            D=D, BLOCK_M=BM2, BLOCK_N=BN2, DTYPE=dtype, HAS_LO=has_lo, USE_DESC=cfg["desc"],
            num_warps=warps2, num_stages=stages2)
    return dq, dk, dv


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, lo, cfg):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, lo, cfg = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, lo)
    ctx.cfg = cfg


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse, lo = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, lo, ctx.cfg)
    return dq, dk, dv, None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


def _flash_attention(q, k, v, lo, cfg=None):
    """o = softmax(q k^T / sqrt(D) + mask) v with the mask given by lo (see the file docstring);
    cfg None = the launch config of _attn_config."""
    return _attn_fwd_op(q, k, v, lo, _cfg_ints(cfg) if cfg else [])[0]


def _check_attn_args(q, k, v, pos, window):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"kernels.flash_attention: expected q [B,T,H,D] and k, v [B,T,Hkv,D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or H % k.shape[2] != 0 or B * T == 0:
        raise ValueError(f"kernels.flash_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         f"(same B, T, D; B, T >= 1; H a multiple of Hkv)")
    if D not in (16, 32, 64, 128):
        raise ValueError(f"kernels.flash_attention: head_dim must be 16, 32, 64 or 128, got {D}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _TL_DTYPE:
        raise ValueError(f"kernels.flash_attention: q, k, v must share one of float16/bfloat16/float32, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"kernels.flash_attention: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q.is_cuda and q.dtype == torch.float32:
        raise ValueError("kernels.flash_attention: on GPU use float16 or bfloat16 (float32 is for the "
                         "CPU interpreter tests), or call it under torch.autocast")
    if pos is not None and (pos.shape != (B, T) or pos.dtype.is_floating_point):
        raise ValueError(f"kernels.flash_attention: pos must be an integer tensor [B, T] = [{B}, {T}], "
                         f"got {pos.dtype} {tuple(pos.shape)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"kernels.flash_attention: window must be None or an int >= 1, got {window!r}")
    _check_device(q, "flash_attention")


def flash_attention(q, k, v, pos=None, window=None):
    """Causal attention with document masking (pos), GQA and an optional sliding window.

    q [B, T, H, D], k/v [B, T, Hkv, D] (any strides), pos [B, T] int or None -> o [B, T, H, D]
    (contiguous). Under torch.autocast q, k, v are first cast to the autocast dtype, as torch's own
    attention is; gradients come back in the callers' dtypes."""
    q, k, v = _autocast(q, k, v)
    _check_attn_args(q, k, v, pos, window)
    B, T = q.shape[:2]
    lo = _attn_lo(pos.to(q.device) if pos is not None else None, B, T, window, q.device)
    return _flash_attention(q, k, v, lo)


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------

def rms_norm_ref(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in at least float32, returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    return y.to(x.dtype)


@triton.jit
def _rms_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=keep, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=keep)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(X, W, DY, DX, DW_PART, RSTD, stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_prog,
             BLOCK: tl.constexpr):
    # dx = rstd * (w*dy - xhat * mean(w*dy*xhat)),  dw = sum_rows dy * xhat  (xhat = x * rstd)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    keep = cols < n_cols
    w = tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_prog
    for r in range(row0, tl.minimum(row0 + rows_per_prog, n_rows)):
        x = tl.load(X + r * stride_x + cols, mask=keep, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=keep, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        wdy = w * dy
        dx = (wdy - xhat * (tl.sum(wdy * xhat, 0) / n_cols)) * rstd
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=keep)
        dw += dy * xhat
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=keep)


def _n_programs(n, per_sm, device):
    """Enough programs to fill the GPU (a handful under the interpreter), at most n."""
    if _interpreting():
        return max(1, min(n, 4))
    return max(1, min(n, per_sm * torch.cuda.get_device_properties(device).multi_processor_count))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty(n_rows, n_cols, device=x.device, dtype=x.dtype)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(n_cols)
        with _on_device(x):
            _rms_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block,
                                num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(n_rows, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        progs = _n_programs(n_rows, 4, x2.device)
        dw_part = torch.empty(progs, n_cols, device=x2.device, dtype=torch.float32)
        block = triton.next_power_of_2(n_cols)
        _rms_bwd[(progs,)](x2, weight, dy2, dx, dw_part, rstd, x2.stride(0), dy2.stride(0), dx.stride(0),
                           n_rows, n_cols, triton.cdiv(n_rows, progs), BLOCK=block,
                           num_warps=min(16, max(1, block // 256)))
        return dx.view(dy.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim of x [..., D] with weight [D]; autograd-capable."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"kernels.rms_norm: weight must be [D] with D = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if x.shape[-1] > 65536:
        raise ValueError(f"kernels.rms_norm: rows longer than 65536 are not supported, got {x.shape[-1]}")
    _check_device(x, "rms_norm", matmul=False)
    return _RMSNorm.apply(x, weight, float(eps))


# ----------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# ----------------------------------------------------------------------------------------------------

def linear_cross_entropy_ref(h, W, y, ignore_index=-100, z_loss=0.0, reduction="mean"):
    """Same contract as linear_cross_entropy, computed in float64 with full logits."""
    logits = h.double() @ W.double().t()                             # [N, V]
    keep = y != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
    loss = torch.where(keep, lse - target + z_loss * lse * lse, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp(min=1)


@triton.jit
def _logits_tile(Hm, Wm, rows, cols, N, V, D, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_V] tile of h @ W^T."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        a = tl.load(Hm + rows[:, None].to(tl.int64) * stride_h + kk[None, :],
                    mask=(rows[:, None] < N) & (kk[None, :] < D), other=0.0)
        w = tl.load(Wm + cols[:, None].to(tl.int64) * stride_w + kk[None, :],
                    mask=(cols[:, None] < V) & (kk[None, :] < D), other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lce_fwd(Hm, Wm, Y, M_PART, S_PART, T_PART, N, V, D, stride_h, stride_w, v_per_split,
             BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Per (row block, vocab split): running max, sum of exp and target logit over the split."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    y = tl.load(Y + rows, mask=rows < N, other=-1)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_start = split * v_per_split
    for v0 in range(v_start, tl.minimum(v_start + v_per_split, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(Hm, Wm, rows, cols, N, V, D, stride_h, stride_w, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    out = split * N + rows
    tl.store(M_PART + out, m, mask=rows < N)
    tl.store(S_PART + out, s, mask=rows < N)
    tl.store(T_PART + out, tgt, mask=rows < N)


@triton.jit
def _lce_grad(Hm, Wm, Y, LSE, COEF, G, N, V, D, v0, width, stride_h, stride_w, stride_g, z_loss,
              BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """G[:, c] = coef * (softmax * (1 + 2 z_loss lse) - onehot(y)) for the vocab chunk [v0, v0+width)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cc = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)        # column within the chunk
    cols = v0 + cc
    z = _logits_tile(Hm, Wm, rows, cols, N, V, D, stride_h, stride_w, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
    in_rows = rows < N
    y = tl.load(Y + rows, mask=in_rows, other=-1)
    lse = tl.load(LSE + rows, mask=in_rows, other=0.0)
    coef = tl.load(COEF + rows, mask=in_rows, other=0.0)
    p = tl.exp(z - lse[:, None])
    g = p * (1.0 + 2.0 * z_loss * lse)[:, None] - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    g = g * coef[:, None]
    tl.store(G + rows[:, None].to(tl.int64) * stride_g + cc[None, :], g.to(G.dtype.element_ty),
             mask=in_rows[:, None] & (cc[None, :] < width))


def _lce_config():
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages): a standard Hopper matmul tile."""
    if _interpreting():
        return 16, 32, 16, 4, 1
    return 128, 128, 64, 8, 3


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, ignore_index, z_loss, reduction, chunk):
        N, D = h.shape
        V = W.shape[0]
        BM, BV, BK, warps, stages = _lce_config()
        precision = "ieee" if h.dtype == torch.float32 else "tf32"   # tf32 is ignored for 16-bit inputs
        idx = (y != ignore_index).nonzero()[:, 0]                    # rows that carry a target
        hv, yv = h.index_select(0, idx).contiguous(), y.index_select(0, idx).contiguous()
        n = hv.shape[0]
        lse = torch.zeros(n, device=h.device, dtype=torch.float32)
        tgt = torch.zeros_like(lse)
        if n > 0:
            row_blocks = triton.cdiv(n, BM)
            splits = max(1, min(triton.cdiv(V, BV), triton.cdiv(_n_programs(10**9, 4, h.device), row_blocks)))
            v_per_split = triton.cdiv(triton.cdiv(V, splits), BV) * BV
            splits = triton.cdiv(V, v_per_split)
            part = torch.empty(3, splits, n, device=h.device, dtype=torch.float32)
            with _on_device(h):
                _lce_fwd[(row_blocks, splits)](hv, W, yv, part[0], part[1], part[2], n, V, D, hv.stride(0),
                                               W.stride(0), v_per_split, BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK,
                                               PRECISION=precision, num_warps=warps, num_stages=stages)
            m = part[0].max(0).values
            lse = m + torch.log((part[1] * torch.exp(part[0] - m)).sum(0))
            tgt = part[2].sum(0)
        loss_v = lse - tgt + z_loss * lse * lse
        ctx.save_for_backward(h, W, idx, yv, lse)
        ctx.args = (z_loss, reduction, chunk, precision, N)
        if reduction == "none":
            return torch.zeros(N, device=h.device, dtype=torch.float32).index_copy_(0, idx, loss_v)
        total = loss_v.sum()
        return total if reduction == "sum" else total / max(n, 1)

    @staticmethod
    def backward(ctx, dloss):
        h, W, idx, yv, lse = ctx.saved_tensors
        z_loss, reduction, chunk, precision, N = ctx.args
        n = idx.shape[0]
        V, D = W.shape
        dh = torch.zeros(N, D, device=h.device, dtype=torch.float32)
        dW = torch.zeros_like(W)
        want_dh, want_dW = ctx.needs_input_grad[:2]
        if n == 0:
            return dh.to(h.dtype), dW, None, None, None, None, None
        if reduction == "none":
            coef = dloss.float().index_select(0, idx).contiguous()
        else:
            coef = (dloss.float() / (n if reduction == "mean" else 1)).expand(n).contiguous()
        BM, BV, BK, warps, stages = _lce_config()
        hv = h.index_select(0, idx).contiguous()
        # vocab chunk: at most ~64M gradient entries in flight, a multiple of the tile width
        c = chunk or max(BV, (1 << 26) // n // BV * BV)
        g = torch.empty(n, min(c, V), device=h.device, dtype=h.dtype)
        dhv = torch.zeros(n, D, device=h.device, dtype=torch.float32)
        for v0 in range(0, V, c):
            width = min(c, V - v0)
            gc = g[:, :width]
            _lce_grad[(triton.cdiv(n, BM), triton.cdiv(width, BV))](
                hv, W, yv, lse, coef, gc, n, V, D, v0, width, hv.stride(0), W.stride(0), gc.stride(0), z_loss,
                BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, PRECISION=precision, num_warps=warps, num_stages=stages)
            if want_dh:
                dhv += (gc @ W[v0:v0 + width]).float()
            if want_dW:
                torch.mm(gc.t(), hv, out=dW[v0:v0 + width])
        dh.index_copy_(0, idx, dhv)
        return dh.to(h.dtype) if want_dh else None, dW if want_dW else None, None, None, None, None, None


def linear_cross_entropy(h, W, y, ignore_index=-100, z_loss=0.0, reduction="mean", chunk_size=None):
    """Cross-entropy of logits h @ W^T against y without materialising the logits; autograd-capable.

    h [N, D], W [V, D], y [N] int (ignore_index rows count for nothing). Per token:
    lse - logit[y] + z_loss * lse^2. reduction "mean" (over kept tokens; 0 when none is kept), "sum",
    or "none" ([N] float32, 0 at ignored rows). chunk_size: vocab columns per backward chunk. The
    matmuls run in h's dtype (W is cast to it), or in the autocast dtype under torch.autocast."""
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or y.shape != (h.shape[0],):
        raise ValueError(f"kernels.linear_cross_entropy: expected h [N,D], W [V,D], y [N], got "
                         f"{tuple(h.shape)}, {tuple(W.shape)}, {tuple(y.shape)}")
    h, W = _autocast(h, W)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"kernels.linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    if h.dtype not in _TL_DTYPE or y.dtype.is_floating_point:
        raise ValueError(f"kernels.linear_cross_entropy: h must be float16/bfloat16/float32 and y "
                         f"integer, got {h.dtype}, {y.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"kernels.linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    bad = (y != ignore_index) & ((y < 0) | (y >= W.shape[0]))
    if bad.any():
        raise ValueError(f"kernels.linear_cross_entropy: targets must be in [0, {W.shape[0]}) or "
                         f"{ignore_index}, got {y[bad][0].item()}")
    _check_device(h, "linear_cross_entropy")
    W = W.to(h.dtype)                       # autograd casts the gradient back to W's dtype
    if W.stride(1) != 1:
        W = W.contiguous()
    return _LinearCrossEntropy.apply(h, W, y, ignore_index, float(z_loss), reduction, chunk_size)


# ----------------------------------------------------------------------------------------------------
# Correctness checks: python kernels.py --check
# ----------------------------------------------------------------------------------------------------

def _pos_from_docs(rows, T):
    """pos [B, T] from per-row document lengths; a negative length -n is n padding tokens."""
    out = []
    for lens in rows:
        parts = [torch.arange(n) if n > 0 else torch.full((-n,), -1) for n in lens]
        row = torch.cat(parts)
        if row.numel() != T:
            raise ValueError(f"kernels: document lengths {lens} sum to {row.numel()}, expected {T}")
        out.append(row)
    return torch.stack(out)


def _random_doc_lens(T, gen, mean_len, p_one=0.2):
    """Document lengths summing to T: exponentially distributed, a fraction p_one of them length 1."""
    lens = []
    while sum(lens) < T:
        r = torch.rand((), generator=gen).item()
        n = 1 if r < p_one else 1 + int(torch.empty(()).exponential_(1.0 / mean_len, generator=gen).item())
        lens.append(min(n, T - sum(lens)))
    return lens


def _rel_err(x, ref):
    """max |x - ref| / max |ref|: one number per tensor, comparable across shapes and scales."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def _sdpa_baseline(q, k, v, mask, do):
    """PyTorch's own attention in q's dtype (memory-efficient backend on GPU, explicit mask): the yardstick
    for bf16/fp16 errors on GPU. Rows that see nothing get their diagonal so SDPA stays finite; they
    are zeroed after (do is already 0 there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[2] // k.shape[2]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves)
    kh, vh = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
    seen = mask.any(-1)                                                      # [B, T]
    full = mask | (~seen)[:, :, None] & torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=full[:, None]).transpose(1, 2)
    o = o * seen[:, :, None, None]
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def _attn_cases(gpu):
    """(name, B, T, H, Hkv, D, dtype, docs, window, cfg). docs: None, per-row document lengths,
    "random", "padded", or "fused" (random docs; q/k/v are strided views of one fused projection)."""
    if not gpu:
        f32, f16 = torch.float32, torch.float16
        mixed = dict(_INTERP_CONFIG, fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1), desc=False)
        return [
            ("causal T=50 D=32 fp32", 1, 50, 2, 2, 32, f32, None, None, None),
            ("causal T=33 GQA2 fp16", 2, 33, 4, 2, 32, f16, None, None, None),
            # length-1 docs, a doc over the 16- and 32-token block edges, and long docs that give
            # the dK/dV loop a fully visible phase between two masked ones
            ("docs fixed T=100 GQA2 D=16 fp32", 2, 100, 4, 2, 16, f32,
             [[2, 98], [1, 5, 30, 1, 1, 23, 16, 23]], None, None),
            ("docs random T=77 GQA2 D=16 fp32 fused-qkv", 2, 77, 4, 2, 16, f32, "fused", None, None),
            ("docs random T=70 GQA4 D=32 fp16", 1, 70, 8, 2, 32, f16, "random", None, None),
            ("docs random T=64 MQA window=9 D=16 fp32", 1, 64, 4, 1, 16, f32, "random", 9, None),
            ("window=20 no docs T=45 MQA fp16", 1, 45, 2, 1, 32, f16, None, 20, None),
            ("padding rows T=40 GQA2 D=16 fp32", 2, 40, 2, 1, 16, f32, "padded", None, None),
            ("docs random T=40 D=64 fp32", 1, 40, 2, 1, 64, f32, "random", None, None),
            ("pointer path, 16x16 blocks, docs T=50 GQA2 fp16", 1, 50, 4, 2, 32, f16, "random", 5, mixed),
        ]
    b16, f16 = torch.bfloat16, torch.float16
    return [
        ("causal T=2048 D=128 GQA4 bf16", 2, 2048, 16, 4, 128, b16, None, None, None),
        ("causal T=1000 D=64 GQA2 fp16", 2, 1000, 8, 4, 64, f16, None, None, None),
        ("docs random T=2048 D=128 GQA4 bf16 fused-qkv", 2, 2048, 16, 4, 128, b16, "fused", None, None),
        ("docs random T=1500 D=64 MQA window=300 bf16", 1, 1500, 8, 1, 64, b16, "random", 300, None),
        ("padding rows T=1024 D=128 GQA4 fp16", 2, 1024, 16, 4, 128, f16, "padded", None, None),
        ("pointer path docs T=1100 D=128 GQA2 bf16", 1, 1100, 8, 4, 128, b16, "random",
         None, dict(_ATTN_CONFIGS[128], desc=False)),
    ]


def _attn_inputs(B, T, H, Hkv, D, dtype, docs, device, seed):
    """Leaf q, k, v (views of one fused tensor for docs="fused"), pos, upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    if docs == "fused":
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen).to(device, dtype).requires_grad_()
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        leaves = [qkv]
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    else:
        q = torch.randn(B, T, H, D, generator=gen).to(device, dtype).requires_grad_()
        k = torch.randn(B, T, Hkv, D, generator=gen).to(device, dtype).requires_grad_()
        v = torch.randn(B, T, Hkv, D, generator=gen).to(device, dtype).requires_grad_()
        leaves = [q, k, v]
    pos = None
    if isinstance(docs, list):
        pos = _pos_from_docs(docs, T)
    elif docs in ("random", "fused"):
        pos = _pos_from_docs([_random_doc_lens(T, gen, max(4, T // 3)) for _ in range(B)], T)
    elif docs == "padded":
        a, b = T // 4, T // 3
        pos = _pos_from_docs([[a, T - a - 8, -8], [a, -3, b, 1, -(T - a - 3 - b - 1)]], T)
    pos = pos.to(device) if pos is not None else None
    do = torch.randn(B, T, H, D, generator=gen).to(device, dtype)
    if pos is not None:
        do = do * (pos >= 0)[:, :, None, None]
    return leaves, (q, k, v), pos, do


def _check_attention(gpu, device, seed=0):
    records = []
    tol_fixed = {torch.float32: 2e-5, torch.float16: 5e-3}
    for i, (name, B, T, H, Hkv, D, dtype, docs, window, cfg) in enumerate(_attn_cases(gpu)):
        leaves, (q, k, v), pos, do = _attn_inputs(B, T, H, Hkv, D, dtype, docs, device, seed + i)
        if cfg is None:
            o = flash_attention(q, k, v, pos, window)
        else:
            o = _flash_attention(q, k, v, _attn_lo(pos, B, T, window, q.device), cfg)
        o.backward(do)
        grads = [t.grad for t in leaves]
        if docs == "fused":
            grads = [g.view(B, T, -1, D) for g in grads[0].split([H * D, Hkv * D, Hkv * D], dim=-1)]
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_o = attention_ref(*ref_in, pos=pos, window=window)
        ref_o.backward(do.double())
        refs = [ref_o.detach()] + [t.grad for t in ref_in]
        ours = [o.detach()] + grads
        if gpu:
            mask = attention_mask(T, pos, window, q.device).expand(B, T, T)
            base = _sdpa_baseline(q, k, v, mask, do)
            tols = [2 * _rel_err(b, r) for b, r in zip(base, refs)]
        else:
            tols = [tol_fixed[dtype]] * 4
        errs = {n: (_rel_err(x, r), t) for n, x, r, t in zip(("out", "dq", "dk", "dv"), ours, refs, tols)}
        finite = all(torch.isfinite(x).all().item() for x in ours)
        if pos is not None and (pos < 0).any():   # padding rows: exactly zero output and dq
            pad = pos < 0
            finite = finite and ours[0][pad].abs().max().item() == 0 and ours[1][pad].abs().max().item() == 0
        ok = finite and all(e <= t for e, t in errs.values())
        records.append({"name": f"attention: {name}", "ok": ok, "errs": errs})
    return records


def _check_attention_control(gpu, device):
    """The check must be able to fail: a window off by one has to show up as a large error."""
    dtype = torch.float16 if gpu else torch.float32
    leaves, (q, k, v), pos, do = _attn_inputs(1, 40, 2, 1, 16, dtype, "random", device, 99)
    with torch.no_grad():
        o = flash_attention(q, k, v, pos, window=7)
        wrong = attention_ref(q.double(), k.double(), v.double(), pos, window=8)
    err = _rel_err(o, wrong)
    return [{"name": "attention: control, window 7 vs reference window 8 must differ",
             "ok": err > 1e-2, "errs": {"out": (err, 1e-2)}}]


def _check_attention_in_training(gpu, device):
    """flash_attention as model.py calls it: under torch.autocast with float32 q/k (an fp32 qk-norm
    weight promotes them) next to a low-precision v, and inside torch.compile(fullgraph=True) on views
    of a fused qkv projection, which must give the eager results bit for bit."""
    low = torch.bfloat16 if gpu else torch.float16
    B, T, H, Hkv, D = (2, 512, 8, 2, 64) if gpu else (1, 40, 4, 2, 16)
    leaves, (q, k, v), pos, do = _attn_inputs(B, T, H, Hkv, D, torch.float32, "random", device, 5)
    q, k = leaves[:2]
    v = v.detach().to(low).requires_grad_()
    with torch.autocast(device, dtype=low):
        o = flash_attention(q, k, v, pos, window=T // 3)
    o.backward(do.to(low))
    ref_in = [t.detach().to(low).double().requires_grad_() for t in (q, k, v)]
    ref_o = attention_ref(*ref_in, pos=pos, window=T // 3)
    ref_o.backward(do.to(low).double())
    tol = 2e-2 if gpu else 5e-3
    refs = [ref_o.detach()] + [t.grad for t in ref_in]
    ours = [o.detach(), q.grad, k.grad, v.grad]
    errs = {n: (_rel_err(x, r), tol) for n, x, r in zip(("out", "dq", "dk", "dv"), ours, refs)}
    dtypes_ok = (o.dtype, q.grad.dtype, k.grad.dtype, v.grad.dtype) == (low, torch.float32, torch.float32, low)
    records = [{"name": f"attention: autocast {str(low)[6:]}, fp32 q/k + {str(low)[6:]} v, grads' dtypes",
                "ok": dtypes_ok and all(e <= t for e, t in errs.values()), "errs": errs}]

    dtype = low if gpu else torch.float32
    (qkv,), _, pos, do = _attn_inputs(B, T, H, Hkv, D, dtype, "fused", device, 6)

    def attend(qkv):
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return flash_attention(q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), pos, T // 3)

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="inductor" if gpu else "aot_eager")):
        qkv.grad = None
        o = fn(qkv)
        o.backward(do)
        results.append((o.detach(), qkv.grad))
    diffs = {n: ((a - b).abs().max().item(), 0.0) for n, a, b in zip(("out", "dqkv"), *results)}
    records.append({"name": "attention: torch.compile fullgraph on fused-qkv views = eager, bitwise",
                    "ok": all(d == 0 for d, _ in diffs.values()), "errs": diffs})
    return records


def _check_rms_norm(gpu, device):
    """(x shape, x dtype, weight dtype): leading dims are flattened; an fp32 weight under 16-bit
    activations is what autocast training produces."""
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    cases = ([((37, 48), f32, f32), ((4, 5, 64), f16, f32)] if not gpu
             else [((4096, 2048), b16, b16), ((2, 500, 4000), f32, f32), ((8, 512, 2048), b16, f32)])
    tol = {f32: 1e-5, f16: 2e-3, b16: 1.6e-2}
    records = []
    for shape, dtype, wdtype in cases:
        gen = torch.Generator().manual_seed(shape[-1])
        x = (3 * torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()
        w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device, wdtype).requires_grad_()
        dy = torch.randn(*shape, generator=gen).to(device, dtype)
        y = rms_norm(x, w, 1e-6)
        y.backward(dy)
        xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        yr = rms_norm_ref(xr, wr, 1e-6)
        yr.backward(dy.double())
        errs = {name: (_rel_err(a, b), tol[dtype]) for name, a, b in
                (("y", y, yr.detach()), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad))}
        ok = all(e <= t for e, t in errs.values()) and y.dtype == dtype and w.grad.dtype == wdtype
        records.append({"name": f"rms_norm: {list(shape)} x {str(dtype)[6:]} weight {str(wdtype)[6:]}",
                        "ok": ok, "errs": errs})
    return records


def _check_cross_entropy(gpu, device):
    """(N, D, V, dtype, z_loss, reduction, chunk_size, fraction of rows ignored)."""
    if not gpu:
        cases = [(29, 32, 100, torch.float32, 1e-3, "mean", 40, 0.2),
                 (24, 40, 77, torch.float16, 0.0, "sum", None, 0.3),
                 (17, 32, 64, torch.float32, 1e-2, "none", 32, 0.2),
                 (8, 32, 50, torch.float32, 1e-3, "mean", None, 1.0)]
    else:
        cases = [(4096, 2048, 50000, torch.bfloat16, 1e-4, "mean", None, 0.3),
                 (2000, 1024, 32000, torch.float16, 0.0, "none", 8192, 0.1)]
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    records = []
    for n, d, vocab, dtype, z, red, chunk, drop in cases:
        gen = torch.Generator().manual_seed(n + vocab)
        h = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
        W = (torch.randn(vocab, d, generator=gen) / d ** 0.5).to(device, dtype).requires_grad_()
        y = torch.randint(0, vocab, (n,), generator=gen)
        y[torch.rand(n, generator=gen) < drop] = -100
        y = y.to(device)
        loss = linear_cross_entropy(h, W, y, z_loss=z, reduction=red, chunk_size=chunk)
        g = torch.randn(loss.shape, generator=gen).to(device) if red == "none" else torch.tensor(1.0, device=device)
        loss.backward(g)
        hr, Wr = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
        ref = linear_cross_entropy_ref(hr, Wr, y, z_loss=z, reduction=red)
        ref.backward(g.double())
        if drop == 1.0:   # nothing to predict: loss and gradients exactly zero
            errs = {"loss": (loss.abs().max().item(), 0.0), "dh": (h.grad.abs().max().item(), 0.0),
                    "dW": (W.grad.abs().max().item(), 0.0)}
        else:
            errs = {name: (_rel_err(a, b), tol[dtype]) for name, a, b in
                    (("loss", loss.detach(), ref.detach()), ("dh", h.grad, hr.grad), ("dW", W.grad, Wr.grad))}
        label = f"[{n}x{d}]@[{vocab}x{d}] {str(dtype)[6:]} z={z} {red} chunk={chunk} ignored={drop:.0%}"
        records.append({"name": f"cross_entropy: {label}",
                        "ok": all(e <= t for e, t in errs.values()), "errs": errs})
    return records


def check(json_path=None):
    """Run every correctness case on this device; print one line per case; True when all pass."""
    gpu = torch.cuda.is_available() and not _interpreting()
    device = "cuda" if gpu else "cpu"
    records = []
    for run in (lambda: _check_attention(gpu, device), lambda: _check_attention_control(gpu, device),
                lambda: _check_attention_in_training(gpu, device),
                lambda: _check_rms_norm(gpu, device), lambda: _check_cross_entropy(gpu, device)):
        for r in run():
            errs = "  ".join(f"{k}={e:.2e}/{t:.1e}" for k, (e, t) in r["errs"].items())
            print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['name']:<72} {errs}", flush=True)
            records.append(r)
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, json_path)
    n_bad = sum(not r["ok"] for r in records)
    print(f"{len(records) - n_bad}/{len(records)} checks passed (errors are max|x-ref|/max|ref| vs float64; "
          f"tolerances fixed per dtype{', for attention 2x the error of torch SDPA in the same dtype' if gpu else ''})")
    return n_bad == 0


# ----------------------------------------------------------------------------------------------------
# GPU compilation without a GPU: python kernels.py --compile sm_90
# ----------------------------------------------------------------------------------------------------

def compile_attention(arch="sm_90", head_dims=(64, 128), paths=None):
    """Compile every attention kernel launch of flash_attention and its backward for `arch` through
    the real host code, on a machine without a GPU (Triton's compiler and ptxas run on the CPU), and
    print each kernel's registers, stack (spills) and shared memory. The interpreter accepts programs
    the compiler rejects, so this is the CPU-side guard for the GPU path. paths: subset of
    ("desc", "ptr") (TMA descriptors from sm_90 on, pointer loads everywhere). True when all compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    if _interpreting():
        raise RuntimeError("kernels.compile_attention: run without TRITON_INTERPRET=1 (it compiles, not interprets)")
    if not re.fullmatch(r"sm_\d+", arch):
        raise ValueError(f"kernels.compile_attention: arch must look like sm_90 or sm_80, got {arch!r}")
    target = GPUTarget("cuda", int(arch[3:]), 32)
    backend = make_backend(target)
    ok = True

    def compiling(fn):     # stands in for fn.run: compile for `target` where a launch would happen
        def run(*args, grid, warmup, **kwargs):
            nonlocal ok
            kwargs["debug"] = False
            bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            what = f"{fn.__name__:<16} " + " ".join(f"{n}={kwargs[n]}" for n in (
                "D", "BLOCK_M", "BLOCK_N", "HAS_LO", "USE_DESC", "num_warps", "num_stages") if n in kwargs)
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            except Exception as e:
                ok = False
                print(f"FAIL  {what}: {type(e).__name__}: {e}", flush=True)
                return
            print(f"ok    {what}  {_resource_usage(kernel)} shared={kernel.metadata.shared}", flush=True)
        return run

    jitted = (_attn_fwd, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq)
    for fn in jitted:
        fn.run = compiling(fn)
    try:
        B, T, H, Hkv = 2, 300, 8, 2
        pos = _pos_from_docs([[100, 200], [1, 299]], T)
        for D in head_dims:
            for path in paths or (("desc", "ptr") if target.arch >= 90 else ("ptr",)):
                cfg = _cfg_ints(dict(_ATTN_CONFIGS[64 if D <= 64 else 128], desc=path == "desc"))
                # views of a fused projection, as model.py's layout may give them
                qkv = torch.zeros(B, T, (H + 2 * Hkv) * D, dtype=torch.bfloat16)
                q, k, v = (t.view(B, T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
                for lo in (None, _attn_lo(pos, B, T, 64, "cpu")):
                    o, lse = _attn_fwd_op(q, k, v, lo, cfg)
                    _attn_bwd_op(o, q, k, v, o, lse, lo, cfg)
    finally:
        for fn in jitted:
            del fn.run
    return ok


def _resource_usage(kernel):
    """'REG:n STACK:n ...' of a compiled kernel's cubin, read with the cuobjdump Triton ships."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK|LOCAL):\d+", out)) or "resources: n/a"


# ----------------------------------------------------------------------------------------------------
# Benchmark: python kernels.py --bench
# ----------------------------------------------------------------------------------------------------

def _time_ms(fn, gpu, grads=()):
    """Median milliseconds of fn(); CUDA events on GPU, one timed call on CPU (tiny mode)."""
    if gpu:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _bench_impls(pos, doc_lens, T, gpu):
    """name -> (prepare, run): prepare(q, k, v) gives the leaves an implementation takes (untimed),
    run(q, k, v) -> o; all on [B, T, H, D] tensors, the same mask for everyone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B = pos.shape[0]
    doc = torch.cumsum(pos == 0, dim=1)
    same = lambda q, k, v: (q, k, v)  # noqa: E731
    ours_pos = pos if doc_lens is not None else None     # one document per row: the plain causal path
    impls = {"triton (ours)": (same, lambda q, k, v: flash_attention(q, k, v, ours_pos))}

    def causal(b, h, qi, ki):
        return qi >= ki

    def doc_causal(b, h, qi, ki):
        return (qi >= ki) & (doc[b, qi] == doc[b, ki])

    block_mask = create_block_mask(causal if doc_lens is None else doc_causal, B, None, T, T, device=pos.device)
    flex = torch.compile(flex_attention, dynamic=False) if gpu else flex_attention
    impls["flex (BlockMask)"] = (same, lambda q, k, v: flex(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
        enable_gqa=True).transpose(1, 2))
    if doc_lens is None:     # one document per row: SDPA's fused backends apply
        def sdpa(backend, gqa):
            def run(q, k, v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True, enable_gqa=gqa).transpose(1, 2)
            return run

        def repeat_kv(q, k, v):   # cuDNN is timed as plain MHA: same FLOPs, no GQA support needed
            G = q.shape[2] // k.shape[2]
            return q, *(t.detach().repeat_interleave(G, dim=2).requires_grad_() for t in (k, v))
        impls["sdpa flash"] = (same, sdpa(SDPBackend.FLASH_ATTENTION, True))
        impls["sdpa cuDNN (K/V repeated)"] = (repeat_kv, sdpa(SDPBackend.CUDNN_ATTENTION, False))
    else:                    # packed documents: torch's variable-length flash attention
        from torch.nn.attention.varlen import varlen_attn
        cu = torch.tensor([0] + [n for row in doc_lens for n in row], device=pos.device).cumsum(0).to(torch.int32)
        longest = max(max(row) for row in doc_lens)

        def run(q, k, v):
            H, D = q.shape[2:]
            o = varlen_attn(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu, cu,
                            longest, longest, window_size=(-1, 0), enable_gqa=True)
            return o.view(B, T, H, D)
        impls["sdpa varlen flash"] = (same, run)
    return impls


def _accuracy(T, H, Hkv, D, docs, device, dtype):
    """Errors vs an fp32 reference of ours and of torch's own attention, both in `dtype`."""
    B = 1
    leaves, (q, k, v), pos, do = _attn_inputs(B, T, H, Hkv, D, dtype, docs, device, seed=7)
    o = flash_attention(q, k, v, pos)
    o.backward(do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_o = attention_ref(*ref_in, pos=pos)
    ref_o.backward(do.float())
    refs = [ref_o.detach()] + [t.grad for t in ref_in]
    base = _sdpa_baseline(q, k, v, attention_mask(T, pos, None, device).expand(B, T, T), do)
    ours = [o.detach()] + [t.grad for t in leaves]
    return {n: (_rel_err(x, r), _rel_err(b, r)) for n, x, b, r in zip(("out", "dq", "dk", "dv"), ours, base, refs)}


def bench(tiny=False, head_dim=128):
    """TFLOP/s of forward and backward, ours next to torch's, plus the bf16 accuracy criterion."""
    gpu = torch.cuda.is_available() and not _interpreting()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    torch._dynamo.config.recompile_limit = 64     # FlexAttention compiles once per shape
    if tiny:
        H, Hkv, D, tokens, causal_T, packed_T, mean_doc = 2, 1, 32, 128, [64, 128], [128], 24
    else:
        # SmolLM3's attention shape; 16k tokens per batch; packed rows of ~600-token documents
        H, Hkv, D, tokens, mean_doc = 16, 4, head_dim, 16384, 600
        causal_T, packed_T = [1024, 2048, 4096, 8192, 16384], [4096, 8192]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton.__version__}  "
          f"{torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter: timings meaningless)'}")
    print(f"H={H} Hkv={Hkv} D={D} {str(dtype)[6:]}, {tokens} tokens per batch. FLOPs: fwd 4*H*D*sum(L^2)/2 "
          f"(causal; L = row length, or each document's for packed rows), bwd 2.5x fwd")
    gen = torch.Generator().manual_seed(0)
    cases = [(f"causal T={T}", T, None) for T in causal_T]
    cases += [(f"packed T={T}", T, [_random_doc_lens(T, gen, mean_doc, p_one=0.0) for _ in range(max(1, tokens // T))])
              for T in packed_T]
    print("x columns: impl time / our time (> 1: ours is faster)")
    print(f"{'case':<22}{'impl':<27}{'fwd ms':>9}{'TF/s':>7}{'bwd ms':>9}{'TF/s':>7}"
          f"{'x fwd':>8}{'x bwd':>8}{'x f+b':>8}")
    for label, T, doc_lens in cases:
        B = max(1, tokens // T)
        rows = doc_lens or [[T]] * B
        pos = _pos_from_docs(rows, T).to(device)
        fwd_flops = 4 * H * D * sum(n * n for row in rows for n in row) * 0.5
        q = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(B, T, H, D, device=device, dtype=dtype)
        ours = None
        for name, (prepare, fn) in _bench_impls(pos, doc_lens, T, gpu).items():
            try:
                leaves = prepare(q, k, v)
                f_ms = _time_ms(lambda: fn(*leaves), gpu)
                o = fn(*leaves)
                b_ms = _time_ms(lambda: o.backward(do, retain_graph=True), gpu, grads=leaves)
                del o
            except Exception as e:          # a backend missing on this GPU/build is a table entry, not a crash
                if name == "triton (ours)":
                    raise
                print(f"{label:<22}{name:<27}  n/a: {type(e).__name__}: {str(e).splitlines()[0][:70]}")
                continue
            if name == "triton (ours)":
                ours = (f_ms, b_ms)
            ratio = "" if ours is None or name == "triton (ours)" else \
                f"{f_ms / ours[0]:>8.2f}{b_ms / ours[1]:>8.2f}{(f_ms + b_ms) / (ours[0] + ours[1]):>8.2f}"
            print(f"{label:<22}{name:<27}{f_ms:>9.3f}{fwd_flops / f_ms / 1e9:>7.0f}{b_ms:>9.3f}"
                  f"{2.5 * fwd_flops / b_ms / 1e9:>7.0f}{ratio}", flush=True)
            label = ""
    acc_T = 128 if tiny else 2048
    acc_dtype = torch.float16 if not gpu else torch.bfloat16
    ok = True
    for docs in (None, "random"):
        errs = _accuracy(acc_T, H, Hkv, D, docs, device, acc_dtype)
        good = all(e <= 2 * b for e, b in errs.values())
        ok = ok and good
        print(f"accuracy {str(acc_dtype)[6:]} T={acc_T} {'causal' if docs is None else 'packed docs'}: "
              + "  ".join(f"{n} ours {e:.2e} torch {b:.2e}" for n, (e, b) in errs.items())
              + f"  -> {'PASS' if good else 'FAIL'} (ours <= 2x torch, both vs fp32)"
              + ("" if gpu else " [CPU: torch's math backend computes in fp32 and only rounds its results;"
                 " meaningful on GPU only]"))
    return ok or tiny


# Candidates for --tune; the table above should hold the winners measured on the target GPU.
_TUNE_SPACE = {
    "fwd": [(bm, bn, w, st) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4)],
    "dkdv": [(bm, bn, w, st) for bm in (32, 64) for bn in (64, 128) for w in (4, 8) for st in (2, 3)],
    "dq": [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for st in (2, 3)],
}


def tune(head_dim, B=2, T=8192, H=16, Hkv=4, device="cuda", space=None):
    """Greedy per-kernel search of _TUNE_SPACE on causal attention; prints the config table entry."""
    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float16
    q = torch.randn(B, T, H, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, head_dim, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(B, T, H, head_dim, device=device, dtype=dtype)
    best = dict(_attn_config(head_dim, q.device))
    for kernel, candidates in (space or _TUNE_SPACE).items():
        times = {}
        for c in candidates:
            cfg = dict(best, **{kernel: c})
            try:
                if kernel == "fwd":
                    times[c] = _time_ms(lambda: _flash_attention(q, k, v, None, cfg), gpu)
                else:
                    o = _flash_attention(q, k, v, None, cfg)
                    times[c] = _time_ms(lambda: o.backward(do, retain_graph=True), gpu, grads=(q, k, v))
            except Exception as e:       # e.g. out of shared memory: not a candidate on this GPU
                print(f"{kernel} {c}: {type(e).__name__}")
                continue
            print(f"{kernel} {c}: {times[c]:.3f} ms", flush=True)
        best[kernel] = min(times, key=times.get)
    print(f"best for head_dim {head_dim}: " + json.dumps({n: best[n] for n in _TUNE_SPACE}))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="correctness checks on this device")
    parser.add_argument("--bench", action="store_true", help="attention TFLOP/s vs torch (GPU)")
    parser.add_argument("--tiny", action="store_true", help="with --bench: toy sizes (runs on CPU)")
    parser.add_argument("--tune", action="store_true", help="search attention block sizes (GPU)")
    parser.add_argument("--head_dim", type=int, default=128, choices=(64, 128), help="with --bench/--tune")
    parser.add_argument("--json", help="with --check: also write the results to this file")
    parser.add_argument("--compile", metavar="ARCH", help="alone: compile the attention kernels for ARCH "
                        "(e.g. sm_90, sm_80) on this machine, no GPU needed")
    args = parser.parse_args(argv)
    if args.compile:
        if args.check or args.bench or args.tune:
            parser.error("--compile runs alone")
        if not re.fullmatch(r"sm_\d+", args.compile):
            parser.error(f"--compile takes an architecture like sm_90 or sm_80, got {args.compile!r}")
        return 0 if compile_attention(args.compile) else 1
    if not (args.check or args.bench or args.tune):  # bare `python kernels.py`: what this machine can do
        args.check = args.bench = True
        args.tiny = args.tiny or not torch.cuda.is_available()
    if (args.bench and not args.tiny or args.tune) and not torch.cuda.is_available():
        parser.error("--bench and --tune need a CUDA GPU; on CPU run --bench --tiny")
    if not torch.cuda.is_available() and not _interpreting():
        # triton is already imported, and it reads TRITON_INTERPRET at import: start afresh with it set
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv,
                  dict(os.environ, TRITON_INTERPRET="1"))
    ok = True
    if args.tune:
        tune(args.head_dim)
    if args.check:
        ok = check(args.json) and ok
    if args.bench:
        ok = bench(args.tiny, args.head_dim) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
