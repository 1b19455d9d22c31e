"""model.py — the SmolLM3 decoder, with every architecture knob the Smol Training Playbook ablates.

    python model.py config/smollm3.py [--n_layers=4]  # architecture summary (meta device: no weights allocated)

    model = Model(ModelConfig(...))
    logits = model(x, pos=pos)                  # x, pos [B, T] -> [B, T, V] fp32
    _, loss = model(x, y, pos)                  # cross-entropy (+ z-loss, + MoE balance), chunked past loss_budget_mb
    model.generate(prompts, max_new_tokens)     # KV cache: prefill, then decode_one_token per step
    model.generate(prompts, n, num_samples=G)   # G samples per prompt sharing its prefill (GRPO); compile=True
    Model.from_pretrained(dir) / model.save_pretrained(dir)    # transformers' SmolLM3 layout (MLA / MoE: ours)

pos holds per-document positions: 0 at each document start, -1 for padding (nothing attends to or from it, and
its attention output is 0); pos None is one causal sequence per row. A bf16 model gives transformers'
SmolLM3ForCausalLM bf16 logits bit-for-bit, and so does an fp32 model under bf16 autocast. Beyond SmolLM3:
attention = "mla" (DeepSeek-V2's latent attention) and n_experts > 0 (MoE MLPs; train.py calls model.moe_step()
after each update), each equal to transformers' DeepseekV3 modules in tests/test_mla_moe.py.

Sections: ModelConfig · RMSNorm, RoPE (+ YaRN) · doc_causal_mask (the one attention mask, kernels.py's twin's too) ·
Attention (attn_impl "sdpa": CPU, reference; "triton": kernels.py, GPU), MLA, MLP, MoE, Block · KVCache · Model
(forward and loss, MoE balance, accounting, generation, HF checkpoints) · HF names, atomic_write, sample, summary, main
"""
import functools
import json
import math
import os
import pathlib
import sys
import typing
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def check(ok, msg):
    """The one-line error of bad input (a config, a checkpoint, an argument): ValueError(msg) unless ok."""
    if not ok:
        raise ValueError(msg)


