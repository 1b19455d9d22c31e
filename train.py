"""train.py — pretraining: AdamW (or Muon) with a WSD/cosine schedule, exact kill-and-resume, a data-stage
curriculum, spike guards and throughput/MFU logging. The main job of the project:

    python train.py config/tiny.py                      # 2 CPU cores, ~8 min: default corpus, training, samples
    python train.py config/tiny.py --resume=True        # continue a killed run from its latest checkpoint
    python train.py config/smollm3_1b_ablation.py       # one GPU (bf16 autocast, fp32 master weights)
    python train.py config/smollm3_long_32k.py          # long-context stage: init_from the 4k run, fresh schedule
    torchrun --standalone --nproc_per_node=8 train.py config/smollm3.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train.py config/smollm3.py                      # and --node_rank=1 on the second node

Rank, world size and local rank come from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). This
file runs one process; data/tensor parallelism is wired in by parallel.py, and until it is, a WORLD_SIZE above
1 stops with a clear message. The whole loop is the one function `train(ns)` so that wiring stays small.

Design choices
- Steps are counted as *completed optimizer steps*: the update that runs with data position `s` (the
  loader's step) is logged as step s+1, a checkpoint "at step s" holds the state after s updates, and a
  resumed run continues with data position s. The loader's order is a pure function of (seed, sample
  index), so the data position is all the data state there is.
- Schedule (DESIGN §3): linear warmup `lr*(s+1)/warmup_steps`, then either WSD — constant, then the last
  `round(decay_frac*max_steps)` steps decay to `min_lr` along `1-p` (linear) or `1-sqrt(p)` — or cosine from
  the end of warmup, `min_lr + (lr-min_lr)*(1+cos(pi*p))/2`. In both, p = (s+1-start)/(max_steps-start), so
  the last update runs at exactly min_lr, just as the first warmup update runs at lr/warmup_steps.
- AdamW groups: weight decay on matrices only; none on norms, and none on embeddings unless
  `wd_embeddings` (the playbook's stability ablation, after OLMo 2). Fused AdamW on CUDA.
- GPU precision: the forward (and eval) runs under bf16 autocast, the backward outside it; weights, grads and
  optimizer state stay fp32 (no loss scaler: bf16 has fp32's exponent range); fp32 matmuls may use TF32.
- Loss normalisation: a micro-batch's loss is its mean over target tokens and the step's loss the mean of its
  micro-batches (backward of loss/accum). Pretraining rows have no ignored (-100) targets, so every micro-batch
  holds the same number of tokens and this is exactly the per-token mean of the whole batch.
- Muon (`optimizer="muon"`): hidden 2-D matrices take SGD-Nesterov momentum orthogonalised by 5 Newton-Schulz
  iterations (quintic coefficients 3.4445, -4.7750, 2.0315, as in modded-nanogpt), scaled by
  sqrt(max(1, rows/cols)); embeddings, the output head and norms stay on AdamW. Both follow one schedule:
  the Muon LR is `muon_lr * lr_at(s)/lr`.
- Guards: a non-finite loss or grad norm, or a loss above `spike_factor` x the running mean (a bias-corrected
  EMA of accepted losses), skips the update (the batch is dropped, the step still advances), is logged and
  counted; more than `max_skips` in a row stops the run and leaves the last checkpoint as it was.
- Checkpoint = directory `ckpt_000123/`: `config.json` + `model.safetensors` in the HF SmolLM3 layout
  (model.save_pretrained), and `trainer/state.safetensors` (optimizer state keyed by parameter name, RNG
  states) + `trainer/state.json` (step, guard counters, resolved config) in a subdirectory, so that the HF
  loader, which reads every *.safetensors beside config.json, sees only the weights. No pickle anywhere.
  Written as `.tmp_ckpt_...`, renamed into place, then the one-line file `latest` is replaced atomically;
  a crash at any point leaves `latest` naming a complete checkpoint (a complete one that `latest` never came
  to name, killed between the rename and the pointer, is rewritten when the resumed run reaches its step).
  The newest `keep_ckpts` are kept.
- On resume, `log.jsonl` is cut back to the checkpoint's step, so the log of a killed-and-resumed run is the
  log of the uninterrupted one; on CPU the losses match bit for bit (tests/test_train.py).
- Bits per byte per source: sum of CE nats / (ln 2 x sum of UTF-8 bytes of the target tokens), on fixed
  held-out rows, so runs with different tokenizers compare.
- Throughput: tokens/s is averaged over the steps since the previous log line, eval and checkpoint time left
  out. MFU = model.flops_per_token(seq_len) (6 x matmul params + causal attention at T/2 keys) x tokens/s / peak,
  with the device's dense bf16 peak, whatever `dtype` (PEAK_FLOPS: H100 SXM and H200 989 TFLOP/s, H100 PCIe
  756, A100 312); other devices (CPU included) show n/a. Each step syncs with the host once, fetching loss and
  grad norm together: the guard needs both before it may step.
- The loss curves are written as `loss.svg` (text, so no plotting package; opens in any web browser).
"""
import contextlib
import dataclasses
import html
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from config import load, pick
from data import DataConfig, Loader, load_tokenizer, prepare_default
from model import Model, ModelConfig

