"""parallel.py — data and tensor parallelism on torch.distributed: one DP x TP rank grid, a bucketed DDP that
overlaps its all-reduces with the backward, ZeRO-1 (AdamW state sharded over DP), and Megatron-style tensor
parallelism with a vocab-parallel embedding, LM head and cross-entropy.

    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py --micro_batch_size=8   # CPU (gloo): DP 2
    torchrun --standalone --nproc_per_node=4 train.py config/tiny.py --micro_batch_size=8 --tp=2 --zero=1  # DP 2 x TP 2
    torchrun --standalone --nproc_per_node=8 train.py config/smollm3_1b_ablation.py  # 8 GPUs (nccl): DP 8
    grid = init(tp=2); model = TPModel(Model(cfg), grid.tp_group)   # library use: same seed on every rank
    python -m pytest -q tests/test_parallel.py

train.py builds the grid from --tp, shards the model with TPModel when tp > 1, and syncs gradients over the DP
group with DDP or, with --zero=1, with ZeRO1; its checkpoints gather the shards (tp_gather, ZeRO1.state_dict),
so they are whole whatever the layout, and load back into any layout (tp_shard, ZeRO1.load_state_dict).

Every process group is sliced from one Grid and passed explicitly; every collective runs under the process
group's timeout, and a Heartbeat thread per rank names a rank whose process died or froze and exits, so a lost
rank ends the others with an error instead of a hang. Tests: tests/test_parallel.py (2 and 4 spawned CPU
processes on gloo, fp32, compared against single-process runs and torch's own DDP).

Sections
  grid            Grid, check_layout, init, shutdown, Heartbeat (lost-rank detection through the store)
  DDP             Bucket, DDP (reverse-order ~25 MB buckets, post-accumulate-grad hooks, no_sync, finish)
  ZeRO-1          ZeRO1 (flat shards per param group: reduce-scatter, clip over shards, step, all-gather;
                  state_dict / load_state_dict in the full AdamW's format)
  TP comm ops     f (copy to TP region), g (reduce from TP region)
  TP layers       ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_ce;
                  tp_gather / tp_shard (a param's full tensor from shards and back), clip_grad_norm
  TP model        TPModel (shards a same-seed single-process Model in place; vocab-parallel loss)
"""
import contextlib
import dataclasses
import datetime
import functools
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn

# ---------------------------------------------------------------- grid


@dataclasses.dataclass
class Grid:
    """Rank r sits at (dp_rank, tp_rank) = divmod(r, tp): TP innermost, so a TP group is consecutive ranks
    (one node's GPUs, on the fast links) and a DP group is every tp-th rank."""
    rank: int
    world: int
    tp: int
    dp_group: object
    tp_group: object
    heartbeat: object = None

    @property
    def dp(self):
        return self.world // self.tp

    @property
    def dp_rank(self):
        return self.rank // self.tp

    @property
    def tp_rank(self):
        return self.rank % self.tp


def check_layout(world, tp, mc=None):
    """A one-line ValueError, naming the numbers, for the first thing that does not divide."""
    checks = [(tp >= 1 and world % tp == 0, f"world size {world} is not divisible by tp={tp}")]
    if mc is not None:
        checks += [(getattr(mc, k) % tp == 0, f"{k} {getattr(mc, k)} is not divisible by tp={tp}")
                   for k in ("n_heads", "n_kv_heads", "d_ff", "vocab_size")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"parallel layout: {msg}")


