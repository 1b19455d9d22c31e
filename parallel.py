"""parallel.py — data and tensor parallelism on torch.distributed: one DP x TP rank grid, a bucketed DDP that
overlaps its all-reduces with the backward, ZeRO-1 (AdamW state sharded over DP), and Megatron-style tensor
parallelism with a vocab-parallel embedding, LM head and cross-entropy, optionally sequence-parallel.

    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py --micro_batch_size=8   # CPU (gloo): DP 2
    torchrun --standalone --nproc_per_node=4 train.py config/tiny.py --micro_batch_size=8 --tp=2 --zero=1  # DP 2 x TP 2
    torchrun --standalone --nproc_per_node=8 train.py config/smollm3_1b_ablation.py  # 8 GPUs (nccl): DP 8
    grid = init(tp=2); model = TPModel(Model(cfg), grid.tp_group)   # library use: same seed on every rank
    python parallel.py plan config/smollm3.py --gpus=384 --tp=2 [--gpu_mem=80GB --mfu=0.3]   # the layout's numbers
    torchrun --standalone --nproc_per_node=8 parallel.py bench   # collectives' bus bandwidth, matmul TFLOP/s
    python -m pytest -q tests/test_parallel.py tests/test_parallel_tools.py

train.py builds the grid from --tp and calls setup: TPModel shards the model when tp > 1, and DDP or, with
--zero=1, ZeRO1 syncs the gradients over the DP group. Its checkpoints gather the shards through Layout (tp_gather,
ZeRO1.state_dict, every rank's RNG), so they are whole whatever the layout, and load back into any layout.

SPModel adds sequence parallelism to TPModel (tested against one process and torch's DTensor plan; train.py
does not run it yet). The planner predicts per-GPU memory, communication and step time for a layout from the
model's own counts (Model.num_params, flops_per_token) and refuses one that does not fit; the bench measures
the bandwidths it assumes.

Every process group is sliced from one Grid and passed explicitly; every collective runs under the process
group's timeout, and a Heartbeat thread per rank names a rank whose process died or froze and exits, so a lost
rank ends the others with an error instead of a hang. Tests: tests/test_parallel.py (2 and 4 spawned CPU
processes on gloo, fp32, compared against single-process runs and torch's own DDP).

Sections
  grid            Grid, check_layout, init, shutdown, settling, Heartbeat (lost-rank detection through the store)
  DDP             Bucket, DDP (reverse-order ~25 MB buckets, post-accumulate-grad hooks, no_sync, finish)
  ZeRO-1          ZeRO1 (flat shards per param group: reduce-scatter, clip over shards, step, all-gather;
                  state_dict / load_state_dict in the full AdamW's format)
  TP comm ops     f (copy to TP region), g (reduce from TP region)
  TP layers       ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_ce;
                  tp_gather / tp_shard (a param's full tensor from shards and back), clip_grad_norm
  TP model        TPModel (shards a same-seed single-process Model in place; vocab-parallel loss)
  sequence par.   gather_seq, scatter_seq (Korthikanti's g, g-bar), SeqParallelEmbedding, SPModel
  train.py's side setup (model, optimizers, clip, DP sync for train.Step), Layout (checkpoint gathers, RNG)
  planner         PEAK_FLOPS, PlanConfig, layer_activation_bytes, tp_allreduce_bytes, sp_comm_bytes, plan,
                  plan_report, check_fits, fit_warning (train.py's and posttrain.py's start on a GPU)
  cluster bench   BenchConfig, bench (nccl-tests' algbw / busbw; bf16 matmul), bench_report
  command line    main: plan | bench
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

from model import Model, ModelConfig, RMSNorm

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


def shutdown(*models):
    """Free the models' tensors, wait for every rank, stop init's heartbeat, then destroy the groups: without the
    barrier a rank can tear gloo down while another is still in a collective, and the process aborts at exit."""
    for m in models:
        for p in m.parameters():
            p.grad = None
    dist.barrier()
    for t in threading.enumerate():
        if isinstance(t, Heartbeat):
            t.stop()
    dist.destroy_process_group()


@contextlib.contextmanager
def settling(grid):
    """Around train.py's loop: an error in a collective is raised only after Heartbeat.settle (which, when a rank
    was lost, names it and exits instead); in one process (grid None) it is raised as it is."""
    try:
        yield
    except RuntimeError as e:
        if grid:
            grid.heartbeat.settle(e)
        raise


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
    n = dist.get_world_size(group)
    sq = sum(p.grad.float().square().sum() / (1 if getattr(p, "tp_dim", None) is not None else n) for p in params)
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


# ---------------------------------------------------------------- sequence parallelism (Korthikanti et al. 2022)
# Between the TP regions (norms, residual adds, the embedding's output) each rank holds T/tp of the sequence
# instead of all of it: the activations there shrink tp-fold, and each all-reduce becomes a reduce-scatter
# into the sequence-parallel region plus an all-gather out of it (the same bytes on the wire).

def gather_cat(x, group, dim=1):
    """Every rank's x concatenated along dim, in rank order: [B, T/tp, ...] -> [B, T, ...] for sequence parallelism."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def _seq_reduce_scatter(x, group):
    """[B, T, ...] partial sums on each rank -> this rank's [B, T/tp, ...] of the sum."""
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[1] // n, x.shape[0], *x.shape[2:]))
    dist.reduce_scatter_single(out, x.transpose(0, 1).contiguous(), group=group)   # the sequence first
    return out.transpose(0, 1)


