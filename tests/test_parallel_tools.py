"""parallel.py's planner and bench, its TP layers against torch's own DTensor tensor parallelism, and
sequence parallelism (SPModel) against one process.

The planner's activation bytes are held equal to what autograd saves (saved-tensor hooks, CPU bf16 autocast),
its TP traffic to the bytes TPModel and SPModel send, its parameter and token counts to hand arithmetic.
Two spawned gloo processes (fp32) run the TP and SP checks, against one process and against
torch.distributed.tensor.parallel's ColwiseParallel / RowwiseParallel / SequenceParallel / loss_parallel,
and the bench at tiny sizes."""
import contextlib
import io
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                               loss_parallel, parallelize_module)

import parallel
from model import Model, ModelConfig, rope_cos_sin

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, nope_interval=2)
# head_dim 12: q (48) and kv (24) differ from d_model, so a wrong coefficient cannot hide behind another
WIDE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=56,
                   nope_interval=2)
SMOLLM3_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "smollm3.py")
SMOLLM3 = ModelConfig(vocab_size=128256, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=4, d_ff=11008,
                      attn_impl="triton")                     # config/smollm3.py's model


def model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return Model(cfg)


def docs(B, T):
    """pos [B, T]: two documents and two padding tokens a row."""
    return torch.cat([torch.arange(T - 6), torch.arange(4), torch.full((2,), -1)]).repeat(B, 1)


