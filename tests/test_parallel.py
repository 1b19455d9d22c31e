"""parallel.py against single-process oracles: 2 CPU processes on gloo (spawned), fp32. Each worker builds the
same-seed model, runs the parallel version on its share of the batch and compares with the single-process
run on the whole batch (and with torch's own DistributedDataParallel)."""
import contextlib
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
import train
from model import Model, ModelConfig
from test_train import corpus, make_ns, train_records  # noqa: F401 (corpus: the byte-level corpus fixture)

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
    r, n = grid.dp_rank, grid.dp
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
                          **({"clip_grad_norm": zero.clip_grad_norm} if sharded else {}))
        rows = slice(2 * r, 2 * r + 2) if sharded else slice(None)
        norms = [step([batch(s)], lambda b: m(b[0][rows], b[1][rows])[1], tc.lr).grad_norm for s in range(4)]
        runs.append((m, norms))
    (ref, ref_norms), (ours, norms) = runs
    assert ref_norms[0] > 10 * tc.grad_clip                      # clipping is active
    assert norms == pytest.approx(ref_norms, rel=1e-4), "ZeRO-1 global grad norm"
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        close(q, p, f"ZeRO-1 after 4 clipped steps: {name}", atol=1e-5)
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
        kept += [ref, tp]
    return kept


def _tp_seed_contract(grid):
    ref, tp = model(0), parallel.TPModel(model(0), grid.tp_group)
    for (name, p), q in zip(ref.named_parameters(), tp.model.parameters()):
        assert torch.equal(q, slice_of(p, q, grid.tp_rank)), f"{name}: shard is not the same-seed model's slice"
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

def _train_rank(rank, world, port, ns):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.train(ns)


def test_train_py_data_parallel_equals_one_process(tmp_path, corpus):
    """8 rows a step as 1 process x 2 micro-batches of 4, and as 2 DP ranks x 1 of 4: the same rows, losses,
    grad norms and final weights (train.py's loader, DDP, rank-0 logging and checkpoints)."""
    over = dict(micro_batch_size=4, max_steps=3, warmup_steps=1, eval_interval=3, ckpt_interval=3)
    one, two = make_ns(tmp_path, corpus, "one", **over), make_ns(tmp_path, corpus, "two", **over)
    train.train(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_rank, args=(2, port, two), nprocs=2, join=True)
    for a, b in zip(train_records(one.out_dir), train_records(two.out_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    final = [Model.from_pretrained(os.path.join(ns.out_dir, "ckpt_000003")).state_dict() for ns in (one, two)]
    for name, w in final[0].items():
        close(final[1][name], w, f"final weight {name}", atol=1e-5)


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