class gather_seq(torch.autograd.Function):
    """Into a TP region from the sequence-parallel one (Korthikanti's g): forward all-gather along the
    sequence, backward reduce-scatter (the ranks' partial gradients of the whole sequence, summed; ours kept)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_cat(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_reduce_scatter(grad, ctx.group), None


class scatter_seq(torch.autograd.Function):
    """Out of a TP region into the sequence-parallel one (Korthikanti's g-bar): forward reduce-scatter of the
    ranks' partial sums along the sequence, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_cat(grad, ctx.group), None


class _Local(nn.Module):
    """A TP layer's weight shard (the same Parameter, the same name) without its f or g."""

    def __init__(self, layer):
        super().__init__()
        self.weight = layer.weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class SeqParallelEmbedding(nn.Module):
    """VocabParallelEmbedding's rows, its partial lookups reduce-scattered along the sequence (not all-reduced)."""

    def __init__(self, vocab_parallel, group):
        super().__init__()
        self.group, self.weight, self.lo = group, vocab_parallel.weight, vocab_parallel.lo

    def forward(self, ids):
        if ids.shape[1] % dist.get_world_size(self.group):
            raise ValueError(f"sequence parallel: sequence length {ids.shape[1]} is not divisible by "
                             f"tp={dist.get_world_size(self.group)}")
        local = ids - self.lo
        inside = (local >= 0) & (local < self.weight.shape[0])
        e = torch.nn.functional.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return scatter_seq.apply(e * inside[..., None], self.group)


class SPModel(TPModel):
    """TPModel with sequence parallelism: the residual stream is [B, T/tp, C] on each rank. Each norm runs on
    the rank's tokens and gather_seq hands the whole sequence to the column-parallel layers (no f: the
    gather's backward sums the ranks' gradients); the row-parallel o and down end in scatter_seq (no g).
    A norm weight's gradient is partial over the sequence, so a hook sums it over the group. The parameters,
    their names and values are TPModel's; forward(x, y, pos) as TPModel's."""

    def __init__(self, model, group):
        super().__init__(model, group)
        gather = lambda module, args, out: gather_seq.apply(out, group)
        scatter = lambda module, args, out: scatter_seq.apply(out, group)
        # a fresh final norm on the same weight: TPModel's f hook on the old one is for unsplit sequences
        norm, model.norm = model.norm, RMSNorm(model.cfg.d_model, model.cfg.rms_eps)
        model.norm.weight = norm.weight
        norms = [model.norm] + [n for block in model.layers for n in (block.attn_norm, block.mlp_norm)]
        for n in norms:
            n.register_forward_hook(gather)
            n.weight.register_hook(functools.partial(_summed, group=group))
        for block in model.layers:
            a, mlp = block.attn, block.mlp
            a.q, a.k, a.v, a.o = (_Local(m) for m in (a.q, a.k, a.v, a.o))
            mlp.gate, mlp.up, mlp.down = (_Local(m) for m in (mlp.gate, mlp.up, mlp.down))
            a.o.register_forward_hook(scatter)
            mlp.down.register_forward_hook(scatter)
        model.tok_emb = SeqParallelEmbedding(model.tok_emb, group)


# ---------------------------------------------------------------- train.py's side

def setup(model, grid, zero, build_optimizers):
    """train.py's wiring: shard `model` in place when tp > 1 (each rank keeps its slice of the same-seed weights),
    build its optimizers (build_optimizers(model)), sync the grads over DP with ZeRO1 (zero=1) or DDP. Returns
    train.Step's pieces: (net, the module computing the loss; opts; clip_grad_norm; ddp); grid None: one process."""
    tp = grid.tp_group if grid and grid.tp > 1 else None
    net = TPModel(model, tp) if tp else model
    opts, clip, sync = build_optimizers(model), torch.nn.utils.clip_grad_norm_, None
    if tp:                                                     # the norm over every TP shard
        clip = functools.partial(clip_grad_norm, group=tp)
    if grid and zero:                                          # ZeRO-1's reduce-scatter replaces DDP's all-reduce
        opts = [ZeRO1(opts[0], grid.dp_group, tp)]
        clip, sync = opts[0].clip_grad_norm, opts[0]
    elif grid:   # DDP's hooks sit on the parameters (rank 0's, broadcast): the plain module runs, compiled or not
        sync = DDP(model, grid.dp_group)
    return net, opts, clip, sync


class Layout:
    """Where a model's tensors live on the grid, for train.py's checkpoints: the full tensors of its TP shards and
    back, and every rank's RNG states; identities in one process (grid None)."""

    def __init__(self, grid, model):
        self.grid, self.rank = grid, grid.rank if grid else 0
        self.params = dict(model.named_parameters()) if grid and grid.tp > 1 else {}
        self.device = next(model.parameters()).device

    def full(self, name, t):
        """The full tensor of t, parameter `name`'s value or optimizer state (collective under TP)."""
        return tp_gather(t, self.params[name], self.grid.tp_group) if name in self.params else t

    def local(self, name, t):
        """This rank's TP shard of the full tensor t of parameter `name` (full's inverse)."""
        return tp_shard(t, self.params[name], self.grid.tp_group) if name in self.params else t

    def rng_states(self):
        """Every rank's RNG states as {rng/torch/{rank}, rng/cuda/{rank}: uint8 tensor} (all-gathered)."""
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        parts, sizes = [torch.cat(list(mine.values()))], [v.numel() for v in mine.values()]
        if self.grid:
            flat = parts[0].to(self.device)                    # NCCL gathers GPU tensors only
            parts = [torch.empty_like(flat) for _ in range(self.grid.world)]
            dist.all_gather(parts, flat)
        return {f"rng/{k}/{r}": v.cpu().clone() for r, part in enumerate(parts)
                for k, v in zip(mine, part.split(sizes))}

    def set_rng_states(self, tensors):
        """This rank's RNG states from rng_states()'s; a rank the saving run lacked takes rank 0's."""
        torch.set_rng_state(tensors.get(f"rng/torch/{self.rank}", tensors["rng/torch/0"]))
        cuda = tensors.get(f"rng/cuda/{self.rank}", tensors.get("rng/cuda/0"))
        if self.device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)


