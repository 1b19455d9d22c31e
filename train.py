"""train.py — pretraining: AdamW or Muon, warmup then WSD or cosine, spike guard, bpb evals, exact resume.

    python train.py config/tiny.py                  # 2 CPU cores: default corpus, 300 steps, samples
    python train.py config/tiny.py --resume=True    # continue from the newest intact checkpoint
    python train.py config/smollm3_1b_ablation.py   # one GPU: bf16 autocast, fp32 master weights
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py --micro_batch_size=8   # DP 2 (parallel.py)
    torchrun --standalone --nproc_per_node=4 train.py config/tiny.py --micro_batch_size=8 --tp=2 --zero=1  # DP 2 x TP 2

Steps count completed updates: the update at data position s is logged as step s+1, and a checkpoint at step s
holds the state after s updates. The loader's order is a pure function of (seed, sample index), so the data
position is all the data state there is: a resumed run matches an uninterrupted one bit for bit. Under torchrun
every rank trains (DP x TP, parallel.setup); rank 0 logs and writes whole checkpoints: any layout, or HF, loads them.

Sections: configuration · schedule · optimizers · one step · checkpoints · setup · logging · the loop · benchmark.
"""
import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from config import load, pick
from data import DataConfig, Loader, load_tokenizer, prepare_default
from eval import evaluate, plot_curves
import parallel
from model import Model, ModelConfig, atomic_write, check, fsync

# The spike guard's reference is an EMA of accepted losses with a ~20-step horizon: slow enough to ignore
# noise, fast enough to follow a falling loss, so a spike is measured against where the run actually is.
LOSS_EMA_BETA = 0.95
# Fields that make two checkpoints different networks; rope_theta, YaRN, masking may change between stages.
ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "nope_interval",
             "tie_embeddings", "qk_norm", "attention", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
             "qk_rope_head_dim", "v_head_dim", "n_experts", "n_experts_active", "n_shared_experts", "d_expert",
             "moe_layer_interval", "moe_first_dense")


@dataclasses.dataclass
class TrainConfig:
    out_dir: str = "out/run"            # run directory: log.jsonl, run.json, loss.svg, checkpoints
    seed: int = 1337
    batch_size: int = 32                # global rows per optimizer step (x seq_len = tokens per step)
    micro_batch_size: int = 8           # rows per forward/backward; accumulation = batch / (micro * dp)
    max_steps: int = 1000
    lr: float = 3e-4                    # peak AdamW learning rate
    min_lr: float = 0.0
    warmup_steps: int = 100
    schedule: str = "wsd"               # "wsd" | "cosine"
    decay_frac: float = 0.1             # WSD: fraction of max_steps spent decaying
    decay_shape: str = "linear"         # WSD: "linear" | "1-sqrt"
    weight_decay: float = 0.1
    wd_embeddings: bool = False         # SmolLM3: no weight decay on embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    optimizer: str = "adamw"            # "adamw" | "muon" (Muon for hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    eval_interval: int = 100            # steps between held-out evaluations (and at the end)
    eval_rows: int = 32                 # held-out rows per source
    ckpt_interval: int = 500            # steps between checkpoints (and at the end)
    keep_ckpts: int = 2                 # newest checkpoints kept on disk
    log_interval: int = 1               # steps between log.jsonl lines (skipped steps are always logged)
    spike_factor: float = 3.0           # skip when loss > factor x running mean; 0 = off
    max_skips: int = 5                  # stop after more than this many skipped updates in a row
    dtype: str = "bfloat16"             # autocast dtype on GPU: "bfloat16" | "float32"; weights stay fp32
    compile: bool | None = None         # torch.compile the model for training; None: on CUDA, off on CPU
    bench: int = 0                      # > 0: time this many steps on random rows and exit (no corpus, no files)
    init_from: str | None = None        # checkpoint, run or HF dir whose weights start a new run (not on resume)
    resume: bool = False                # continue from out_dir's latest checkpoint (fresh start if none)
    device: str = "auto"                # "auto" | "cpu" | "cuda" | "cuda:N"
    tp: int = 1                         # tensor-parallel ranks (torchrun); dp = world_size / tp
    zero: int = 0                       # 1: ZeRO-1, AdamW state sharded over the dp ranks (no effect at dp 1)
    dist_timeout_s: int = 300           # a collective, or a rank's heartbeat, silent this long stops the run
    sample_prompts: list[str] = dataclasses.field(default_factory=lambda: ["def ", "Problem: "])
    sample_tokens: int = 96
    sample_temperature: float = 0.8


class Diverged(RuntimeError):
    """Too many consecutive updates were skipped; the last checkpoint is left as it was."""


# ---------------------------------------------------------------- configuration

