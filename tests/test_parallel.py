"""parallel.py against single-process oracles: 2 CPU processes on gloo (spawned), fp32. Each worker builds the
same-seed model, runs the parallel version on its share of the batch and compares with the single-process
run on the whole batch (and with torch's own DistributedDataParallel). train.py under torchrun's environment
(2 and 4 spawned ranks: DP 2, DP 2 with ZeRO-1, DP 2 x TP 2 with ZeRO-1) against one process, checkpoints
resumed across layouts, and a killed rank named by the survivor."""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
import test_train
import train
from config import load, pick
from model import Model, ModelConfig
from test_train import ROOT, make_ns, train_records, write_config

corpus = test_train.corpus                                    # the byte-level two-source corpus fixture

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, nope_interval=2)


def _worker(rank, world, tp, path, checks):
    """Run every check on one process group (a spawn costs seconds); each check's failure is recorded by name
    (a failing rank may leave the other in a collective, which the group's timeout then ends)."""
    torch.set_num_threads(1)
    grid = parallel.init(tp=tp, timeout_s=30, init_method=f"file://{path}/rdzv", rank=rank, world=world)
    models, errors = [], {}
    for check in checks:
        try:
            models += CHECKS[check](grid)
        except Exception:
            errors[check] = traceback.format_exc()
    parallel.shutdown(*models)
    with open(f"{path}/rank{rank}.json", "w") as f:
        json.dump(errors, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """{check: error traceback} over both ranks, from one 2-process run per layout (DP 2, then TP 2)."""
    errors = {}
    for tp, checks in ((1, ["ddp_grads", "ddp_accum_and_steps", "zero1_steps"]),
                       (2, ["tp_model", "tp_seed_contract", "vocab_parallel_ce"])):
        path = tmp_path_factory.mktemp(f"tp{tp}")
        mp.spawn(_worker, args=(2, tp, str(path), checks), nprocs=2, join=True)
        for r in range(2):
            errors.update(json.loads((path / f"rank{r}.json").read_text()))
    return errors


def batch(step, rows=4, T=16):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, CFG.vocab_size, (rows, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return Model(cfg)


def close(a, b, what, atol=1e-6):
    # after optimizer steps atol=1e-5: Adam divides by sqrt(v), so last-bit grad differences move weights more
    assert torch.allclose(a, b, rtol=1e-4, atol=atol), f"{what}: max diff {(a - b).abs().max():.3g}"


# ---------------------------------------------------------------- DDP

def _ddp_grads(grid):
    r = grid.dp_rank
    x, y = batch(0)
    mine = slice(r * 2, r * 2 + 2)
    ref = model(0)
    ref(x, y)[1].backward()
    ours = parallel.DDP(model(seed=r), grid.dp_group, bucket_mb=0.01, first_bucket_mb=0.002)  # rank 1's own
    assert len(ours.buckets) > 2                                                           # weights replaced
    ours(x[mine], y[mine])[1].backward()
    ours.finish()
    theirs = torch.nn.parallel.DistributedDataParallel(model(0), process_group=grid.dp_group)
    theirs(x[mine], y[mine])[1].backward()
    for (name, p), q, t in zip(ref.named_parameters(), ours.module.parameters(), theirs.module.parameters()):
        close(q.grad, p.grad, f"DDP grad {name} vs single process")
        close(q.grad, t.grad, f"DDP grad {name} vs torch DDP")
    return [ref, ours, theirs]


def test_ddp_grads_equal_single_process_and_torch_ddp(two_ranks):
    assert "ddp_grads" not in two_ranks, two_ranks["ddp_grads"]


def _ddp_accum_and_steps(grid):
    r = grid.dp_rank
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    ref, ours = model(0), parallel.DDP(model(0), grid.dp_group, bucket_mb=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    for step in range(3):
        micro = [batch(10 * step + m) for m in range(3)]          # 3 accumulation micro-steps
        for x, y in micro:
            (ref(x, y)[1] / 3).backward()
        for m, (x, y) in enumerate(micro):
            sync = contextlib.nullcontext() if m == 2 else ours.no_sync()
            with sync:
                (ours(x[2 * r:2 * r + 2], y[2 * r:2 * r + 2])[1] / 3).backward()
            if m < 2:
                assert not calls, f"accumulation micro-step {m} sent {len(calls)} all-reduces"
        assert len(calls) == len(ours.buckets), f"{len(calls)} all-reduces for {len(ours.buckets)} buckets"
        calls.clear()
        ours.finish()
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    dist.all_reduce = real
    for (name, p), q in zip(ref.named_parameters(), ours.module.parameters()):
        close(q, p, f"DDP after 3 accumulated steps: {name}", atol=1e-5)
    return [ref, ours]


def test_ddp_accumulation_sends_nothing_and_steps_equal_single_process(two_ranks):
    assert "ddp_accum_and_steps" not in two_ranks, two_ranks["ddp_accum_and_steps"]


# ---------------------------------------------------------------- ZeRO-1

def _zero1_steps(grid):
    r = grid.dp_rank
    tc = train.TrainConfig(lr=1e-2, grad_clip=0.05, weight_decay=0.1, spike_factor=0.0)
    cpu = torch.device("cpu")
    runs = []
    for sharded in (False, True):
        m = model(0)
        opt = train.build_optimizers(m, tc, cpu)[0]
        assert len(opt.param_groups) == 2                         # decay and no-decay groups kept
        zero = parallel.ZeRO1(opt, grid.dp_group) if sharded else None
        step = train.Step([zero or opt], train.Guard(0.0), tc, contextlib.nullcontext(),
                          **({"clip_grad_norm": zero.clip_grad_norm, "ddp": zero} if sharded else {}))
        rows = slice(2 * r, 2 * r + 2) if sharded else slice(None)
        norms = [step([batch(s)], lambda b: m(b[0][rows], b[1][rows])[1], tc.lr).grad_norm for s in range(4)]
        runs.append((m, norms, zero or opt))
    (ref, ref_norms, ref_opt), (ours, norms, zero) = runs
    assert ref_norms[0] > 10 * tc.grad_clip                      # clipping is active
    assert norms == pytest.approx(ref_norms, rel=1e-4), "ZeRO-1 global grad norm"
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        close(q, p, f"ZeRO-1 after 4 clipped steps: {name}", atol=1e-5)
    # the consolidated state is plain AdamW's, and a fresh ZeRO1 loading it holds this rank's shards again
    full, want = zero.state_dict(), ref_opt.state_dict()
    assert full["state"].keys() == want["state"].keys() and full["param_groups"] == want["param_groups"]
    for idx, st in want["state"].items():
        for k, v in st.items():
            close(full["state"][idx][k], v, f"ZeRO-1 state_dict {idx}/{k}", atol=1e-5)
    again = parallel.ZeRO1(train.build_optimizers(model(0), tc, cpu)[0], grid.dp_group)
    again.load_state_dict(want)
    for a, b in zip(again.inner.state.values(), zero.inner.state.values(), strict=True):
        for k in b:
            close(a[k], b[k], f"ZeRO-1 load_state_dict shard {k}", atol=1e-5)
    return [ref, ours]


def test_zero1_steps_equal_adamw_with_clipping(two_ranks):
    assert "zero1_steps" not in two_ranks, two_ranks["zero1_steps"]


# ---------------------------------------------------------------- tensor parallel (the 2 ranks are one TP group)

def slice_of(full, shard, r):
    """Rank r's slice of `full` along the one dim where the shard is smaller (the whole tensor if none)."""
    dims = [d for d in range(full.dim()) if full.shape[d] != shard.shape[d]]
    return full.chunk(full.shape[dims[0]] // shard.shape[dims[0]], dims[0])[r] if dims else full


def _tp_model(grid):
    r, kept = grid.tp_rank, []
    x, y = batch(1)
    y = y.clone()
    y[0, :3] = -100
    pos = torch.cat([torch.arange(10), torch.arange(4), torch.full((2,), -1)]).repeat(4, 1)   # 2 docs, padding
    for tie in (True, False):
        cfg = ModelConfig(**{**vars(CFG), "head_dim": None, "tie_embeddings": tie, "z_loss": 1e-3, "qk_norm": True})
        ref, tp = model(0, cfg), parallel.TPModel(model(0, cfg), grid.tp_group)
        close(tp(x, pos=pos), ref(x, pos=pos), f"TP logits (tie={tie})")
        loss, ref_loss = tp(x, y, pos)[1], ref(x, y, pos)[1]
        close(loss, ref_loss, f"TP loss (tie={tie})")
        loss.backward()
        ref_loss.backward()
        for (name, p), q in zip(ref.named_parameters(), tp.model.parameters()):
            close(q.grad, slice_of(p.grad, q, r), f"TP grad {name} (tie={tie})")
        # the TP grad norm counts split weights' shards and replicated norms once: clip_grad_norm_'s norm
        norm = parallel.clip_grad_norm(list(tp.model.parameters()), 0.05, grid.tp_group)
        close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05), f"TP grad norm (tie={tie})")
        assert norm > 0.5                                     # clipping is active
        for (name, p), q in zip(ref.named_parameters(), tp.model.parameters()):
            close(q.grad, slice_of(p.grad, q, r), f"TP clipped grad {name} (tie={tie})")
        kept += [ref, tp]
    return kept


def _tp_seed_contract(grid):
    ref, tp = model(0), parallel.TPModel(model(0), grid.tp_group)
    for (name, p), q in zip(ref.named_parameters(), tp.model.parameters()):
        assert torch.equal(q, slice_of(p, q, grid.tp_rank)), f"{name}: shard is not the same-seed model's slice"
        assert torch.equal(parallel.tp_gather(q.detach(), q, grid.tp_group), p), f"{name}: tp_gather"
        assert torch.equal(parallel.tp_shard(p.detach(), q, grid.tp_group), q), f"{name}: tp_shard"
        if q.shape != p.shape:                                # a split weight: the two shards differ
            theirs = [torch.empty_like(q) for _ in range(2)]
            dist.all_gather(theirs, q.detach().contiguous(), group=grid.tp_group)
            assert not torch.equal(*theirs), f"{name}: both TP shards are equal"
    return [ref, tp]


def _vocab_parallel_ce(grid):
    r = grid.tp_rank
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(12, 64, generator=g)).requires_grad_()
    y = torch.randint(0, 64, (12,), generator=g)
    y[[1, 7]] = -100
    z = 1e-2
    ref = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="none")
    ref = ref + torch.where(y == -100, 0.0, z * torch.logsumexp(logits, -1).square())
    ref.sum().backward()
    mine = logits.detach()[:, 32 * r:32 * (r + 1)].clone().requires_grad_()
    ours = parallel.vocab_parallel_ce(mine, y, 32 * r, grid.tp_group, z_loss=z)
    close(ours, ref.detach(), "vocab-parallel CE (+ z-loss) per token")
    ours.sum().backward()
    close(mine.grad, logits.grad[:, 32 * r:32 * (r + 1)], "vocab-parallel CE gradient")
    return []