# ---------------------------------------------------------------- planner

# Dense bf16 tensor-core peaks (vendor data sheets; the sheets' larger numbers assume 2:4 sparsity), matched in
# this order against torch.cuda.get_device_name() by train.peak_flops (MFU): the PCIe and NVL cards before the
# SXM parts they contain.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12}

@dataclasses.dataclass
class PlanConfig:
    gpus: int = 8
    tp: int = 1
    gpu_mem: str = "80GB"               # "80GB" (10^9 bytes), "141GiB" (2^30)
    gpu: str = "H100"                   # a key of PEAK_FLOPS: its dense bf16 peak
    mfu: float = 0.3                    # the predicted step time assumes this fraction of the peak
    tp_busbw: float = 360.0             # GB/s bus bandwidth inside a TP group (H100 NVLink, nccl-tests scale)
    dp_busbw: float = 40.0              # GB/s across nodes (8 x 400 Gb/s InfiniBand per node); measure: bench
    sp: bool = False                    # sequence parallelism (SPModel) inside the TP group


def parse_bytes(text):
    units = {"GIB": 2 ** 30, "GB": 1e9, "MIB": 2 ** 20, "MB": 1e6}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            with contextlib.suppress(ValueError):
                return float(text[:-len(unit)]) * scale
    raise ValueError(f"gpu_mem={text!r}: expected a size such as 80GB or 141GiB")