# Dense bf16 tensor-core peaks (vendor data sheets; the sheets' larger numbers assume 2:4 sparsity), matched in
# this order against torch.cuda.get_device_name(): the PCIe and NVL cards before the SXM parts they contain.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12}
# The spike guard's reference is an EMA of accepted losses with a ~20-step horizon: slow enough to ignore
# noise, fast enough to follow a falling loss, so a spike is measured against where the run actually is.
LOSS_EMA_BETA = 0.95


@dataclass
class TrainConfig:
    out_dir: str = "out/run"            # run directory: log.jsonl, run.json, loss.svg, checkpoints
    seed: int = 1337
    batch_size: int = 32                # global rows per optimizer step (x seq_len = tokens per step)
    micro_batch_size: int = 8           # rows per forward/backward; accumulation = batch / (micro * world)
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
    compile: bool = False               # torch.compile the model for training
    init_from: str | None = None        # checkpoint, run or HF dir whose weights start a new run (not on resume)
    resume: bool = False                # continue from out_dir's latest checkpoint (fresh start if none)
    device: str = "auto"                # "auto" | "cpu" | "cuda" | "cuda:N"
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
    """Raise one ValueError listing every inconsistency between the model, data and train settings."""
    errors = []

    def need(ok, msg):
        if not ok:
            errors.append(msg)

    for key in ("batch_size", "micro_batch_size", "max_steps", "eval_interval", "eval_rows", "ckpt_interval",
                "keep_ckpts", "log_interval", "muon_ns_steps"):
        need(getattr(tc, key) > 0, f"{key}={getattr(tc, key)} must be > 0")
    for key in ("warmup_steps", "max_skips", "sample_tokens"):
        need(getattr(tc, key) >= 0, f"{key}={getattr(tc, key)} must be >= 0")
    rows = tc.micro_batch_size * world_size
    need(tc.micro_batch_size <= 0 or tc.batch_size % rows == 0,
         f"batch_size={tc.batch_size} must be a multiple of micro_batch_size*world_size = "
         f"{tc.micro_batch_size}*{world_size}")
    need(dc.seq_len <= mc.max_position_embeddings,
         f"seq_len={dc.seq_len} exceeds max_position_embeddings={mc.max_position_embeddings}")
    longest = max((len(p.encode()) for p in tc.sample_prompts), default=0)  # bytes >= tokens
    need(longest + tc.sample_tokens <= mc.max_position_embeddings,
         f"sample prompts ({longest} bytes) + sample_tokens={tc.sample_tokens} exceed "
         f"max_position_embeddings={mc.max_position_embeddings}")
    need(tc.schedule in SCHEDULES, f"schedule={tc.schedule!r} must be one of {sorted(SCHEDULES)}")
    need(tc.decay_shape in DECAY_SHAPES, f"decay_shape={tc.decay_shape!r} must be one of {sorted(DECAY_SHAPES)}")
    need(tc.optimizer in ("adamw", "muon"), f"optimizer={tc.optimizer!r} must be 'adamw' or 'muon'")
    need(tc.dtype in ("bfloat16", "float32"), f"dtype={tc.dtype!r} must be 'bfloat16' or 'float32'")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", tc.device),
         f"device={tc.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    need(tc.lr > 0 and 0 <= tc.min_lr <= tc.lr, f"need 0 <= min_lr={tc.min_lr} <= lr={tc.lr} and lr > 0")
    need(0 <= tc.decay_frac <= 1, f"decay_frac={tc.decay_frac} must be in [0, 1]")
    if tc.schedule == "wsd":
        decay = round(tc.decay_frac * tc.max_steps)
        need(tc.warmup_steps + decay <= tc.max_steps,
             f"warmup_steps={tc.warmup_steps} + decay steps {decay} (decay_frac*max_steps) "
             f"exceed max_steps={tc.max_steps}")
    else:
        need(tc.warmup_steps < tc.max_steps, f"warmup_steps={tc.warmup_steps} must be < max_steps={tc.max_steps}")
    need(tc.spike_factor == 0 or tc.spike_factor > 1, f"spike_factor={tc.spike_factor} must be 0 (off) or > 1")
    need(tc.grad_clip >= 0 and tc.weight_decay >= 0, "grad_clip and weight_decay must be >= 0")
    need(0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1 and tc.eps > 0, "need 0 <= beta1, beta2 < 1 and eps > 0")
    if errors:
        raise ValueError("config: " + "; ".join(errors))