@dataclass
class ModelConfig:
    vocab_size: int = 128256
    d_model: int = 2048
    n_layers: int = 36
    n_heads: int = 16
    n_kv_heads: int = 4            # = n_heads: MHA, 1: MQA, between: GQA
    head_dim: int | None = None    # None: d_model // n_heads
    d_ff: int = 11008
    rope_theta: float = 50000.0
    yarn_factor: float = 1.0       # YaRN context extension (SmolLM3: 2 at inference for 128k); 1 = off
    yarn_original_max_position: int = 65536  # the context the model was trained at, for YaRN
    nope_interval: int = 4         # RNoPE: layer i skips RoPE when (i + 1) % nope_interval == 0; 0 = RoPE everywhere
    max_position_embeddings: int = 65536
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    doc_masking: bool = True       # False: a row is one causal sequence (the playbook's baseline)
    sliding_window: int | None = None  # every layer sees the last `window` tokens (i - j < window)
    qk_norm: bool = False
    z_loss: float = 0.0            # PaLM: adds z_loss * logsumexp(logits)^2 per token
    attn_impl: str = "sdpa"        # "sdpa" | "triton"
    init_std: float = 0.02
    loss_budget_mb: float = 1024.0  # fp32 logits the loss holds at once; more rows run in chunks (see forward)
    act_ckpt: bool = False         # recompute each layer in backward: ~1/3 more compute, activations of 1 layer
    # special ids, None = none; train.py takes them from the tokenizer, config.json records them
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    # MLA (DeepSeek-V2): attention = "mla" replaces GQA's K/V heads by one low-rank latent per token
    attention: str = "gqa"         # "gqa" | "mla"
    kv_lora_rank: int = 512        # the latent that keys and values come up from (what the KV cache holds)
    q_lora_rank: int = 0           # query latent; 0 = queries straight from the residual stream
    qk_nope_head_dim: int = 128    # per-head query/key dims without position
    qk_rope_head_dim: int = 64     # per-head query dims with RoPE, meeting one rope key shared by all heads
    v_head_dim: int = 128
    # MoE MLP: n_experts > 0 swaps the MLP of layers `moe_layers` for routed experts (+ always-on shared ones)
    n_experts: int = 0             # routed experts; 0 = dense MLP everywhere
    n_experts_active: int = 2      # top-k experts per token
    n_shared_experts: int = 0
    d_expert: int | None = None    # each expert's FFN width; None = d_ff
    moe_layer_interval: int = 1    # layer i is MoE when i >= moe_first_dense and (i + 1) % interval == 0
    moe_first_dense: int = 0       # DeepSeek keeps the first layers dense
    router_score: str = "softmax"  # "softmax" (Switch, Mixtral) | "sigmoid" (DeepSeek-V3)
    router_norm_topk: bool = True  # rescale the k chosen scores to sum to 1
    moe_aux_loss: float = 0.01     # load-balancing loss coefficient (Switch / DeepSeek form); 0 = off
    moe_z_loss: float = 0.0        # router z-loss coefficient (ST-MoE: 1e-3); 0 = off
    moe_bias_update: float = 0.0   # auxiliary-loss-free balancing: bias step per update (DeepSeek-V3: 1e-3); 0 = off
    moe_capacity_factor: float = 0.0  # an expert takes <= factor * tokens * k / n_experts assignments; 0 = no cap

    def __post_init__(self):
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "loss_budget_mb", "max_position_embeddings"):
            check(getattr(self, k) > 0, f"model config: {k} must be > 0, got {getattr(self, k)}")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0, f"model config: d_model ({self.d_model}) must be divisible by "
                  f"n_heads ({self.n_heads}) unless head_dim is set")
            self.head_dim = self.d_model // self.n_heads
        checks = [(self.n_heads % self.n_kv_heads == 0, f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"),
                  (self.head_dim > 0 and self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even and > 0 for RoPE"),
                  (self.attn_impl in ("sdpa", "triton"), f"attn_impl must be 'sdpa' or 'triton', got {self.attn_impl!r}"),
                  (self.nope_interval >= 0, f"nope_interval must be >= 0, got {self.nope_interval}"),
                  (self.yarn_factor >= 1.0, f"yarn_factor must be >= 1 (1 = off), got {self.yarn_factor}"),
                  (self.sliding_window is None or self.sliding_window > 0, f"sliding_window must be None or > 0, got {self.sliding_window}")]
        if self.attention == "mla":
            checks += [(min(self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim) > 0 and self.q_lora_rank >= 0,
                        "MLA needs kv_lora_rank, qk_nope_head_dim, v_head_dim > 0 and q_lora_rank >= 0"),
                       (self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even and > 0"),
                       # the Triton kernel takes one head dim for q, k and v; MLA's differ (SDPA on GPU too)
                       (self.attn_impl == "sdpa", "attention='mla' runs on attn_impl='sdpa'"),
                       (not self.qk_norm, "qk_norm is GQA's (MLA normalises its latents instead)")]
        checks += [(self.attention in ("gqa", "mla"), f"attention must be 'gqa' or 'mla', got {self.attention!r}"),
                   (self.n_experts == 0 or 1 <= self.n_experts_active <= self.n_experts,
                    f"n_experts_active ({self.n_experts_active}) must be in 1..n_experts ({self.n_experts})"),
                   (min(self.n_experts, self.n_shared_experts, self.moe_first_dense) >= 0 and self.moe_layer_interval > 0
                    and (self.d_expert is None or self.d_expert > 0), "n_experts, n_shared_experts, moe_first_dense >= 0, moe_layer_interval, d_expert > 0"),
                   (self.router_score in ("softmax", "sigmoid"), f"router_score must be 'softmax' or 'sigmoid', got {self.router_score!r}"),
                   (min(self.moe_aux_loss, self.moe_z_loss, self.moe_bias_update, self.moe_capacity_factor) >= 0,
                    "moe_aux_loss, moe_z_loss, moe_bias_update, moe_capacity_factor must be >= 0")]
        # an id past the vocabulary cannot be embedded (transformers refuses such a pad_token_id outright)
        checks += [(getattr(self, k) is None or 0 <= getattr(self, k) < self.vocab_size,
                    f"{k} {getattr(self, k)} is outside the vocabulary (vocab_size {self.vocab_size})")
                   for k in ("bos_id", "eos_id", "pad_id")]
        for ok, msg in checks:
            check(ok, f"model config: {msg}")

    @property
    def loss_chunk(self):
        """Rows of the LM head + CE computed at once: as many as loss_budget_mb of fp32 logits hold."""
        return max(1, int(self.loss_budget_mb * 2**20) // (4 * self.vocab_size))

    @property
    def nope_layers(self):
        return nope_layers(self.n_layers, self.nope_interval)

    @property
    def moe_layers(self):
        return [i for i in range(self.n_layers) if self.n_experts and i >= self.moe_first_dense
                and (i + 1) % self.moe_layer_interval == 0]

    @property
    def is_smollm3(self):
        """A model transformers' SmolLM3 can hold: checkpoints in its layout (others in ours, see save_pretrained)."""
        return self.attention == "gqa" and not self.n_experts

    def cache_dims(self, layer):
        """(heads, dim) of a layer's two cached tensors: GQA's keys and values; MLA's latent and shared rope key."""
        if self.attention == "mla":
            return (1, self.kv_lora_rank), (1, 0 if layer in self.nope_layers else self.qk_rope_head_dim)
        return (self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)


def nope_layers(n_layers, interval):
    """RNoPE's layers without RoPE (0-based): with interval 4, layers 3, 7, 11, ...; interval 0: none."""
    return [i for i in range(n_layers) if interval and (i + 1) % interval == 0]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as SmolLM3 does) and cast back before the weight, matching transformers bit-for-bit
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg):
    """Inverse frequencies [D/2] (half-split layout: 1 / theta^(arange(0, D, 2) / D)) and the cos/sin scale."""
    d, theta, s = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim, cfg.rope_theta, cfg.yarn_factor
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if s == 1.0:
        return inv_freq, 1.0
    # YaRN (Peng et al., 2023): pairs that turn more than 32 times over the original context keep their frequency,
    # pairs that turn less than once are interpolated (frequency / factor), a linear ramp over the pair index blends
    # between (pair i turns r times at index d * ln(L / (2 pi r)) / (2 ln theta)); cos, sin scaled 0.1 ln(factor) + 1.
    index_at = lambda turns: d * math.log(cfg.yarn_original_max_position / (2 * math.pi * turns)) / (2 * math.log(theta))
    lo, hi = max(math.floor(index_at(32)), 0), min(math.ceil(index_at(1)), d - 1)
    interp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    return inv_freq * (1 - interp) + inv_freq / s * interp, 0.1 * math.log(s) + 1.0


def rope_cos_sin(pos, cfg, dtype=torch.float32):
    """cos, sin [B, T, 1, D] for positions pos [B, T] >= 0, in `dtype`; sin's first half negated (apply_rope)."""
    inv_freq, scale = rope_frequencies(cfg)
    # angles in fp32, cos/sin rounded to the residual stream's dtype as transformers does (bit-exact bf16);
    # under autocast the residual stream is fp32 and so is RoPE
    ang = (pos.float()[..., None] * inv_freq.to(pos.device))[:, :, None]  # [B, T, 1, D/2]
    cos, sin = (ang.cos() * scale).to(dtype), (ang.sin() * scale).to(dtype)
    return cos.repeat(1, 1, 1, 2), torch.cat([-sin, sin], -1)


def apply_rope(x, cos, sin):
    # rotate_half(x) * sin (transformers) = roll(x) * sin with sin's first half negated: bit-for-bit, one op fewer
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def rms_norm_decode(h, eps):
    """h / RMS(h) [B, C], no weight, in 4 ops: at a decode step's few rows each op costs more than its math, and
    F.rms_norm dispatches ~8 (a Python-scalar op ~2x a tensor one, hence eps as a [1] tensor). Statistics in fp32."""
    n = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=torch.float32)   # [B, 1]
    return (h * torch.addcmul(eps, n, n, value=1 / h.shape[-1]).rsqrt_()).to(h.dtype)


def doc_causal_mask(pos, window=None, doc_masking=True):
    """Boolean attention mask [B, 1, T, T] (True = may attend) from per-document positions pos [B, T]."""
    i = torch.arange(pos.shape[1], device=pos.device)
    d = i[:, None] - i[None, :]                                # query index - key index
    allowed = ((d >= 0) & (d < (window or len(i))))[None]      # [1, T, T] causal, within the window
    real = pos >= 0                                            # padding (pos -1) is invisible both ways
    allowed = allowed & real[:, :, None] & real[:, None, :]
    if doc_masking:
        doc = torch.cumsum(pos <= 0, dim=1)                    # a document starts at pos 0 (or a padding run)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.use_rope = layer_idx not in cfg.nope_layers
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, H * D, bias=False)
        self.k = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.v = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.o = nn.Linear(H * D, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, cfg.rms_eps), RMSNorm(D, cfg.rms_eps)

    def forward(self, x, rope, pos, mask, cache=None):
        """x [B, T, C]; rope = (cos, sin); pos [B, T] (-1 = padding) or None (causal rows, no padding);
        mask: SDPA's bool mask [B, 1, T, S], or None for causal (the Triton kernel masks from pos itself)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q(x).view(B, T, cfg.n_heads, cfg.head_dim)                                  # [B, T, H, D]
        k, v = (p(x).view(B, T, cfg.n_kv_heads, cfg.head_dim) for p in (self.k, self.v))  # [B, T, Hkv, D]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # fp32 RoPE / qk-norm weights promote q, k under autocast; attention takes one dtype (v's: bf16 there)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cfg.attn_impl == "triton" and cache is None:
            # on a CPU only under Triton's interpreter (tests at tiny sizes); train.py refuses it for real runs
            if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError("attn_impl='triton' needs a CUDA GPU (or TRITON_INTERPRET=1); on CPU use 'sdpa'")
            import kernels  # imported here so that the CPU path never needs triton
            return self.o(kernels.flash_attention(q, k, v, pos, cfg.sliding_window).reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)     # [B, Hkv, S, D]
        rep = cfg.n_heads // cfg.n_kv_heads
        if mask is not None and rep > 1 and q.is_cuda:
            # CUDA's fused kernels may not take a mask and GQA together; the fallback, the math kernel,
            # holds [B, H, T, T] scores. Expanding K/V keeps the fused kernel.
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=k.shape[1] != q.shape[1])
        o = o.transpose(1, 2)                              # [B, T, H, D]
        if pos is not None:
            # a padding query saw only itself (Model.sdpa_mask); its output is 0 by contract
            o = o.masked_fill((pos < 0)[:, :, None, None], 0.0)
        return self.o(o.reshape(B, T, -1))


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, 2024): every head's key and value come up (kv_up) from one latent
    per token, c = RMSNorm(kv_down x), each key completed by a rope key shared by the heads; the cache holds c and
    that key. Queries come from x, or from their own latent (q_lora_rank > 0). A NoPE layer has no rope part."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.rope_dim = cfg.cache_dims(layer_idx)[1][1]
        C, H, r, dn, dv = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.q_down, self.q_norm = nn.Linear(C, cfg.q_lora_rank, bias=False), RMSNorm(cfg.q_lora_rank, cfg.rms_eps)
        self.q = nn.Linear(cfg.q_lora_rank or C, H * (dn + self.rope_dim), bias=False)
        self.kv_down, self.kv_norm = nn.Linear(C, r + self.rope_dim, bias=False), RMSNorm(r, cfg.rms_eps)
        self.kv_up = nn.Linear(r, H * (dn + dv), bias=False)
        self.o = nn.Linear(H * dv, C, bias=False)

    def forward(self, x, rope, pos, mask, cache=None):
        """As Attention.forward."""
        B, T, _ = x.shape
        cfg, H, dn, dr = self.cfg, self.cfg.n_heads, self.cfg.qk_nope_head_dim, self.rope_dim
        q = self.q(self.q_norm(self.q_down(x)) if cfg.q_lora_rank else x).view(B, T, H, -1).transpose(1, 2)
        c, k_rope = self.kv_down(x)[:, None].split([cfg.kv_lora_rank, dr], dim=-1)    # [B, 1, T, r], [B, 1, T, dr]
        c = self.kv_norm(c)
        if dr:
            cos, sin = (t.transpose(1, 2) for t in rope)                               # [B, 1, T, dr]
            q = torch.cat([q[..., :dn], apply_rope(q[..., dn:], cos, sin)], dim=-1)    # [B, H, T, dn + dr]
            k_rope = apply_rope(k_rope, cos, sin)
        if cache is not None:
            c, k_rope = cache.update(self.layer_idx, c, k_rope)                       # [B, 1, S, r], [B, 1, S, dr]
        # every head's keys and values from the latent (decoding could fold kv_up into q and o: DeepSeek's absorb)
        k_nope, v = self.kv_up(c).view(B, -1, H, dn + cfg.v_head_dim).transpose(1, 2).split([dn, cfg.v_head_dim], -1)
        k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)                  # [B, H, S, dn + dr]
        o = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask, is_causal=mask is None)
        if pos is not None:
            o = o.masked_fill((pos < 0)[:, None, :, None], 0.0)                        # padding's output is 0
        return self.o(o.transpose(1, 2).reshape(B, T, -1))                             # [B, T, H * dv]


class MLP(nn.Module):
    def __init__(self, cfg, d_ff=None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Mixture of experts in place of the MLP: a router scores n_experts SwiGLU experts per token in fp32 (softmax,
    or DeepSeek-V3's sigmoid); the top n_experts_active run, weighted by their (renormalised) scores, beside
    n_shared_experts on every token. Balance: moe_aux_loss * E * sum_i f_i P_i (Switch; f_i: share of assignments,
    P_i: mean normalised score) + router z-loss, in the mean loss; or DeepSeek-V3's bias, which only chooses
    (Model.moe_step moves it). An expert over its capacity drops its last assignments in token order (the token keeps
    its residual). Dispatch sorts by expert, one matmul each and one host sync (breaks torch.compile's graph)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.router = cfg, nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        d = cfg.d_expert or cfg.d_ff
        self.experts = nn.ModuleList(MLP(cfg, d) for _ in range(cfg.n_experts))
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, cfg.n_shared_experts * d)
        self.register_buffer("balance_bias", torch.zeros(cfg.n_experts))  # saved: the router's state
        self.aux_loss, self.load, self.dropped = None, 0, 0  # load, dropped: assignments since the last moe_step

    def forward(self, x):
        cfg, E, k = self.cfg, self.cfg.n_experts, self.cfg.n_experts_active
        xf, N = x.reshape(-1, x.shape[-1]), x.shape[:-1].numel()       # [N, C]
        with torch.autocast(x.device.type, enabled=False):            # routing in fp32, also under autocast
            logits = F.linear(xf.float(), self.router.weight.float())  # [N, E]
        scores = logits.softmax(-1) if cfg.router_score == "softmax" else logits.sigmoid()
        chosen = (scores + self.balance_bias).topk(k, dim=-1).indices  # [N, k]; the bias only chooses
        weight = scores.gather(1, chosen)
        if cfg.router_norm_topk:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        flat = chosen.flatten()                                        # assignment a is token a // k's
        counts, order = torch.bincount(flat, minlength=E), flat.argsort(stable=True)  # by expert, then token order
        cap = math.ceil(cfg.moe_capacity_factor * N * k / E) if cfg.moe_capacity_factor else N * k
        rank = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[flat[order]]
        order, kept = order[rank < cap], counts.clamp(max=cap)
        token = order // k
        ys = torch.cat([e(xf[t]) for e, t in zip(self.experts, token.split(kept.tolist()))])
        # index_add takes one dtype: the experts' (bf16 under autocast, xf fp32), as a dense MLP's output is
        out = torch.zeros_like(xf, dtype=ys.dtype).index_add(0, token, ys * weight.flatten()[order, None].to(ys.dtype))
        if cfg.n_shared_experts:
            out = out + self.shared(xf)
        probs = scores / scores.sum(-1, keepdim=True)                  # sigmoid scores normalised per token
        self.aux_loss = cfg.moe_aux_loss * E * (counts / (N * k) * probs.mean(0)).sum()
        if cfg.moe_z_loss:
            self.aux_loss = self.aux_loss + cfg.moe_z_loss * torch.logsumexp(logits, -1).square().mean()
        if self.training:
            self.load, self.dropped = self.load + counts.detach(), self.dropped + (counts - kept).sum().detach()
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = (MLA if cfg.attention == "mla" else Attention)(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MoE(cfg) if layer_idx in cfg.moe_layers else MLP(cfg)

    def forward(self, x, rope, pos, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, pos, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Static, preallocated per layer [B, heads, S, dim] (ModelConfig.cache_dims), an additive mask per row [B, S]
    (0: a real token's key; -inf: padding, or not yet written), RoPE's cos/sin per position [S, 1, 1, D]. A step
    writes its column by an index tensor (`col`) and reads every column under the mask: the same shapes each step
    and no Python-side state (what torch.compile needs to compile it once)."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        zeros = lambda heads, dim: torch.zeros(batch, heads, max_len, dim, device=device, dtype=dtype)
        dims = [cfg.cache_dims(i) for i in range(cfg.n_layers)]
        self.k, self.v = [zeros(*k) for k, _ in dims], [zeros(*v) for _, v in dims]
        self.mask = torch.full((batch, max_len), float("-inf"), device=device, dtype=dtype)
        self.window, self.columns = cfg.sliding_window, torch.arange(max_len, device=device)
        self.cos, self.sin = (t[0, :, None] for t in rope_cos_sin(self.columns[None], cfg, dtype))  # [S, 1, 1, D]
        self.eps = torch.tensor([cfg.rms_eps], device=device)  # rms_norm_decode's
        self.col = None   # the columns update() writes: the prompt's at prefill, then one per decode step
        self.stop = 0     # the columns update() returns: the prompt's at prefill, then all (masked)

    def update(self, layer, k, v):
        """Write this layer's two tensors [B, heads, T, dim] at `col` -> its cache [B, heads, stop, dim]."""
        self.k[layer].index_copy_(2, self.col, k)
        self.v[layer].index_copy_(2, self.col, v)
        return self.k[layer][:, :, :self.stop], self.v[layer][:, :, :self.stop]

    def expand(self, n):
        """Each row repeated n times in place of one (rows b*n .. b*n+n-1 are copies of row b)."""
        self.k, self.v = [t.repeat_interleave(n, 0) for t in self.k], [t.repeat_interleave(n, 0) for t in self.v]
        self.mask = self.mask.repeat_interleave(n, 0)


class CrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy + z_loss * logsumexp^2 of fp32 logits [N, V] -> ([N], 0 where y == -100; the logits'
    buffer, now log-softmax: ignore it). Forward and backward, (softmax (1 + 2 z lse) - onehot(y)) g, run in that one
    buffer, not autograd's four [N, V] (a CPU first-touches each: ~10-20% of a small model's step, BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, logits, y, z_loss):
        valid = y != -100
        y = y.masked_fill(~valid, 0)
        lse = torch.logsumexp(logits, -1) if z_loss else None
        torch.log_softmax(logits, -1, out=logits)  # in place: the caller's logits are not read again
        ctx.mark_dirty(logits)
        loss = -logits.gather(1, y[:, None])[:, 0] + (z_loss * lse.square() if z_loss else 0)
        ctx.save_for_backward(logits, y, valid, lse)
        ctx.z_loss = z_loss
        ctx.set_materialize_grads(False)
        return loss.masked_fill(~valid, 0.0), logits

    @staticmethod
    def backward(ctx, g, _):
        lsm, y, valid, lse = ctx.saved_tensors
        g = g.masked_fill(~valid, 0.0)
        # lsm.exp_() is the softmax, in place (a second backward of the graph fails autograd's version check)
        grad = lsm.exp_().mul_((g if lse is None else g * (1 + 2 * ctx.z_loss * lse))[:, None])
        return grad.scatter_add_(1, y[:, None], -g[:, None]), None, None