CHECKS = {"ddp_grads": _ddp_grads, "ddp_accum_and_steps": _ddp_accum_and_steps, "zero1_steps": _zero1_steps,
          "tp_model": _tp_model, "tp_seed_contract": _tp_seed_contract, "vocab_parallel_ce": _vocab_parallel_ce}


@pytest.mark.parametrize("check", ["tp_model", "tp_seed_contract", "vocab_parallel_ce"])
def test_tensor_parallel_equals_single_process(two_ranks, check):
    """TP=2 logits, loss and every gradient equal TP=1 (tied and untied head, GQA, qk-norm, z-loss, padding,
    ignored targets); vocab-parallel CE equals F.cross_entropy; shards are slices of the same-seed model."""
    assert check not in two_ranks, two_ranks[check]


# ---------------------------------------------------------------- train.py under torchrun's environment

def _train_ranks(rank, world, runs):
    """Rank `rank` of `world` runs train.train on each (port, namespace) in turn, as torchrun would start it."""
    torch.set_num_threads(1)
    for port, ns in runs:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        train.train(ns)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resumable_copy(src, dst, step):
    """A copy of run `src` whose latest checkpoint is the one at `step` (later ones and their log lines dropped)."""
    shutil.copytree(src, dst)
    for d in os.listdir(dst):
        if d.startswith("ckpt_") and int(d[5:]) > step:
            shutil.rmtree(os.path.join(dst, d))
    (dst / "latest").write_text(f"ckpt_{step:06d}\n")