# The dataclasses whose fields a training config may set (config.load reads exactly these).
CONFIGS = (ModelConfig, DataConfig, TrainConfig)


def resolve(ns):
    """The three dataclasses of a loaded namespace, checked together: (ModelConfig, DataConfig, TrainConfig).

    ModelConfig checks its own fields (heads divisible by KV heads, even head_dim, ...) as it is built."""
    mc, dc, tc = (cls(**pick(ns, cls)) for cls in CONFIGS)
    check_config(mc, dc, tc, dist_env()[1])
    return mc, dc, tc


# ---------------------------------------------------------------- learning-rate schedule

def _progress(step, start, end):
    """Fraction of the decay done *after* update `step` (0-based data position): 1/(end-start) ... 1."""
    return min(max((step + 1 - start) / max(end - start, 1), 0.0), 1.0)


DECAY_SHAPES = {"linear": lambda p: 1.0 - p, "1-sqrt": lambda p: 1.0 - math.sqrt(p)}
SCHEDULES = {
    "wsd": lambda s, tc: DECAY_SHAPES[tc.decay_shape](
        _progress(s, tc.max_steps - round(tc.decay_frac * tc.max_steps), tc.max_steps)),
    "cosine": lambda s, tc: 0.5 * (1.0 + math.cos(math.pi * _progress(s, tc.warmup_steps, tc.max_steps))),
}