def _chunk_ce(h, weight, y, z_loss):
    """Per-token cross-entropy (+ z-loss) for one chunk: h [N, C], y [N] -> [N] (0 where y == -100)."""
    # under bf16 autocast the logits leave the matmul in bf16 (as in transformers); the softmax runs in fp32
    return CrossEntropy.apply((h @ weight.t()).float(), y, z_loss)[0]


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in [] if self.tok_emb.weight.is_meta else self.modules():  # meta (summary, from_pretrained): none
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.init_std)

    @property
    def head_weight(self):
        return self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def sdpa_mask(self, pos):
        """doc_causal_mask [B, 1, T, T], where every query also sees itself: CUDA's SDPA kernels may give NaN
        for a row with nothing to attend to (a padding query), and Attention zeroes those outputs anyway."""
        eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)
        return doc_causal_mask(pos, self.cfg.sliding_window, self.cfg.doc_masking) | eye

    def hidden(self, x, pos, mask, cache=None, rope=None):
        """Final-norm hidden states [B, T, C] (pos, mask: see Attention); rope: (cos, sin) if the caller has them."""
        h = self.tok_emb(x)
        if rope is None:
            rope_pos = torch.arange(x.shape[1], device=x.device)[None] if pos is None else pos.clamp(min=0)
            rope = rope_cos_sin(rope_pos, self.cfg, h.dtype)  # padding's rotation (pos 0) is masked out anyway
        for layer in self.layers:
            if self.cfg.act_ckpt and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, pos, mask, use_reentrant=False)
            else:
                h = layer(h, rope, pos, mask, cache)
        return self.norm(h)

    def forward(self, x, y=None, pos=None, reduction="mean"):
        check(reduction in ("mean", "sum", "none"), f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        cfg = self.cfg
        order = (pos < 0).int().argsort(dim=1, stable=True) if pos is not None and not cfg.doc_masking else None
        if order is not None:
            # one causal sequence of the row's real tokens: padding moves (stably) to the row's end, where SDPA's mask and
            # the Triton kernel's (one key range per query) both hide it and a window counts real tokens; RoPE counts them
            x, pos = x.gather(1, order), pos.gather(1, order)
            pos = torch.where(pos >= 0, (pos >= 0).cumsum(1) - 1, -1)
        # one SDPA mask for all layers; None: causal (no pos, no window), or the Triton kernel's own from pos
        mask = None
        if cfg.attn_impl == "sdpa" and (pos is not None or cfg.sliding_window is not None):
            mask = self.sdpa_mask(torch.arange(x.shape[1], device=x.device)[None] if pos is None else pos)
        h = self.hidden(x, pos, mask)
        if order is not None:                              # back in the input's order
            h = h.scatter(1, order[..., None].expand_as(h), h)
        if y is None:
            return (h @ self.head_weight.t()).float()
        # Logits within loss_budget_mb: LM head and CE in one pass; beyond, checkpointed chunks of that size, so peak
        # memory is one chunk's logits (4096 tokens x 128k vocab = 2 GB fp32) for a second LM-head matmul in backward.
        h, yf, n = h.flatten(0, 1), y.flatten(), cfg.loss_chunk
        chunked = n < len(yf) and torch.is_grad_enabled()
        ce = functools.partial(checkpoint, _chunk_ce, use_reentrant=False) if chunked else _chunk_ce
        per_token = torch.cat([ce(h[i:i + n], self.head_weight, yf[i:i + n], cfg.z_loss) for i in range(0, len(yf), n)])
        if reduction == "none":
            return None, per_token.view_as(y)
        loss = per_token.sum() / (1 if reduction == "sum" else (y != -100).sum().clamp(min=1))
        for m in self.moe() if reduction == "mean" else []:  # the training loss adds the balance losses
            loss = loss + m.aux_loss
        return None, loss

    # ---- MoE: the routers' balance between updates ---------------------------------------------------
    def moe(self):
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def moe_step(self):
        """After each update (train.py), from the assignments all ranks counted since the last call: move the balance
        biases (b_i += moe_bias_update * sign(mean load - load_i)); -> max / mean load per layer, dropped share."""
        moe = self.moe()
        if not moe or not torch.is_tensor(moe[0].load):
            return {}
        counts = torch.stack([torch.cat([m.load, m.dropped[None]]) for m in moe]).float()  # [MoE layers, E + 1]
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        load, dropped = counts[:, :-1], counts[:, -1]
        for m, l in zip(moe, load):
            if self.cfg.moe_bias_update:
                m.balance_bias += self.cfg.moe_bias_update * torch.sign(l.mean() - l)
            m.load, m.dropped = 0, 0
        dropped = {"moe_dropped": (dropped.sum() / load.sum()).item()} if self.cfg.moe_capacity_factor else {}
        return {"moe_load_max_mean": [round(v, 3) for v in (load.max(1).values / load.mean(1)).tolist()], **dropped}

    # ---- accounting -------------------------------------------------------------------------------
    def num_params(self, non_embedding=False, active=False):
        """Parameters; active: those one token uses (an MoE layer's router, shared and k routed experts)."""
        embeddings = [self.tok_emb.weight] + ([] if self.cfg.tie_embeddings else [self.lm_head.weight])
        idle = sum(sum(p.numel() for p in m.experts[0].parameters()) * (len(m.experts) - self.cfg.n_experts_active)
                   for m in self.moe()) if active else 0
        return sum(p.numel() for p in self.parameters()) - non_embedding * sum(p.numel() for p in embeddings) - idle

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 N (active matmul params) + 6 H (D_qk + D_v) T_ctx a layer (GQA: 12 L H D T)."""
        cfg = self.cfg
        # N: non-embedding parameters + one V x C LM-head matmul, tied or not (the embedding is a lookup)
        n_matmul = self.num_params(non_embedding=True, active=True) + cfg.vocab_size * cfg.d_model
        # scores and values cost 2 * H * D_qk + 2 * H * D_v per key, x3 for fwd+bwd; a causal query sees T/2
        # keys on average (PaLM's 12 L H D T counts the full square), capped by the window; doc masking not counted
        t_ctx = seq_len / 2 if cfg.sliding_window is None else min(seq_len / 2, cfg.sliding_window)
        # D_qk + D_v: MLA's heads are qk_nope (+ qk_rope in a RoPE layer) and v_head_dim wide
        dims = (sum(cfg.qk_nope_head_dim + cfg.cache_dims(i)[1][1] + cfg.v_head_dim for i in range(cfg.n_layers))
                if cfg.attention == "mla" else cfg.n_layers * 2 * cfg.head_dim)
        return 6 * n_matmul + 6 * cfg.n_heads * dims * t_ctx

    # ---- generation (gpt-fast's shape: prefill, then one decode step per token) ---------------------
    def prefill(self, x, pos, cache):
        """Prompts x [B, P] at pos (-1 = left padding) into an empty cache -> the last column's logits [B, V];
        the cache is then ready for decode steps from column P."""
        P = x.shape[1]
        cache.col, cache.stop = cache.columns[:P], P
        h = self.hidden(x, pos, self.sdpa_mask(pos), cache)
        cache.mask[:, :P].masked_fill_(pos >= 0, 0.0)
        cache.col, cache.stop = cache.columns[P:P + 1].clone(), cache.mask.shape[1]
        return (h[:, -1] @ self.head_weight.t()).float()

    def decode_weights(self):
        """Per layer, a decode step's weights [in, out]: q/k/v and gate/up concatenated, the RMSNorm weight before
        each folded in; None unless every layer is SmolLM3's (not MLA, MoE, qk-norm, TP shards). A copy per call."""
        if not (self.cfg.is_smollm3 and not self.cfg.qk_norm and type(self.layers[0].attn.q) is nn.Linear):
            return None
        cat = lambda norm, *ms: torch.cat([m.weight.t() for m in ms], 1) * (1 if norm is None else norm.weight[:, None])
        return [(cat(l.attn_norm, l.attn.q, l.attn.k, l.attn.v), cat(None, l.attn.o),
                 cat(l.mlp_norm, l.mlp.gate, l.mlp.up), cat(None, l.mlp.down)) for l in self.layers]

    def decode_one_token(self, tok, pos, cache):
        """Append one token per row (tok, pos: [B]) at the cache's next column -> next-token logits [B, V]; tensor ops
        only (the column too): one graph every step. decode_weights: ~30 ops a layer, not Block's ~60 (per-op bound)."""
        B, (H, Hkv, D) = tok.shape[0], (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim)
        # doc_causal_mask's last row: the row's real cached keys and the new one; additive (no bool -> float per layer)
        mask = cache.mask.index_fill_(1, cache.col, 0.0)                    # [B, S]
        if cache.window is not None:
            mask = torch.where(cache.columns > cache.col - cache.window, mask, float("-inf"))
        mask, cos, sin = mask[:, None, None], cache.cos[pos], cache.sin[pos]  # [B, 1, 1, S], [B, 1, 1, D]
        if cache.weights is None:  # the layers' own forward; pos None: no padding to zero among the new tokens
            h = self.hidden(tok[:, None], None, mask, cache, (cos, sin))[:, 0]
        else:
            h = self.tok_emb(tok)                                           # [B, C]
            for i, (layer, (w_qkv, w_o, w_gate_up, w_down)) in enumerate(zip(self.layers, cache.weights)):
                qkv = (rms_norm_decode(h, cache.eps) @ w_qkv).view(B, H + 2 * Hkv, 1, D)
                qk, v = qkv.split([H + Hkv, Hkv], 1)                       # [B, H + Hkv, 1, D], [B, Hkv, 1, D]
                if layer.attn.use_rope:
                    qk = apply_rope(qk, cos, sin)                          # queries and keys in one go
                k, v = cache.update(i, qk[:, H:], v)                       # [B, Hkv, S, D]
                # GQA: a KV head's rep query heads are rep query rows of it, so the cache is read as is
                o = F.scaled_dot_product_attention(qk[:, :H].view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask)
                h = torch.addmm(h, o.view(B, H * D), w_o)                  # h + o @ w_o in one op
                gate, up = (rms_norm_decode(h, cache.eps) @ w_gate_up).chunk(2, -1)
                h = torch.addmm(h, F.silu(gate) * up, w_down)
            h = rms_norm_decode(h, cache.eps) * self.norm.weight
        cache.col.add_(1)
        return torch.bmm(h.expand(len(cache.head), -1, -1), cache.head).transpose(0, 1).reshape(B, -1).float()

    # inference mode: no autograd bookkeeping (version counters, views) in the hundreds of small ops a step
    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None,
                 num_samples=1, compile=False):
        """The new tokens of each prompt (a list of token ids), up to and including its first stop id; temperature
        0 = greedy; one device-to-host copy per step. num_samples=G: G continuations of each prompt (rows p*G ..
        p*G+G-1) sharing one prefill (GRPO's groups). compile: the decode step under torch.compile (once per shape)."""
        cfg, dev = self.cfg, self.tok_emb.weight.device
        B, lens, G = len(prompts), [len(p) for p in prompts], num_samples
        if B == 0:
            return []
        check(G >= 1, f"generate: num_samples must be >= 1, got {G}")
        check(min(lens) > 0, "generate: every prompt needs at least one token")
        P = max(lens)
        check(P + max_new_tokens <= cfg.max_position_embeddings, f"generate: prompt {P} + {max_new_tokens} new tokens "
              f"exceeds max_position_embeddings {cfg.max_position_embeddings}")
        bad = next((t for p in prompts for t in p if not 0 <= t < cfg.vocab_size), None)
        check(bad is None, f"generate: prompt token id {bad} is outside the vocabulary (vocab_size {cfg.vocab_size})")
        # left-pad so every row's next token lands in one column; padding's pos -1 hides its id (0, not pad_id)
        x = torch.tensor([[0] * (P - n) + list(p) for p, n in zip(prompts, lens)], device=dev)
        pos = torch.tensor([[-1] * (P - n) + list(range(n)) for n in lens], device=dev)
        cache = KVCache(cfg, B, P + max_new_tokens, dev, self.tok_emb.weight.dtype)
        if compile and "_compiled_decode" not in self.__dict__:
            # not fullgraph: what dynamo cannot trace (MoE's routing) breaks the graph; tests hold GQA's to one graph
            self._compiled_decode = torch.compile(self.decode_one_token)
        step = self._compiled_decode if compile else self.decode_one_token
        out, done, stop = [[] for _ in range(B * G)], [False] * (B * G), {int(s) for s in stop_ids}
        # autocast off: prefill and steps run in the weights' dtype, the cache's (under autocast what they write varies:
        # GQA's k/v bf16, MLA's latents fp32), and bf16 weights give the same tokens with autocast or without
        with torch.autocast(dev.type, enabled=False):
            logits = self.prefill(x, pos, cache)
            cache.weights = self.decode_weights()
            # the head is a step's largest read, and one mm of a few rows runs on one CPU thread: as n matmuls over
            # a share of the vocabulary each (one bmm), every thread streams part of it (bit-identical logits;
            # batch 8, 2 threads: 1.09-1.16x a step). One row is a matrix-vector product, threaded already.
            V, n = self.head_weight.shape[0], torch.get_num_threads()
            n = n if dev.type == "cpu" and B * G > 1 and V % n == 0 else 1
            cache.head = self.head_weight.view(n, V // n, -1).transpose(1, 2)         # [n, C, V / n]
            next_pos = torch.tensor(lens, device=dev)
            if G > 1:
                cache.expand(G)
                logits, next_pos = logits.repeat_interleave(G, 0), next_pos.repeat_interleave(G, 0)
            for t in range(max_new_tokens):
                nxt = sample(logits, temperature, top_k, top_p, generator)          # [B * G]
                for b, tok in enumerate(nxt.tolist()):  # the step's one device -> host sync
                    if not done[b]:
                        out[b].append(tok)
                        done[b] = tok in stop
                if all(done) or t == max_new_tokens - 1:
                    break
                logits = step(nxt, next_pos + t, cache)
        return out

    # ---- HF SmolLM3 checkpoints: config.json + model.safetensors, as SmolLM3ForCausalLM reads them ---
    def save_pretrained(self, path, state_dict=None):
        """config.json + model.safetensors, atomically (MLA / MoE: our names, fields); state_dict: TP-gathered."""
        from safetensors.torch import save_file
        cfg = self.cfg
        conf = {"model_type": "nanosmol", **asdict(cfg)} if not cfg.is_smollm3 else {
            "architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_act": "silu",
            **{hf_key: getattr(cfg, k) for k, hf_key in HF_KEYS.items()},
            "rope_theta": cfg.rope_theta, "no_rope_layer_interval": cfg.nope_interval,
            "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.n_layers)],
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta} if cfg.yarn_factor == 1.0 else
                {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.yarn_factor,
                 "original_max_position_embeddings": cfg.yarn_original_max_position},
            # transformers applies its window only to "sliding_attention" layers: ours is every layer
            "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.n_layers,
            "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id, "mlp_bias": False,
            "torch_dtype": str(self.tok_emb.weight.dtype).removeprefix("torch."), "attention_bias": False,
            # ours only; transformers ignores them (qk_norm's weights are saved under Qwen3's names)
            "nanosmol": {k: getattr(cfg, k) for k in NANOSMOL_KEYS}}
        os.makedirs(path, exist_ok=True)
        name = hf_name if cfg.is_smollm3 else str
        tensors = {name(k): v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        text = json.dumps(conf, indent=2)
        atomic_write(os.path.join(path, "config.json"), lambda p: pathlib.Path(p).write_text(text))

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """A SmolLM3 directory (ours or a released one), in its dtype (bf16 stays bf16); overrides: ModelConfig's."""
        from safetensors import safe_open
        cfg = cls.config_from_hf(os.path.join(path, "config.json"), **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        name = hf_name if cfg.is_smollm3 else str
        expected = {name(k): (k, v.shape) for k, v in model.state_dict().items()}  # file's name -> ours, shape
        state, source = {}, {}
        for f in cls.tensor_files(path):
            with safe_open(os.path.join(path, f), framework="pt") as sf:
                for k in sf.keys():
                    if k == "lm_head.weight" and cfg.tie_embeddings or k.endswith("rotary_emb.inv_freq"):
                        continue  # tied: a copy of the embedding; inv_freq: a derived buffer old checkpoints kept
                    check(k in expected, f"{path}/{f}: unexpected tensor {k!r}")
                    check(k not in source, f"{path}/{f}: tensor {k!r} is also in {source.get(k)}")
                    (name, shape), t = expected[k], sf.get_tensor(k)
                    check(t.shape == shape, f"{path}/{f}: tensor {k!r} has shape {tuple(t.shape)}, "
                                            f"expected {tuple(shape)}")
                    state[name], source[k] = t, f
        missing = sorted(set(expected) - set(source))
        check(not missing, f"{path}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        model.load_state_dict(state, assign=True)
        return model

    @staticmethod
    def tensor_files(path):
        """A checkpoint's safetensors files: model.safetensors, else the shards its index names (transformers' way)."""
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return ["model.safetensors"]
        check(os.path.isfile(index), f"{path}: neither model.safetensors nor model.safetensors.index.json found")
        weight_map = json.loads(pathlib.Path(index).read_text()).get("weight_map")
        check(isinstance(weight_map, dict), f"{index}: expected a 'weight_map' of tensor name -> shard file")
        return sorted(set(weight_map.values()))

    @staticmethod
    def config_from_hf(path, **overrides):
        """ModelConfig from a config.json: ours (model_type "nanosmol"), or transformers' SmolLM3 / Llama one read as
        its config class reads it; what SmolLM3ForCausalLM would compute differently from ours is an error."""
        from config import check_type
        hints = typing.get_type_hints(ModelConfig)
        for k, v in overrides.items():
            check(k in hints, f"from_pretrained: unknown ModelConfig field {k!r}")
            overrides[k] = check_type(v, hints[k], f"from_pretrained: {k}")

        def build(kw):  # the file's fields, then the overrides; the config's own errors name the file
            try:
                return ModelConfig(**{**kw, **overrides})
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        try:
            hf = json.loads(pathlib.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if hf.get("model_type") == "nanosmol":
            unknown = sorted(set(hf) - set(hints) - {"model_type"})
            check(not unknown, f"{path}: unknown ModelConfig field(s) {', '.join(unknown)}")
            return build({k: check_type(v, hints[k], f"{path}: {k}") for k, v in hf.items() if k != "model_type"})

        def get(key, tp, default=None):  # hf[key] of type tp, default when absent or null (HF's unset)
            return default if hf.get(key) is None else check_type(hf[key], tp, f"{path}: {key}")
        smol = hf.get("model_type") == "smollm3"
        check(smol or hf.get("model_type") == "llama",
              f"{path}: model_type {hf.get('model_type')!r}, expected 'smollm3' (or 'llama', 'nanosmol')")
        for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]:
            check(hf.get(k) is not None, f"{path}: missing key {k!r}")
        unsupported = [f"{k}={hf[k]!r}" for k, ok in [("attention_bias", False), ("mlp_bias", False),
                                                      ("hidden_act", "silu")] if hf.get(k, ok) != ok]
        check(not unsupported, f"{path}: {', '.join(unsupported)} is not supported (no biases, SiLU)")
        kw = {k: get(hf_key, hints[k]) for k, hf_key in HF_KEYS.items() if hf.get(hf_key) is not None}
        # absent: the defaults of transformers' config classes
        kw = {"n_kv_heads": kw["n_heads"], "max_position_embeddings": 32768, "tie_embeddings": smol, **kw}
        n_layers, interval = kw["n_layers"], get("no_rope_layer_interval", int, 4 if smol else 0)
        rope = get("no_rope_layers", list[int])
        if rope is not None:  # authoritative (1 = RoPE, 0 = NoPE); the interval is what it is made of
            check(len(rope) >= n_layers, f"{path}: no_rope_layers has {len(rope)} entries for {n_layers} layers")
            nope = [i for i, r in enumerate(rope[:n_layers]) if not r]
            if nope != nope_layers(n_layers, interval):
                interval = nope[0] + 1 if nope else 0
            check(nope == nope_layers(n_layers, interval), f"{path}: no_rope_layers {rope[:n_layers]} is not a "
                  f"periodic RNoPE pattern (NoPE layers {nope}, not every nope_interval-th layer)")
        # transformers: rope_parameters (or legacy rope_scaling) wins over a top-level rope_theta
        rope_params = get("rope_parameters", dict) or get("rope_scaling", dict) or {}
        theta = check_type(rope_params.get("rope_theta") or hf.get("rope_theta") or 2e6, float, f"{path}: rope_theta")
        kind = rope_params.get("rope_type", rope_params.get("type", "default"))
        odd = {k: rope_params[k] for k, ok in [("beta_fast", 32), ("beta_slow", 1), ("attention_factor", None), ("mscale", None),
                                               ("mscale_all_dim", None), ("truncate", True), ("partial_rotary_factor", 1.0)]
               if rope_params.get(k) not in (None, ok)}
        check(kind in ("default", "yarn") and not odd, f"{path}: RoPE {kind!r} {odd or ''} is not supported (expected "
              "'default', or 'yarn' with its default beta_fast/beta_slow/attention factor)")
        if kind == "yarn":
            max_pos = kw["max_position_embeddings"]
            orig = rope_params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
            factor = check_type(rope_params.get("factor") or max_pos / orig, float, f"{path}: rope_parameters.factor")
            kw.update(yarn_factor=factor, yarn_original_max_position=check_type(orig, int, f"{path}: original_max_position_embeddings"))
        # transformers windows only layers whose layer_type is "sliding_attention" (by default the NoPE ones)
        window = get("sliding_window", int) if hf.get("use_sliding_window") else None
        nope = nope_layers(n_layers, interval)
        types = get("layer_types", list[str]) or ["sliding_attention" if window and i in nope else "full_attention" for i in range(n_layers)]
        windowed = {t == "sliding_attention" for t in types[:n_layers]} if window else {False}
        check(len(windowed) == 1, f"{path}: a sliding window on only some layers (layer_types) is not supported")
        # special ids: absent = its class's default, null = none; a list eos keeps its first (generate: stop_ids)
        for k, hf_key, default in [("bos_id", "bos_token_id", 128000 if smol else 1),
                                   ("eos_id", "eos_token_id", 128001 if smol else 2),
                                   ("pad_id", "pad_token_id", 128004 if smol else None)]:
            v = check_type(hf.get(hf_key, default), int | list[int] | None, f"{path}: {hf_key}")
            kw[k] = (v[0] if v else None) if isinstance(v, list) else v
        ours = get("nanosmol", dict, {})
        kw.update({k: check_type(ours[k], hints[k], f"{path}: nanosmol.{k}") for k in NANOSMOL_KEYS if k in ours})
        kw.update(rope_theta=theta, nope_interval=interval, sliding_window=window if True in windowed else None)
        return build(kw)


# ModelConfig field -> config.json key, where the value is the same
HF_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "d_ff": "intermediate_size",
           "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "head_dim": "head_dim", "max_position_embeddings": "max_position_embeddings", "rms_eps": "rms_norm_eps",
           "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range"}
NANOSMOL_KEYS = ("qk_norm", "doc_masking", "z_loss")
# our module names -> transformers' SmolLM3 ones, part by part (layer indices and ".weight" stay as they are)
HF_NAMES = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "layers": "model.layers", "attn": "self_attn",
            "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
            **{p: f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")}}


def hf_name(name):
    """layers.3.attn.q.weight -> model.layers.3.self_attn.q_proj.weight"""
    return ".".join(HF_NAMES.get(part, part) for part in name.split("."))


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """All or nothing, even across a power loss: `write(tmp)` fills a temporary file, which is fsynced
    and renamed over `path`; then the directory is fsynced so that the rename itself is on disk."""
    tmp = f"{path}.tmp"
    write(tmp)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(os.path.dirname(path) or ".")


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))  # drop, back in vocabulary order
    # inverse CDF: one uniform draw per row (torch.multinomial draws one exponential per vocabulary entry: ~30% of a
    # CPU rollout at 4k ids); the first id whose cumulative mass exceeds it, never past the last id with mass
    cdf = logits.softmax(-1).double().cumsum(-1)                                          # [B, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.minimum(torch.searchsorted(cdf, u, right=True)[:, 0], cdf.argmax(-1))


def summary(cfg, seq_len=4096):
    """Human-readable architecture summary, computed on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = Model(cfg)
    nope = cfg.nope_layers
    kv = 2 * sum(h * d for i in range(cfg.n_layers) for h, d in cfg.cache_dims(i))  # bf16
    gqa = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # K and V, bf16
    rows = {"parameters": f"{model.num_params():,}",  # rows whose value is falsy (no MoE, no MLA) are left out
            "active parameters": cfg.n_experts and f"{model.num_params(active=True):,} per token ({len(cfg.moe_layers)}"
            f" MoE layers: top-{cfg.n_experts_active} of {cfg.n_experts} experts + {cfg.n_shared_experts} shared)",
            "non-embedding": f"{model.num_params(non_embedding=True):,}",
            f"FLOPs/token @{seq_len}": f"{model.flops_per_token(seq_len):,.0f} (6N + attention)",
            "KV cache/token (bf16)": f"{kv:,} bytes ({kv * seq_len / 2**20:,.1f} MiB per {seq_len}-token sequence)",
            "GQA KV cache/token": cfg.attention == "mla" and f"{gqa:,} bytes with {cfg.n_kv_heads} KV heads of "
            f"{cfg.head_dim} (the MLA latent + rope key: {gqa / kv:.2f}x smaller)",
            "NoPE layers": f"{nope if nope else 'none'} ({len(nope)} of {cfg.n_layers})"}
    return "\n".join([f"{k:>24} = {v}" for k, v in asdict(cfg).items()] + [""]
                     + [f"{k:>24} = {v}" for k, v in rows.items() if v])


def main(argv):
    """python model.py CONFIG [--key=value ...]: the architecture summary."""
    from config import load, pick
    try:
        ns = load(argv, ModelConfig, prog="python model.py", strict=False)
        cfg = ModelConfig(**pick(ns, ModelConfig))
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(summary(cfg, 4096))


if __name__ == "__main__":
    main(sys.argv[1:])