def dist_env():
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) for a plain `python train.py`."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def check_config(mc, dc, tc, world_size=1):
    """One ValueError listing every inconsistency of the settings (the parallel layout's first, alone)."""
    parallel.check_layout(world_size, tc.tp, mc)
    dp = world_size // tc.tp
    longest = max((len(p.encode()) for p in tc.sample_prompts), default=0)  # bytes >= tokens
    decay = round(tc.decay_frac * tc.max_steps)
    checks = [(getattr(tc, k) > 0, f"{k}={getattr(tc, k)} must be > 0")
              for k in ("batch_size", "micro_batch_size", "max_steps", "eval_interval", "eval_rows", "ckpt_interval",
                        "keep_ckpts", "log_interval", "muon_ns_steps", "dist_timeout_s")]
    checks += [(getattr(tc, k) >= 0, f"{k}={getattr(tc, k)} must be >= 0")
               for k in ("warmup_steps", "max_skips", "sample_tokens", "bench")]
    checks += [(getattr(tc, k) in allowed, f"{k}={getattr(tc, k)!r} must be one of {allowed}")
               for k, allowed in (("schedule", ["cosine", "wsd"]), ("decay_shape", ["1-sqrt", "linear"]),
                                  ("optimizer", ["adamw", "muon"]), ("dtype", ["bfloat16", "float32"]),
                                  ("zero", [0, 1]))]
    checks += [
        (tc.micro_batch_size <= 0 or tc.batch_size % (tc.micro_batch_size * dp) == 0,
         f"batch_size={tc.batch_size} must be a multiple of micro_batch_size*dp = {tc.micro_batch_size}*{dp} "
         f"(dp = world_size/tp = {world_size}/{tc.tp})"),
        # Muon orthogonalises whole matrices: Newton-Schulz of a TP shard or a ZeRO slice is another update
        (tc.optimizer == "adamw" or tc.tp == 1 and not tc.zero, "optimizer='muon' needs tp=1 and zero=0"),
        (tc.tp == 1 or mc.is_smollm3, f"tp={tc.tp} needs the SmolLM3 architecture (attention='gqa', no experts)"),
        (dc.seq_len <= mc.max_position_embeddings,
         f"seq_len={dc.seq_len} exceeds max_position_embeddings={mc.max_position_embeddings}"),
        (longest + tc.sample_tokens <= mc.max_position_embeddings,
         f"sample prompts ({longest} bytes) + sample_tokens={tc.sample_tokens} exceed "
         f"max_position_embeddings={mc.max_position_embeddings}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", tc.device),
         f"device={tc.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (tc.lr > 0 and 0 <= tc.min_lr <= tc.lr, f"need 0 <= min_lr={tc.min_lr} <= lr={tc.lr} and lr > 0"),
        (0 <= tc.decay_frac <= 1, f"decay_frac={tc.decay_frac} must be in [0, 1]"),
        (tc.schedule != "wsd" or tc.warmup_steps + decay <= tc.max_steps,
         f"warmup_steps={tc.warmup_steps} + decay steps {decay} (decay_frac*max_steps) "
         f"exceed max_steps={tc.max_steps}"),
        (tc.schedule == "wsd" or tc.warmup_steps < tc.max_steps,
         f"warmup_steps={tc.warmup_steps} must be < max_steps={tc.max_steps}"),
        (tc.spike_factor == 0 or tc.spike_factor > 1, f"spike_factor={tc.spike_factor} must be 0 (off) or > 1"),
        (tc.grad_clip >= 0 and tc.weight_decay >= 0, "grad_clip and weight_decay must be >= 0"),
        (0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1 and tc.eps > 0, "need 0 <= beta1, beta2 < 1 and eps > 0")]
    errors = [msg for ok, msg in checks if not ok]
    check(not errors, "config: " + "; ".join(errors))


# The dataclasses whose fields a training config may set (config.load reads exactly these).
CONFIGS = (ModelConfig, DataConfig, TrainConfig)


def resolve(ns):
    """(ModelConfig, DataConfig, TrainConfig) of a namespace, checked together (ModelConfig also checks itself)."""
    mc, dc, tc = (cls(**pick(ns, cls)) for cls in CONFIGS)
    check_config(mc, dc, tc, dist_env()[1])
    return mc, dc, tc


# ---------------------------------------------------------------- schedule