def lr_at(step, tc):
    """Learning rate of the update at data position `step` (0-based)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.min_lr + (tc.lr - tc.min_lr) * SCHEDULES[tc.schedule](step, tc)


# ---------------------------------------------------------------- optimizers

def newton_schulz(g, steps):
    """Approximately orthogonalise a matrix: U S V^T -> U f(S) V^T with f(s) ~ 1 on the singular values.

    Quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X on X = G/||G||_F (so every singular value is <= 1);
    the coefficients trade exact convergence for a steep slope at 0, so 5 steps push all values into ~[0.7, 1.2].
    Runs in bf16 on GPU (the iteration tolerates it, and it is the cost of Muon), fp32 elsewhere.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:                                                  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT                                        # [r, r], r = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalised by Newton-Schulz, for 2-D weight matrices (Keller Jordan's Muon).

    Per parameter: buf = momentum*buf + g; u = g + momentum*buf (Nesterov); W *= 1 - lr*wd;
    W -= lr * sqrt(max(1, rows/cols)) * newton_schulz(u).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(mom).add_(p.grad)
                update = newton_schulz(p.grad.add(buf, alpha=mom), group["ns_steps"])
                p.mul_(1.0 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def build_optimizers(model, tc, device):
    """[AdamW] or [Muon, AdamW]; groups carry `param_names` and a `base_lr` the schedule scales each step."""
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_emb = "emb" in name or "lm_head" in name
        if tc.optimizer == "muon" and p.dim() == 2 and not is_emb:
            matrices.append((name, p))
        elif p.dim() < 2 or "norm" in name or ("emb" in name and not tc.wd_embeddings):
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    adam_groups = [dict(params=ps, weight_decay=wd, base_lr=tc.lr)
                   for ps, wd in ((decay, tc.weight_decay), (no_decay, 0.0)) if ps]
    fused = device.type == "cuda"  # the CPU path stays the reference for-loop implementation
    opts = [torch.optim.AdamW(adam_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused)]
    if matrices:
        opts.insert(0, Muon([dict(params=matrices, base_lr=tc.muon_lr)], lr=tc.muon_lr, momentum=tc.muon_momentum,
                            weight_decay=tc.weight_decay, ns_steps=tc.muon_ns_steps))
    return opts


def set_lr(opts, step, tc):
    """Scale every group's base LR by the schedule's factor at `step`; returns the AdamW LR."""
    lr = lr_at(step, tc)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr / tc.lr
    return lr


# ---------------------------------------------------------------- checkpoints

def _write_text(path, text):
    """Atomic small-file write: temp file, fsync, rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(run_dir):
    """Path of the checkpoint `run_dir/latest` names, or None when the run has none."""
    pointer = os.path.join(run_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        path = os.path.join(run_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, "trainer", "state.json")):
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def save_checkpoint(run_dir, model, opts, state, keep):
    """Write `run_dir/ckpt_{step:06d}` atomically, point `latest` at it, prune to the newest `keep`."""
    state = {**state, "optimizers": [type(opt).__name__ for opt in opts]}
    name = f"ckpt_{state['step']:06d}"
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".tmp_{name}")
    current = latest_checkpoint(run_dir)
    if current is not None and os.path.basename(current) == name:
        return final                                           # this exact state is already on disk
    shutil.rmtree(tmp, ignore_errors=True)                     # leftover of a crash mid-write
    model.save_pretrained(tmp)
    tensors = {f"rng/{k}": v for k, v in rng_state().items()}
    for opt in opts:
        sd = opt.state_dict()
        for group in sd["param_groups"]:
            for idx, pname in zip(group["params"], group["param_names"]):
                for key, value in sd["state"].get(idx, {}).items():
                    tensors[f"optim/{pname}/{key}"] = value.detach().cpu().contiguous()
    os.makedirs(os.path.join(tmp, "trainer"))
    save_file(tensors, os.path.join(tmp, "trainer", "state.safetensors"))
    _write_text(os.path.join(tmp, "trainer", "state.json"), json.dumps(state, indent=1))
    if os.path.exists(final):                                  # a complete dir that `latest` never named
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text(os.path.join(run_dir, "latest"), name + "\n")
    # by step, not by name: ckpt_1000000 sorts before ckpt_999999 as a string
    old = sorted((d for d in os.listdir(run_dir) if d.startswith("ckpt_") and d != name), key=lambda d: int(d[5:]))
    for d in old[:max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(os.path.join(run_dir, d))
    return final


def load_checkpoint(path, model, opts):
    """Restore weights, optimizer state and RNG from checkpoint `path`; returns its trainer/state.json dict."""
    with open(os.path.join(path, "trainer", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    kinds = [type(opt).__name__ for opt in opts]
    if state["optimizers"] != kinds:
        raise ValueError(f"{path} holds the state of optimizers {state['optimizers']}, this run uses {kinds}")
    model.load_state_dict(Model.from_pretrained(path).state_dict())
    tensors = load_file(os.path.join(path, "trainer", "state.safetensors"))
    per_param = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            pname, slot = key[len("optim/"):].rsplit("/", 1)
            per_param.setdefault(pname, {})[slot] = value
    for opt in opts:
        sd = opt.state_dict()
        for group in sd["param_groups"]:
            for idx, pname in zip(group["params"], group["param_names"]):
                if pname in per_param:
                    sd["state"][idx] = per_param.pop(pname)
        opt.load_state_dict(sd)
    if per_param:
        raise ValueError(f"{path}: optimizer state for parameters this model lacks: {sorted(per_param)[:5]}")
    set_rng_state({k[len("rng/"):]: v for k, v in tensors.items() if k.startswith("rng/")})
    return state


def rng_state():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_state(states):
    torch.set_rng_state(states["torch"])
    cuda = [states[f"cuda{i}"] for i in range(len(states) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def init_weights_from(model, path):
    """Copy weights from a checkpoint dir, a run dir (its latest checkpoint) or an HF SmolLM3 dir."""
    if os.path.isfile(os.path.join(path, "latest")):
        path = latest_checkpoint(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"init_from={path!r}: expected a run, checkpoint or HF model directory with config.json")
    model.load_state_dict(Model.from_pretrained(path).state_dict())
    return path


# ---------------------------------------------------------------- run log

def read_log(path, upto_step=None):
    """Records of log.jsonl (a torn last line from a kill is dropped), optionally those with step <= upto_step."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return [r for r in records if upto_step is None or r["step"] <= upto_step]


def _json_float(v):
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf; keep them readable


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, val_sets, token_bytes, micro_batch_size, autocast, device):
    """Held-out loss (nats/token) and bits per byte per source, plus pooled over all sources ("all")."""
    model.eval()
    loss, bpb, totals = {}, {}, [0.0, 0, 0]
    for source, (x, y, pos) in val_sets.items():
        nats, nbytes, ntok = 0.0, 0, 0
        for i in range(0, len(x), micro_batch_size):
            xb, yb, pb = (t[i:i + micro_batch_size].to(device) for t in (x, y, pos))
            with autocast:
                _, ce = model(xb, yb, pb, reduction="none")    # [b, T], 0 where yb == -100
            keep = yb != -100
            nats += ce.double()[keep].sum().item()
            nbytes += token_bytes[yb[keep]].sum().item()
            ntok += keep.sum().item()
        loss[source], bpb[source] = nats / max(ntok, 1), nats / (math.log(2) * max(nbytes, 1))
        totals = [totals[0] + nats, totals[1] + nbytes, totals[2] + ntok]
    loss["all"], bpb["all"] = totals[0] / max(totals[2], 1), totals[0] / (math.log(2) * max(totals[1], 1))
    model.train()
    return loss, bpb