def init(tp=1, mc=None, timeout_s=120, init_method="env://", rank=None, world=None):
    """Join the process group (RANK, WORLD_SIZE from torchrun unless given) and slice it into the grid."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    check_layout(world, tp, mc)                                # before any process waits on another
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous(init_method, rank, world, timeout=timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    heartbeat = Heartbeat(store, rank, world, timeout_s)      # its first beat: before new_group's barrier
    # new_group is collective: every rank creates every group, in the same order, and keeps its own
    dp_group = tp_group = None
    for d in range(world // tp):
        g = dist.new_group(list(range(d * tp, (d + 1) * tp)), timeout=timeout)
        tp_group = g if rank // tp == d else tp_group
    for t in range(tp):
        g = dist.new_group(list(range(t, world, tp)), timeout=timeout)
        dp_group = g if rank % tp == t else dp_group
    heartbeat.start()
    return Grid(rank, world, tp, dp_group, tp_group, heartbeat)


def shutdown(grid, *models):
    """Free the models' tensors, wait for every rank, then destroy the groups: without the barrier a rank can
    tear gloo down while another is still in a collective, and the process aborts at exit."""
    for m in models:
        for p in m.parameters():
            p.grad = None
    dist.barrier()
    grid.heartbeat.stop()
    dist.destroy_process_group()


class Heartbeat(threading.Thread):
    """Names a lost rank. Every rank bumps heartbeat/{rank} in the rendezvous store every timeout/10 s and
    watches everyone's: a counter that stood still for timeout_s is a rank whose process died or froze, and this
    process prints its number and exits 1. Without it a dead peer reads as gloo's "connection closed by peer",
    or as an NCCL collective that waits until NCCL's watchdog aborts, neither naming the rank."""

    def __init__(self, store, rank, world, timeout_s):
        super().__init__(daemon=True, name="heartbeat")
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.keys = [f"heartbeat/{r}" for r in range(world)]
        self.stopped = threading.Event()
        store.add(self.keys[rank], 1)

    def run(self):
        seen, since = [None] * self.world, [time.monotonic()] * self.world
        while not self.stopped.wait(self.timeout_s / 10):
            try:
                self.store.add(self.keys[self.rank], 1)
                beats = self.store.multi_get(self.keys)
            except RuntimeError as e:                          # torchrun's agent or rank 0 hosts the store
                self._exit(f"the rendezvous store is unreachable, so its host (rank 0 or torchrun) is lost: {e}")
            now = time.monotonic()
            for r, b in enumerate(beats):
                seen[r], since[r] = (b, now) if b != seen[r] else (seen[r], since[r])
            lost = [r for r in range(self.world) if now - since[r] > self.timeout_s]
            if lost:
                self._exit(f"rank {', '.join(map(str, lost))} lost: no heartbeat for {self.timeout_s} s")

    def _exit(self, why):
        if not self.stopped.is_set():
            print(f"parallel: rank {self.rank}: {why}; exiting", file=sys.stderr, flush=True)
            os._exit(1)                                        # the main thread may be stuck in a collective

    def settle(self, error):
        """After `error` in a collective: wait until every rank has failed too (an error they share, which the
        caller then raises) or, within 1.5 x the timeout, run() names a lost rank and exits."""
        failed, deadline = [f"failed/{r}" for r in range(self.world)], time.monotonic() + 1.5 * self.timeout_s
        try:
            self.store.set(failed[self.rank], str(error)[:200])
            while time.monotonic() < deadline and not self.store.check(failed):
                time.sleep(self.timeout_s / 20)
        except RuntimeError:                                   # the store is gone: run() exits within a beat
            time.sleep(self.timeout_s / 5)

    def stop(self):
        self.stopped.set()
        self.join()


# ---------------------------------------------------------------- DDP

class Bucket:
    def __init__(self, params):
        self.params, self.ready, self.work = params, 0, None
        # reduced in fp32 whatever the grads' dtype: a bf16 sum over 192 ranks loses most of its bits
        self.buf = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)


class DDP(nn.Module):
    """Data parallel: after each synced backward every rank holds the DP-mean gradient. Buckets of
    ~bucket_mb MB in reverse parameter order (the order backward produces grads; the first bucket small so the
    network starts early) are all-reduced asynchronously as soon as their last grad is accumulated, in bucket
    order on every rank; finish() waits for them. Inside no_sync() (accumulation micro-steps) nothing is sent."""

    def __init__(self, module, group, bucket_mb=25, first_bucket_mb=1):
        super().__init__()
        self.module, self.group, self.sync = module, group, True
        self.n = dist.get_world_size(group)
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:                                       # one starting point: rank 0's weights
            dist.broadcast(p.data, src=dist.get_global_rank(group, 0), group=group)
        self.buckets, cur, size, limit = [], [], 0, first_bucket_mb * 2 ** 20
        for p in reversed(params):
            cur.append(p)
            size += p.numel() * 4
            if size >= limit:
                self.buckets.append(Bucket(cur))
                cur, size, limit = [], 0, bucket_mb * 2 ** 20
        if cur:
            self.buckets.append(Bucket(cur))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.next = 0                                          # the next bucket to launch
        for p in params:
            p.register_post_accumulate_grad_hook(self._hook)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _hook(self, p):
        if not self.sync:
            return
        self.bucket_of[p].ready += 1
        # launch in bucket order only: collectives must be issued in the same order on every rank
        while self.next < len(self.buckets) and self.buckets[self.next].ready == len(self.buckets[self.next].params):
            self._launch(self.buckets[self.next])
            self.next += 1

    def _launch(self, b):
        off = 0
        for p in b.params:
            g = b.buf[off:off + p.numel()]
            g.copy_(p.grad.view(-1)) if p.grad is not None else g.zero_()
            off += p.numel()
        b.buf.div_(self.n)                                     # the mean, explicitly: gloo has no PREMUL_SUM
        b.work = dist.all_reduce(b.buf, group=self.group, async_op=True)

    def mean(self, t):
        """The DP mean of a small tensor (the step's loss, for the guard)."""
        t = t / self.n
        dist.all_reduce(t, group=self.group)
        return t

    def finish(self):
        """Wait for every bucket (launching any whose params got no grad) and write the mean grads back."""
        for b in self.buckets[self.next:]:
            self._launch(b)
        for b in self.buckets:
            b.work.wait()
            off = 0
            for p in b.params:
                g = b.buf[off:off + p.numel()].view_as(p)
                p.grad = g.to(p.dtype).clone() if p.grad is None else p.grad.copy_(g)
                off += p.numel()
            b.ready, b.work = 0, None
        self.next = 0