def same_run(a, b, what, steps=None):
    """Equal train losses and grad norms (and, at the evals, held-out losses) of runs a and b."""
    ra, rb = (train.read_log(os.path.join(ns.out_dir, "log.jsonl")) for ns in (a, b))
    ra, rb = ([r for r in rs if steps is None or r["step"] in steps] for rs in (ra, rb))
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb], what
    for x, y in zip(ra, rb):
        if x["kind"] == "train":
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), f"{what}: step {x['step']} loss"
            # rel 1e-4: torch's fp32 clip_grad_norm_ on CPU (the one-process side) is off float64's by up to ~3e-5
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), f"{what}: step {x['step']} grad norm"
        else:
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5), f"{what}: step {x['step']} val loss"


def final_weights(ns, step=3):
    return Model.from_pretrained(os.path.join(ns.out_dir, f"ckpt_{step:06d}")).state_dict()


def test_train_py_layouts_equal_one_process_and_resume_across_layouts(tmp_path, corpus):
    """8 rows a step for 3 clipped steps as 1 process x 2 micro-batches of 4, as DP 2 with ZeRO-1 and as DP 2 x
    TP 2 with ZeRO-1 (4 ranks): the same losses, grad norms, held-out losses and final weights. Checkpoints are
    whole and layout-free: those two runs' step-2 checkpoints resume in one process, and one process's resumes
    at DP 2 x TP 2 with DDP, each giving the uninterrupted run's step 3 and final weights."""
    over = dict(micro_batch_size=4, max_steps=3, warmup_steps=1, eval_interval=3, ckpt_interval=2, grad_clip=0.1,
                n_kv_heads=2, dist_timeout_s=60)                     # 2 KV heads: TP 2 splits them
    ns = {name: make_ns(tmp_path, corpus, name, **over, **kw) for name, kw in (
        ("one", {}), ("zero", dict(zero=1)), ("tp", dict(tp=2, zero=1)), ("back", dict(tp=2)))}
    t0 = time.perf_counter()
    train.train(ns["one"])
    assert all(r["grad_norm"] > 0.1 for r in train_records(ns["one"].out_dir))   # clipping is active
    resumable_copy(tmp_path / "one", tmp_path / "back", 2)
    ns["back"].resume = True
    mp.spawn(_train_ranks, args=(2, [(free_port(), ns["zero"])]), nprocs=2, join=True)
    mp.spawn(_train_ranks, args=(4, [(free_port(), ns["tp"]), (free_port(), ns["back"])]), nprocs=4, join=True)
    for name in ("zero", "tp"):
        same_run(ns["one"], ns[name], name)
        hf = [json.loads(open(os.path.join(ns[k].out_dir, "ckpt_000003", "config.json")).read()) for k in ("one", name)]
        assert hf[0] == hf[1], f"{name}: config.json differs from one process's"
        ns[f"{name}_1"] = make_ns(tmp_path, corpus, f"{name}_1", **over, resume=True)    # ... and to one process
        resumable_copy(tmp_path / name, tmp_path / f"{name}_1", 2)
        train.train(ns[f"{name}_1"])
    ref = final_weights(ns["one"])
    for name in ("zero", "tp", "back", "zero_1", "tp_1"):
        if name in ("back", "zero_1", "tp_1"):
            same_run(ns["one"], ns[name], f"resumed {name}", steps={3})
        theirs = final_weights(ns[name])
        for k, w in ref.items():
            close(theirs[k], w, f"{name}: final weight {k}", atol=1e-5)
    print(f"layouts test: {time.perf_counter() - t0:.1f} s, load {os.getloadavg()}")