# ---------------------------------------------------------------- loss-curve plot

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _ticks(lo, hi, n=6):
    """About n round tick values in [lo, hi] (steps of 1, 2 or 5 x 10^k) and the decimals to print them with."""
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    return [(k * step, decimals) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def plot_curves(path, series, width=800, height=480, xlabel="step", ylabel="loss", max_points=2000):
    """Line plot of `series` = [(label, [(x, y), ...]), ...] with a grid, round ticks and a legend, as SVG.

    SVG is text (no plotting package) and opens in any web browser. A series longer than `max_points` is
    drawn through every k-th point, counted back from its last point, so the curve still ends where the run is.
    """
    points = [p for _, pts in series for p in pts]
    if not points:
        return
    left, right, top, bottom = 56, width - 16, 28, height - 40
    x0 = min(x for x, _ in points)
    x1 = max(max(x for x, _ in points), x0 + 1)
    # The first few percent of steps sit near ln(vocab); letting them set the y range would flatten the rest.
    late = [y for x, y in points if x >= x0 + 0.05 * (x1 - x0)] or [y for _, y in points]
    y0, y1 = min(y for _, y in points), max(late)
    margin = 0.05 * (y1 - y0) or 0.5
    y0, y1 = y0 - margin, y1 + margin

    def px(x):
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y):
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<clipPath id="area"><rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/></clipPath>']
    for v, d in _ticks(x0, x1):
        svg.append(f'<line x1="{px(v):.1f}" y1="{top}" x2="{px(v):.1f}" y2="{bottom}" stroke="#ddd"/>'
                   f'<text x="{px(v):.1f}" y="{bottom + 16}" text-anchor="middle">{v:.{d}f}</text>')
    for v, d in _ticks(y0, y1):
        svg.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{right}" y2="{py(v):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.{d}f}</text>')
    svg.append(f'<path d="M{left},{top}V{bottom}H{right}" fill="none" stroke="black"/>'
               f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>'
               f'<text x="{left}" y="{top - 10}">{html.escape(ylabel)}</text>'
               f'<rect x="{right - 170}" y="{top + 4}" width="166" height="{16 * len(series) + 8}" fill="white"/>')
    for k, (label, pts) in enumerate(series):
        color, pts = _COLORS[k % len(_COLORS)], sorted(pts)
        pts = pts[::-math.ceil(len(pts) / max_points)][::-1] if pts else pts
        svg.append(f'<polyline points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)}" fill="none" '
                   f'stroke="{color}" stroke-width="{1.5 if k else 1}" clip-path="url(#area)"/>')
        if len(pts) < 50:                                          # sparse series (evals) get point markers
            svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}" clip-path="url(#area)"/>'
                    for x, y in pts]
        ly = top + 16 + 16 * k                                     # legend, top right
        svg.append(f'<line x1="{right - 162}" y1="{ly}" x2="{right - 142}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{right - 136}" y="{ly + 4}">{html.escape(label)}</text>')
    _write_text(path, "\n".join(svg + ["</svg>\n"]))


