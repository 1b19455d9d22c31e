"""train.py against independent references: hand-computed LR values, an SVD oracle for Newton-Schulz,
the exact arithmetic of decoupled weight decay, an uninterrupted run for SIGKILL-and-resume (bit for bit,
across a data-stage boundary), transformers for the checkpoint layout, hand arithmetic for the shipped configs,
and an XML parser inverting the loss plot's coordinates. Tiny models on a tiny two-source corpus written with
data.py's own tools and its byte-level tokenizer."""
import contextlib
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from config import load, pick
from data import DataConfig, Loader
from eval import evaluate
from model import Model, ModelConfig
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = dict(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_position_embeddings=64,
             nope_interval=2, rope_theta=10000.0)
TRAIN = dict(seq_len=32, batch_size=8, micro_batch_size=4, max_steps=24, warmup_steps=4, lr=3e-3, eval_interval=5,
             ckpt_interval=10, eval_rows=4, device="cpu", dtype="float32", sample_tokens=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny shapes run faster on one thread, and on a busy shared CPU two OpenMP threads can spin 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Data keys of a two-source corpus ('prose', 'sums') in byte-level tokens, train and val splits."""
    root = tmp_path_factory.mktemp("corpus")
    tok = data.Tokenizer.byte_level()                        # 263 ids: 256 bytes + 7 specials
    tok.save(str(root / "tokenizer.json"))
    words = "the cat sat on a mat and then ran to see the dog by the red door".split()
    prose = [" ".join(words[(7 * i + j) % len(words)] for j in range(5 + i % 11)) + "." for i in range(400)]
    sums = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    for source, docs in (("prose", prose), ("sums", sums)):
        for split, part in (("train", docs[:-40]), ("val", docs[-40:])):
            path = root / f"{source}_{split}.jsonl"
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
            data.prepare([str(path)], str(root), tok, source, split)
    return {"data_dir": str(root), "dataset": str(root), "tokenizer": str(root / "tokenizer.json"),
            "mixture": {"prose": 0.5, "sums": 0.5}}


def write_config(path, **keys):
    with open(path, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in keys.items())
    return str(path)


def make_ns(tmp_path, corpus, name="run", **over):
    keys = {**MODEL, **TRAIN, **corpus, "out_dir": str(tmp_path / name), **over}
    return load([write_config(tmp_path / f"{name}.py", **keys)], *train.CONFIGS)


def train_records(run_dir):
    return [r for r in train.read_log(os.path.join(run_dir, "log.jsonl")) if r["kind"] == "train"]


# ---------------------------------------------------------------- schedule

def test_lr_schedule_hand_computed():
    # lr 1e-2 -> min 1e-3 over 100 steps, 10 warmup steps; WSD decays over the last 20 (steps 80..99).
    tc = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=100, decay_frac=0.2)
    expect = {0: 1e-3, 4: 5e-3, 9: 1e-2, 10: 1e-2, 79: 1e-2,
              80: 0.00955,            # p = 1/20: 1e-3 + 9e-3 * 0.95
              89: 0.0055,             # p = 1/2
              99: 1e-3}               # p = 1: the last update runs at min_lr
    for step, lr in expect.items():
        assert train.get_lr(step, tc) == pytest.approx(lr, rel=1e-12, abs=0), step
    tc.decay_shape = "1-sqrt"
    for step, lr in {79: 1e-2, 80: 0.007987538820, 89: 0.003636038969, 99: 1e-3}.items():
        assert train.get_lr(step, tc) == pytest.approx(lr, rel=1e-9), step   # 1e-3 + 9e-3 * (1 - sqrt(p))
    tc = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=100, schedule="cosine")
    # p = (s + 1 - 10) / 90; lr = 1e-3 + 9e-3 * (1 + cos(pi p)) / 2
    for step, lr in {9: 1e-2, 10: 0.009997258721, 54: 0.0055, 76: 0.00237403733, 99: 1e-3}.items():
        assert train.get_lr(step, tc) == pytest.approx(lr, rel=1e-7), step


# ---------------------------------------------------------------- optimizers

@pytest.mark.parametrize("optimizer,wd_embeddings", [("adamw", False), ("adamw", True), ("muon", False)])
def test_weight_decay_reaches_only_matrices(optimizer, wd_embeddings):
    torch.manual_seed(0)
    model = Model(ModelConfig(**{**MODEL, "tie_embeddings": False}))
    tc = TrainConfig(optimizer=optimizer, wd_embeddings=wd_embeddings, weight_decay=0.1, lr=0.05, muon_lr=0.02,
                     warmup_steps=0, max_steps=10, decay_frac=0.0)
    opts = train.build_optimizers(model, tc, torch.device("cpu"))
    groups = [(type(o).__name__, g) for o in opts for g in o.param_groups]
    names = [n for _, g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())       # each parameter exactly once
    decayed = {n for _, g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}           # attn/mlp, lm_head, tok_emb
    assert decayed == matrices - ({"tok_emb.weight"} if not wd_embeddings else set())
    assert not any("norm" in n for n in decayed)
    if optimizer == "muon":
        muon = {n for kind, g in groups if kind == "Muon" for n in g["param_names"]}
        assert muon == matrices - {"tok_emb.weight", "lm_head.weight"}

    # With zero gradients an update is pure decoupled decay: W <- W * (1 - lr * wd), exactly.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    train.set_lr(opts, train.get_lr(5, tc), tc.lr)
    for o in opts:
        o.step()
    factor = {"AdamW": 1 - 0.05 * 0.1, "Muon": 1 - 0.02 * 0.1}
    for kind, g in groups:
        for n, p in zip(g["param_names"], g["params"]):
            expect = before[n] * factor[kind] if n in decayed else before[n]
            assert torch.equal(p.detach(), expect), n
            assert n not in decayed or not torch.equal(p.detach(), before[n])


def ns_oracle(g, steps=5):
    """Newton-Schulz through the SVD: the iteration acts on each singular value of G/||G||_F alone."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x = s / s.square().sum().sqrt()
    for _ in range(steps):
        x = 3.4445 * x - 4.7750 * x ** 3 + 2.0315 * x ** 5
    return u @ torch.diag(x) @ vh


def test_muon_matches_svd_newton_schulz_reference():
    gen = torch.Generator().manual_seed(0)
    for shape in ((12, 20), (20, 12)):
        g = torch.randn(shape, generator=gen) * 3
        torch.testing.assert_close(train.newton_schulz(g, 5).double(), ns_oracle(g), rtol=0, atol=2e-4)
    # Two Muon steps on a tall matrix (scale sqrt(rows/cols) = sqrt(2)) against the formulas in float64.
    w0 = torch.randn(16, 8, generator=gen)
    g1, g2 = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    w = torch.nn.Parameter(w0.clone())
    opt = train.Muon([dict(params=[("w", w)])], lr=0.1, momentum=0.9, weight_decay=0.01)
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    lr, m, wd, scale = 0.1, 0.9, 0.01, math.sqrt(2)
    g1, g2, w0 = g1.double(), g2.double(), w0.double()
    w1 = w0 * (1 - lr * wd) - lr * scale * ns_oracle(g1 + m * g1)            # buf = g1
    w2 = w1 * (1 - lr * wd) - lr * scale * ns_oracle(g2 + m * (m * g1 + g2))  # buf = m g1 + g2, Nesterov
    torch.testing.assert_close(w.detach().double(), w2, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- config checks

@pytest.mark.parametrize("over,message", [
    (dict(batch_size=10), r"batch_size=10 must be a multiple of micro_batch_size\*dp = 4\*1 \(dp = world_size/tp = 1/1\)"),
    (dict(seq_len=128), r"seq_len=128 exceeds max_position_embeddings=64"),
    (dict(n_heads=2, n_kv_heads=3), r"n_heads \(2\) must be divisible by n_kv_heads \(3\)"),
    (dict(schedule="linear"), r"schedule='linear' must be one of \['cosine', 'wsd'\]"),
    (dict(warmup_steps=20, decay_frac=0.5), r"warmup_steps=20 \+ decay steps 12 .* exceed max_steps=24"),
    (dict(spike_factor=0.5), r"spike_factor=0.5 must be 0 \(off\) or > 1"),
    (dict(min_lr=1.0), r"min_lr=1.0 <= lr=0.003"),
    (dict(sample_tokens=60), r"sample prompts \(9 bytes\) \+ sample_tokens=60 exceed max_position_embeddings=64"),
    (dict(device="gpu"), r"device='gpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_config_errors_before_any_work(tmp_path, corpus, over, message):
    ns = make_ns(tmp_path, corpus, **over)
    with pytest.raises(ValueError, match=message):
        train.train(ns)
    assert not os.path.exists(ns.out_dir)
    with pytest.raises(SystemExit, match="^train.py: "):                      # the command line: one line
        train.main([write_config(tmp_path / "c.py", **{**MODEL, **TRAIN, **corpus, **over})])


def test_world_size_and_existing_run_errors(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"micro_batch_size\*dp = 4\*3 \(dp = world_size/tp = 3/1\)"):
        train.train(make_ns(tmp_path, corpus))
    monkeypatch.delenv("WORLD_SIZE")
    ns = make_ns(tmp_path, corpus, max_steps=2, warmup_steps=1, ckpt_interval=1)
    train.train(ns)
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume=True"):
        train.train(ns)
    ns.resume, ns.optimizer = True, "muon"
    with pytest.raises(ValueError, match=r"optimizers \['AdamW'\], this run uses \['Muon', 'AdamW'\]"):
        train.train(ns)


# ---------------------------------------------------------------- checkpoints

def _step(model, opts, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    for o in opts:
        o.step()


@pytest.mark.parametrize("crash", ["optimizer_file", "latest_pointer"])
def test_crash_while_checkpointing_keeps_previous(tmp_path, monkeypatch, crash):
    run = str(tmp_path)
    tc = TrainConfig()
    torch.manual_seed(0)
    model = Model(ModelConfig(**MODEL))
    opts = train.build_optimizers(model, tc, torch.device("cpu"))
    _step(model, opts, 1)
    train.save_checkpoint(run, model, opts, {"step": 1}, keep=2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: opts[0].state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    _step(model, opts, 2)

    if crash == "optimizer_file":
        def torn_save(tensors, path):                       # half a file, then the process "dies"
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError("disk full")
        monkeypatch.setattr(train, "save_file", torn_save)
    else:
        real = train.atomic_write

        def failing_write(path, write):
            if os.path.basename(path) == "latest":
                raise OSError("killed before the pointer moved")
            real(path, write)
        monkeypatch.setattr(train, "atomic_write", failing_write)
    with pytest.raises(OSError):
        train.save_checkpoint(run, model, opts, {"step": 2}, keep=2)

    path = train.latest_checkpoint(run)
    assert os.path.basename(path) == "ckpt_000001"
    fresh = Model(ModelConfig(**MODEL))
    fresh_opts = train.build_optimizers(fresh, tc, torch.device("cpu"))
    assert train.load_checkpoint(path, fresh, fresh_opts)["step"] == 1
    for n, p in fresh.named_parameters():
        assert torch.equal(p, weights[n]) and torch.equal(fresh_opts[0].state[p]["exp_avg"], moments[n]), n

    monkeypatch.undo()                                      # the next save succeeds and cleans up
    train.save_checkpoint(run, model, opts, {"step": 2}, keep=2)
    assert os.path.basename(train.latest_checkpoint(run)) == "ckpt_000002"
    assert sorted(os.listdir(run)) == ["ckpt_000001", "ckpt_000002", "latest"]


def test_pruning_keeps_the_newest_by_step_past_a_million(tmp_path):
    # smollm3.py runs 4.7M steps: as strings ckpt_1000000 < ckpt_999998, so a name sort prunes the wrong one
    model = Model(ModelConfig(**MODEL))
    opts = train.build_optimizers(model, TrainConfig(), torch.device("cpu"))
    for step in (999_998, 1_000_000, 1_000_002):
        train.save_checkpoint(str(tmp_path), model, opts, {"step": step}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_1000000", "ckpt_1000002", "latest"]


def test_kill_and_resume_is_bit_exact_across_stage_boundary(tmp_path, corpus):
    # Stage boundary at step 14; checkpoints at 10 and 20. The run is killed once step 11 is logged, so it
    # resumes from 10 and crosses the boundary after the restart.
    keys = {**MODEL, **TRAIN, **corpus, "stages": [[0, {"prose": 0.9, "sums": 0.1}], [14, {"prose": 0.1, "sums": 0.9}]],
            "sample_tokens": 4}
    cfg = write_config(tmp_path / "cfg.py", **keys)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), cfg, f"--out_dir={out}", *extra],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    p = launch(ref)
    assert p.wait(timeout=120) == 0, p.stdout.read()
    p = launch(killed)
    deadline = time.time() + 120
    while not any(r["step"] >= 11 for r in train_records(killed)):
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert os.path.basename(train.latest_checkpoint(killed)) == "ckpt_000010"
    # What a kill at step 20 leaves at its worst: a complete ckpt_000020 that `latest` never came to name
    # (killed between the rename and the pointer; here stale weights, so keeping it would show) and a torn
    # temporary directory. The resumed run must write both over.
    shutil.copytree(os.path.join(killed, "ckpt_000010"), os.path.join(killed, "ckpt_000020"), dirs_exist_ok=True)
    os.makedirs(os.path.join(killed, ".tmp_ckpt_000020", "trainer"), exist_ok=True)
    p = launch(killed, "--resume=True")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "resuming from" in out and "at step 10" in out

    def comparable(run):
        return [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu")}
                for r in train.read_log(os.path.join(run, "log.jsonl"))]
    a, b = comparable(ref), comparable(killed)
    assert [r["step"] for r in a if r["kind"] == "train"] == list(range(1, 25))
    assert a == b                                            # losses, grad norms, LRs, val loss/bpb: bit for bit
    assert sorted(os.listdir(killed)) == sorted(os.listdir(ref)) == [
        "ckpt_000020", "ckpt_000024", "latest", "log.jsonl", "loss.svg", "run.json", "samples.txt"]
    for ckpt in ("ckpt_000020", "ckpt_000024"):
        wa = load_file(os.path.join(ref, ckpt, "model.safetensors"))
        wb = load_file(os.path.join(killed, ckpt, "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), ckpt


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """A finished 20-step run with checkpoints at 10 and 20."""
    tmp = tmp_path_factory.mktemp("finished")
    ns = make_ns(tmp, corpus, max_steps=20)
    train.train(ns)
    return ns.out_dir


@pytest.mark.parametrize("damage,rel,why", [
    ("truncate", "model.safetensors", "model.safetensors has "),
    ("flip", "model.safetensors", "model.safetensors differs from the sha256 recorded at save time (corrupt)"),
    ("flip", "trainer/state.safetensors", "trainer/state.safetensors differs from the sha256"),
    ("truncate", "trainer/state.json", "trainer/state.json is truncated or corrupt"),
])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, corpus, finished_run, capsys, damage, rel,
                                                              why):
    # Checkpoints at 10 and 20 (keep 2); ckpt_000020 is damaged after the run, so a resume must say why it passes
    # it over, restart from 10, and log exactly what the uninterrupted run logged.
    ns = make_ns(tmp_path, corpus, max_steps=20, resume=True)
    shutil.copytree(finished_run, ns.out_dir)
    reference = train.read_log(os.path.join(finished_run, "log.jsonl"))
    with open(os.path.join(ns.out_dir, "ckpt_000020", rel), "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if damage == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size - 100)                        # inside the tensor data: the file still parses
            byte = f.read(1)[0]
            f.seek(size - 100)
            f.write(bytes([byte ^ 0x10]))
    capsys.readouterr()
    train.train(ns)
    out = capsys.readouterr().out
    assert f"ckpt_000020 is unusable: {why}" in out and "; using ckpt_000010" in out, out
    assert damage == "flip" or rel.endswith(".json") or re.search(r"has [\d,]+ bytes, [\d,]+ were saved \(truncat", out)
    assert "at step 10" in out

    def comparable(records):
        return [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu")} for r in records]
    assert comparable(train.read_log(os.path.join(ns.out_dir, "log.jsonl"))) == comparable(reference)
    assert train.checkpoint_problem(os.path.join(ns.out_dir, "ckpt_000020")) is None     # rewritten whole
    with open(os.path.join(ns.out_dir, "run.json")) as f:
        history = json.load(f)["history"]                      # the resume appended to the first start
    assert [(h["start_step"], h["resumed_from"] and os.path.basename(h["resumed_from"])) for h in history] == [
        (0, None), (10, "ckpt_000010")]



def test_checkpoint_without_checksums_is_named_as_such(tmp_path, finished_run):
    ckpt = shutil.copytree(os.path.join(finished_run, "ckpt_000020"), tmp_path / "old")
    state = json.loads((ckpt / "trainer" / "state.json").read_text())
    del state["files"]                                         # what a checkpoint of an older nanosmol holds
    (ckpt / "trainer" / "state.json").write_text(json.dumps(state))
    assert train.checkpoint_problem(str(ckpt)) == ("trainer/state.json records no file checksums "
                                                   "(an older nanosmol wrote it), so it cannot be verified")

def test_no_intact_checkpoint_is_one_error(tmp_path, corpus):
    ns = make_ns(tmp_path, corpus, max_steps=2, warmup_steps=1, ckpt_interval=1)
    train.train(ns)
    for step in (1, 2):
        os.remove(os.path.join(ns.out_dir, f"ckpt_{step:06d}", "model.safetensors"))
    ns.resume = True
    with pytest.raises(ValueError, match=r"no intact checkpoint \(ckpt_000002 is unusable: model.safetensors is "
                                         r"missing; ckpt_000001 is unusable: model.safetensors is missing\)"):
        train.train(ns)


def test_another_architecture_is_one_line_naming_the_fields(tmp_path, corpus):
    first = make_ns(tmp_path, corpus, "first", max_steps=2, warmup_steps=1)
    train.train(first)
    ns = make_ns(tmp_path, corpus, "second", init_from=first.out_dir, d_model=48, n_heads=3, d_ff=96)
    with pytest.raises(ValueError) as e:
        train.train(ns)
    assert str(e.value) == (f"init_from: {train.latest_checkpoint(first.out_dir)} holds another architecture "
                            "(theirs vs ours): d_model: 32 vs 48, n_heads: 2 vs 3, d_ff: 64 vs 96")
    first.resume, first.n_layers = True, 3
    with pytest.raises(ValueError, match=r"^resume: .* \(theirs vs ours\): n_layers: 2 vs 3$"):
        train.train(first)


@pytest.mark.parametrize("over,message", [
    (dict(attn_impl="triton"), r"attn_impl='triton' needs a CUDA device and the triton package \(device is cpu\)"),
    (dict(init_from="no/such/run"), r"init_from='no/such/run': expected a run, checkpoint or HF model directory"),
])
def test_unusable_setup_fails_before_the_corpus_is_built(tmp_path, corpus, over, message):
    fresh = str(tmp_path / "fresh_data")                       # the default corpus would be built here
    ns = make_ns(tmp_path, corpus, **{**over, "dataset": "default", "data_dir": fresh, "tokenizer": "default"})
    with pytest.raises(ValueError, match=message):
        train.train(ns)
    assert not os.path.exists(fresh) and not os.path.exists(ns.out_dir)


def test_command_line_usage_and_ctrl_c(tmp_path, corpus, capsys):
    for argv, code in (([], 2), (["--help"], 0)):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        out = capsys.readouterr()
        assert e.value.code == code and "python train.py" in out.out + out.err
        assert "--max_steps" in out.out + out.err and "--n_layers" in out.out + out.err
    # Ctrl-C mid-run: one line naming the step, exit code 130, no traceback
    cfg = write_config(tmp_path / "c.py", **{**MODEL, **TRAIN, **corpus, "max_steps": 100_000, "ckpt_interval": 5,
                                             "out_dir": str(tmp_path / "run")})
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), cfg], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(r["step"] >= 7 for r in train_records(str(tmp_path / "run"))):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1].split("\r")[-1]       # after tqdm's bar
    assert re.fullmatch(r"train.py: interrupted at step (\d+); continue with --resume=True "
                        r"\(the latest checkpoint is at step (\d+)\)", last), err
    step, saved = map(int, re.fullmatch(r".*step (\d+);.*step (\d+)\)", last).groups())
    assert step >= 7 and saved % 5 == 0 and step - 5 <= saved <= step and "Traceback" not in err + out


def test_checkpoint_loads_in_transformers(tmp_path, corpus):
    hf = pytest.importorskip("transformers")
    run = train.train(make_ns(tmp_path, corpus, max_steps=2, warmup_steps=1, tie_embeddings=False))["run_dir"]
    ckpt = train.latest_checkpoint(run)
    # weights only on top (the HF loader reads every *.safetensors there), and the tokenizer beside them
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "tokenizer.json", "trainer"]
    theirs = hf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    x = torch.randint(0, 263, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(Model.from_pretrained(ckpt)(x), theirs(input_ids=x).logits, rtol=0, atol=1e-5)
    # self-contained: transformers' tokenizer from the checkpoint alone gives our ids
    ours = data.load_tokenizer(DataConfig(**corpus))
    hf_tok = hf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt, "tokenizer.json"))
    text = "the cat sat on 12 + 30 = 42. ünïcode"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    # world-readable, whatever safetensors' own 0600
    for d, dirs, files in os.walk(ckpt):
        assert os.stat(d).st_mode & 0o755 == 0o755, d
        for f in files:
            assert os.stat(os.path.join(d, f)).st_mode & 0o644 == 0o644, f
    # the special ids the model got are the tokenizer's (byte-level: bos 256, eos 257, pad 260), not the
    # ModelConfig defaults, in config.json, run.json and the checkpoint's resolved config alike
    with open(os.path.join(ckpt, "config.json")) as f:
        hf_cfg = json.load(f)
    with open(os.path.join(run, "run.json")) as f:
        started = json.load(f)["history"]
    with open(os.path.join(ckpt, "trainer", "state.json")) as f:
        saved = json.load(f)["config"]
    ids = (ours.bos_id, ours.eos_id, ours.pad_id)
    assert ids == (256, 257, 260) == (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"])
    assert len(started) == 1 and ids == tuple(started[0]["config"][k] for k in ("bos_id", "eos_id", "pad_id"))
    assert ids == tuple(saved[k] for k in ("bos_id", "eos_id", "pad_id"))


def test_init_from_loads_weights_for_a_new_stage(tmp_path, corpus):
    first = train.train(make_ns(tmp_path, corpus, "stage1", max_steps=6, warmup_steps=2))
    # A long-context style stage: longer rows, larger rope_theta, fresh schedule, weights from stage 1.
    ns = make_ns(tmp_path, corpus, "stage2", init_from=first["run_dir"], seq_len=64, rope_theta=1e6, max_steps=1,
                 warmup_steps=1, decay_frac=0.0, batch_size=4)
    train.train(ns)
    ref = Model.from_pretrained(train.latest_checkpoint(first["run_dir"]), rope_theta=1e6)
    x, y, pos = Loader(dc := DataConfig(**pick(ns, DataConfig)), data.load_tokenizer(dc), 4, 1, ns.seed).get(0, 0)
    with torch.no_grad():
        _, loss = ref(x, y, pos)
    assert train_records(ns.out_dir)[0]["loss"] == loss.item()


def test_accumulation_matches_one_big_micro_batch(tmp_path, corpus):
    # 8 rows as 1 x 8 or 4 x 2: the same rows, the same mean loss and gradient (loss / accum in backward)
    recs = []
    for name, micro in (("whole", 8), ("accum", 2)):
        ns = make_ns(tmp_path, corpus, name, micro_batch_size=micro, max_steps=3, warmup_steps=1, eval_interval=3,
                     ckpt_interval=3)
        train.train(ns)
        recs.append(train_records(ns.out_dir))
    for a, b in zip(*recs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_evaluate_bits_per_byte_against_cross_entropy(corpus):
    torch.manual_seed(0)
    model = Model(ModelConfig(**MODEL))
    dc = DataConfig(**corpus, seq_len=32)
    loader = Loader(dc, data.load_tokenizer(dc), 4, 1, 0)
    val_sets = {s: loader.val_rows(s, 6) for s in ("prose", "sums")}
    token_bytes = torch.tensor([1] * 256 + [0] * 7)                    # byte-level: one byte per id, specials none
    loss, bpb = evaluate(model, val_sets, token_bytes, 4, contextlib.nullcontext(), torch.device("cpu"))
    nats, nbytes, ntok = {}, {}, {}
    for s, (x, y, pos) in val_sets.items():
        with torch.no_grad():
            logits = model(x, pos=pos).double()
        nats[s] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        nbytes[s], ntok[s] = (y < 256).sum().item(), y.numel()
        assert loss[s] == pytest.approx(nats[s] / ntok[s], rel=1e-6)
        assert bpb[s] == pytest.approx(nats[s] / (math.log(2) * nbytes[s]), rel=1e-6)
    assert bpb["all"] == pytest.approx(sum(nats.values()) / (math.log(2) * sum(nbytes.values())), rel=1e-6)
    assert loss["all"] == pytest.approx(sum(nats.values()) / sum(ntok.values()), rel=1e-6)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_peak_per_device(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.peak_flops(torch.device("cuda:0")) == peak
    assert train.peak_flops(torch.device("cpu")) is None


# ---------------------------------------------------------------- guards

def _inject(monkeypatch, accum, corrupt):
    """Training forwards at data position s return corrupt(s, loss); evaluation forwards are untouched."""
    forward, calls = Model.forward, [0]

    def patched(self, x, y=None, pos=None, reduction="mean"):
        out = forward(self, x, y, pos, reduction)
        if not torch.is_grad_enabled():
            return out
        calls[0] += 1
        return out[0], corrupt((calls[0] - 1) // accum, out[1])
    monkeypatch.setattr(Model, "forward", patched)


def test_nan_and_spike_are_skipped_and_counted(tmp_path, corpus, monkeypatch):
    _inject(monkeypatch, 2, lambda s, loss: loss * float("nan") if s == 3 else loss * 10 if s == 7 else loss)
    ns = make_ns(tmp_path, corpus, max_steps=12, ckpt_interval=12)
    summary = train.train(ns)
    recs = {r["step"]: r for r in train_records(ns.out_dir)}
    assert recs[4]["skipped"] == "nonfinite_loss" and recs[4]["skips"] == 1
    assert recs[8]["skipped"] == "spike" and recs[8]["skips"] == 2
    assert all(r["skipped"] is None and math.isfinite(r["loss"]) for s, r in recs.items() if s not in (4, 8))
    assert sorted(recs) == list(range(1, 13)) and summary["skips"] == 2
    # skipped updates never reached the optimizer: AdamW counted 10 steps in 12
    state = load_file(os.path.join(train.latest_checkpoint(ns.out_dir), "trainer", "state.safetensors"))
    assert state["optim/tok_emb.weight/step"].item() == 10


def test_too_many_skips_stop_and_keep_last_checkpoint(tmp_path, corpus, monkeypatch):
    _inject(monkeypatch, 2, lambda s, loss: loss * float("nan") if s >= 6 else loss)
    ns = make_ns(tmp_path, corpus, max_steps=20, ckpt_interval=5, max_skips=2)
    with pytest.raises(train.Diverged, match=r"stopping at step 9: 3 consecutive updates skipped .*ckpt_000005"):
        train.train(ns)
    path = train.latest_checkpoint(ns.out_dir)
    assert os.path.basename(path) == "ckpt_000005"
    model = Model(ModelConfig(**MODEL))
    opts = train.build_optimizers(model, TrainConfig(), torch.device("cpu"))
    assert train.load_checkpoint(path, model, opts)["step"] == 5


# ---------------------------------------------------------------- learning

def test_overfits_one_repeated_batch(tmp_path, corpus, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 33), generator=gen)
    batch = (x[:, :-1], x[:, 1:], torch.arange(32).expand(4, 32))
    monkeypatch.setattr(Loader, "get", lambda self, step, micro: batch)
    ns = make_ns(tmp_path, corpus, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, batch_size=4, max_steps=150,
                 warmup_steps=10, lr=1e-2, weight_decay=0.0, spike_factor=0.0, eval_interval=150, ckpt_interval=150)
    train.train(ns)
    losses = [r["loss"] for r in train_records(ns.out_dir)]
    assert losses[0] > 5.0 and losses[-1] < 0.05                # ln(264) = 5.58 -> memorised


# ---------------------------------------------------------------- shipped configs

POST_TRAINING = ("_mid", "_sft", "_apo", "_grpo")


def test_shipped_configs_resolve_and_hold_their_numbers():
    """Every config/*.py passes the checks; the numbers their comments state are what they compute."""
    resolved = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name != "__init__" and not name.endswith(POST_TRAINING):   # posttrain.py's: tests/test_posttrain.py
            ns = load([path], *train.CONFIGS)
            resolved[name] = (ns, *train.resolve(ns))
    tokens = {k: tc.batch_size * dc.seq_len for k, (_, _, dc, tc) in resolved.items()}
    assert tokens["smollm3"] == tokens["smollm3_long_32k"] == tokens["smollm3_long_64k"] == 2_359_296
    assert tokens["smollm3_1b_ablation"] == 1_048_576 and tokens["tiny"] == 4_096
    smol = resolved["smollm3"][3]
    assert smol.max_steps * 2_359_296 == pytest.approx(11.1e12, rel=1e-3)
    assert [s for s, _ in resolved["smollm3"][2].stages] == [round(8e12 / 2_359_296, -3),
                                                            smol.max_steps - round(smol.decay_frac * smol.max_steps)]
    for name, count in (("smollm3", 3_075_098_624), ("smollm3_1b_ablation", 1_235_814_400), ("tiny", 3_950_848)):
        with torch.device("meta"):
            assert Model(resolved[name][1]).num_params() == count, name
    # Each ablation is the 1B baseline with one change (and its own out_dir).
    base = vars(resolved["smollm3_1b_ablation"][0])
    ablations = {k: v for k, v in resolved.items() if k.startswith("ablation_")}
    assert len(ablations) == 10
    for name, (ns, *_) in ablations.items():
        diff = {k for k, v in vars(ns).items() if v != base[k]}
        # MLA and MoE are one change spelled in several keys (tests/test_mla_moe.py holds them to their keys)
        assert (len(diff - {"out_dir"}) == 1 or name in ("ablation_mla", "ablation_moe")) and ns.out_dir == f"out/{name}", (name, diff)


# ---------------------------------------------------------------- --bench

def test_bench_prints_its_numbers_and_writes_nothing(tmp_path, capsys):
    """--bench=2 on random rows: every field printed, tokens/s = tokens per step / step time, no corpus built
    (its data_dir stays absent), no run directory, nothing new in the working directory."""
    keys = {**MODEL, **TRAIN, "dataset": "default", "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "run")}
    cfg = write_config(tmp_path / "bench.py", **keys)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(os.getcwd()))
    train.main([cfg, "--bench=2"])
    out = capsys.readouterr().out
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(os.getcwd()))) == before
    m = re.search(r"2 steps after 2 warm-up: ([\d.]+) ms/step, ([\d,]+) tokens/s \(([\d,]+) per device\), "
                  r"MFU n/a, peak memory ([\d.]+) GB \(peak RSS\)", out)
    assert m, out
    tokens_per_step = TRAIN["batch_size"] * TRAIN["seq_len"]
    ms, tok_s, per_device, gb = float(m[1]), *(int(g.replace(",", "")) for g in m.groups()[1:3]), float(m[4])
    assert per_device == tok_s and gb > 0
    assert tok_s == pytest.approx(tokens_per_step / (ms / 1000), rel=0.06, abs=1)  # ms is printed to 0.1
    assert "4 x 2 accum x 32 tokens/step; attn_impl=sdpa compile=False act_ckpt=False autocast=off" in out