def layer_activation_bytes(mc, seq_len, tp=1, sp=False):
    """Bytes one Block keeps for its backward per token under train.py's bf16 autocast (eager), counted the
    way Korthikanti et al. 2022 ("Reducing Activation Recomputation") count theirs, s*b*h*(34 + 5*a*s/h) per
    layer for GPT with 2-byte activations. For this block, h = d_model, q = n_heads*head_dim, kv =
    n_kv_heads*head_dim, f = d_ff, H = n_heads:
      2 RMSNorms, each its fp32 input and fp32 normalised value (8h), and fp32 rsqrt (4)     16h + 8
      each of q, k, v, gate, up its own bf16 cast of its input (autocast casts per op)      10h
      flash attention's Q (after RoPE), K, V, output and fp32 log-sum-exp                   4q + 4kv + 4H
      the o projection's input (a contiguous copy of the attention output)                  2q
      SwiGLU: gate and up outputs, silu(gate), their product (the down projection's input)  8f
      the padding mask                                                                      1
      attn_impl "sdpa" only: its bf16 additive copy of the [B, 1, T, T] document mask        2T
    Flash attention (our Triton kernel, SDPA's fused kernels) keeps no scores: Korthikanti's 5*a*s^2*b term
    is gone. Under TP the norms, the casts of their outputs and the masks stay whole; the rest is split.
    Sequence parallelism (sp) splits the norms too. tests/test_parallel_tools.py holds this equal to what
    autograd saves."""
    h, f, H = mc.d_model, mc.d_ff, mc.n_heads
    q, kv = mc.n_heads * mc.head_dim, mc.n_kv_heads * mc.head_dim
    norms = (16 * h + 8) // (tp if sp else 1)
    return norms + 10 * h + 1 + 2 * seq_len * (mc.attn_impl == "sdpa") + (6 * q + 4 * kv + 4 * H + 8 * f) // tp


def tp_allreduce_bytes(mc, tokens, tp, act_bytes=2, act_ckpt=False):
    """Bytes all-reduced over the TP group in one micro-batch's forward + backward of TPModel: forward,
    the embedding's g (fp32) and each layer's o and down g (autocast's act_bytes), the three [N] of
    vocab_parallel_ce; backward, the f of each column-parallel q, k, v, gate, up and of the final norm, whose
    inputs are the fp32 norm outputs, and the qk-norm weight grads. Activation checkpointing runs each layer's
    forward again in the backward as far as its last saved tensor (torch's early stop): the o projection's g
    again, the down projection's not."""
    if tp == 1:
        return 0
    h, L = mc.d_model, mc.n_layers
    fwd = tokens * h * 4 + L * 2 * tokens * h * act_bytes + 3 * tokens * 4
    bwd = (5 * L + 1) * tokens * h * 4 + (L * 2 * mc.head_dim * 4 if mc.qk_norm else 0)
    return fwd + bwd + (L * tokens * h * act_bytes if act_ckpt else 0)


def sp_comm_bytes(mc, tokens, act_bytes=2, act_ckpt=False):
    """SPModel's traffic in one micro-batch's forward + backward: (bytes all-gathered or reduce-scattered, as
    nccl-tests' S, the whole array; bytes all-reduced). Forward, the embedding's scatter (fp32), per layer
    two norms' gathers (fp32) and the o and down scatters (act_bytes), the final norm's gather; backward,
    each one's conjugate in the same dtype; checkpointing re-runs both gathers and o's scatter of each layer.
    All-reduced: vocab_parallel_ce's three [N] and the grads of the norm (and qk-norm) weights."""
    Nh, L = tokens * mc.d_model, mc.n_layers
    moved = 2 * (8 * Nh + L * (8 + 2 * act_bytes) * Nh) + (L * (8 + act_bytes) * Nh if act_ckpt else 0)
    reduced = 3 * tokens * 4 + (2 * L + 1) * mc.d_model * 4 + (L * 2 * mc.head_dim * 4 if mc.qk_norm else 0)
    return moved, reduced


