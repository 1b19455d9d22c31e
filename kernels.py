"""Triton kernels for nanosmol with a plain PyTorch twin: FlashAttention-2 (forward + backward) with
document masking, GQA and sliding windows. RMSNorm and the LM-head loss have no kernel of their own:
torch.compile (on by default on CUDA) fuses model.RMSNorm in its own rounding order, so bf16 keeps
transformers' bits, and model.py's chunked loss already bounds the logits' memory by loss_budget_mb.

    flash_attention(q, k, v, pos=None, window=None) -> o    q [B,T,H,D], k/v [B,T,Hkv,D]; twin attention_ref

Run:
    python -m pytest -q tests/test_kernels.py   # CPU: every kernel vs its float64 twin (Triton interpreter)
    python kernels.py --bench [--head_dim 64]   # GPU: ours vs FlexAttention vs SDPA, causal and doc-masked GQA
    python kernels.py --bench --tiny            # CPU: the benchmark's code path at toy size
    python kernels.py --compile sm_90           # CPU: compile the attention kernels for an H100

Attention masks as model.doc_causal_mask (padding, pos < 0, gets output and gradients exactly 0, never
NaN) at a cost ~ sum of L^2 over documents of length L, not T^2: see _attn_lo.

Sections: helpers · twin · kernels (forward, backward) · host side and custom ops · --compile · --bench · main.
"""
import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from model import check, doc_causal_mask

LOG2E = 1.4426950408889634
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _on_device(t):
    """Triton launches on the current CUDA device, which need not hold the tensors (device="cuda:1")."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---- Attention: PyTorch twin ---------------------------------------------------------------------------

def attention_ref(q, k, v, pos=None, window=None):
    """Plain softmax attention in the inputs' dtype (float64 too), same contract as flash_attention."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    if pos is None:
        pos = torch.arange(T, device=q.device).expand(B, T)
    qh = q.transpose(1, 2)                                        # [B, H, T, D]
    kh, vh = (t.transpose(1, 2).repeat_interleave(G, dim=1) for t in (k, v))   # [B, H, T, D]
    mask = doc_causal_mask(pos.to(q.device), window)              # [B, 1, T, T]
    s = (qh @ kh.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~mask, 0.0)          # rows that see nothing: 0, not NaN
    return (p @ vh).transpose(1, 2)                               # [B, T, H, D]


# ---- Attention: Triton kernels (FlashAttention-2, Dao 2023) --------------------------------------------
# Every tensor is read as a 2-D [B*T, heads*D] view: the tile of (batch b, token t, head h) starts at row
# b*T + t, column h*D. On Hopper the loops read tiles through TMA descriptors (USE_DESC; X a TensorDescriptor).

@triton.jit
def _load_rows(X, row, col, t, T, stride, BLOCK: tl.constexpr, D: tl.constexpr, USE_DESC: tl.constexpr):
    """[BLOCK, D] tile at (row, col); t is the token of `row` (pointer loads stop at T, TMA loads at the
    tensor's end: the rows between belong to the next sequence and are masked in the math)."""
    if USE_DESC:
        x = X.load([row, col])
    else:
        r = tl.arange(0, BLOCK)
        ptrs = X + (row + r)[:, None].to(tl.int64) * stride + col + tl.arange(0, D)[None, :]
        x = tl.load(ptrs, mask=(t + r)[:, None] < T, other=0.0)
    return x


@triton.jit
def _masked(x, fill, LO, b, i, j, T, PHASE: tl.constexpr):
    """x where query i of row b sees key j (broadcastable token indices: lo[i] <= j <= i), else fill; PHASE 1's
    blocks are fully visible: x as it is."""
    if PHASE != 1:
        x = tl.where((j <= i) & (j >= tl.load(LO + b * T + i, mask=i < T, other=0)), x, fill)
    return x


