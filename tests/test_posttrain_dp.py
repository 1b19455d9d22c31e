"""posttrain.py under torchrun's environment against one process: 2 spawned CPU ranks on gloo, fp32, run SFT, DPO
(APO-zero on precomputed reference log-probs) and GRPO (token-level and per-sequence aggregation) as data
parallel (SFT and GRPO also with ZeRO-1), each rank on its share of every step's rows, and must give the losses,
grad norms, logged numbers and final weights of one process that accumulates the same global batch. GRPO's
rollouts come from a stand-in for
Model.generate that answers each prompt deterministically (a sampled rollout depends on how the batch is
split, so the two runs could not see the same completions); everything after generation is the real code."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import config
import posttrain as pt
import train
from data import Tokenizer
from model import Model, ModelConfig
from test_posttrain import MODEL, _pairs, _short_conversations, _write_jsonl

WORLD = 2
GROUP = 4


def fake_generate(self, prompts, max_new_tokens, temperature, top_k, top_p, stop, generator, num_samples=1):
    """Completion j of a prompt "a + b?": its answer for one j per group (which one depends on the prompt), another
    number for the rest, with j + a % 3 filler words (so lengths differ within a group and between ranks, and the
    overlong penalty and the cut at max_new_tokens bite), then the stop token."""
    tok, outs = Tokenizer.byte_level(), []
    for p in prompts:
        a, b = (int(v) for v in tok.decode(p).rsplit("user\n", 1)[1].split("?")[0].split(" + "))
        for j in range(num_samples):
            n = a + b if j == (a + b) % num_samples else 100 + j
            outs.append((tok.encode(f"The answer is {n}." + " hmm" * (j + a % 3)) + [stop[0]])[:max_new_tokens])
    return outs


def _ranks(rank, world, runs):
    """Rank `rank` of `world` runs each (port, method, argv) in turn, as torchrun would start it."""
    torch.set_num_threads(1)
    Model.generate = fake_generate
    real_setup = pt.parallel.setup
    for port, method, argv in runs:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        ns = config.load(argv, *pt.COMMAND_CONFIGS.get(method, pt.CONFIGS))

        def setup(*args):   # which gradient sync the run got (DDP or ZeRO1), beside its out_dir
            pieces = real_setup(*args)
            open(f"{ns.out_dir}.sync{rank}", "w").write(type(pieces[3]).__name__)
            return pieces
        pt.parallel.setup = setup
        pt.COMMANDS[method](ns)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out):
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu", "rollout_tok_per_s")}
            for r in train.read_log(os.path.join(out, "log.jsonl"))]


def same_run(one, dp, what):
    """Equal log lines: integers and counts exactly, losses and logged means to rel 1e-5, grad norms to rel 1e-4
    (torch's fp32 clip_grad_norm_ sums in another order than DDP's buckets leave the grads)."""
    a, b = records(one), records(dp)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b], what
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), f"{what}: step {x['step']} keys"
        if x["kind"] == "data":                                # the examples read and skipped
            assert x == y, what
            continue
        for k in x:
            tol = 1e-4 if k == "grad_norm" else 1e-5
            assert y[k] == (pytest.approx(x[k], rel=tol, abs=1e-7) if isinstance(x[k], (float, dict)) else x[k]), \
                f"{what}: step {x['step']} {k}"


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    """{name: (one-process out_dir, DP-2 out_dir)}: every method's run both ways (one spawn for all DP runs)."""
    tmp = tmp_path_factory.mktemp("dp")
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    Model(ModelConfig(**MODEL, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)).save_pretrained(tmp / "init")
    tok.save(str(tmp / "init" / "tokenizer.json"))
    common = [f"--init_from={tmp / 'init'}", "--max_steps=3", "--warmup_steps=1", "--eval_interval=3",
              "--ckpt_interval=3", "--log_interval=1", "--device=cpu", "--dtype=float32", "--seed=5",
              "--dist_timeout_s=60", "--chat_date='2025-01-02'", f"--data_dir={tmp}"]
    rl = [{"prompt": [{"role": "system", "content": "/system_override"}, {"role": "user", "content": f"{a} + {b}?"}],
           "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (4, 4), (0, 3)]]
    methods = {
        # 4 rows a step: one process accumulates 4 micro-batches of 1, each rank 2; grad clipping active
        "sft": ("sft", ["--batch_size=4", "--micro_batch_size=1", "--seq_len=256", "--lr=3e-3", "--grad_clip=0.5",
                        "--eval_rows=3", f"--train_data={_write_jsonl(tmp / 'c.jsonl', _short_conversations(12))}",
                        f"--val_data={_write_jsonl(tmp / 'cv.jsonl', _short_conversations(15)[12:])}"]),
        # the same with AdamW's state sharded over the 2 ranks (ZeRO-1; one process: no effect)
        "sft_zero1": ("sft", ["--batch_size=4", "--micro_batch_size=1", "--seq_len=256", "--lr=3e-3", "--grad_clip=0.5",
                              "--eval_rows=3", "--zero=1", f"--train_data={tmp / 'c.jsonl'}", f"--val_data={tmp / 'cv.jsonl'}"]),
        "dpo": ("dpo", ["--batch_size=4", "--micro_batch_size=1", "--seq_len=256", "--lr=1e-2", "--eval_rows=3",
                        "--loss_type='apo_zero'", "--ref_logps='precompute'",
                        f"--train_data={_write_jsonl(tmp / 'p.jsonl', _pairs(12))}",
                        f"--val_data={_write_jsonl(tmp / 'pv.jsonl', _pairs(15)[12:])}"]),
        # 2 prompts x 4 completions a step, 2 updates per rollout, micro-batches of 2 completions
        **{f"grpo_{agg}": ("grpo", [f"--loss_agg='{agg}'", "--batch_size=8", "--micro_batch_size=2",
                                    f"--group_size={GROUP}", "--max_new_tokens=32", "--overlong_cache=8",
                                    "--num_iterations=1" if agg == "grpo" else "--num_iterations=3",
                                    "--max_steps=3", "--ckpt_interval=3", "--eval_questions=0", "--lr=3e-3",
                                    "--seq_len=128", f"--rl_data={_write_jsonl(tmp / 'rl.jsonl', rl)}"])
           for agg in ("dapo", "grpo")}}
    # smollm3_grpo.py's settings: ZeRO-1, rollouts on a bf16 copy of the weights (deep-copied beside ZeRO's state)
    methods["grpo_dapo_zero1"] = ("grpo", methods["grpo_dapo"][1] + ["--zero=1", "--rollout_dtype='bfloat16'"])
    runs = {name: (str(tmp / f"{name}_one"), str(tmp / f"{name}_dp")) for name in methods}
    saved, threads = Model.generate, torch.get_num_threads()
    Model.generate = fake_generate
    torch.set_num_threads(1)                                   # tiny shapes: one thread is faster
    try:
        for name, (method, argv) in methods.items():
            pt.COMMANDS[method](config.load(common + argv + [f"--out_dir={runs[name][0]}"],
                                            *pt.COMMAND_CONFIGS.get(method, pt.CONFIGS)))
    finally:
        Model.generate = saved
        torch.set_num_threads(threads)
    spawned = [(free_port(), method, common + argv + [f"--out_dir={runs[name][1]}"])
               for name, (method, argv) in methods.items()]
    mp.spawn(_ranks, args=(WORLD, spawned), nprocs=WORLD, join=True)
    return runs


@pytest.mark.parametrize("name", ["sft", "sft_zero1", "dpo", "grpo_dapo", "grpo_grpo", "grpo_dapo_zero1"])
def test_data_parallel_equals_one_process(dp_runs, name):
    one, dp = dp_runs[name]
    same_run(one, dp, name)
    log = records(one)
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3]
    if name.startswith("sft"):   # unequal token counts per rank: a mean of the ranks' means would differ
        assert all(r["grad_norm"] > 0.5 for r in log if r["kind"] == "train")        # clipping is active
    if name.startswith("grpo"):
        assert all(0 < r["reward_std"] and r["tokens"] > 0 for r in log if r["kind"] == "train")
    wa, wb = (Model.from_pretrained(os.path.join(d, "ckpt_000003")).state_dict() for d in (one, dp))
    for k, w in wa.items():
        # Adam divides by sqrt(v): last-bit gradient differences move a weight by up to ~lr x 1e-3
        assert torch.allclose(wb[k], w, rtol=1e-4, atol=1e-5), f"{name}: final {k}: {(wb[k] - w).abs().max():.3g}"
    assert [open(f"{dp}.sync{r}").read() for r in range(WORLD)] == ["ZeRO1" if "zero" in name else "DDP"] * WORLD
    run = json.loads(open(os.path.join(dp, "run.json")).read())["history"][0]
    assert run["world_size"] == WORLD and run["config"]["chat_date"] == "2025-01-02"