def plan(mc, seq_len, batch_size, micro_batch_size, pc, peak_flops, bf16=True):
    """The numbers of one DP x TP layout (a dict; plan_report prints them). Memory counts what train.py holds
    per GPU: fp32 weights and grads, the fp32 DP communication buffer (DDP's buckets, or ZeRO-1's flat
    reduce-scatter input), AdamW's two fp32 moments, autocast's bf16 weight copies, the activations."""
    if mc.attention != "gqa" or mc.n_experts:
        raise ValueError(f"parallel plan: activations and TP traffic are modelled for attention='gqa' with dense "
                         f"MLPs, not attention={mc.attention!r} with n_experts={mc.n_experts}")
    check_layout(pc.gpus, pc.tp, mc)
    dp = pc.gpus // pc.tp
    if batch_size % (micro_batch_size * dp):
        raise ValueError(f"parallel plan: batch_size {batch_size} is not a multiple of micro_batch_size "
                         f"{micro_batch_size} x DP {dp}")
    with torch.device("meta"):
        model = Model(mc)
    # norms (the 1-D parameters) are replicated over TP; every matrix is split tp ways
    P = sum(p.numel() // pc.tp if p.dim() == 2 else p.numel() for p in model.parameters())
    N, V = micro_batch_size * seq_len, mc.vocab_size          # tokens per micro-batch
    layer = layer_activation_bytes(mc, seq_len, pc.tp, pc.sp)
    # TP's vocab-parallel loss takes the whole [N, V/tp] logits (bf16, their fp32 copy, exp); one process
    # chunks them (loss_chunk rows at a time). Either way the final norm keeps 12h bytes per token.
    head = (N if pc.tp > 1 else min(N, mc.loss_chunk)) * V // pc.tp * 10 + N * 12 * mc.d_model
    mem = {"weights (fp32)": 4 * P, "bf16 weight copies (autocast)": 2 * P if bf16 else 0,
           "grads (fp32)": 4 * P, "DP buffer (fp32)": 4 * P if dp > 1 else 0,
           "optimizer (AdamW fp32 m, v)": 8 * P,
           # ZeRO-1: the moments, the owned fp32 shard and its grad, over DP
           "optimizer, ZeRO-1": 16 * P / dp,
           "activations": mc.n_layers * N * layer,
           # checkpointing keeps each layer's fp32 input and recomputes one layer at a time in the backward
           "activations, act ckpt": mc.n_layers * N * 4 * mc.d_model // (pc.tp if pc.sp else 1) + N * layer,
           "LM head + loss": head}
    # an upper bound: the backward frees activations while it makes the grads, which the sum counts at once
    base = mem["weights (fp32)"] + mem["bf16 weight copies (autocast)"] + mem["grads (fp32)"] \
        + mem["DP buffer (fp32)"] + mem["LM head + loss"]
    totals = {(zero, ckpt): base + mem["optimizer, ZeRO-1" if zero else "optimizer (AdamW fp32 m, v)"]
              + mem["activations, act ckpt" if ckpt else "activations"]
              for zero in (False, True) for ckpt in (False, True)}
    flops = model.flops_per_token(seq_len)
    tok_s = pc.mfu * peak_flops / flops                      # per GPU
    accum = batch_size // (micro_batch_size * dp)
    t, a = pc.tp, 2 if bf16 else 4
    if pc.sp and t > 1:                                      # ring all-gather / reduce-scatter: (n-1)/n of S
        moved, reduced = sp_comm_bytes(mc, N, a, mc.act_ckpt)
        tp_bus, tp_calls = ((t - 1) / t * moved + 2 * (t - 1) / t * reduced) * accum, \
            (2 * (4 * mc.n_layers + 2) + 3 * mc.n_layers * mc.act_ckpt) * accum
    else:
        tp_bus = 2 * (t - 1) / t * tp_allreduce_bytes(mc, N, t, a, mc.act_ckpt) * accum
        tp_calls = ((2 + mc.act_ckpt + 5 + 2 * mc.qk_norm) * mc.n_layers + 5) * (t > 1) * accum
    return dict(params=model.num_params(), params_per_gpu=P, dp=dp, tp=pc.tp, accum=accum, tokens_per_step=
                batch_size * seq_len, micro_tokens=N, layer_bytes=layer, mem=mem, totals=totals, flops=flops,
                tok_s=tok_s, step_s=batch_size * seq_len / (tok_s * pc.gpus),
                # ring collectives: each rank sends 2(n-1)/n of an all-reduce's bytes (nccl-tests' busbw)
                dp_bus=2 * (dp - 1) / dp * 4 * P, tp_bus=tp_bus, tp_calls=tp_calls)


def plan_report(p, pc, mc, seq_len, peak_flops):
    """The plan as text, a fit mark on each of the four layouts (ZeRO-1 or not, act ckpt or not)."""
    cap, gb = parse_bytes(pc.gpu_mem), lambda b: f"{b / 1e9:8.2f}"
    m = p["mem"]
    lines = [f"{pc.gpus} GPUs = DP {p['dp']} x TP {p['tp']}{' (+SP)' if pc.sp else ''}; {pc.gpu} (dense bf16 peak "
             f"{peak_flops / 1e12:.0f} TFLOP/s), {pc.gpu_mem} each",
             f"  parameters          {p['params']:,} ({p['params_per_gpu']:,} per GPU)",
             f"  tokens per step     {p['tokens_per_step']:,} = DP {p['dp']} x {p['accum']} accumulation x "
             f"micro-batch {p['micro_tokens'] // seq_len} x {seq_len} tokens",
             f"  FLOPs per token     {p['flops'] / 1e9:.2f} GFLOP (model.flops_per_token: 6N + attention)",
             "memory per GPU, GB (1e9 bytes)"]
    lines += [f"  {k:30}{gb(v)}" for k, v in m.items()]
    lines += [f"  (activations: {mc.n_layers} layers x {p['micro_tokens']:,} tokens x {p['layer_bytes']:,} "
              "bytes, layer_activation_bytes)",
              f"total per GPU, GB       no act ckpt   act ckpt    ({pc.gpu_mem} = {cap / 1e9:.2f} GB)"]
    for zero in (False, True):
        cells = [f"{gb(p['totals'][zero, c])} {'ok' if p['totals'][zero, c] <= cap else 'OVER':4}"
                 for c in (False, True)]
        lines.append(f"  {'ZeRO-1' if zero else 'DDP (no ZeRO)':20}{'  '.join(cells)}".rstrip())
    dp_s, tp_s = p["dp_bus"] / (pc.dp_busbw * 1e9), p["tp_bus"] / (pc.tp_busbw * 1e9)
    lines += ["communication per GPU per step (ring: 2(n-1)/n of an all-reduce's bytes, (n-1)/n of an all-gather's)",
              f"  DP   {p['dp_bus'] / 1e9:8.2f} GB   fp32 grads all-reduced (ZeRO-1: reduce-scatter + all-gather, "
              f"the same); {dp_s:.2f} s at {pc.dp_busbw:g} GB/s, overlapped with the backward",
              f"  TP   {p['tp_bus'] / 1e9:8.2f} GB   {p['tp_calls']} activation "
              f"{'all-gathers and reduce-scatters' if pc.sp else 'all-reduces'} (act_ckpt={mc.act_ckpt}); "
              f"{tp_s:.2f} s at {pc.tp_busbw:g} GB/s, on the critical path",
              f"predicted at MFU {100 * pc.mfu:.0f}%: {p['tok_s']:,.0f} tokens/s per GPU, "
              f"{p['tok_s'] * pc.gpus / 1e6:.2f}M tokens/s in all, {p['step_s']:.2f} s per step"]
    return "\n".join(lines)


def check_fits(p, pc):
    """A one-line ValueError, saying by how much, when not even ZeRO-1 with activation checkpointing fits."""
    best, cap = min(p["totals"].values()), parse_bytes(pc.gpu_mem)
    if best > cap:
        raise ValueError(f"parallel plan: DP {p['dp']} x TP {p['tp']} does not fit: even ZeRO-1 with activation "
                         f"checkpointing needs {best / 1e9:.2f} GB per GPU, {(best - cap) / 1e9:.2f} GB more than "
                         f"gpu_mem={pc.gpu_mem}")


def fit_warning(mc, seq_len, tc, world, device, gpu_bytes=None):
    """The warning a run on `world` GPUs (of gpu_bytes each; None: the CUDA device's) gets when plan's bound for its
    layout (tc: tp, zero, batch shape, dtype; mc.act_ckpt) exceeds them, with the switches that lower it; None when
    it fits, on a CPU, or for a model plan does not model. A bound, not a prediction: a warning, not a refusal."""
    if gpu_bytes is None and device.type != "cuda":
        return None
    gpu_bytes = gpu_bytes or torch.cuda.get_device_properties(device).total_memory
    try:
        p = plan(mc, seq_len, tc.batch_size, tc.micro_batch_size, PlanConfig(gpus=world, tp=tc.tp), 1.0,
                 tc.dtype == "bfloat16")
    except ValueError:                                         # MLA, MoE; a layout train.py refuses anyway
        return None
    zero = bool(tc.zero) and p["dp"] > 1
    need = p["totals"][zero, mc.act_ckpt]
    if need <= gpu_bytes:
        return None
    fixes = [f for f, off in [("--act_ckpt=True", not mc.act_ckpt),
                              ("--zero=1", not zero and p["dp"] > 1 and tc.optimizer == "adamw")] if off]
    return (f"warning: `python parallel.py plan` bounds this layout (DP {p['dp']} x TP {p['tp']}) at {need / 1e9:.1f} "
            f"GB a GPU, over this GPU's {gpu_bytes / 1e9:.1f} GB: expect out-of-memory; "
            + ", ".join(fixes + ["a smaller --micro_batch_size"]) + " lower it")


# ---------------------------------------------------------------- cluster bench

@dataclasses.dataclass
class BenchConfig:
    min_bytes: int = 1024
    max_bytes: int | None = None        # None: 1 GiB on GPUs (nccl), 1 MiB on CPU (gloo)
    iters: int = 20                     # nccl-tests' defaults: 20 timed runs after 5 warm-up ones
    warmup: int = 5
    matmul_n: int | None = None         # None: 8192 on GPUs, 256 on CPU


# nccl-tests' conventions (doc/PERFORMANCE.md): algbw = S / t with S the whole array (all-gather's output,
# reduce-scatter's input); busbw = algbw x the fraction of S each rank must move in a ring, which makes
# runs on different rank counts comparable with the link's own speed
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}