# ---------------------------------------------------------------- ZeRO-1

class ZeRO1:
    """AdamW with its state sharded over the DP group. Each param group's params are one flat vector, padded to
    a multiple of the DP size; rank r owns slice r and keeps AdamW state for it alone. clip_grad_norm
    reduce-scatters the grads (the mean lands on the owner), clips by the global norm over all shards (and over
    the TP group's, when the params are TP shards); step() steps the shard and all-gathers the updated
    parameters. Grads need no DDP all-reduce. state_dict() is the full AdamW's, so a checkpoint is layout-free."""

    def __init__(self, opt, group, tp_group=None):
        self.opt, self.group, self.tp_group = opt, group, tp_group  # opt: the full AdamW (groups, hyperparams)
        self.n, self.r = dist.get_world_size(group), dist.get_rank(group)
        self.param_groups = opt.param_groups
        self.shards, self.flat_sizes, self.replicated = [], [], []
        shard_groups = []
        for g in opt.param_groups:
            flat = torch.cat([p.detach().reshape(-1) for p in g["params"]])
            size = -(-flat.numel() // self.n)
            self.flat_sizes.append(size)
            flat = torch.nn.functional.pad(flat, (0, size * self.n - flat.numel()))
            shard = nn.Parameter(flat[self.r * size:(self.r + 1) * size].clone())
            self.shards.append(shard)
            shard_groups.append({**{k: v for k, v in g.items() if k not in ("params", "param_names")}, "params": [shard]})
            # this shard's ranges of TP-replicated params (norms), which the TP grad norm must count once
            self.replicated.append([(s0, s1) for p, _, _, s0, s1 in self._pieces(g, size)
                                    if tp_group and getattr(p, "tp_dim", None) is None])
        self.inner = torch.optim.AdamW(shard_groups)          # each group carries all its hyperparameters

    def _pieces(self, g, size):
        """(param, start, end in the param, start, end in this rank's shard) of each param the shard overlaps."""
        lo, hi, off = self.r * size, (self.r + 1) * size, 0
        for p in g["params"]:
            a, b = max(off, lo), min(off + p.numel(), hi)
            if a < b:
                yield p, a - off, b - off, a - lo, b - lo
            off += p.numel()

    def clip_grad_norm(self, params, max_norm):
        """Reduce-scatter the mean grads into the shards, clip them by the global norm, return that norm."""
        sq = torch.zeros((), dtype=torch.float32, device=self.shards[0].device)
        for g, shard, size, rep in zip(self.param_groups, self.shards, self.flat_sizes, self.replicated):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in g["params"]])
            flat = torch.nn.functional.pad(flat, (0, size * self.n - flat.numel())) / self.n
            out = torch.empty(size, dtype=torch.float32, device=flat.device)
            dist.reduce_scatter_tensor(out, flat, group=self.group)
            shard.grad = out.to(shard.dtype)
            sq = sq + out.square().sum()
            if rep:                                            # on every TP rank: each counts 1/tp of them
                sq = sq - (1 - 1 / dist.get_world_size(self.tp_group)) * sum(out[a:b].square().sum() for a, b in rep)
        dist.all_reduce(sq, group=self.group)
        if self.tp_group:
            dist.all_reduce(sq, group=self.tp_group)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)       # clip_grad_norm_'s rule, over every shard
        for shard in self.shards:
            shard.grad.mul_(coef)
        return norm

    def step(self):
        for g, ig, shard, size in zip(self.param_groups, self.inner.param_groups, self.shards, self.flat_sizes):
            ig["lr"] = g["lr"]                                 # train.set_lr writes the full groups
            # the params are the truth (a resume or init_from may have loaded them since): refresh the shard
            for p, a, b, s0, s1 in self._pieces(g, size):
                shard.data[s0:s1].copy_(p.detach().reshape(-1)[a:b])
        self.inner.step()
        for g, shard, size in zip(self.param_groups, self.shards, self.flat_sizes):
            flat = torch.empty(size * self.n, dtype=shard.dtype, device=shard.device)
            dist.all_gather_into_tensor(flat, shard.detach(), group=self.group)
            off = 0
            for p in g["params"]:
                p.data.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)

    # train.Step's data-parallel side, as DDP's: the grads stay local until clip_grad_norm's reduce-scatter
    def no_sync(self):
        return contextlib.nullcontext()

    def finish(self):
        pass

    mean = DDP.mean

    def state_dict(self):
        """The full AdamW's state_dict (every rank all-gathers every shard of the state): what a plain AdamW
        over the same params would hold, so a checkpoint resumes at any DP size, with or without ZeRO."""
        sd = self.opt.state_dict()
        for g, sg, shard, size in zip(self.param_groups, sd["param_groups"], self.shards, self.flat_sizes):
            state, off = self.inner.state.get(shard, {}), 0
            full = {k: v if v.dim() == 0 else self._gather(v, size) for k, v in state.items()}
            for p, idx in zip(g["params"], sg["params"]):
                if full:
                    sd["state"][idx] = {k: (v if v.dim() == 0 else v[off:off + p.numel()].view_as(p)).clone()
                                        for k, v in full.items()}
                off += p.numel()
        return sd

    def _gather(self, shard, size):
        flat = torch.empty(size * self.n, dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(flat, shard.contiguous(), group=self.group)
        return flat

    def load_state_dict(self, sd):
        """Take a full AdamW state_dict (state_dict()'s, or a plain AdamW's) and keep this rank's shard of it."""
        inner = self.inner.state_dict()
        for i, (sg, shard, size) in enumerate(zip(sd["param_groups"], self.shards, self.flat_sizes)):
            states = [sd["state"][idx] for idx in sg["params"] if idx in sd["state"]]
            if not states:
                continue
            if len(states) != len(sg["params"]):
                raise ValueError("ZeRO-1: optimizer state for only some parameters of a group")
            one = {}
            for k, v in states[0].items():                     # exp_avg, exp_avg_sq, and the step count
                flat = torch.cat([s[k].reshape(-1) for s in states]) if v.dim() else None
                one[k] = v if flat is None else torch.nn.functional.pad(flat, (0, size * self.n - flat.numel()))[
                    self.r * size:(self.r + 1) * size].clone()
            inner["state"][i] = one
        self.inner.load_state_dict(inner)


# ---------------------------------------------------------------- TP comm ops (Megatron-LM, Shoeybi et al. 2019)

class f(torch.autograd.Function):
    """Megatron's f, entering a TP region: forward identity, backward all-reduce (sum) over the TP group
    (each rank's partial gradient of the replicated input comes from its own slice of the weights)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.group), None


def _summed(t, group):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class g(torch.autograd.Function):
    """Megatron's g, leaving a TP region: forward all-reduce (sum) of the ranks' partial results, backward
    identity (the replicated output's gradient is already whole on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---------------------------------------------------------------- TP layers
# Each takes the full single-process module and keeps this rank's exact slice of it: the TP-seed contract
# (shards of one weight are slices of one same-seed draw, never equal draws of one rank-local seed).

def _slice(w, dim, group):
    p = nn.Parameter(w.detach().chunk(dist.get_world_size(group), dim)[dist.get_rank(group)].clone())
    p.tp_dim = dim                                             # what tp_gather, tp_shard and the grad norms read
    return p


def tp_gather(t, p, group):
    """The full tensor whose TP shard is t (shaped like param p: its value, grad or optimizer state)."""
    if getattr(p, "tp_dim", None) is None or t.dim() == 0:    # replicated, or AdamW's step count
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, p.tp_dim)


def tp_shard(t, p, group):
    """This rank's TP shard of the full tensor t of param p (tp_gather's inverse)."""
    if getattr(p, "tp_dim", None) is None or t.dim() == 0:
        return t
    return t.chunk(dist.get_world_size(group), p.tp_dim)[dist.get_rank(group)].clone()


def clip_grad_norm(params, max_norm, group):
    """clip_grad_norm_ of a TP model: the squares of split weights summed over the group, replicated ones
    (norms, whose grads are equal on every rank) counted once; returns the global norm."""
    params = [p for p in params if p.grad is not None]
    sq = sum(p.grad.float().square().sum() / (1 if getattr(p, "tp_dim", None) is not None else dist.get_world_size(group))
             for p in params)
    dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return norm


class ColumnParallelLinear(nn.Module):
    """Output features split: y[:, this rank's slice] = f(x) @ W[slice].T."""

    def __init__(self, full, group):
        super().__init__()
        self.group, self.weight = group, _slice(full.weight, 0, group)

    def forward(self, x):
        return torch.nn.functional.linear(f.apply(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """Input features split (the column-parallel layer's output): y = g(x_slice @ W[:, slice].T)."""

    def __init__(self, full, group):
        super().__init__()
        self.group, self.weight = group, _slice(full.weight, 1, group)

    def forward(self, x):
        return g.apply(torch.nn.functional.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows lo..lo+V/tp of the table: ids outside them give 0, and g sums the one rank that has each id."""

    def __init__(self, full, group):
        super().__init__()
        self.group, self.weight = group, _slice(full.weight, 0, group)
        self.lo = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.lo
        inside = (local >= 0) & (local < self.weight.shape[0])
        e = torch.nn.functional.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return g.apply(e * inside[..., None], self.group)


def vocab_parallel_ce(logits, y, lo, group, z_loss=0.0):
    """Per-token cross-entropy (+ z_loss * lse^2) [N], 0 where y == -100, from this rank's logits [N, V/tp]
    (vocabulary columns lo..lo+V/tp); full-vocabulary logits are never gathered: three all-reduces of [N]
    (max, target logit, sum of exp) make the log-sum-exp."""
    logits = logits.float()
    m = logits.detach().max(-1).values                        # a shift only: lse does not depend on it
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    local = y - lo
    inside = (local >= 0) & (local < logits.shape[1])
    target = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    target = g.apply(torch.where(inside, target, 0.0), group)
    lse = g.apply((logits - m[:, None]).exp().sum(-1), group).log() + m
    loss = lse - target
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(y == -100, 0.0, loss)


# ---------------------------------------------------------------- TP model

class TPModel(nn.Module):
    """A Model sharded in place over `group`: q/k/v/gate/up column-parallel, o/down row-parallel (each rank
    runs n_heads/tp query heads and n_kv_heads/tp KV heads), embedding and LM head vocab-parallel. Norms
    stay replicated. forward(x, y, pos) -> the mean loss via vocab_parallel_ce; forward(x, pos=pos) -> the
    full logits (gathered: for evals, not the training loss). The LM head is not chunked (memory: [B*T, V/tp])."""

    def __init__(self, model, group):
        super().__init__()
        cfg, n = model.cfg, dist.get_world_size(group)
        check_layout(n, n, cfg)
        self.model, self.group = model, group
        local = dataclasses.replace(cfg, n_heads=cfg.n_heads // n, n_kv_heads=cfg.n_kv_heads // n)
        for block in model.layers:
            a, mlp = block.attn, block.mlp
            a.cfg = local
            if cfg.qk_norm:
                # the qk-norm weights are shared by all heads, and each rank holds only its heads: the
                # gradient of one backward is the sum over ranks (f's backward, on the parameter)
                for w in (a.q_norm.weight, a.k_norm.weight):
                    w.register_hook(functools.partial(_summed, group=group))
            a.q, a.k, a.v = (ColumnParallelLinear(m, group) for m in (a.q, a.k, a.v))
            a.o = RowParallelLinear(a.o, group)
            mlp.gate, mlp.up = ColumnParallelLinear(mlp.gate, group), ColumnParallelLinear(mlp.up, group)
            mlp.down = RowParallelLinear(mlp.down, group)
        model.tok_emb = VocabParallelEmbedding(model.tok_emb, group)
        if not cfg.tie_embeddings:                            # Model multiplies by its weight (head_weight)
            model.lm_head = ColumnParallelLinear(model.lm_head, group)
        # the final norm's output enters the vocab-parallel head: f there sums the ranks' gradients of it
        model.norm.register_forward_hook(lambda module, args, out: f.apply(out, group))

    def forward(self, x, y=None, pos=None, reduction="mean"):
        logits = self.model(x, pos=pos)                       # [B, T, V/tp]: Model's head is the local slice
        if y is None:
            parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, logits.contiguous(), group=self.group)
            return torch.cat(parts, -1)
        lo = dist.get_rank(self.group) * logits.shape[-1]
        per_token = vocab_parallel_ce(logits.flatten(0, 1), y.flatten(), lo, self.group, self.model.cfg.z_loss)
        if reduction == "none":                                # eval.evaluate's per-token losses [B, T]
            return None, per_token.view_as(y)
        return None, per_token.sum() / (y != -100).sum().clamp(min=1)