def plot_run(path, records):
    """loss.svg of a run: train loss of accepted steps and held-out loss per source."""
    train_pts = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and not r["skipped"]]
    evals = [r for r in records if r["kind"] == "eval"]
    series = [("train", train_pts)] + [(f"val {s}", [(r["step"], r["val_loss"][s]) for r in evals])
                                       for s in (evals[-1]["val_loss"] if evals else {})]
    plot_curves(path, series)


# ---------------------------------------------------------------- run description

def git_commit():
    """HEAD of the repository holding this file (+ '-dirty' with local changes), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def describe_run(ns, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"config": vars(ns), "python": platform.python_version(), "torch": torch.__version__,
            "device": name, "git_commit": git_commit(), "argv": sys.argv, "world_size": dist_env()[1],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------- the loop

def train(ns):
    """Pretrain as configured by namespace `ns` (config.load); returns a summary dict of the finished run."""
    mc, dc, tc = resolve(ns)
    rank, world, local_rank = dist_env()
    if world > 1:
        raise ValueError(f"WORLD_SIZE={world}: multi-process training is wired in by parallel.py; "
                         "this file runs one process")
    if tc.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tc.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={tc.device!r} but CUDA is not available")
    master = rank == 0
    run_dir = tc.out_dir
    ckpt = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if ckpt and not tc.resume:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume=True or choose another --out_dir")

    if dc.dataset == "default":
        prepare_default(dc.data_dir, mc.vocab_size)            # idempotent: builds tokenizer + shards once
    tok = load_tokenizer(dc)
    if tok.n_vocab > mc.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids but vocab_size={mc.vocab_size}")
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64, device=device)
    # The tokenizer owns the special ids: generate() pads with pad_id and config.json records all three.
    mc = dataclasses.replace(mc, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)

    torch.manual_seed(tc.seed)
    model = Model(mc).to(device)
    model.train()
    opts = build_optimizers(model, tc, device)
    accum = tc.batch_size // (tc.micro_batch_size * world)
    loader = Loader(dc, tok, tc.micro_batch_size, accum, tc.seed, dp_rank=rank, dp_size=world)
    sources = sorted(set(dc.mixture) | {s for _, weights in dc.stages for s in weights})
    val_sets = {s: loader.val_rows(s, tc.eval_rows) for s in sources}

    # Guard state: skip counters and a bias-corrected EMA of accepted losses (the spike reference).
    start, guard = 0, {"skips": 0, "skips_in_row": 0, "loss_ema": 0.0, "loss_ema_n": 0}
    log_path = os.path.join(run_dir, "log.jsonl")
    if ckpt:
        saved = load_checkpoint(ckpt, model, opts)
        start, guard = saved["step"], saved["guard"]
        changed = {k: (saved["config"].get(k), v) for k, v in vars(ns).items() if saved["config"].get(k) != v}
        changed.pop("resume", None)
        if master:
            print(f"resuming from {ckpt} at step {start}" + (f"; config changes: {changed}" if changed else ""))
    elif tc.init_from:
        source = init_weights_from(model, tc.init_from)
        if master:
            print(f"initialised weights from {source}; fresh optimizer and schedule")
    elif tc.resume and master:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch")
    if master:                                               # cut the log back to the checkpoint's step
        os.makedirs(run_dir, exist_ok=True)
        _write_text(log_path, "".join(json.dumps(r) + "\n" for r in read_log(log_path, start)))

    amp = device.type == "cuda" and tc.dtype == "bfloat16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    fwd = torch.compile(model) if tc.compile else model      # eval and generate use the plain module
    tokens_per_step = tc.batch_size * dc.seq_len
    flops_per_token, peak = model.flops_per_token(dc.seq_len), peak_flops(device)
    if master:
        run = describe_run(ns, device)
        _write_text(os.path.join(run_dir, "run.json"), json.dumps(run, indent=1))
        print(json.dumps(run["config"], indent=1))
        print(f"python {run['python']}, torch {run['torch']}, device {run['device']}, commit {run['git_commit']}")
        print(f"{model.num_params():,} parameters ({model.num_params(non_embedding=True):,} non-embedding); "
              f"{tokens_per_step:,} tokens/step = {tc.batch_size} rows ({tc.micro_batch_size} x {accum} accum "
              f"x {world} ranks) x {dc.seq_len}; MFU peak: "
              + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16)" if peak else "n/a on this device"))

    def log(record):
        if master:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(step):
        if master:
            state = {"step": step, "guard": guard, "config": vars(ns), "tokens": step * tokens_per_step}
            save_checkpoint(run_dir, model, opts, state, tc.keep_ckpts)

    params = [p for opt in opts for g in opt.param_groups for p in g["params"]]
    bar = tqdm(total=tc.max_steps, initial=start, disable=not master, dynamic_ncols=True, desc="train")
    weights, timed_steps, timed_s, t_last = None, 0, 0.0, time.perf_counter()
    for step in range(start, tc.max_steps):
        if master and loader.weights_at(step) != weights:
            weights = loader.weights_at(step)
            bar.write(f"step {step}: data mixture {weights}")
        lr = set_lr(opts, step, tc)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y, pos = (t.to(device, non_blocking=True) for t in loader.get(step, micro))
            with autocast:
                _, loss = fwd(x, y, pos)
            (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        loss_v, grad_norm_v = torch.stack([loss_sum / accum, grad_norm]).tolist()  # the step's one host sync

        mean = guard["loss_ema"] / (1 - LOSS_EMA_BETA ** guard["loss_ema_n"]) if guard["loss_ema_n"] else math.inf
        skipped = ("nonfinite_loss" if not math.isfinite(loss_v) else "nonfinite_grad" if not math.isfinite(grad_norm_v)
                   else "spike" if tc.spike_factor and loss_v > tc.spike_factor * mean else None)
        if skipped:
            guard["skips"] += 1
            guard["skips_in_row"] += 1
        else:
            for opt in opts:
                opt.step()
            guard["skips_in_row"] = 0
            guard["loss_ema"] = LOSS_EMA_BETA * guard["loss_ema"] + (1 - LOSS_EMA_BETA) * loss_v
            guard["loss_ema_n"] += 1
        for opt in opts:
            opt.zero_grad(set_to_none=True)

        done = step + 1
        timed_steps, timed_s = timed_steps + 1, timed_s + time.perf_counter() - t_last
        tok_s = tokens_per_step * timed_steps / timed_s            # averaged over the steps since the last log line
        mfu = flops_per_token * tok_s / peak if peak else None
        bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", gnorm=f"{grad_norm_v:.3f}",
                        mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
        bar.update(1)
        if skipped or done % tc.log_interval == 0 or done == tc.max_steps:
            log({"kind": "train", "step": done, "loss": _json_float(loss_v), "lr": lr,
                 "grad_norm": _json_float(grad_norm_v), "tok_per_s": tok_s, "mfu": mfu, "skipped": skipped,
                 "skips": guard["skips"], "loss_mean": _json_float(mean)})
            timed_steps, timed_s = 0, 0.0
        if skipped:
            bar.write(f"step {done}: update skipped ({skipped}: loss {loss_v:.4g}, grad norm {grad_norm_v:.4g}, "
                      f"running mean {mean:.4g}); {guard['skips']} skipped so far")
            if guard["skips_in_row"] > tc.max_skips:
                bar.close()
                raise Diverged(f"stopping at step {done}: {guard['skips_in_row']} consecutive updates skipped "
                               f"(max_skips={tc.max_skips}); last good checkpoint: "
                               f"{latest_checkpoint(run_dir) or 'none written yet'}")
        if done % tc.eval_interval == 0 or done == tc.max_steps:
            val_loss, val_bpb = evaluate(model, val_sets, token_bytes, tc.micro_batch_size, autocast, device)
            log({"kind": "eval", "step": done, "val_loss": val_loss, "val_bpb": val_bpb})
            bar.write(f"step {done}: val loss " + ", ".join(f"{s} {v:.4f}" for s, v in val_loss.items())
                      + " | bpb " + ", ".join(f"{s} {v:.4f}" for s, v in val_bpb.items()))
            if master:
                plot_run(os.path.join(run_dir, "loss.svg"), read_log(log_path))
        if done % tc.ckpt_interval == 0 or done == tc.max_steps:
            checkpoint(done)
        t_last = time.perf_counter()                           # eval and checkpoint time is not step time
    bar.close()

    samples = []
    if master and tc.sample_tokens and tc.sample_prompts:
        gen = torch.Generator(device=device).manual_seed(tc.seed)
        model.eval()                                           # fp32 weights, no autocast: the KV cache is fp32
        outs = model.generate([tok.encode(p) for p in tc.sample_prompts], tc.sample_tokens,
                              temperature=tc.sample_temperature, stop_ids=(tok.eos_id,), generator=gen)
        samples = [p + tok.decode([t for t in out if t != tok.eos_id]) for p, out in zip(tc.sample_prompts, outs)]
        text = "".join(f"--- sample {i}\n{s}\n" for i, s in enumerate(samples))
        _write_text(os.path.join(run_dir, "samples.txt"), text)
        print(text, end="")
    last_eval = next((r for r in reversed(read_log(log_path)) if r["kind"] == "eval"), None)
    return {"step": tc.max_steps, "run_dir": run_dir, "skips": guard["skips"], "samples": samples,
            "val_loss": last_eval and last_eval["val_loss"], "val_bpb": last_eval and last_eval["val_bpb"]}


def main(argv):
    """Command line: bad input (config, files, checkpoints) and a diverged run end in one line, exit code 1."""
    try:
        train(load(argv, *CONFIGS, prog="python train.py"))
    except (ValueError, Diverged) as e:
        sys.exit(f"train.py: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