def _ops(count, n, r, device):
    """{op: (run, wrong)} on fp32 arrays of `count` elements in all; wrong() runs the op once on fresh data
    (rank r gives r + 1) and counts the elements that are not what they should be, as nccl-tests does."""
    full, part = torch.zeros(count, device=device), torch.zeros(count // n, device=device)
    total, owners = n * (n + 1) / 2, torch.arange(1, n + 1, device=device).repeat_interleave(count // n)

    runs = {"all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: dist.all_gather_single(full, part),
            "reduce_scatter": lambda: dist.reduce_scatter_single(part, full)}

    def wrong(op):
        (full if op != "all_gather" else part).fill_(r + 1)
        runs[op]()
        result = {"all_reduce": full != total, "all_gather": full != owners, "reduce_scatter": part != total}[op]
        full.zero_(), part.zero_()                            # zeros while timing: sums that never overflow
        return int(result.sum())

    return {op: (run, functools.partial(wrong, op)) for op, run in runs.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(bc, device):
    """Time the three collectives over the world at sizes min_bytes, 2x, ... max_bytes, then a bf16 matmul on
    each device. -> (rows of {op, bytes, time_s, algbw, busbw, wrong}, [TFLOP/s of each rank])."""
    n, r = dist.get_world_size(), dist.get_rank()
    top = bc.max_bytes or (2 ** 30 if device.type == "cuda" else 2 ** 20)
    rows, size = [], bc.min_bytes
    while size <= top:
        count = max(n, size // 4 // n * n)                    # fp32 elements, a multiple of the rank count
        for op, (run, wrong) in _ops(count, n, r, device).items():
            for _ in range(bc.warmup):
                run()
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(bc.iters):
                run()
            _sync(device)
            # [time, wrong]: an op takes as long as its slowest rank
            stats = torch.tensor([(time.perf_counter() - t0) / bc.iters, 0.0], device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            stats[1] = wrong()
            dist.all_reduce(stats[1:])
            t, algbw = stats[0].item(), count * 4 / stats[0].item() / 1e9
            rows.append(dict(op=op, bytes=count * 4, time_s=t, algbw=algbw, busbw=algbw * BUS_FACTOR[op](n),
                             wrong=int(stats[1].item())))
        size *= 2
    m = bc.matmul_n or (8192 if device.type == "cuda" else 256)
    a, b = (torch.randn(m, m, device=device).to(torch.bfloat16) for _ in range(2))
    for _ in range(bc.warmup):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(bc.iters):
        a @ b
    _sync(device)
    mine = torch.tensor([2 * m ** 3 * bc.iters / (time.perf_counter() - t0) / 1e12], device=device)
    every = [torch.zeros_like(mine) for _ in range(n)]
    dist.all_gather(every, mine)
    return rows, [t.item() for t in every]


def bench_report(rows, tflops, bc, device):
    n, backend = dist.get_world_size(), dist.get_backend()
    lines = [f"{n} ranks, {backend}, fp32 arrays; time = the slowest rank's mean over {bc.iters} runs; "
             "busbw = algbw x 2(n-1)/n (all-reduce), x (n-1)/n (all-gather, reduce-scatter)"]
    for op in BUS_FACTOR:
        lines += [f"{op:>16} {'bytes':>12} {'time us':>12} {'algbw GB/s':>11} {'busbw GB/s':>11} {'wrong':>6}"]
        lines += [f"{'':16} {x['bytes']:12,} {x['time_s'] * 1e6:12.1f} {x['algbw']:11.4g} {x['busbw']:11.4g} "
                  f"{x['wrong']:6}" for x in rows if x["op"] == op]
    m = bc.matmul_n or (8192 if device.type == "cuda" else 256)
    lines.append(f"bf16 matmul {m}^3, TFLOP/s per rank: " + ", ".join(f"{t:.4g}" for t in tflops))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def main(argv):
    """python parallel.py plan CONFIG [--key=value ...] | torchrun ... parallel.py bench [--key=value ...]"""
    from config import load, pick
    from data import DataConfig
    from train import TrainConfig                             # here: train.py imports this file
    if not argv or argv[0] not in ("plan", "bench"):
        sys.exit("usage: python parallel.py plan CONFIG [--gpus=N --tp=N --gpu_mem=80GB --mfu=0.3 ...]\n"
                 "       torchrun --nproc_per_node=N parallel.py bench [--max_bytes=N --iters=N ...]")
    try:
        if argv[0] == "plan":
            ns = load(argv[1:], ModelConfig, DataConfig, TrainConfig, PlanConfig, prog="python parallel.py plan",
                      strict=False)
            mc, tc = ModelConfig(**pick(ns, ModelConfig)), TrainConfig(**pick(ns, TrainConfig))
            pc = PlanConfig(**pick(ns, PlanConfig))
            if pc.gpu not in PEAK_FLOPS:
                raise ValueError(f"gpu={pc.gpu!r}: expected one of {', '.join(PEAK_FLOPS)} (parallel.PEAK_FLOPS)")
            p = plan(mc, ns.seq_len, tc.batch_size, tc.micro_batch_size, pc, PEAK_FLOPS[pc.gpu], tc.dtype == "bfloat16")
            print(plan_report(p, pc, mc, ns.seq_len, PEAK_FLOPS[pc.gpu]))
            check_fits(p, pc)
            return
        bc = BenchConfig(**pick(load(argv[1:], BenchConfig), BenchConfig))
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")        # `python parallel.py bench` alone: one rank
    os.environ.setdefault("MASTER_PORT", "29500")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init()
    rows, tflops = bench(bc, device)
    if dist.get_rank() == 0:
        print(bench_report(rows, tflops, bc, device))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