def saved_bytes_per_token(block, cfg, part=None):
    """Bytes a Block's forward keeps for backward per token of 16-token rows: the difference between 2 and 3
    rows (the weights and their bf16 copies cancel), the shared inputs (rope, pos, mask) left out; each storage
    counted once. part=(r, n): the block takes tokens r*16/n..(r+1)*16/n of each row (sequence parallel)."""
    counts = []
    for B, T in ((2, 16), (3, 16)):
        pos = docs(B, T)
        rope, mask = rope_cos_sin(pos, cfg), model(cfg=cfg).sdpa_mask(pos)
        shared = {t.untyped_storage().data_ptr() for t in (*rope, pos, mask)}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in shared:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(B, T // (part[1] if part else 1), cfg.d_model, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, rope, pos, mask)
        counts.append((B * T, sum(seen.values())))
    (n1, b1), (n2, b2) = counts
    return (b2 - b1) / (n2 - n1)


@pytest.mark.parametrize("cfg", [CFG, WIDE], ids=["head_dim=d/H", "head_dim=12"])
def test_layer_activation_bytes_equal_what_autograd_saves(cfg):
    for layer in model(cfg=cfg).layers:                       # layer 0 with RoPE, layer 1 without
        assert saved_bytes_per_token(layer, cfg) == parallel.layer_activation_bytes(cfg, 16)


def test_smollm3_plan_counts_by_hand():
    pc = parallel.PlanConfig(gpus=384, tp=2)
    p = parallel.plan(SMOLLM3, 4096, 576, 3, pc, 989e12)
    norms = 36 * 2 * 2048 + 2048                              # replicated over TP; everything else halves
    per_gpu = (3_075_098_624 - norms) // 2 + norms
    assert (p["params"], p["params_per_gpu"], p["dp"], p["accum"]) == (3_075_098_624, per_gpu, 192, 1)
    assert p["tokens_per_step"] == 2_359_296 == 192 * 3 * 4096
    assert p["mem"]["weights (fp32)"] == 4 * per_gpu and p["mem"]["optimizer, ZeRO-1"] == 16 * per_gpu / 192
    assert p["mem"]["activations"] == 36 * 3 * 4096 * (26 * 2048 + 9 + (6 * 2048 + 4 * 512 + 4 * 16 + 8 * 11008) // 2)
    assert p["dp_bus"] == 2 * 191 / 192 * 4 * per_gpu        # fp32 grads in a ring over 192
    # SmolLM3's published ~14k tokens/s per H100 is ~29% MFU by this FLOP count (BENCHMARKS.md)
    at_28 = parallel.plan(SMOLLM3, 4096, 576, 3, parallel.PlanConfig(gpus=384, tp=2, mfu=0.28), 989e12)
    assert 13_500 < at_28["tok_s"] < 14_000
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parallel.main(["plan", SMOLLM3_PY, "--gpus=384", "--tp=2"])
    text = out.getvalue()
    assert "DP 192 x TP 2" in text and "2,359,296" in text and f"{per_gpu:,} per GPU" in text


def test_plan_refuses_what_does_not_fit_and_says_by_how_much(capsys):
    pc = parallel.PlanConfig(gpus=192, tp=1, gpu_mem="40GB")
    best = min(parallel.plan(SMOLLM3, 4096, 576, 3, pc, 989e12)["totals"].values())
    with pytest.raises(SystemExit, match=f"^error: parallel plan: DP 192 x TP 1 does not fit: even ZeRO-1 with "
                       f"activation checkpointing needs {best / 1e9:.2f} GB per GPU, {best / 1e9 - 40:.2f} GB more "
                       "than gpu_mem=40GB$"):
        parallel.main(["plan", SMOLLM3_PY, "--gpus=192", "--gpu_mem=40GB"])
    assert "ZeRO-1" in capsys.readouterr().out                # the numbers are printed before the refusal
    with pytest.raises(SystemExit, match="batch_size 576 is not a multiple of micro_batch_size 3 x DP 384"):
        parallel.main(["plan", SMOLLM3_PY, "--gpus=384"])
    with pytest.raises(SystemExit, match="gpu_mem='80 gigs': expected a size such as 80GB"):
        parallel.main(["plan", SMOLLM3_PY, "--gpus=192", "--gpu_mem=80 gigs"])
    with pytest.raises(SystemExit, match="modelled for attention='gqa' with dense MLPs, not attention='mla' with "
                       "n_experts=0$"):
        parallel.main(["plan", SMOLLM3_PY, "--gpus=192", "--attention=mla", "--attn_impl=sdpa"])


def test_fit_warning_at_the_start_of_a_run_that_would_not_fit():
    """README's one-node 3B run (8 GPUs, TP 2, ZeRO-1, micro-batch 3): plan's bound is 82.1 GB a GPU without
    activation checkpointing, over an H100's 80, and 40.8 with it; without ZeRO-1 the DDP row, and --zero=1 offered
    (to AdamW, not to Muon)."""
    import dataclasses

    import train
    cpu, tc = torch.device("cpu"), train.TrainConfig(batch_size=576, micro_batch_size=3, tp=2, zero=1)
    warn = parallel.fit_warning(SMOLLM3, 4096, tc, 8, cpu, 80e9)
    assert warn.startswith("warning: `python parallel.py plan` bounds this layout (DP 4 x TP 2) at 82.1 GB a GPU, "
                           "over this GPU's 80.0 GB") and "--act_ckpt=True" in warn and "--zero=1" not in warn
    assert parallel.fit_warning(dataclasses.replace(SMOLLM3, act_ckpt=True), 4096, tc, 8, cpu, 80e9) is None
    ddp = parallel.fit_warning(SMOLLM3, 4096, dataclasses.replace(tc, zero=0), 8, cpu, 80e9)
    assert "at 88.2 GB" in ddp and "--act_ckpt=True, --zero=1, a smaller --micro_batch_size lower it" in ddp
    muon = parallel.fit_warning(SMOLLM3, 4096, dataclasses.replace(tc, zero=0, optimizer="muon"), 8, cpu, 80e9)
    assert "--zero=1" not in muon                                                 # Muon runs without ZeRO only
    assert parallel.fit_warning(SMOLLM3, 4096, tc, 8, cpu) is None                  # a CPU: nothing to compare with
    assert parallel.fit_warning(dataclasses.replace(SMOLLM3, n_experts=4), 4096, tc, 8, cpu, 1e9) is None


# ---------------------------------------------------------------- two gloo ranks, one TP group

def _worker(rank, path, checks):
    torch.set_num_threads(1)
    grid = parallel.init(tp=2, timeout_s=30, init_method=f"file://{path}/rdzv", rank=rank, world=2)
    models, errors, out = [], {}, {}
    for check in checks:
        try:
            models += CHECKS[check](grid, out)
        except Exception:
            errors[check] = traceback.format_exc()
    parallel.shutdown(*models)
    with open(f"{path}/rank{rank}.json", "w") as f:
        json.dump({"errors": errors, "out": out}, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """{"errors": {check: traceback}, "out": rank 0's results} from one 2-process run of every check."""
    path = tmp_path_factory.mktemp("tools")
    mp.spawn(_worker, args=(str(path), list(CHECKS)), nprocs=2, join=True)
    runs = [json.loads((path / f"rank{r}.json").read_text()) for r in range(2)]
    return {"errors": {**runs[1]["errors"], **runs[0]["errors"]}, "out": runs[0]["out"]}


def close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{what}: max diff {(a - b).abs().max():.3g}"


def shard(t, like, r):
    """Rank r's slice of tensor or DTensor t in the shape of our shard `like` (DTensor may hold a grad whole)."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    dims = [d for d in range(full.dim()) if full.shape[d] != like.shape[d]]
    return full.chunk(2, dims[0])[r] if dims else full


def _tp_bytes(grid, out):
    """TPModel's all-reduces over one forward + backward, counted, against the planner's formula (fp32)."""
    kept = []
    for ckpt in (False, True):
        cfg = ModelConfig(**{**vars(WIDE), "qk_norm": True, "act_ckpt": ckpt})
        tp = parallel.TPModel(model(0, cfg), grid.tp_group)
        x = torch.randint(0, 64, (2, 16))
        sent, real = [], dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: (sent.append(t.numel() * t.element_size()), real(t, *a, **k))[1]
        try:
            tp(x, x, docs(2, 16))[1].backward()
        finally:
            dist.all_reduce = real
        p = parallel.plan(cfg, 16, 2, 2, parallel.PlanConfig(gpus=2, tp=2), 1e12, bf16=False)
        assert sum(sent) == parallel.tp_allreduce_bytes(cfg, 32, 2, act_bytes=4, act_ckpt=ckpt) == p["tp_bus"], \
            f"act_ckpt={ckpt}: {sum(sent)} bytes all-reduced, planned {p['tp_bus']}"
        assert len(sent) == p["tp_calls"], f"act_ckpt={ckpt}: {len(sent)} all-reduces, planned {p['tp_calls']}"
        kept.append(tp)
    # and what one TP rank's block saves for backward: norms and their casts whole, the rest halved
    tp = parallel.TPModel(model(0, WIDE), grid.tp_group)
    for layer in tp.model.layers:
        assert saved_bytes_per_token(layer, WIDE) == parallel.layer_activation_bytes(WIDE, 16, tp=2)
    return kept + [tp]


X0 = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(3))


def both_blocks(m, x0):
    """Model m's two blocks (RoPE, then NoPE) on x0, two documents and padding a row -> (output, input grad)."""
    pos = docs(4, 16)
    rope, mask = rope_cos_sin(pos, CFG), m.sdpa_mask(pos)
    x = x0.clone().requires_grad_()
    y = m.layers[1](m.layers[0](x, rope, pos, mask), rope, pos, mask)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()   # every output gets its own grad
    return y, x.grad


def _dtensor_blocks(grid, out):
    """Both blocks (RoPE and NoPE) of the same-seed model: ours (TPModel's Column/RowParallelLinear) and torch's
    parallelize_module plan give the same outputs, input grads and every weight's grad (as local shards)."""
    mesh = DeviceMesh.from_group(grid.tp_group, "cpu")
    ref, ours, theirs = model(0), parallel.TPModel(model(0), grid.tp_group).model, model(0)
    half = ours.layers[0].attn.cfg                            # n_heads / 2, n_kv_heads / 2
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(), "mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel()}
    for block in theirs.layers:
        block.attn.cfg = half
        parallelize_module(block, mesh, plan)
    results = [both_blocks(m, X0) for m in (ref, ours, theirs)]
    for what, a, b, c in zip(("output", "input grad"), *results):
        close(b, a, f"ours vs one process: {what}")
        assert torch.equal(b, c), f"ours vs DTensor: {what}, max diff {(b - c).abs().max():.3g}"
    for (name, p), q, t in zip(ref.layers.named_parameters(), ours.layers.parameters(), theirs.layers.parameters()):
        assert torch.equal(q, shard(t, q, grid.tp_rank)), f"{name}: our shard is not DTensor's"
        theirs_grad = shard(t.grad, q, grid.tp_rank)
        assert torch.equal(q.grad, theirs_grad), \
            f"ours vs DTensor: grad {name}, max diff {(q.grad - theirs_grad).abs().max():.3g}"
    return [ref, ours, theirs]


def _dtensor_sequence_parallel(grid, out):
    """SPModel's blocks vs torch's sequence-parallel plan (SequenceParallel norms, inputs gathered by
    PrepareModuleInput, row-parallel outputs scattered along the sequence) on this rank's half of the tokens:
    the same outputs, input grads and weight grads (fp32 rounding: the two sum partial grads in other orders)."""
    mesh, r = DeviceMesh.from_group(grid.tp_group, "cpu"), grid.tp_rank
    ours, theirs = parallel.SPModel(model(0), grid.tp_group).model, model(0)
    whole, split = (Replicate(), None, None, None, None), (Shard(1), None, None, None, None)   # Attention's 5 args
    plan = {"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=split, desired_input_layouts=whole),
            "mlp": PrepareModuleInput(input_layouts=split[:1], desired_input_layouts=whole[:1]),
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(output_layouts=Shard(1)), "mlp.gate": ColwiseParallel(),
            "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(output_layouts=Shard(1))}
    for block in theirs.layers:
        block.attn.cfg = ours.layers[0].attn.cfg
        parallelize_module(block, mesh, plan)
    mine = X0[:, 8 * r:8 * (r + 1)]
    for what, a, b in zip(("output", "input grad"), both_blocks(ours, mine), both_blocks(theirs, mine)):
        close(a, b, f"SP vs DTensor: {what}")
    for (name, q), t in zip(ours.layers.named_parameters(), theirs.layers.parameters()):
        close(q.grad, shard(t.grad, q, r), f"SP vs DTensor: grad {name}")
    return [ours, theirs]


def _dtensor_embedding_and_loss(grid, out):
    """VocabParallelEmbedding vs RowwiseParallel on nn.Embedding; a ColumnParallelLinear head with
    vocab_parallel_ce vs ColwiseParallel (sharded logits) with F.cross_entropy under loss_parallel."""
    mesh, r = DeviceMesh.from_group(grid.tp_group, "cpu"), grid.tp_rank
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (3, 8), generator=g)
    h0, y = torch.randn(12, 32, generator=g), torch.randint(0, 64, (12,), generator=g)
    y[[2, 9]] = -100
    kept = []
    for torch_side in (False, True):
        torch.manual_seed(0)
        emb, head = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False)
        if torch_side:
            emb = parallelize_module(emb, mesh, RowwiseParallel(input_layouts=Replicate()))
            head = parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
        else:
            emb = parallel.VocabParallelEmbedding(emb, grid.tp_group)
            head = parallel.ColumnParallelLinear(head, grid.tp_group)
        e = emb(ids)
        (e * torch.linspace(-1, 1, e.numel()).view_as(e)).sum().backward()
        h = h0.clone().requires_grad_()
        if torch_side:
            with loss_parallel():
                loss = torch.nn.functional.cross_entropy(head(h), y, ignore_index=-100)
                loss.backward()
            loss = loss.full_tensor()
        else:
            loss = parallel.vocab_parallel_ce(head(h), y, 32 * r, grid.tp_group).sum() / (y != -100).sum()
            loss.backward()
        mine = (32, 32)                                       # the [V/2, C] shard of either table
        kept.append((e, shard(emb.weight.grad, torch.empty(mine), r), loss, h.grad,
                     shard(head.weight.grad, torch.empty(mine), r)))
    for what, a, b in zip(("embedding output", "embedding grad", "loss", "hidden grad", "head grad"), *kept):
        close(a, b, f"ours vs DTensor: {what}")
    return []


def _sequence_parallel(grid, out):
    """SPModel's logits, loss and every gradient equal one process's (tied and untied head, qk-norm, z-loss,
    two documents and padding, with and without activation checkpointing); its activations cross the group
    only as all-gathers and reduce-scatters, 2 + 4 per layer of each; traffic and saved bytes as planned."""
    r, kept = grid.tp_rank, []
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(6))
    y = x.roll(-1, 1)
    y[0, :3] = -100
    pos = docs(4, 16)
    for tie, ckpt in ((True, False), (False, True)):
        cfg = ModelConfig(**{**vars(WIDE), "tie_embeddings": tie, "z_loss": 1e-3, "qk_norm": True, "act_ckpt": ckpt})
        ref, sp = model(0, cfg), parallel.SPModel(model(0, cfg), grid.tp_group)
        close(sp(x, pos=pos), ref(x, pos=pos), f"SP logits (tie={tie}, act_ckpt={ckpt})")
        calls, real = [], {k: getattr(dist, k) for k in ("all_reduce", "all_gather", "reduce_scatter_single")}
        for k, fn in real.items():
            setattr(dist, k, lambda *a, _k=k, _fn=fn, **kw: (calls.append((_k, a)), _fn(*a, **kw))[1])
        try:
            loss, ref_loss = sp(x, y, pos)[1], ref(x, y, pos)[1]
            loss.backward()
        finally:
            for k, fn in real.items():
                setattr(dist, k, fn)
        ref_loss.backward()
        close(loss, ref_loss, f"SP loss (tie={tie}, act_ckpt={ckpt})")
        for (name, p), q in zip(ref.named_parameters(), sp.model.parameters()):
            close(q.grad, shard(p.grad, q, r), f"SP grad {name} (tie={tie}, act_ckpt={ckpt})")
        size = lambda t: t.numel() * t.element_size()
        # nccl-tests' S, the whole array: all_gather(parts, x)'s parts, reduce_scatter_single(out, x)'s x
        moved = sum(sum(map(size, a[0])) if k == "all_gather" else size(a[1]) for k, a in calls if k != "all_reduce")
        reduced = sum(size(a[0]) for k, a in calls if k == "all_reduce")
        assert (moved, reduced) == parallel.sp_comm_bytes(cfg, 64, act_bytes=4, act_ckpt=ckpt), \
            f"act_ckpt={ckpt}: {moved} bytes gathered or scattered, {reduced} all-reduced, planned " \
            f"{parallel.sp_comm_bytes(cfg, 64, act_bytes=4, act_ckpt=ckpt)}"
        p = parallel.plan(cfg, 16, 4, 4, parallel.PlanConfig(gpus=2, tp=2, sp=True), 1e12, bf16=False)
        assert p["tp_bus"] == moved / 2 + reduced, "the ring's (n-1)/n and 2(n-1)/n at n = 2"
        L = cfg.n_layers
        counts = {k: sum(1 for c, _ in calls if c == k) for k in ("all_gather", "reduce_scatter_single")}
        # forward: the embedding and o, down of each layer scatter; 2 norms a layer and the final one gather;
        # backward: the conjugates; checkpointing re-runs each layer's forward up to its last saved tensor (both
        # norms' gathers and o's scatter; not down's)
        expect = {"all_gather": 2 * (2 * L + 1) + 2 * L * ckpt, "reduce_scatter_single": 2 * (2 * L + 1) + L * ckpt}
        assert counts == expect, f"act_ckpt={ckpt}: {counts}, expected {expect}"
        assert sum(counts.values()) == p["tp_calls"]
        kept += [ref, sp]
    sp = parallel.SPModel(model(0, WIDE), grid.tp_group)
    for layer in sp.model.layers:
        assert saved_bytes_per_token(layer, WIDE, (r, 2)) == parallel.layer_activation_bytes(WIDE, 16, tp=2, sp=True)
    return kept + [sp]


def _bench(grid, out):
    bc = parallel.BenchConfig(min_bytes=1024, max_bytes=8192, iters=3, warmup=1, matmul_n=32)
    rows, tflops = parallel.bench(bc, torch.device("cpu"))
    out["rows"], out["tflops"] = rows, tflops
    out["report"] = parallel.bench_report(rows, tflops, bc, torch.device("cpu"))
    return []


CHECKS = {"tp_bytes": _tp_bytes, "dtensor_blocks": _dtensor_blocks,
          "dtensor_embedding_and_loss": _dtensor_embedding_and_loss, "sequence_parallel": _sequence_parallel,
          "dtensor_sequence_parallel": _dtensor_sequence_parallel, "bench": _bench}


@pytest.mark.parametrize("check", ["tp_bytes", "dtensor_blocks", "dtensor_embedding_and_loss", "sequence_parallel",
                                   "dtensor_sequence_parallel"])
def test_tensor_parallel_against_torch_and_the_planner(two_ranks, check):
    assert check not in two_ranks["errors"], two_ranks["errors"][check]


def test_bench_on_two_gloo_ranks(two_ranks):
    """1 KB..8 KB in doublings for each collective, every result checked; nccl-tests' bus factors for n = 2."""
    assert "bench" not in two_ranks["errors"], two_ranks["errors"]["bench"]
    rows, factor = two_ranks["out"]["rows"], {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5}
    assert [(x["op"], x["bytes"]) for x in rows] == [(op, s) for s in (1024, 2048, 4096, 8192) for op in factor]
    for x in rows:
        assert x["wrong"] == 0, x
        assert x["algbw"] == pytest.approx(x["bytes"] / x["time_s"] / 1e9) and x["time_s"] > 0
        assert x["busbw"] == pytest.approx(x["algbw"] * factor[x["op"]])
    assert len(two_ranks["out"]["tflops"]) == 2 and min(two_ranks["out"]["tflops"]) > 0
    report = two_ranks["out"]["report"]
    assert report.count("\n") == 3 * 5 + 1 and "bf16 matmul 32^3" in report