@triton.jit
def _key_range(LO, b, m0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PHASE: tl.constexpr):
    """Keys of query block [m0, m0+BLOCK_M) in PHASE 0 (masked, left of the fully visible blocks),
    1 (fully visible) or 2 (masked, on the diagonal). lo is non-decreasing: its ends bound the block."""
    end = tl.minimum(m0 + BLOCK_M, T)
    start = tl.load(LO + b * T + m0) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(tl.load(LO + b * T + end - 1), BLOCK_N) * BLOCK_N, end)
    # a key block is fully visible when its last key n0+BLOCK_N-1 <= m0, the block's first query
    full_hi = tl.maximum((m0 + 1) // BLOCK_N * BLOCK_N, full_lo)
    bounds = (start, full_lo, full_hi, end)
    return bounds[PHASE], bounds[PHASE + 1]


@triton.jit
def _fwd_steps(acc, l_i, m_i, q, K, V, LO, b, m0, col, T, stride_k, stride_v, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
               USE_DESC: tl.constexpr, PHASE: tl.constexpr):
    """Online softmax in base 2 over this phase's key blocks."""
    n_start, n_end = _key_range(LO, b, m0, T, BLOCK_M, BLOCK_N, PHASE)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    for n0 in range(n_start, n_end, BLOCK_N):
        k = _load_rows(K, b * T + n0, col, n0, T, stride_k, BLOCK_N, D, USE_DESC)
        v = _load_rows(V, b * T + n0, col, n0, T, stride_v, BLOCK_N, D, USE_DESC)
        s = _masked(tl.dot(q, tl.trans(k)), float("-inf"), LO, b, offs_m[:, None],       # [BM, BN] raw scores
                    (n0 + tl.arange(0, BLOCK_N))[None, :], T, PHASE)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DTYPE), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, LO, qk_scale, T, H, G, stride_q, stride_k, stride_v,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
              USE_DESC: tl.constexpr):
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    # heaviest (latest) query blocks first, so causal imbalance leaves no long tail
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, b * T + m0, h * D, m0, T, stride_q, BLOCK_M, D, False)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # -1e30, not -inf: a row that has seen no key yet never computes (-inf) - (-inf)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    for phase in tl.static_range(3):
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, K, V, LO, b, m0, (h // G) * D, T, stride_k, stride_v,
                                   qk_scale, BLOCK_M, BLOCK_N, D, DTYPE, USE_DESC, phase)
    seen = l_i > 0.0                                       # False only for rows that see no key (padding)
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    # lse +inf for rows that saw nothing: every probability the backward recomputes is then 0
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    rows = (b * T + offs_m).to(tl.int64)
    tl.store(O + rows[:, None] * (H * D) + h * D + tl.arange(0, D)[None, :], o.to(DTYPE),
             mask=(offs_m < T)[:, None])
    tl.store(LSE + (b * H + h) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _query_range(HI, b, n0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PHASE: tl.constexpr):
    """Queries of key block [n0, n0+BLOCK_N) in PHASE 0 (masked, on the diagonal), 1 (they see the
    whole block) or 2 (masked, where lo passes the block). HI[j] ends the queries that see key j."""
    q_end = tl.load(HI + b * T + tl.minimum(n0 + BLOCK_N, T) - 1)   # queries that see any key of the block
    q_full = tl.load(HI + b * T + n0)                               # those before see all of it
    diag_end = tl.minimum(n0 + BLOCK_N, q_end)
    full_end = diag_end + tl.maximum(q_full - diag_end, 0) // BLOCK_M * BLOCK_M
    bounds = (n0, diag_end, full_end, q_end)
    return bounds[PHASE], bounds[PHASE + 1]


@triton.jit
def _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, LO, HI, b, h, n0, T, H, stride_q, stride_do, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
                USE_DESC: tl.constexpr, PHASE: tl.constexpr):
    """dK, dV of one key block from the query blocks of this phase, for query head h. Transposed
    orientation ([BN, BM] tiles): P^T and dS^T feed the next dots as the left operand."""
    m_start, m_end = _query_range(HI, b, n0, T, BLOCK_M, BLOCK_N, PHASE)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    stat0 = (b * H + h) * T
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, b * T + m0, h * D, m0, T, stride_q, BLOCK_M, D, USE_DESC)
        do = _load_rows(DO, b * T + m0, h * D, m0, T, stride_do, BLOCK_M, D, USE_DESC)
        # rows past T get lse = +inf, hence P = 0: they add nothing
        lse = tl.load(LSE + stat0 + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(DELTA + stat0 + offs_m, mask=offs_m < T, other=0.0)
        pT = _masked(tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0,    # [BN, BM]
                     LO, b, offs_m[None, :], offs_n[:, None], T, PHASE)
        dv = tl.dot(pT.to(DTYPE), do, dv)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])               # [BN, BM]
        dk = tl.dot(dsT.to(DTYPE), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, LO, HI, qk_scale, sm_scale, T, H, G,
                   stride_q, stride_k, stride_v, stride_do,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                   USE_DESC: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    b, hk = tl.program_id(0) // (H // G), tl.program_id(0) % (H // G)
    n0 = tl.program_id(1) * BLOCK_N          # key block 0 has the most queries: heaviest first already
    k = _load_rows(K, b * T + n0, hk * D, n0, T, stride_k, BLOCK_N, D, False)
    v = _load_rows(V, b * T + n0, hk * D, n0, T, stride_v, BLOCK_N, D, False)
    dk, dv = tl.zeros([BLOCK_N, D], dtype=tl.float32), tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # GQA: the query heads of the group add up in registers; K/V are never repeated in memory
    for g in range(G):
        for phase in tl.static_range(3):
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, LO, HI, b, hk * G + g, n0, T, H,
                                 stride_q, stride_do, qk_scale, BLOCK_M, BLOCK_N, D, DTYPE, USE_DESC,
                                 phase)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows = (b * T + offs_n).to(tl.int64)[:, None]
    cols = hk * D + tl.arange(0, D)[None, :]
    tl.store(DK + rows * (H // G * D) + cols, (dk * sm_scale).to(DTYPE), mask=(offs_n < T)[:, None])
    tl.store(DV + rows * (H // G * D) + cols, dv.to(DTYPE), mask=(offs_n < T)[:, None])


@triton.jit
def _dq_steps(dq, q, do, lse, delta, K, V, LO, b, m0, col, T, stride_k, stride_v, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
              USE_DESC: tl.constexpr, PHASE: tl.constexpr):
    """dQ of one query block from this phase's key blocks (same ranges as the forward)."""
    n_start, n_end = _key_range(LO, b, m0, T, BLOCK_M, BLOCK_N, PHASE)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    for n0 in range(n_start, n_end, BLOCK_N):
        k = _load_rows(K, b * T + n0, col, n0, T, stride_k, BLOCK_N, D, USE_DESC)
        v = _load_rows(V, b * T + n0, col, n0, T, stride_v, BLOCK_N, D, USE_DESC)
        p = _masked(tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0,      # [BM, BN]
                    LO, b, offs_m[:, None], (n0 + tl.arange(0, BLOCK_N))[None, :], T, PHASE)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq = tl.dot(ds.to(DTYPE), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, LO, qk_scale, sm_scale, T, H, G,
                 stride_q, stride_k, stride_v, stride_do,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                 USE_DESC: tl.constexpr):
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, b * T + m0, h * D, m0, T, stride_q, BLOCK_M, D, False)
    do = _load_rows(DO, b * T + m0, h * D, m0, T, stride_do, BLOCK_M, D, False)
    lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for phase in tl.static_range(3):
        dq = _dq_steps(dq, q, do, lse, delta, K, V, LO, b, m0, (h // G) * D, T, stride_k, stride_v, qk_scale,
                       BLOCK_M, BLOCK_N, D, DTYPE, USE_DESC, phase)
    rows = (b * T + offs_m).to(tl.int64)
    tl.store(DQ + rows[:, None] * (H * D) + h * D + tl.arange(0, D)[None, :], (dq * sm_scale).to(DTYPE),
             mask=(offs_m < T)[:, None])


# ---- Attention: host side ------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by head_dim. Hopper sizing: the forward keeps
# Q (BM x D) in shared memory plus num_stages K/V tiles; 128x64 at D=128 with 3 stages is ~128 KB.
# dK/dV holds its K/V block and two fp32 accumulators in registers, hence 64-row query steps.
_ATTN_BLOCKS = {
    64: {"fwd": (128, 64, 4, 3), "dkdv": (64, 128, 8, 3), "dq": (128, 64, 8, 3)},
    128: {"fwd": (128, 64, 8, 3), "dkdv": (64, 128, 8, 2), "dq": (128, 64, 8, 2)},
}
# The interpreter costs ~3 ms per program and loop step whatever the tile; the tests want several blocks
# per sequence at T ~ 50-100, with BLOCK_M != BLOCK_N to catch mixed-up indices.
_INTERP_BLOCKS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}


def _attn_blocks(D):
    return _INTERP_BLOCKS if _interpreting() else _ATTN_BLOCKS[64 if D <= 64 else 128]


def _rows_view(x):
    """x if its tokens are rows of a [B*T, heads*D] view with a 16-byte aligned stride >= a row (what TMA
    needs: a fused qkv projection's views qualify, expanded or transposed tensors do not), else a copy."""
    B, T, nh, D = x.shape
    ok = (x.stride(3) == 1 and (nh == 1 or x.stride(2) == D) and x.stride(1) >= nh * D
          and (B == 1 or x.stride(0) == T * x.stride(1))
          and (x.stride(1) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0)
    return x if ok else x.contiguous()


def _tiles(x, block_rows, tma):
    """What the loops read x through: a TMA descriptor over its [B*T, heads*D] rows, or x itself."""
    B, T, nh, D = x.shape
    return TensorDescriptor(x, [B * T, nh * D], [x.stride(1), 1], [block_rows, D]) if tma else x


# The whole mask is one number per query, lo[i], its first visible key: query i sees exactly the keys
# [lo[i], i]. lo never decreases along a row, so a block of queries needs only the keys from lo of its
# first query on, and each inner loop runs in three phases: masked blocks, fully visible blocks (no
# mask arithmetic), masked blocks on the diagonal.
def _attn_lo(pos, window):
    """First visible key of each query, int32 [B, T] from pos [B, T]."""
    t = torch.arange(pos.shape[1], device=pos.device, dtype=torch.int32)
    # a document starts at pos == 0; a padding token (pos < 0) starts an empty one after itself
    lo = torch.where(pos == 0, t, torch.where(pos < 0, t + 1, 0)).to(torch.int32).cummax(dim=1).values
    if window is not None:
        lo = torch.maximum(lo, t - (window - 1))
    return lo.contiguous()


# Forward and backward are torch custom ops tied by register_autograd rather than an autograd.Function:
# torch.compile then keeps each as one opaque node (no graph break, no tracing of Triton launches or
# TMA descriptors). Block sizes are derived inside from head_dim; only `tma` crosses the boundary.
@torch.library.custom_op("nanosmol::flash_attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                 tma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, T, H, D] (contiguous, q's dtype) and the log-sum-exp [B, H, T] (fp32, base 2)."""
    q, k, v = _rows_view(q), _rows_view(k), _rows_view(v)
    B, T, H, D = q.shape
    BM, BN, warps, stages = _attn_blocks(D)["fwd"]
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    with _on_device(q):
        _attn_fwd[(B * H, triton.cdiv(T, BM))](
            q, _tiles(k, BN, tma), _tiles(v, BN, tma), o, lse, lo, LOG2E / math.sqrt(D), T, H, H // k.shape[2],
            q.stride(1), k.stride(1), v.stride(1), D=D, BLOCK_M=BM, BLOCK_N=BN,
            DTYPE=_TL_DTYPE[q.dtype], USE_DESC=tma, num_warps=warps, num_stages=stages)
    return o, lse


@_attn_fwd_op.register_fake
def _(q, k, v, lo, tma):
    return q.new_empty(q.shape), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("nanosmol::flash_attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, lo: torch.Tensor, tma: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, contiguous, in q's dtype. dQ has its own kernel: two extra matmuls per tile, but no
    atomics, so the gradients are deterministic."""
    q, k, v, do = _rows_view(q), _rows_view(k), _rows_view(v), _rows_view(do)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    (BM1, BN1, w1, s1), (BM2, BN2, w2, s2) = _attn_blocks(D)["dkdv"], _attn_blocks(D)["dq"]
    scale = 1.0 / math.sqrt(D)
    common = dict(D=D, DTYPE=_TL_DTYPE[q.dtype], USE_DESC=tma)
    # the softmax-backward term shared by every key of a row: rowsum(dO * O), [B, H, T]
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (torch.empty(t.shape, device=q.device, dtype=q.dtype) for t in (q, k, v))
    # hi[j]: the end of the queries that see key j (lo <= j), for the dK/dV loops over query blocks
    keys = torch.arange(T, device=lo.device, dtype=torch.int32).expand(B, T).contiguous()
    hi = torch.searchsorted(lo, keys, right=True).to(torch.int32)
    with _on_device(q):
        _attn_bwd_dkdv[(B * Hkv, triton.cdiv(T, BN1))](
            _tiles(q, BM1, tma), k, v, _tiles(do, BM1, tma), dk, dv, lse, delta, lo, hi, scale * LOG2E, scale,
            T, H, H // Hkv, q.stride(1), k.stride(1), v.stride(1), do.stride(1),
            BLOCK_M=BM1, BLOCK_N=BN1, num_warps=w1, num_stages=s1, **common)
        _attn_bwd_dq[(B * H, triton.cdiv(T, BM2))](
            q, _tiles(k, BN2, tma), _tiles(v, BN2, tma), do, dq, lse, delta, lo, scale * LOG2E, scale,
            T, H, H // Hkv, q.stride(1), k.stride(1), v.stride(1), do.stride(1),
            BLOCK_M=BM2, BLOCK_N=BN2, num_warps=w2, num_stages=s2, **common)
    return dq, dk, dv


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, lo, tma):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, lo, ctx.tma = inputs
    ctx.save_for_backward(q, k, v, *output, lo)


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse, lo = ctx.saved_tensors
    return *_attn_bwd_op(do, q, k, v, o, lse, lo, ctx.tma), None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


def flash_attention(q, k, v, pos=None, window=None, tma=None):
    """Causal attention, document-masked by pos [B, T] (int, or None), GQA, optional sliding window: q [B, T, H, D],
    k/v [B, T, Hkv, D] (any strides) -> o [B, T, H, D] (contiguous). tma None: TMA where the device has it."""
    if torch.is_autocast_enabled(q.device.type):    # as F.linear and SDPA would; autograd casts gradients back
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    B, T, H, D = q.shape if q.dim() == 4 else (0,) * 4
    if k.dim() != 4 or k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D or H % k.shape[2] or B * T == 0:
        raise ValueError(f"kernels.flash_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         f"(q [B,T,H,D], k/v [B,T,Hkv,D]; B, T >= 1; H a multiple of Hkv)")
    check(D in (16, 32, 64, 128), f"kernels.flash_attention: head_dim must be 16, 32, 64 or 128, got {D}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _TL_DTYPE or not (q.device == k.device == v.device):
        raise ValueError(f"kernels.flash_attention: q, k, v must share one device and one of float16/"
                         f"bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype} on {q.device}, {k.device}, {v.device}")
    check(not (q.is_cuda and q.dtype == torch.float32), "kernels.flash_attention: on GPU use float16 or bfloat16 "
          "(float32 is for the CPU interpreter tests), or call it under torch.autocast")
    if pos is not None and (pos.shape != (B, T) or pos.dtype.is_floating_point):
        raise ValueError(f"kernels.flash_attention: pos must be an integer tensor [B, T] = [{B}, {T}], "
                         f"got {pos.dtype} {tuple(pos.shape)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"kernels.flash_attention: window must be None or an int >= 1, got {window!r}")
    interpreted = q.device.type == "cpu" and _interpreting()
    if interpreted and q.dtype == torch.bfloat16:   # it returns garbage (errors ~1e8) from a bfloat16 tl.dot
        raise ValueError("kernels.flash_attention: the Triton interpreter miscomputes bfloat16 matmuls; use "
                         "float16 or float32 under TRITON_INTERPRET=1")
    check(interpreted or q.is_cuda, "kernels.flash_attention: needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
          f"tensors), got a tensor on {q.device}; use the PyTorch twin on CPU")
    if tma is None:   # TMA descriptors on NVIDIA Hopper and later (ROCm reports its own "capabilities")
        tma = interpreted or torch.version.hip is None and torch.cuda.get_device_capability(q.device)[0] >= 9
    pos = torch.arange(T, device=q.device).expand(B, T) if pos is None else pos.to(q.device)
    return _attn_fwd_op(q, k, v, _attn_lo(pos, window), tma)[0]


# ---- GPU compilation without a GPU: python kernels.py --compile sm_90 ----------------------------------

# TMA (the descriptor path) from sm_90 on; the pointer path needs sm_80's bf16 mma
COMPILE_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def compile_attention(arch="sm_90", head_dims=(64, 128), tma=(True, False)):
    """Compile flash_attention's launches for `arch` through the real host code on the CPU (Triton's compiler and
    ptxas; the interpreter accepts programs they reject); prints each kernel's shared memory, True if all compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    if _interpreting():
        raise RuntimeError("kernels.compile_attention: run without TRITON_INTERPRET=1 (it compiles, not interprets)")
    if arch not in COMPILE_ARCHS:
        raise ValueError(f"kernels.compile_attention: arch must be one of {', '.join(COMPILE_ARCHS)}, got {arch!r}")
    target = GPUTarget("cuda", int(arch[3:]), 32)
    backend = make_backend(target)
    failures = []

    def compiling(fn):     # stands in for fn.run: compile for `target` where a launch would happen
        def run(*args, grid, warmup, **kwargs):
            kwargs["debug"] = False
            bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            what = f"{fn.__name__:<15} " + " ".join(f"{n}={kwargs[n]}" for n in ("D", "BLOCK_M", "BLOCK_N", "USE_DESC"))
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            except Exception as e:
                failures.append(what)
                print(f"FAIL  {what}: {type(e).__name__}: {e}", flush=True)
                return
            print(f"ok    {what}  shared memory {kernel.metadata.shared} B", flush=True)
        return run

    jitted = (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq)
    for fn in jitted:
        fn.run = compiling(fn)
    try:
        B, T, H, Hkv = 2, 300, 8, 2
        lo = _attn_lo(_pos_of([[100, 200], [1, 299]]), 64)
        for D in head_dims:
            # views of a fused projection, as model.py's layout may give them
            qkv = torch.zeros(B, T, (H + 2 * Hkv) * D, dtype=torch.bfloat16)
            q, k, v = (t.view(B, T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
            for use_tma in tma if target.arch >= 90 else (False,):
                o, lse = _attn_fwd_op(q, k, v, lo, use_tma)
                _attn_bwd_op(o, q, k, v, o, lse, lo, use_tma)
    finally:
        for fn in jitted:
            del fn.run
    return not failures


# ---- Benchmark: python kernels.py --bench --------------------------------------------------------------

def _pos_of(rows):
    """pos [B, T] of rows packed with documents of the given lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in rows])


def _random_doc_lens(T, gen, mean_len):
    """Lengths of about T / mean_len documents filling T tokens, cut at uniform random points."""
    cuts = torch.randint(1, T, (max(0, T // mean_len - 1),), generator=gen).unique().tolist()
    return [b - a for a, b in zip([0] + cuts, cuts + [T])]


def _time_ms(fn, gpu, grads):
    """Median milliseconds of fn(); CUDA events on GPU, one call after a warm-up on CPU (tiny mode)."""
    if gpu:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _bench_impls(pos, doc_lens, gpu):
    """name -> run(q, k, v) -> o on [B, T, H, D], each with pos's document-causal mask: ours, FlexAttention with a
    BlockMask, SDPA's varlen flash attention over the documents, and on rows of one document SDPA with is_causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.attention.varlen import varlen_attn
    B, T = pos.shape
    doc = torch.cumsum(pos == 0, dim=1)
    block_mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (doc[b, qi] == doc[b, ki]),
                                   B, None, T, T, device=pos.device)
    flex = torch.compile(flex_attention, dynamic=False) if gpu else flex_attention
    cu = torch.tensor([0] + [n for row in doc_lens for n in row], device=pos.device).cumsum(0).to(torch.int32)
    longest = max(max(row) for row in doc_lens)

    def varlen(q, k, v):     # [B*T, heads, D] rows, documents delimited by cu
        return varlen_attn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, longest, longest,
                           window_size=(-1, 0), enable_gqa=True).view(q.shape)

    def sdpa_causal(backend, q, k, v, expand):     # one SDPA backend
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if expand:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand).transpose(1, 2)
    impls = {"triton (ours)": lambda q, k, v: flash_attention(q, k, v, pos),
             "flex (BlockMask)": lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      block_mask=block_mask, enable_gqa=True).transpose(1, 2),
             "sdpa varlen flash": varlen}
    if all(len(row) == 1 for row in doc_lens):  # plain causal rows: SDPA's fused backends take is_causal
        impls["sdpa flash"] = lambda q, k, v: sdpa_causal(SDPBackend.FLASH_ATTENTION, q, k, v, expand=False)
        # cuDNN's SDPA takes no GQA: its time includes expanding K/V to every query head
        impls["sdpa cudnn"] = lambda q, k, v: sdpa_causal(SDPBackend.CUDNN_ATTENTION, q, k, v, expand=True)
    return impls


def bench(tiny=False, head_dim=128):
    """Forward and backward TFLOP/s, as a markdown table, on causal rows of T = 1k ... 16k and on rows of packed
    documents (GQA), ours next to FlexAttention and SDPA with the same mask (bf16 errors: tests/bench_gpu.py)."""
    gpu = torch.cuda.is_available() and not _interpreting()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    torch._dynamo.config.recompile_limit = 64     # FlexAttention compiles once per shape
    # SmolLM3's attention shape; 16k tokens per batch: causal rows, then rows of ~600-token documents
    H, Hkv, D, tokens, mean_doc = (2, 1, 16, 32, 12) if tiny else (16, 4, head_dim, 16384, 600)
    cases = ([(32, False), (32, True)] if tiny else
             [(T, False) for T in (1024, 2048, 4096, 8192, 16384)] + [(4096, True), (8192, True)])
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton.__version__}  "
          f"{torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter: timings meaningless)'}")
    print(f"H={H} Hkv={Hkv} D={D} {str(dtype)[6:]}, {tokens} tokens per batch. FLOPs: fwd 2*H*D*sum(L^2) "
          f"over documents of length L, bwd 2.5x fwd. x: their time / ours (> 1: ours is faster)\n")
    print("| case | impl | fwd ms | fwd TF/s | bwd ms | bwd TF/s | x fwd | x bwd |\n|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for T, packed in cases:
        rows = [_random_doc_lens(T, gen, mean_doc) if packed else [T] for _ in range(tokens // T)]
        pos = _pos_of(rows).to(device)
        fwd_flops = 2 * H * D * sum(n * n for row in rows for n in row)
        q = torch.randn(len(rows), T, H, D, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(len(rows), T, Hkv, D, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
        do = torch.randn_like(q)
        label, ours = f"T={T} {'packed docs' if packed else 'causal'}", None
        for name, fn in _bench_impls(pos, rows, gpu).items():
            try:
                f_ms = _time_ms(lambda: fn(q, k, v), gpu, ())
                o = fn(q, k, v)
                b_ms = _time_ms(lambda: o.backward(do, retain_graph=True), gpu, (q, k, v))
                ratio = f" {f_ms / ours[0]:.2f} | {b_ms / ours[1]:.2f} |" if ours else " | |"
                ours = ours or (f_ms, b_ms)
                row = (f" {f_ms:.3f} | {fwd_flops / f_ms / 1e9:.0f} | {b_ms:.3f} | "
                       f"{2.5 * fwd_flops / b_ms / 1e9:.0f} |{ratio}")
            except Exception as e:     # a backend this device/build lacks is a table entry, not a crash
                if ours is None:
                    raise
                row = f" n/a: {type(e).__name__}: {str(e).splitlines()[0][:70]} | | | | | |"
            print(f"| {label} | {name} |{row}", flush=True)


def main(argv):
    parser = argparse.ArgumentParser(
        prog="kernels.py", description="Benchmark and GPU-compile nanosmol's Triton attention kernels.",
        epilog="correctness: python -m pytest -q tests/test_kernels.py (CPU, Triton interpreter)")
    parser.add_argument("--bench", action="store_true", help="attention TFLOP/s vs FlexAttention and SDPA (GPU)")
    parser.add_argument("--tiny", action="store_true", help="with --bench: toy sizes (runs on CPU)")
    parser.add_argument("--head_dim", type=int, default=128, choices=(64, 128), help="with --bench")
    parser.add_argument("--compile", metavar="ARCH", choices=COMPILE_ARCHS,
                        help=f"compile the attention kernels for ARCH ({', '.join(COMPILE_ARCHS)}), no GPU needed")
    if not argv:
        parser.print_usage(sys.stderr)
        print("kernels.py: choose --bench [--tiny] or --compile ARCH (-h for help)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.compile and (args.bench or args.tiny):
        parser.error("--compile runs alone")
    if args.compile:
        return 0 if compile_attention(args.compile) else 1
    if not args.bench:
        parser.error("--tiny and --head_dim go with --bench")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("--bench needs a CUDA GPU; on CPU run --bench --tiny")
    if not torch.cuda.is_available() and not _interpreting():
        # triton is already imported, and it reads TRITON_INTERPRET at import: start afresh with it set
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv,
                  dict(os.environ, TRITON_INTERPRET="1"))
    bench(args.tiny, args.head_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