# ---------------------------------------------------------------- a lost rank

def _stall(rank, path):
    grid = parallel.init(timeout_s=3, init_method=f"file://{path}/rdzv", rank=rank, world=2)
    if grid.rank == 1:                                        # alive but never joins the collective
        time.sleep(20)
        os._exit(0)
    t0 = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(4))
        outcome = "the all-reduce returned"
    except RuntimeError as e:
        outcome = f"{time.perf_counter() - t0:.1f} s: {e}"
    with open(f"{path}/rank0.txt", "w") as f:
        f.write(outcome)
    os._exit(0)                                               # the group is broken: no clean shutdown exists


def test_a_stalled_rank_ends_the_other_with_an_error_within_the_timeout(tmp_path):
    ctx = mp.spawn(_stall, args=(str(tmp_path),), nprocs=2, join=False)
    ctx.processes[0].join(30)
    for p in ctx.processes:
        p.kill()
    outcome = (tmp_path / "rank0.txt").read_text()
    assert " s: " in outcome and 2.5 < float(outcome.split(" s: ")[0]) < 10, f"rank 0 after the 3 s timeout: {outcome}"


# A rank of train.py that SIGKILLs itself as its third step starts (the other rank's gloo all-reduce then fails).
KILLER = """import os, signal, sys
import train
lr = train.get_lr
def get_lr(step, tc):
    if step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return lr(step, tc)
train.get_lr = get_lr
train.main(sys.argv[1:])
"""