def get_lr(step, tc):
    """AdamW LR of the update at data position `step` (0-based): linear warmup to lr, then WSD (constant, then
    the last decay_frac of steps decay to min_lr along 1-p or 1-sqrt(p)) or cosine from the end of warmup."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps              # the first update runs at lr / warmup_steps
    start = tc.warmup_steps if tc.schedule == "cosine" else tc.max_steps - round(tc.decay_frac * tc.max_steps)
    # p is the share of the decay done *after* this update, so the last update runs at exactly min_lr
    p = min(max((step + 1 - start) / max(tc.max_steps - start, 1), 0.0), 1.0)
    if tc.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        coeff = 1.0 - (math.sqrt(p) if tc.decay_shape == "1-sqrt" else p)
    return tc.min_lr + coeff * (tc.lr - tc.min_lr)


# ---------------------------------------------------------------- optimizers

def newton_schulz(g, steps):
    """Approximately orthogonalise G (U S V^T -> U f(S) V^T, f(s) ~ 1): X <- aX + b(XX^T)X + c(XX^T)^2 X on
    X = G/||G||_F; modded-nanogpt's coefficients trade exact convergence for a steep slope at 0 (5 steps put
    every s in ~[0.7, 1.2]). bf16 on GPU: the iteration tolerates it, and it is the cost of Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    x = x.mT if tall else x                                    # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT                                        # [r, r], r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalised by Newton-Schulz, for hidden 2-D matrices (Keller Jordan's Muon); embeddings,
    head and norms stay on AdamW. Per parameter: buf = momentum*buf + g; u = g + momentum*buf (Nesterov);
    W *= 1 - lr*wd; W -= lr * sqrt(max(1, rows/cols)) * newton_schulz(u)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"].mul_(mom).add_(p.grad)
                update = newton_schulz(p.grad.add(buf, alpha=mom), group["ns_steps"])
                p.mul_(1.0 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def build_optimizers(model, tc, device):
    """[AdamW] or [Muon, AdamW]. Weight decay on matrices only, on embeddings only with `wd_embeddings` (the
    playbook's stability ablation, after OLMo 2). set_lr scales each group's `base_lr`: Muon's is muon_lr."""
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            muon = tc.optimizer == "muon" and p.dim() == 2 and "emb" not in name and "lm_head" not in name
            no_wd = p.dim() < 2 or "norm" in name or ("emb" in name and not tc.wd_embeddings)
            (matrices if muon else no_decay if no_wd else decay).append((name, p))
    adam_groups = [dict(params=ps, weight_decay=wd, base_lr=tc.lr)
                   for ps, wd in ((decay, tc.weight_decay), (no_decay, 0.0)) if ps]
    fused = device.type == "cuda"  # the CPU path stays the reference for-loop implementation
    opts = [torch.optim.AdamW(adam_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused)]
    if matrices:
        opts.insert(0, Muon([dict(params=matrices, base_lr=tc.muon_lr)], lr=tc.muon_lr, momentum=tc.muon_momentum,
                            weight_decay=tc.weight_decay, ns_steps=tc.muon_ns_steps))
    return opts


def set_lr(opts, lr, peak_lr):
    """Scale every group's base LR by lr / peak_lr (the schedule's factor)."""
    for group in (g for opt in opts for g in opt.param_groups):
        group["lr"] = group["base_lr"] * lr / peak_lr


# ---------------------------------------------------------------- one step

class Guard:
    """Skip an update whose loss or grad norm is not finite, or whose loss exceeds spike_factor x the running
    mean (a bias-corrected EMA of accepted losses). A skipped batch is dropped; the step still advances."""

    def __init__(self, spike_factor):
        self.spike_factor = spike_factor
        self.skips = self.skips_in_row = self.loss_ema_n = 0
        self.loss_ema = 0.0

    def mean(self):
        return self.loss_ema / (1 - LOSS_EMA_BETA ** self.loss_ema_n) if self.loss_ema_n else math.inf

    def check(self, loss, grad_norm):
        """Why this update must be skipped ("nonfinite_loss", "nonfinite_grad", "spike"), or None; counts it."""
        skip = ("nonfinite_loss" if not math.isfinite(loss) else "nonfinite_grad" if not math.isfinite(grad_norm)
                else "spike" if self.spike_factor and loss > self.spike_factor * self.mean() else None)
        if skip:
            self.skips, self.skips_in_row = self.skips + 1, self.skips_in_row + 1
        else:
            self.skips_in_row = 0
            self.loss_ema = LOSS_EMA_BETA * self.loss_ema + (1 - LOSS_EMA_BETA) * loss
            self.loss_ema_n += 1
        return skip

    def state_dict(self):
        return {k: getattr(self, k) for k in ("skips", "skips_in_row", "loss_ema", "loss_ema_n")}

    def load_state_dict(self, state):
        vars(self).update(state)


# skipped: the Guard's reason, or None when the update ran; mean: the Guard's running mean before this step
StepResult = collections.namedtuple("StepResult", "loss grad_norm lr skipped mean")


class Step:
    """One update over a step's micro-batches: forward under `autocast`, the mean micro-batch loss's gradient, clip,
    the guard's update or skip. parallel.setup gives clip_grad_norm and ddp (DDP, ZeRO1: the last micro-step syncs)."""

    def __init__(self, opts, guard, tc, autocast, clip_grad_norm=torch.nn.utils.clip_grad_norm_, ddp=None):
        self.opts, self.guard, self.autocast, self.clip_grad_norm, self.ddp = opts, guard, autocast, clip_grad_norm, ddp
        self.peak_lr, self.max_norm = tc.lr, tc.grad_clip if tc.grad_clip > 0 else math.inf
        self.params = [p for opt in opts for g in opt.param_groups for p in g["params"]]

    def __call__(self, batches, loss_fn, lr):
        set_lr(self.opts, lr, self.peak_lr)
        losses = []
        for i, batch in enumerate(batches):
            with self.autocast:
                loss = loss_fn(batch)
            with self.ddp.no_sync() if self.ddp and i < len(batches) - 1 else contextlib.nullcontext():
                (loss / len(batches)).backward() # backward outside autocast; weights and grads stay fp32
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if self.ddp:                             # every rank's guard must see the same loss and take the same path
            self.ddp.finish()
            loss = self.ddp.mean(loss)
        grad_norm = self.clip_grad_norm(self.params, self.max_norm)
        # The step's one host sync, loss and grad norm together: the guard needs both before it may step.
        loss_v, norm_v = torch.stack([loss, grad_norm]).tolist()
        mean, skipped = self.guard.mean(), self.guard.check(loss_v, norm_v)   # the mean before this step
        for opt in self.opts:
            if not skipped:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return StepResult(loss_v, norm_v, lr, skipped, mean)


# ---------------------------------------------------------------- checkpoints
# ckpt_000123/ = config.json + model.safetensors (the HF SmolLM3 layout) + tokenizer.json, so the directory
# alone serves eval and generation, and trainer/{state.safetensors, state.json} (optimizer state by parameter
# name, RNG; step, guard, config, each file's size and sha256) in a subdirectory, because the HF loader reads
# every *.safetensors beside config.json. No pickle anywhere.

TRAINER_STATE, TRAINER_TENSORS = os.path.join("trainer", "state.json"), os.path.join("trainer", "state.safetensors")


def _named_state(opt):
    """An optimizer's state_dict and its (index, parameter name) pairs: the state is saved by name, not index."""
    sd = opt.state_dict()
    return sd, [(idx, pname) for g in sd["param_groups"] for idx, pname in zip(g["params"], g["param_names"])]


def file_digest(path):
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def optimizer_kind(opt):
    # ZeRO-1 saves and loads its AdamW's full state: a run may change layout (or drop ZeRO) between resumes
    return "AdamW" if isinstance(opt, parallel.ZeRO1) else type(opt).__name__


def save_checkpoint(run_dir, model, opts, state, keep, tok=None, grid=None):
    """Write run_dir/ckpt_{step:06d} (files written into a temporary directory, renamed into place before `latest`
    moves to it: after a kill `latest` names a complete checkpoint), keep the newest `keep`; returns its path.
    Under torchrun every rank calls it (gathering TP shards, ZeRO-1 shards and RNG states) and rank 0 writes."""
    par = parallel.Layout(grid, model)                         # the gathers (collective): identities in one process
    weights = {k: par.full(k, v) for k, v in model.state_dict().items()}
    tensors = par.rng_states()
    for opt in opts:
        sd, names = _named_state(opt)
        tensors.update({f"optim/{pname}/{key}": par.full(pname, value).detach().cpu().contiguous()
                        for idx, pname in names for key, value in sd["state"].get(idx, {}).items()})
    if par.rank != 0:
        return None
    state = {**state, "optimizers": [optimizer_kind(opt) for opt in opts]}
    name = f"ckpt_{state['step']:06d}"
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)                     # leftover of a crash mid-write
    model.save_pretrained(tmp, weights)
    os.makedirs(os.path.join(tmp, "trainer"))
    atomic_write(os.path.join(tmp, TRAINER_TENSORS), lambda p: save_file(tensors, p))
    if tok is not None:
        atomic_write(os.path.join(tmp, "tokenizer.json"), tok.save)
    # Checksums catch a file truncated or corrupted after the save (resume then falls back to an older
    # checkpoint); hashing costs ~1 s per GB, seconds beside the minutes between checkpoints.
    state["files"] = {os.path.relpath(os.path.join(d, f), tmp): file_digest(os.path.join(d, f))
                      for d, _, files in os.walk(tmp) for f in sorted(files)}
    atomic_write(os.path.join(tmp, TRAINER_STATE), lambda p: Path(p).write_text(json.dumps(state, indent=1)))
    # safetensors writes 0600: make the checkpoint readable by whoever evaluates it
    for d, _, files in os.walk(tmp):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    shutil.rmtree(final, ignore_errors=True)                   # one `latest` never named, or a corrupt one
    os.replace(tmp, final)
    fsync(run_dir)                                             # the rename is on disk before `latest` moves
    atomic_write(os.path.join(run_dir, "latest"), lambda p: Path(p).write_text(name + "\n"))
    # by step, not by name: ckpt_1000000 sorts before ckpt_999999 as a string
    old = sorted((d for d in os.listdir(run_dir) if d.startswith("ckpt_") and d != name), key=lambda d: int(d[5:]))
    for d in old[:max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(os.path.join(run_dir, d))
    return final


def checkpoint_problem(path):
    """Why checkpoint `path` cannot be resumed from (a file missing, truncated or corrupt), or None."""
    try:
        state = json.loads(Path(path, TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except ValueError:                                     # JSONDecodeError and UnicodeDecodeError included
        return f"{TRAINER_STATE} is truncated or corrupt"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return f"{TRAINER_STATE} records no file checksums (an older nanosmol wrote it), so it cannot be verified"
    for rel, want in files.items():
        if not os.path.isfile(os.path.join(path, rel)):
            return f"{rel} is missing"
        have = file_digest(os.path.join(path, rel))
        if have["bytes"] != want["bytes"]:
            return f"{rel} has {have['bytes']:,} bytes, {want['bytes']:,} were saved (truncated)"
        if have["sha256"] != want["sha256"]:
            return f"{rel} differs from the sha256 recorded at save time (corrupt)"
    return None


def latest_checkpoint(run_dir):
    """The newest intact checkpoint of `run_dir`: the one `latest` names, else the newest older one that
    verifies (printing which were passed over and why); None when the run has no `latest`."""
    pointer = os.path.join(run_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    named = Path(pointer).read_text(encoding="utf-8").strip()
    if not re.fullmatch(r"ckpt_\d+", named):
        raise ValueError(f"{pointer}: expected a checkpoint name like ckpt_000123, got {named[:40]!r}")
    # A checkpoint newer than `latest` never became it (killed between its rename and the pointer): not trusted.
    older = [d for d in os.listdir(run_dir) if re.fullmatch(r"ckpt_\d+", d) and int(d[5:]) < int(named[5:])]
    problems = []
    for name in [named] + sorted(older, key=lambda d: int(d[5:]), reverse=True):
        problem = checkpoint_problem(os.path.join(run_dir, name))
        if problem is None:
            if problems:
                print(f"{'; '.join(problems)}; using {name}")
            return os.path.join(run_dir, name)
        problems.append(f"{name} is unusable: {problem}")
    raise ValueError(f"{run_dir}: no intact checkpoint ({'; '.join(problems)})")


def load_weights(model, path, grid=None):
    """Model.from_pretrained(path)'s weights into `model` (under TP: this rank's shard of each)."""
    local = parallel.Layout(grid, model).local
    model.load_state_dict({k: local(k, v) for k, v in Model.from_pretrained(path).state_dict().items()})


def load_checkpoint(path, model, opts, grid=None):
    """Restore weights, optimizer state and this rank's RNG from checkpoint `path`, whatever layout wrote it;
    returns its trainer/state.json dict."""
    state = json.loads(Path(path, TRAINER_STATE).read_text(encoding="utf-8"))
    kinds = [optimizer_kind(opt) for opt in opts]
    if state["optimizers"] != kinds:
        raise ValueError(f"{path} holds the state of optimizers {state['optimizers']}, this run uses {kinds}")
    load_weights(model, path, grid)
    par = parallel.Layout(grid, model)
    tensors = load_file(os.path.join(path, TRAINER_TENSORS))
    per_param = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            pname, slot = key[len("optim/"):].rsplit("/", 1)
            per_param.setdefault(pname, {})[slot] = value
    for opt in opts:
        sd, names = _named_state(opt)
        sd["state"].update({idx: {k: par.local(pname, v) for k, v in per_param.pop(pname).items()}
                            for idx, pname in names if pname in per_param})
        opt.load_state_dict(sd)
    check(not per_param, f"{path}: optimizer state for parameters this model lacks: {sorted(per_param)[:5]}")
    par.set_rng_states(tensors)
    return state


# ---------------------------------------------------------------- setup

def setup_device(tc, mc, local_rank):
    """(device, autocast context), checked before any data work: an unusable attn_impl fails in seconds."""
    cuda = torch.cuda.is_available()
    device = torch.device(tc.device if tc.device != "auto" else f"cuda:{local_rank}" if cuda else "cpu")
    check(device.type != "cuda" or cuda, f"device={tc.device!r} but CUDA is not available")
    check(mc.attn_impl != "triton" or device.type == "cuda" and importlib.util.find_spec("triton") is not None,
          f"attn_impl='triton' needs a CUDA device and the triton package (device is {device}); use --attn_impl=sdpa")
    if device.type == "cuda":                                  # fp32 matmuls may use TF32; NCCL uses this GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)
    # bf16 autocast for the forward only; no loss scaler, as bf16 has fp32's exponent range
    bf16 = device.type == "cuda" and tc.dtype == "bfloat16"
    return device, torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def use_compile(tc, device):
    # inductor's compile time (minutes on a CPU for a tiny model) pays off only on a GPU's long runs; TP's
    # collectives sit inside autograd Functions, which the compiler does not trace as reliably: eager there
    return device.type == "cuda" and tc.tp == 1 if tc.compile is None else tc.compile


def find_start(tc, mc):
    """(checkpoint to resume from, checkpoint to init_from): either or both None, architectures checked."""
    if os.path.isfile(os.path.join(tc.out_dir, "latest")) and not tc.resume:
        raise ValueError(f"{tc.out_dir} already holds checkpoints: pass --resume=True or choose another --out_dir")
    ckpt, init = latest_checkpoint(tc.out_dir), None          # None: no `latest` there
    if not ckpt and tc.init_from:
        init = latest_checkpoint(tc.init_from) or tc.init_from
        check(os.path.isfile(os.path.join(init, "config.json")),
              f"init_from={tc.init_from!r}: expected a run, checkpoint or HF model directory with config.json")
    for path, key in ((ckpt, "resume"), (init, "init_from")):
        theirs = Model.config_from_hf(os.path.join(path, "config.json")) if path else mc
        diff = [f"{k}: {getattr(theirs, k)} vs {getattr(mc, k)}" for k in ARCH_KEYS
                if getattr(theirs, k) != getattr(mc, k)]
        check(not diff, f"{key}: {path} holds another architecture (theirs vs ours): {', '.join(diff)}")
    return ckpt, init


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def start_run(run_dir, config, device, start, ckpt):
    """Append this start (config, versions, device, commit) to run.json's history; a fresh run starts a new one.
    The commit is HEAD of the repository holding this file (+ '-dirty' with local changes), or 'unknown'."""
    git = functools.partial(subprocess.run, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                            text=True, timeout=10)
    try:
        head, dirty = git(["git", "rev-parse", "HEAD"]), git(["git", "status", "--porcelain", "--untracked-files=no"])
        commit = head.stdout.strip() + "-dirty" * bool(dirty.stdout.strip()) if head.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    run = {"config": config, "python": platform.python_version(), "torch": torch.__version__,
           "device": device_name(device), "git_commit": commit, "argv": sys.argv, "world_size": dist_env()[1],
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "start_step": start, "resumed_from": ckpt}
    path = os.path.join(run_dir, "run.json")
    history = json.loads(Path(path).read_text()).get("history", []) if ckpt and os.path.isfile(path) else []
    atomic_write(path, lambda p: Path(p).write_text(json.dumps({"history": history + [run]}, indent=1)))
    return run


def peak_flops(device):   # None on a CPU: no GPU's name is in device_name's "cpu (N cores)"
    return next((v for k, v in parallel.PEAK_FLOPS.items() if k in device_name(device)), None)


# ---------------------------------------------------------------- logging

class Logger:
    """Rank 0's record of the run: one log.jsonl line per logged step, the tqdm bar, loss.svg after each eval.
    tokens/s is averaged over the steps since the previous line, eval and checkpoint time left out (a step's
    tokens are tokens_per_step, or extra["tokens"] when the method's steps vary, as GRPO's do); MFU =
    flops_per_token (6 x matmul params + causal attention) x tokens/s / the dense bf16 peak of all the devices."""

    def __init__(self, run_dir, start, tc, tokens_per_step, flops_per_token, peak, master):
        self.path, self.master, self.tc = os.path.join(run_dir, "log.jsonl"), master, tc
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        if master:   # cut the log back to the checkpoint's step: a resumed run's log is the uninterrupted one's
            kept = "".join(json.dumps(r) + "\n" for r in read_log(self.path, start))
            atomic_write(self.path, lambda p: Path(p).write_text(kept, encoding="utf-8"))
        self.bar = tqdm(total=tc.max_steps, initial=start, disable=not master, dynamic_ncols=True, desc="train")
        self.tokens, self.seconds = 0, 0.0
        self.restart_clock()

    def restart_clock(self):
        self.t_last = time.perf_counter()

    def write(self, record):
        if self.master:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text):
        if self.master:
            self.bar.write(text)

    def train_step(self, done, r, guard, extra=None):
        self.seconds += time.perf_counter() - self.t_last
        self.tokens += (extra or {}).get("tokens", self.tokens_per_step)
        tok_s = self.tokens / self.seconds
        mfu = self.flops_per_token * tok_s / self.peak if self.peak else None
        self.bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}", tok_s=f"{tok_s:,.0f}", gnorm=f"{r.grad_norm:.3f}",
                             mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
        self.bar.update(1)
        if r.skipped or done % self.tc.log_interval == 0 or done == self.tc.max_steps:
            self.write({"kind": "train", "step": done, "loss": _json_float(r.loss), "lr": r.lr,
                        "grad_norm": _json_float(r.grad_norm), "tok_per_s": tok_s, "mfu": mfu, "skipped": r.skipped,
                        "skips": guard.skips, "loss_mean": _json_float(r.mean), **(extra or {})})
            self.tokens, self.seconds = 0, 0.0
        if r.skipped:
            self.say(f"step {done}: update skipped ({r.skipped}: loss {r.loss:.4g}, grad norm {r.grad_norm:.4g}, "
                     f"running mean {r.mean:.4g}); {guard.skips} skipped so far")

    def held_out(self, done, val_loss, val_bpb=None, extra=None):
        """An eval line: val_loss (and val_bpb) per source, plus a method's own held-out numbers in `extra`."""
        extra = ({} if val_bpb is None else {"val_bpb": val_bpb}) | (extra or {})
        self.write({"kind": "eval", "step": done, "val_loss": val_loss, **extra})
        self.say(f"step {done}: val loss " + ", ".join(f"{s} {v:.4f}" for s, v in val_loss.items()) + "".join(
            f" | {k} " + (", ".join(f"{s} {x:.4f}" for s, x in v.items()) if isinstance(v, dict) else f"{v:.4f}")
            for k, v in extra.items()))
        if self.master:   # loss.svg: train loss of accepted steps and held-out loss per source
            records = read_log(self.path)
            series = [("train", [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and not r["skipped"]])]
            series += [(f"val {s}", [(r["step"], r["val_loss"][s]) for r in records if r["kind"] == "eval"])
                       for s in val_loss]
            plot_curves(os.path.join(os.path.dirname(self.path), "loss.svg"), series)


def read_log(path, upto_step=None):
    """Records of log.jsonl (a torn last line from a kill is dropped), optionally those with step <= upto_step."""
    if not os.path.isfile(path):
        return []
    lines, records = Path(path).read_text(encoding="utf-8").splitlines(), []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return [r for r in records if upto_step is None or r["step"] <= upto_step]


def _json_float(v):
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf; keep them readable


# ---------------------------------------------------------------- the loop

def train(ns):
    """Pretrain as configured by namespace `ns` (config.load); returns a summary dict of the finished run."""
    mc, dc, tc = resolve(ns)
    rank, world, local_rank = dist_env()
    master, run_dir = rank == 0, tc.out_dir
    device, autocast = setup_device(tc, mc, local_rank)
    # under torchrun: tc.tp-way tensor parallel within groups of consecutive ranks, data parallel across them
    grid = parallel.init(tc.tp, mc, tc.dist_timeout_s) if world > 1 else None
    ckpt, init = find_start(tc, mc)                            # before the corpus: bad paths fail in seconds

    if dc.dataset == "default" and master:
        prepare_default(dc.data_dir, mc.vocab_size)            # idempotent: builds tokenizer + shards once
    if grid:
        dist.barrier()                                         # the other ranks wait for rank 0's corpus
    tok = load_tokenizer(dc)
    check(tok.n_vocab <= mc.vocab_size, f"tokenizer has {tok.n_vocab} ids but vocab_size={mc.vocab_size}")
    # The tokenizer owns the special ids: generate() pads with pad_id and config.json records all three.
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    mc, config = dataclasses.replace(mc, **ids), {**vars(ns), **ids}

    torch.manual_seed(tc.seed)
    model = Model(mc).to(device)
    sizes = model.num_params(), model.num_params(non_embedding=True), model.flops_per_token(dc.seq_len)  # unsharded
    net, opts, clip, sync = parallel.setup(model, grid, tc.zero, lambda m: build_optimizers(m, tc, device))
    # the TP ranks of one DP group read the same rows
    dp, dp_rank = (grid.dp, grid.dp_rank) if grid else (1, 0)
    accum = tc.batch_size // (tc.micro_batch_size * dp)
    loader = Loader(dc, tok, tc.micro_batch_size, accum, tc.seed, dp_rank=dp_rank, dp_size=dp)
    sources = sorted(set(dc.mixture) | {s for _, weights in dc.stages for s in weights})
    val_sets = {s: loader.val_rows(s, tc.eval_rows) for s in sources}
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64, device=device)

    guard, start = Guard(tc.spike_factor), 0
    if ckpt:
        saved = load_checkpoint(ckpt, model, opts, grid)
        start = saved["step"]
        guard.load_state_dict(saved["guard"])
        changed = {k: (saved["config"].get(k), v) for k, v in config.items()
                   if saved["config"].get(k) != v and k != "resume"}
        if master:
            print(f"resuming from {ckpt} at step {start}" + (f"; config changes: {changed}" if changed else ""))
    elif init:
        load_weights(model, init, grid)
        if master:
            print(f"initialised weights from {init}; fresh optimizer and schedule")
    elif tc.resume and master:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch")

    tokens_per_step, peak = tc.batch_size * dc.seq_len, peak_flops(device)
    if master:
        os.makedirs(run_dir, exist_ok=True)
        run = start_run(run_dir, config, device, start, ckpt)
        print(json.dumps(config, indent=1))
        print(f"python {run['python']}, torch {run['torch']}, device {run['device']}, commit {run['git_commit']}")
        print(f"{sizes[0]:,} parameters ({sizes[1]:,} non-embedding); "
              f"{tokens_per_step:,} tokens/step = {tc.batch_size} rows ({tc.micro_batch_size} x {accum} accum "
              f"x {dp} dp) x {dc.seq_len}, tp {tc.tp}{', ZeRO-1' * bool(grid and tc.zero)}; MFU peak: "
              + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16) x {world}" if peak else "n/a on this device"))
        if warn := parallel.fit_warning(mc, dc.seq_len, tc, world, device):
            print(warn)                                        # said before minutes of compiling, not after
    log = Logger(run_dir, start, tc, tokens_per_step, sizes[2], peak and peak * world, master)
    update = Step(opts, guard, tc, autocast, clip_grad_norm=clip, ddp=sync)
    fwd = torch.compile(net) if use_compile(tc, device) else net  # eval and generate use the uncompiled modules

    def lm_loss(batch):
        x, y, pos = (t.to(device, non_blocking=True) for t in batch)
        return fwd(x, y, pos)[1]

    def batches(step):                                         # the first step's data mixture, then each change
        if step == start or loader.weights_at(step) != loader.weights_at(step - 1):
            log.say(f"step {step}: data mixture {loader.weights_at(step)}")
        return [loader.get(step, m) for m in range(accum)]

    def save(done):                                            # every rank gathers its shards, rank 0 writes
        state = {"step": done, "guard": guard.state_dict(), "config": config, "tokens": done * tokens_per_step}
        save_checkpoint(run_dir, model, opts, state, tc.keep_ckpts, tok, grid)

    def held_out(done):                # rank 0's TP group: the other DP ranks would repeat it on the same rows
        if dp_rank == 0:
            log.held_out(done, *evaluate(net, val_sets, token_bytes, tc.micro_batch_size, autocast, device))

    with parallel.settling(grid):      # a collective failed: if a rank is lost, the heartbeat names it and exits
        run_loop(tc, start, update, log, batches, lm_loss, save, start if ckpt else None, held_out,
                 model.moe_step)    # MoE: after each update, the routers' balance biases move; expert load logged
    samples = []
    if master and tc.sample_tokens and tc.sample_prompts:   # one process generates: under TP, from the checkpoint
        sampler = Model.from_pretrained(latest_checkpoint(run_dir)).to(device) if tc.tp > 1 else model
        sampler.eval()                                         # fp32 weights; generate turns autocast off anyway
        gen = torch.Generator(device=device).manual_seed(tc.seed)
        outs = sampler.generate([tok.encode(p) for p in tc.sample_prompts], tc.sample_tokens,
                                temperature=tc.sample_temperature, stop_ids=(tok.eos_id,), generator=gen)
        samples = [p + tok.decode([t for t in out if t != tok.eos_id]) for p, out in zip(tc.sample_prompts, outs)]
        text = "".join(f"--- sample {i}\n{s}\n" for i, s in enumerate(samples))
        atomic_write(os.path.join(run_dir, "samples.txt"), lambda p: Path(p).write_text(text, encoding="utf-8"))
        print(text, end="")
    last_eval = next((r for r in reversed(read_log(log.path)) if r["kind"] == "eval"), None)
    if grid:
        parallel.shutdown(model)
    return {"step": tc.max_steps, "run_dir": run_dir, "skips": guard.skips, "samples": samples,
            "val_loss": last_eval and last_eval["val_loss"], "val_bpb": last_eval and last_eval["val_bpb"]}


def run_loop(tc, start, update, log, batches, loss_fn, save, saved_step, held_out, extra=None):
    """The step loop of pretraining and every post-training method: update(batches(s), loss_fn, get_lr(s, tc)),
    logged with extra() (a method's own numbers); held_out(done), save(done) at their intervals and the end; Diverged
    past max_skips skips in a row. `saved_step`: the resumed checkpoint's step or None, which Ctrl-C's error names."""
    guard, done = update.guard, start
    try:
        for step in range(start, tc.max_steps):
            r = update(batches(step), loss_fn, get_lr(step, tc))
            done = step + 1
            log.train_step(done, r, guard, extra() if extra else None)
            if guard.skips_in_row > tc.max_skips:
                raise Diverged(f"stopping at step {done}: {guard.skips_in_row} consecutive updates skipped "
                               f"(max_skips={tc.max_skips}); last good checkpoint: "
                               f"{latest_checkpoint(tc.out_dir) or 'none written yet'}")
            if done % tc.eval_interval == 0 or done == tc.max_steps:
                held_out(done)
            if done % tc.ckpt_interval == 0 or done == tc.max_steps:
                save(done)
                saved_step = done
            log.restart_clock()                                # eval and checkpoint time is not step time
    except KeyboardInterrupt:
        since = "no checkpoint yet" if saved_step is None else f"the latest checkpoint is at step {saved_step}"
        raise KeyboardInterrupt(f"interrupted at step {done}; continue with --resume=True ({since})") from None
    finally:
        log.bar.close()


# ---------------------------------------------------------------- benchmark

# Untimed steps before the clock starts: the first runs the allocator's and (with compile) the compiler's
# one-time work, the second the optimizer's lazily created state.
BENCH_WARMUP = 2


def bench(ns):
    """`--bench=N`: N optimizer steps of the configured shape on random tokens (one document per row, so the
    mask path is training's), timed after BENCH_WARMUP untimed ones; no corpus, tokenizer or file. Prints the
    step time, tokens/s (per device), MFU where the peak is known, peak memory and the settings."""
    mc, dc, tc = resolve(ns)
    check(dist_env()[1] <= 1, f"WORLD_SIZE={dist_env()[1]}: --bench runs one process")
    device, autocast = setup_device(tc, mc, dist_env()[2])
    torch.manual_seed(tc.seed)
    model = Model(mc).to(device)
    update = Step(build_optimizers(model, tc, device), Guard(0.0), tc, autocast)
    compiled, cuda = use_compile(tc, device), device.type == "cuda"
    fwd = torch.compile(model) if compiled else model
    accum, B, T = tc.batch_size // tc.micro_batch_size, tc.micro_batch_size, dc.seq_len
    pos = torch.arange(T, device=device).expand(B, T)

    def lm_loss(tokens):
        return fwd(tokens[:, :-1], tokens[:, 1:], pos)[1]

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = 0.0
    for step in range(BENCH_WARMUP + tc.bench):
        batches = [torch.randint(mc.vocab_size, (B, T + 1), device=device) for _ in range(accum)]
        t0 = time.perf_counter()
        update(batches, lm_loss, get_lr(step, tc))            # ends in the step's host sync (loss, grad norm)
        seconds += (time.perf_counter() - t0) * (step >= BENCH_WARMUP)
    step_s, peak = seconds / tc.bench, peak_flops(device)
    tok_s = tc.batch_size * T / step_s                         # one process: per device too
    mfu = f"{100 * model.flops_per_token(T) * tok_s / peak:.1f}%" if peak else "n/a"
    memory = (torch.cuda.max_memory_allocated(device) if cuda     # Linux reports the peak resident set in KiB
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"bench: {model.num_params():,} parameters on {device_name(device)}; {B} x {accum} accum x {T} tokens/step; "
          f"attn_impl={mc.attn_impl} compile={compiled} act_ckpt={mc.act_ckpt} "
          f"autocast={'bf16' if cuda and tc.dtype == 'bfloat16' else 'off'}")
    print(f"bench: {tc.bench} steps after {BENCH_WARMUP} warm-up: {1000 * step_s:.1f} ms/step, {tok_s:,.0f} tokens/s "
          f"({tok_s:,.0f} per device), MFU {mfu}, peak memory {memory / 1e9:.2f} GB "
          f"({'cuda max allocated' if cuda else 'peak RSS'})")


def main(argv):
    """Command line: bad input and a diverged run end in one line (exit 1); Ctrl-C in one line (exit 130)."""
    try:
        ns = load(argv, *CONFIGS, prog="python train.py")
        (bench if ns.bench else train)(ns)
    except (ValueError, Diverged) as e:
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt as e:                             # 130 = 128 + SIGINT, what a shell reports
        print(f"train.py: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