def test_a_killed_rank_ends_the_other_with_an_error_naming_it(tmp_path, corpus):
    """Two train.py processes as torchrun would start them, but without torchrun (which would kill the survivor
    itself): rank 1 dies mid-run; rank 0 exits 1 within the heartbeat timeout, naming rank 1."""
    keys = {**test_train.MODEL, **test_train.TRAIN, **corpus, "out_dir": str(tmp_path / "run"), "max_steps": 6,
            "micro_batch_size": 4, "warmup_steps": 1, "eval_interval": 6, "ckpt_interval": 6, "dist_timeout_s": 10}
    argv = [sys.executable, "-c", KILLER, write_config(tmp_path / "run.py", **keys)]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen(argv, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        assert procs[1].wait(120) == -signal.SIGKILL
        died = time.perf_counter()
        err = procs[0].communicate(timeout=60)[1]
        after = time.perf_counter() - died
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1 and "parallel: rank 0: rank 1 lost: no heartbeat for 10 s" in err, err[-2000:]
    assert after < 1.5 * 10 + 5, f"rank 0 took {after:.1f} s after rank 1 died"


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize("world, tp, over, msg", [
    (3, 2, {}, "world size 3 is not divisible by tp=2"),
    (4, 4, {"n_kv_heads": 2}, "n_kv_heads 2 is not divisible by tp=4"),
    (2, 2, {"d_ff": 47}, "d_ff 47 is not divisible by tp=2"),
    (2, 2, {"vocab_size": 63}, "vocab_size 63 is not divisible by tp=2")])
def test_bad_layouts_named(world, tp, over, msg):
    mc = ModelConfig(**{**vars(CFG), "head_dim": None, **over})
    with pytest.raises(ValueError, match=f"^parallel layout: {msg}$"):
        parallel.check_layout(world, tp, mc)


def test_train_layout_checks():
    """The batch divides by the DP size, not WORLD_SIZE: SmolLM3's 576 rows at TP 2 on 384 ranks (DP 192 x 3) pass,
    at TP 1 they do not; layouts TP or ZeRO cannot run (Muon, MLA / MoE under TP) are named."""
    ns = load(["config/smollm3.py", "--tp=2"], *train.CONFIGS)
    mc, dc, tc = (cls(**pick(ns, cls)) for cls in train.CONFIGS)
    train.check_config(mc, dc, tc, world_size=384)
    assert tc.batch_size * dc.seq_len == 192 * 3 * 4096 == 2_359_296
    for over, world, msg in [
            (dict(tp=1), 384, r"^config: batch_size=576 must be a multiple of micro_batch_size\*dp = 3\*384 "
                              r"\(dp = world_size/tp = 384/1\)$"),
            (dict(tp=2), 3, r"^parallel layout: world size 3 is not divisible by tp=2$"),
            (dict(tp=3), 3, r"^parallel layout: n_heads 16 is not divisible by tp=3$"),
            (dict(tp=2, optimizer="muon"), 384, r"^config: optimizer='muon' needs tp=1 and zero=0$"),
            (dict(zero=2), 384, r"^config: zero=2 must be one of \[0, 1\]$")]:
        with pytest.raises(ValueError, match=msg):
            train.check_config(mc, dc, train.TrainConfig(**{**vars(tc), **over}), world_size=world)
    with pytest.raises(ValueError, match=r"^config: tp=2 needs the SmolLM3 architecture \(attention='gqa', no "):
        train.check_config(dataclasses.replace(mc, attention="mla", attn_impl="sdpa"), dc, tc, world_size=384)
