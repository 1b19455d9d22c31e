"""posttrain.py against independent references: the loaders (packing, masks, positions, padding); the SFT loss
against per-conversation forwards and a float64 per-token mean; each preference loss against its formula on
hand-chosen log-ratios and at its limits; completion log-probs against log_softmax by hand; the merge against
tensor-by-tensor averages; an uninterrupted run for SIGKILL-and-resume of SFT and DPO (every logged number
equal) and for a resume on another day (the chat date pinned); pretraining's moe_step for tiny_moe's balance
bias after SFT steps. Tiny models with data.py's byte-level tokenizer (DP runs: test_posttrain_dp.py)."""
import contextlib
import copy
import datetime
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import posttrain as pt
import train
from config import load
from data import Tokenizer
from model import Model, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_position_embeddings=1024,
             nope_interval=2, rope_theta=10000.0)


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer.byte_level()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run faster on one thread, and the SIGKILL runs (OMP_NUM_THREADS=1) must match in-process ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save_model(path, tok, seed=0, **over):
    torch.manual_seed(seed)
    model = Model(ModelConfig(**{**MODEL, **over}))
    model.save_pretrained(str(path))
    tok.save(os.path.join(path, "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, byte_tok):
    """A tiny random HF-layout checkpoint with the byte-level tokenizer beside it: every method's start."""
    path = tmp_path_factory.mktemp("init") / "model"
    _save_model(path, byte_tok)
    return str(path)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# ------------------------------------------------------------------------------------ post-training

def test_best_fit_decreasing_on_a_hand_example():
    # capacity 10, items by size 7 4 4 1: 7 -> new bin0 (room 3); 4 -> new bin1 (room 6); 4 -> bin1 (room 2);
    # 1 -> bin1, the fullest bin it fits (first fit would take bin0)
    assert pt.pack_bfd([7, 4, 1, 4], 10) == [[0], [1, 3, 2]]
    # 7 6 3 3 2 2 1 (ties by index): 7 -> bin0 (3); 6 -> bin1 (4); 3 -> bin0 (0); 3 -> bin1 (1); 2 -> bin2 (8);
    # 2 -> bin2 (6); 1 -> bin1 (0)
    assert pt.pack_bfd([3, 7, 2, 6, 3, 2, 1], 10) == [[1, 0], [3, 4, 6], [2, 5]]
    assert pt.pack_bfd([5, 5, 5], 5) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="item 1 has length 11"):
        pt.pack_bfd([3, 11], 10)


def _conversations():
    return [
        {"messages": [{"role": "system", "content": "/think"}, {"role": "user", "content": "Compute 2 + 3."},
                      {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\nThe answer is 5."}]},
        {"messages": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi <|im_end|>"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"},
                      {"role": "assistant", "content": "No."}]},
        {"messages": [{"role": "user", "content": "Compute 9 / 3."},
                      {"role": "assistant", "content": "<think>\n9 / 3 = 3.\n</think>\nThe answer is 3."}]},
        {"messages": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "x"},
                      {"role": "assistant", "content": "y"}]},
    ]


def test_sft_packing_positions_and_masks(tmp_path, byte_tok):
    convs = _conversations()
    path = _write_jsonl(tmp_path / "sft.jsonl", convs)
    full = [data.render_chat(byte_tok, c["messages"])[0] for c in convs]
    T = 1640  # byte-level lengths 1347, 283, 1347, 232: two rows of two conversations
    sft = pt.SFTLoader(path, byte_tok, T, micro_batch_size=2)
    assert sft.bins == pt.pack_bfd([len(ids) - 1 for ids in full], T)
    for r, items in enumerate(sft.bins):
        at = 0
        for i in items:
            n = len(full[i]) - 1
            seg = slice(at, at + n)
            assert sft.x[r, seg].tolist() == full[i][:-1]  # the whole conversation, in its own segment
            assert sft.pos[r, seg].tolist() == list(range(n))  # positions restart: no cross-document leakage
            y = sft.y[r, seg]
            keep = y != -100
            assert (y[keep] == np.array(full[i][1:])[keep]).all()  # next-token targets within the conversation
            targets = byte_tok.decode(y[keep].tolist())
            answers = [m["content"] + "<|im_end|>" for m in convs[i]["messages"] if m["role"] == "assistant"]
            assert targets == "".join(answers), targets  # exactly the assistant turns and their <|im_end|>
            at += n
        assert (sft.y[r, at:] == -100).all() and (sft.x[r, at:] == byte_tok.pad_id).all()
        assert (sft.pos[r, at:] == -1).all()  # padding: pos -1, which nothing attends to or from
    assert any(len(items) > 1 for items in sft.bins)
    x, y, pos = sft.get(0, 0)
    r0, r1 = sft.indices(0, 0).tolist()
    assert x.shape == (2, T) and torch.equal(x[1], torch.from_numpy(sft.x[r1]))
    assert torch.equal(pos[0], torch.from_numpy(sft.pos[r0]))
    one = pt.SFTLoader(path, byte_tok, T, micro_batch_size=1)
    assert sorted(one.indices(s, 0)[0] for s in range(len(one.bins))) == list(range(len(one.bins)))  # an epoch


def test_preference_and_prompt_batches(tmp_path, byte_tok):
    rows = [{"prompt": [{"role": "user", "content": f"Compute {a} + 1."}],
             "chosen": [{"role": "assistant", "content": f"The answer is {a + 1}."}],
             "rejected": [{"role": "assistant", "content": f"The answer is {a + 2}!!"}]} for a in range(6)]
    pref = pt.PreferenceLoader(_write_jsonl(tmp_path / "p.jsonl", rows), byte_tok, 2048, micro_batch_size=3)
    (xc, yc, pc), (xr, yr, pr) = pref.get(0, 0)
    assert xc.shape == xr.shape
    for i, k in enumerate(pref.indices(0, 0).tolist()):
        for x, y, reply in ((xc, yc, f"The answer is {k + 1}."), (xr, yr, f"The answer is {k + 2}!!")):
            assert byte_tok.decode(y[i][y[i] != -100].tolist()) == reply + "<|im_end|>"
            ids = data.render_chat(byte_tok, rows[k]["prompt"] + [{"role": "assistant", "content": reply}])[0]
            assert x[i, :len(ids) - 1].tolist() == ids[:-1]
            assert (x[i, len(ids) - 1:] == byte_tok.pad_id).all()
            pos = (pc if x is xc else pr)[i]
            assert pos.tolist() == list(range(len(ids) - 1)) + [-1] * (x.shape[1] - len(ids) + 1)
    # a multi-turn prompt: its own assistant turn is context, so only the final reply is the completion
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    multi = [{**r, "prompt": history + r["prompt"]} for r in rows[:1]]
    multi_loader = pt.PreferenceLoader(_write_jsonl(tmp_path / "m.jsonl", multi), byte_tok, 2048, 1)
    (_, yc, _), (_, yr, _) = multi_loader.get(0, 0)
    assert byte_tok.decode(yc[0][yc[0] != -100].tolist()) == "The answer is 1.<|im_end|>"
    assert byte_tok.decode(yr[0][yr[0] != -100].tolist()) == "The answer is 2!!<|im_end|>"
    rl = [{"prompt": [{"role": "user", "content": f"Compute {a} * 2."}], "answer": str(2 * a)} for a in range(5)]
    prompts = pt.PromptLoader(_write_jsonl(tmp_path / "rl.jsonl", rl), byte_tok, micro_batch_size=2,
                                enable_thinking=False)
    ids, answers = prompts.get(1, 0)
    for p, ans in zip(ids, answers):
        k = int(ans) // 2
        assert p == data.render_chat(byte_tok, rl[k]["prompt"], add_generation_prompt=True, enable_thinking=False)[0]
    with pytest.raises(ValueError, match=r"rl2.jsonl:1: expected field 'answer' of type str"):
        pt.PromptLoader(_write_jsonl(tmp_path / "rl2.jsonl", [{"prompt": [], "answer": 3}]), byte_tok, 1)
    with pytest.raises(ValueError, match="file not found: .*nope.jsonl"):
        pt.SFTLoader(str(tmp_path / "nope.jsonl"), byte_tok, 64, 1)




# ------------------------------------------------------------------------------------------------ SFT

def _short_conversations(n):
    """Byte-level conversations of unequal length (a custom system text keeps them short), every third two-turn."""
    out = []
    for i in range(n):
        a, b = 7 * i % 50, 11 * i % 50
        messages = [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": f"{a}+{b}?"},
                    {"role": "assistant", "content": f"{a + b}." + " Sure." * (3 * i % 7)}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Counting."}]
        out.append({"messages": messages})
    return out


def _pairs(n):
    return [{"prompt": [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": f"{i}+{i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"{2 * i + 1}, I think" + "!" * (i % 3)}]} for i in range(n)]


def _rendered(tok, messages):
    """(x, y) of a conversation by data.render_chat alone: targets where the template's mask says generate."""
    ids, mask = data.render_chat(tok, messages)
    return torch.tensor(ids[:-1]), torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])


def test_default_data_files_follow_the_embedded_sets(tmp_path):
    """data_file("default"): every embedded set is written as JSON lines equal to default_sets(); a file that differs
    (written by an older recipe) is rewritten, one that matches is left alone; a configured path is returned as is."""
    run = types.SimpleNamespace(dc=types.SimpleNamespace(data_dir=str(tmp_path)), master=True, grid=None)
    stale = tmp_path / "rl_train.jsonl"
    stale.write_text('{"prompt": "from an older recipe"}\n')
    assert pt.data_file(run, "mine.jsonl", "rl_train") == "mine.jsonl"
    assert stale.read_text() == '{"prompt": "from an older recipe"}\n'
    assert pt.data_file(run, "default", "rl_train") == str(stale)
    sets = pt.default_sets()
    for name, rows in sets.items():
        assert [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()] == rows, name
    written = {name: (tmp_path / f"{name}.jsonl").stat().st_mtime_ns for name in sets}
    time.sleep(0.01)
    pt.data_file(run, "default", "sft_train")
    assert {name: (tmp_path / f"{name}.jsonl").stat().st_mtime_ns for name in sets} == written


def test_sft_masked_positions_give_zero_gradient(tmp_path, byte_tok, init_dir):
    loader = pt.SFTLoader(_write_jsonl(tmp_path / "c.jsonl", _short_conversations(6)), byte_tok, 640, 2)
    x, y, pos = (torch.from_numpy(a[:2]) for a in (loader.x, loader.y, loader.pos))
    model, seen = Model.from_pretrained(init_dir), {}

    def keep(module, inputs, out):                           # the final hidden states, whose grad we read
        out.retain_grad()
        seen["h"] = out
    model.norm.register_forward_hook(keep)
    pt.sft_loss(model, (x, y, pos, 1.0), "cpu").backward()
    # The LM head and CE act per position, so d loss / d h[t] is CE(t)'s alone: exactly 0 where the target is a
    # system, user or template token (or padding), so what those targets are cannot change the update.
    g = seen["h"].grad.norm(dim=-1)                          # [B, T]
    assert (g[y == -100] == 0).all() and (g[y != -100] > 0).all()
    assert (y == -100).logical_and(pos >= 0).sum() > (y != -100).sum()   # most real tokens are masked here


def test_sft_packed_loss_equals_unpacked(tmp_path, byte_tok, init_dir):
    convs = _short_conversations(7)
    loader = pt.SFTLoader(_write_jsonl(tmp_path / "c.jsonl", convs), byte_tok, 800, 1)
    assert max(len(b) for b in loader.bins) >= 3
    x, y, pos = (torch.from_numpy(a) for a in (loader.x, loader.y, loader.pos))
    model = Model.from_pretrained(init_dir)
    with torch.no_grad():
        packed = model(x, y, pos, reduction="none")[1]
        leaky = model(x, y, reduction="none")[1]             # one causal sequence per row: documents see each other
        total, n = 0.0, 0
        for r, items in enumerate(loader.bins):
            at = 0
            for i in items:
                xi, yi = _rendered(byte_tok, convs[i]["messages"])
                alone = model(xi[None], yi[None], torch.arange(len(xi))[None], reduction="none")[1][0]
                torch.testing.assert_close(packed[r, at:at + len(xi)], alone, atol=1e-5, rtol=1e-5)
                assert at == 0 or not torch.allclose(leaky[r, at:at + len(xi)], alone, atol=1e-3)
                total, n, at = total + alone.sum().item(), n + int((yi != -100).sum()), at + len(xi)
        loss = pt.sft_loss(model, (x, y, pos, 1.0), "cpu").item() / int((y != -100).sum())
    assert loss == pytest.approx(total / n, rel=1e-5)


def test_sft_step_loss_is_the_per_token_mean_under_accumulation(tmp_path, byte_tok, init_dir):
    # two conversations of very unequal length, one per row and micro-batch: accumulation over 2 micro-batches
    convs = _short_conversations(2)
    convs[1]["messages"][2]["content"] = "Long. " * 60
    loader = pt.SFTLoader(_write_jsonl(tmp_path / "c.jsonl", convs), byte_tok, 600, micro_batch_size=1, accum=2)
    tc = train.TrainConfig(lr=1e-3, batch_size=2, micro_batch_size=1, grad_clip=0.0, spike_factor=0.0)
    model = Model.from_pretrained(init_dir)
    reference = copy.deepcopy(model)
    grads = []

    def capture(params, max_norm):                           # Step's clip hook sees the accumulated gradients
        grads.append({id(p): p.grad.clone() for p in params})
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    step = train.Step(train.build_optimizers(model, tc, torch.device("cpu")), train.Guard(0.0), tc,
                      contextlib.nullcontext(), clip_grad_norm=capture)
    batches = pt.sft_batches(loader, 0, 2)
    r = step(batches, lambda b: pt.sft_loss(model, b, "cpu"), tc.lr)
    x, y, pos = (torch.cat([b[k] for b in batches]) for k in range(3))
    per_token = reference(x, y, pos, reduction="none")[1]
    mask = y != -100
    assert mask[0].sum() != mask[1].sum()
    want = per_token.double()[mask].mean().item()
    assert r.loss == pytest.approx(want, rel=1e-6)
    mean_of_means = sum(per_token[i][mask[i]].mean().item() for i in range(2)) / 2
    assert abs(mean_of_means - want) > 1e-3                  # what a mean of micro-batch means would have logged
    (per_token.sum() / mask.sum()).backward()
    named = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[0][id(p)], named[name].grad, atol=1e-7, rtol=1e-5)


def test_overlong_conversations_are_skipped_or_truncated_and_counted(tmp_path, byte_tok):
    convs = _short_conversations(4)
    path = _write_jsonl(tmp_path / "c.jsonl", convs)
    lengths = [len(data.render_chat(byte_tok, c["messages"])[0]) - 1 for c in convs]
    limit = sorted(lengths)[1]
    long = sum(n > limit for n in lengths)
    assert 0 < long < 4
    skip = pt.SFTLoader(path, byte_tok, limit, 1, overlong="skip")
    assert skip.counts == {"examples": 4, "skipped": long} and sum(map(len, skip.bins)) == 4 - long
    cut = pt.SFTLoader(path, byte_tok, limit, 1, overlong="truncate")
    assert cut.counts == {"examples": 4, "truncated": long} and sum(map(len, cut.bins)) == 4
    assert (cut.pos >= 0).sum() == sum(min(n, limit) for n in lengths)
    with pytest.raises(ValueError, match=r"c.jsonl: all 4 examples are longer than seq_len=10"):
        pt.SFTLoader(path, byte_tok, 10, 1)
    mid = pt.SFTLoader(path, byte_tok, 800, 1, all_tokens=True)   # mid-training: every real token is a target
    assert ((mid.y != -100) == (mid.pos >= 0)).all()


def test_per_example_enable_thinking(tmp_path, byte_tok):
    question = [{"role": "user", "content": "2+2?"}]
    rows = [{"messages": question + [{"role": "assistant", "content": "4."}], "enable_thinking": False},
            {"messages": question + [{"role": "assistant", "content": "<think>\n2+2=4\n</think>\n4."}]}]
    loader = pt.SFTLoader(_write_jsonl(tmp_path / "c.jsonl", rows), byte_tok, 2000, 1)
    (items,) = loader.bins                                   # both in one row, the longer (/think) first
    at = 0
    for i in items:
        ids = data.render_chat(byte_tok, rows[i]["messages"], enable_thinking=rows[i].get("enable_thinking", True))[0]
        assert loader.x[0, at:at + len(ids) - 1].tolist() == ids[:-1]
        assert ("Reasoning Mode: /no_think" if i == 0 else "Reasoning Mode: /think") in byte_tok.decode(ids)
        at += len(ids) - 1


# ------------------------------------------------------------------------------------------ preference

def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


BETA = 0.1
FORMULAS = {"dpo": lambda w, l: -math.log(_sigmoid(BETA * (w - l))),
            "ipo": lambda w, l: (w - l - 1 / (2 * BETA)) ** 2,
            "apo_zero": lambda w, l: (1 - _sigmoid(BETA * w)) + _sigmoid(BETA * l),
            "apo_down": lambda w, l: _sigmoid(BETA * w) + (1 - _sigmoid(BETA * (w - l)))}


@pytest.mark.parametrize("loss_type", sorted(FORMULAS))
def test_preference_loss_equals_its_formula(loss_type):
    assert sorted(pt.LOSSES) == sorted(FORMULAS)
    loss = pt.LOSSES[loss_type]
    rw, rl = [2.0, -1.5, 0.3, 7.0, -4.0], [-1.0, 0.5, 0.3, 9.0, -12.0]
    got = loss(BETA, torch.tensor(rw, dtype=torch.float64), torch.tensor(rl, dtype=torch.float64))
    assert got.tolist() == pytest.approx([FORMULAS[loss_type](w, l) for w, l in zip(rw, rl)], rel=1e-12)
    # chosen == rejected: DPO log 2, IPO 1/(4 beta^2), APO-zero 1, APO-down sigmoid(beta r) + 1/2
    r = torch.tensor([-3.0, 0.0, 4.0], dtype=torch.float64)
    known = {"dpo": [math.log(2)] * 3, "ipo": [1 / (4 * BETA ** 2)] * 3, "apo_zero": [1.0] * 3,
             "apo_down": [_sigmoid(BETA * v) + 0.5 for v in r.tolist()]}
    assert loss(BETA, r, r).tolist() == pytest.approx(known[loss_type], rel=1e-12)
    # limits in fp32, beta * r = +-1e4: finite values at the limit and finite gradients
    big = 1e5
    limits = {"dpo": (0.0, 2 * BETA * big), "ipo": ((2 * big - 1 / (2 * BETA)) ** 2, (2 * big + 1 / (2 * BETA)) ** 2),
              "apo_zero": (0.0, 2.0), "apo_down": (1.0, 1.0)}
    rw = torch.tensor([big, -big], requires_grad=True)
    rl = torch.tensor([-big, big], requires_grad=True)
    out = loss(BETA, rw, rl)
    out.sum().backward()
    assert out.tolist() == pytest.approx(limits[loss_type], rel=1e-6, abs=1e-6)
    assert torch.isfinite(rw.grad).all() and torch.isfinite(rl.grad).all()


def test_reference_logps_precomputed_equal_frozen_and_hand_computed(tmp_path, byte_tok, init_dir):
    pairs = _pairs(7)
    loader = pt.PreferenceLoader(_write_jsonl(tmp_path / "p.jsonl", pairs), byte_tok, 512, micro_batch_size=3)
    model = Model.from_pretrained(init_dir).eval()
    table = pt.logps_table(model, loader, 2, contextlib.nullcontext(), torch.device("cpu"))
    items = loader.indices(1, 0).tolist()                    # a training batch: other rows, other padding
    with torch.no_grad():
        frozen = torch.stack(pt.pair_logps(model, *loader.rows(items), torch.device("cpu")), 1)
    torch.testing.assert_close(table[items], frozen, rtol=1e-5, atol=1e-4)
    # by hand, in float64: log_softmax at the completion's tokens (the reply and its <|im_end|>) only
    for k in range(len(pairs)):
        for side, name in enumerate(("chosen", "rejected")):
            ids, mask = data.render_chat(byte_tok, pairs[k]["prompt"] + pairs[k][name])
            with torch.no_grad():
                logp = model(torch.tensor(ids[:-1])[None])[0].double().log_softmax(-1)
            want = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
            assert table[k, side].item() == pytest.approx(want, rel=1e-5)
    assert not torch.equal(table[:, 0], table[:, 1])


def test_plain_text_pairs(tmp_path, byte_tok):
    rows = [{"prompt": "Q: 1+1=", "chosen": "2", "rejected": "3!"}]
    loader = pt.PreferenceLoader(_write_jsonl(tmp_path / "p.jsonl", rows), byte_tok, 64, 1)
    (xc, yc, _), (xr, yr, _) = loader.rows([0])
    assert byte_tok.decode(xc[0][xc[0] != byte_tok.pad_id].tolist()) == "Q: 1+1=2"
    assert yc[0][yc[0] != -100].tolist() == byte_tok.encode("2") + [byte_tok.eos_id]
    assert yr[0][yr[0] != -100].tolist() == byte_tok.encode("3!") + [byte_tok.eos_id]
    mixed = [{"prompt": "Q", "chosen": [{"role": "assistant", "content": "2"}], "rejected": "3"}]
    with pytest.raises(ValueError, match=r"m.jsonl:1: prompt, chosen and rejected must all be"):
        pt.PreferenceLoader(_write_jsonl(tmp_path / "m.jsonl", mixed), byte_tok, 64, 1)


# ------------------------------------------------------------------------------------------------ merge

def test_checkpoint_metrics_equal_their_definitions(tmp_path, byte_tok):
    """The pipeline's scorer against its definitions computed here, on a random model: math bpb = the val shard's
    next-token nats (float64 log-softmax) / ln 2 / the target tokens' bytes; pref acc = the share of pairs whose
    chosen reply (+ end of text) has the higher summed log-probability after its prompt (here 2 of 6, so a
    reversed comparison gives 4 of 6); exact match 0 (random bytes), format shares in [0, 1]."""
    data_dir = tmp_path / "data"
    (data_dir / "math").mkdir(parents=True)
    ids = byte_tok.encode("Problem: Compute 38 + 45.\nSolution:\n38 + 45 = 83.\nThe answer is 83.\n" * 12)
    data.write_shard(str(data_dir / "math" / "val_00000.bin"), [(ids, 1)], byte_tok.hash, 2)
    # a short reply is far likelier than a long one under random weights: chosen short in 2 pairs, long in 4
    short, long = "ab", "qzxv wkjp gmfy"
    pairs = [{"prompt": f"pair {i}: ", "chosen": short if i < 2 else long, "rejected": long if i < 2 else short}
             for i in range(6)]
    _write_jsonl(data_dir / "pref_val.jsonl", pairs)
    ckpt = str(tmp_path / "model")   # the chat prompts are ~1,400 bytes: a longer context than init_dir's
    _save_model(ckpt, byte_tok, max_position_embeddings=2048)
    out = pt.checkpoint_metrics(ckpt, str(data_dir), torch.device("cpu"), questions=2)
    model = Model.from_pretrained(ckpt).float().eval()
    with torch.no_grad():
        x = torch.tensor(ids)
        rows = -(-(len(x) - 1) // 256)
        nats = n_bytes = 0.0
        for r in range(rows):
            inp, tgt = x[r * 256:(r + 1) * 256 + 1][:-1], x[r * 256 + 1:(r + 1) * 256 + 1]
            logp = torch.log_softmax(model(inp[None])[0, :len(tgt)].double(), -1)
            nats -= logp.gather(1, tgt[:, None]).sum().item()
            n_bytes += byte_tok.token_bytes()[tgt.numpy()].sum()

        def logp_reply(prompt, reply):
            p, r = byte_tok.encode(prompt), byte_tok.encode(reply) + [byte_tok.eos_id]
            logp = torch.log_softmax(model(torch.tensor([p + r[:-1]]))[0].double(), -1)
            return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
        wins = [logp_reply(q["prompt"], q["chosen"]) > logp_reply(q["prompt"], q["rejected"]) for q in pairs]
    assert wins == [True, True, False, False, False, False]
    assert out["pref_acc"] == pytest.approx(sum(wins) / len(wins))
    # the byte shard is one document (no end-of-text inside), so the scorer's rows are these plain causal rows
    assert out["math_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert out["em_think"] == out["em_no_think"] == 0.0
    assert 0.0 <= out["format_think"] <= 1.0 and 0.0 <= out["format_no_think"] <= 1.0


def test_merge_averages_tensor_by_tensor_and_refuses_mismatches(tmp_path, byte_tok):
    a, b = _save_model(tmp_path / "a", byte_tok, seed=1), _save_model(tmp_path / "b", byte_tok, seed=2)
    out = str(tmp_path / "soup")
    pt.main(["merge", out, f"{tmp_path / 'a'}:0.5", f"{tmp_path / 'b'}:0.5"])
    merged = Model.from_pretrained(out)
    for (name, t), ta, tb in zip(merged.state_dict().items(), a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(t, (ta + tb) / 2, atol=0, rtol=2e-7, msg=name)
    assert Tokenizer.load(os.path.join(out, "tokenizer.json")).encode("hi") == byte_tok.encode("hi")
    assert json.loads(open(os.path.join(out, "merge.json")).read())["merge"][1]["weight"] == 0.5
    # 0.9 / 0.1 (the SmolLM3 recipe) on the same two
    pt.merge(str(tmp_path / "final"), [f"{tmp_path / 'a'}:0.9", f"{tmp_path / 'b'}:0.1"])
    w = Model.from_pretrained(str(tmp_path / "final")).tok_emb.weight
    torch.testing.assert_close(w, 0.9 * a.tok_emb.weight + 0.1 * b.tok_emb.weight, atol=1e-7, rtol=1e-6)
    _save_model(tmp_path / "wide", byte_tok, d_ff=96)
    with pytest.raises(ValueError, match=r"has another model config than .*a: d_ff: 64 vs 96"):
        pt.merge(str(tmp_path / "x"), [f"{tmp_path / 'a'}:0.5", f"{tmp_path / 'wide'}:0.5"])
    # same config.json, one tensor of another shape: named
    shutil.copytree(tmp_path / "b", tmp_path / "bad")
    tensors = load_file(str(tmp_path / "bad" / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:32]
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is torch.float32 \(64, 32\) in "
                                         r".*a but torch.float32 \(32, 32\) in .*bad"):
        pt.merge(str(tmp_path / "x"), [f"{tmp_path / 'a'}:0.5", f"{tmp_path / 'bad'}:0.5"])
    for specs, message in (([f"{tmp_path / 'a'}:0.5", f"{tmp_path / 'b'}:0.6"], "weights sum to 1.1"),
                           ([f"{tmp_path / 'a'}"], "expected CHECKPOINT:WEIGHT"),
                           ([f"{tmp_path / 'a'}:1", ], "soup exists and is not an empty directory")):
        with pytest.raises(ValueError, match=message):
            pt.merge(out if "exists" in message else str(tmp_path / "x"), specs)
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------ command line and resume

def _run_config(tmp_path, init_dir, files, **over):
    keys = {"init_from": init_dir, "seq_len": 256, "batch_size": 2, "micro_batch_size": 1, "max_steps": 6,
            "warmup_steps": 2, "lr": 3e-3, "eval_interval": 3, "eval_rows": 3, "ckpt_interval": 3, "log_interval": 1,
            "device": "cpu", "dtype": "float32", "data_dir": str(tmp_path), **files, **over}
    path = tmp_path / "cfg.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in keys.items()))
    return str(path)


def _method_files(tmp_path, method):
    if method == "sft":
        return {"train_data": _write_jsonl(tmp_path / "train.jsonl", _short_conversations(12)),
                "val_data": _write_jsonl(tmp_path / "val.jsonl", _short_conversations(15)[12:])}
    return {"train_data": _write_jsonl(tmp_path / "train.jsonl", _pairs(12)),
            "val_data": _write_jsonl(tmp_path / "val.jsonl", _pairs(15)[12:]), "loss_type": "apo_zero",
            "ref_logps": "precompute", "lr": 1e-2}


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu")}
            for r in train.read_log(os.path.join(run_dir, "log.jsonl"))]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_kill_and_resume_gives_the_same_losses(tmp_path, init_dir, method):
    cfg = _run_config(tmp_path, init_dir, _method_files(tmp_path, method))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "posttrain.py"), method, cfg, f"--out_dir={out}",
                                 *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    pt.main([method, cfg, f"--out_dir={ref}"])               # uninterrupted, in this process (one thread too)
    p = launch(killed)
    deadline = time.time() + 300
    while not any(r["kind"] == "train" and r["step"] >= 4 for r in _records(killed)):
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p = launch(killed, "--resume=True")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resuming from" in out and "at step 3" in out
    a, b = _records(ref), _records(killed)
    assert [r["kind"] for r in a[:2]] == ["data", "eval"]    # the data counts, then the held-out eval before step 1
    assert [r["step"] for r in a if r["kind"] == "train"] == list(range(1, 7))
    assert a == b                                            # losses, grad norms, rewards, held-out numbers
    keys = {"sft": "loss", "dpo": "rewards/margin"}
    assert len({r[keys[method]] for r in a if r["kind"] == "train"}) == 6
    for ckpt in ("ckpt_000003", "ckpt_000006"):
        wa, wb = (load_file(os.path.join(run, ckpt, "model.safetensors")) for run in (ref, killed))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), ckpt
    if method == "dpo":
        evals = [r for r in a if r["kind"] == "eval"]
        assert evals[0]["val_rewards/margin"] == 0.0          # the policy starts as the reference
        assert evals[-1]["val_rewards/margin"] > 0 and evals[-1]["val_rewards/accuracy"] > 0.5

    # bad input on a finished run: one line naming file:line and the field; nothing on disk changes
    def snapshot():
        return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in glob.glob(f"{ref}/**", recursive=True)
                if os.path.isfile(f)}
    before = snapshot()
    rows = _short_conversations(2) if method == "sft" else _pairs(2)
    rows[1].pop("messages" if method == "sft" else "rejected")
    bad = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        pt.main([method, cfg, f"--out_dir={ref}", "--resume=True", "--max_steps=12", f"--train_data={bad}"])
    field = "messages" if method == "sft" else "rejected"
    assert str(e.value) == f"posttrain.py: {bad}:2: missing field '{field}'"
    assert snapshot() == before


def _day(date):
    """A stand-in for the datetime module whose date.today() is `date` (posttrain and data.py ask it)."""
    class Day(datetime.date):
        @classmethod
        def today(cls):
            return cls(date.year, date.month, date.day)
    return types.SimpleNamespace(date=Day)


def test_a_run_resumed_on_another_day_renders_the_day_it_started(tmp_path, init_dir, monkeypatch):
    """SFT started on 1 March and resumed at step 3 on 2 March gives the uninterrupted run's losses: the template's
    "Today Date" is pinned in run.json and the checkpoints. A fresh run on 2 March differs (the date is in every
    system turn), unless given --chat_date of the first day."""
    cfg = _run_config(tmp_path, init_dir, _method_files(tmp_path, "sft"))

    def run(day, out, *extra):
        for module in (data, pt):
            monkeypatch.setattr(module, "datetime", _day(day))
        pt.main(["sft", cfg, f"--out_dir={tmp_path / out}", *extra])
        return _records(tmp_path / out)

    march1, march2 = datetime.date(2026, 3, 1), datetime.date(2026, 3, 2)
    ref = run(march1, "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "ckpt_000006")
    (tmp_path / "resumed" / "latest").write_text("ckpt_000003\n")
    assert run(march2, "resumed", "--resume=True") == ref
    history = json.loads((tmp_path / "resumed" / "run.json").read_text())["history"]
    assert [h["config"]["chat_date"] for h in history] == ["2026-03-01", "2026-03-01"]
    other = run(march2, "other")
    assert [r["loss"] for r in other if r["kind"] == "train"] != [r["loss"] for r in ref if r["kind"] == "train"]
    assert run(march2, "pinned", "--chat_date='2026-03-01'") == ref
    with pytest.raises(SystemExit) as e:
        pt.main(["sft", cfg, f"--out_dir={tmp_path / 'bad'}", "--chat_date='1 March'"])
    assert "chat_date='1 March' must be a date YYYY-MM-DD" in str(e.value)


def test_moe_balance_bias_moves_after_each_posttrain_step_as_in_pretraining(tmp_path, byte_tok, init_dir):
    """config/tiny_moe.py's shape, 2 SFT steps of 2 micro-batches with held-out evals at steps 0, 1 and 2: after
    each step the bias moves by moe_bias_update x sign(mean load - load) of that step's training forwards alone,
    as train.py's pretraining does (Model.moe_step after the update); the evals count nothing. The step's loss
    is the per-token mean plus the balance losses, as pretraining's."""
    ns = load([os.path.join(ROOT, "config", "tiny_moe.py")], ModelConfig, strict=False)
    start = tmp_path / "moe"
    _save_model(start, byte_tok, **{**vars(ns), "vocab_size": 264})       # the byte-level tokenizer's vocabulary
    files = _method_files(tmp_path, "sft")
    cfg = _run_config(tmp_path, str(start), files, max_steps=2, warmup_steps=1, eval_interval=1, ckpt_interval=1)
    pt.main(["sft", cfg, f"--out_dir={tmp_path / 'run'}"])
    loader = pt.SFTLoader(files["train_data"], byte_tok, 256, 1, accum=2, seed=train.TrainConfig.seed)
    before, want_loss = str(start), []
    for step in (0, 1):
        model = Model.from_pretrained(before).train()         # the weights this step trained from
        ce, aux, n = 0.0, 0.0, 0
        for m in range(2):
            x, y, pos = loader.get(step, m)
            ce += model(x, y, pos, reduction="sum")[1].item()
            aux, n = aux + sum(layer.aux_loss.item() for layer in model.moe()) / 2, n + int((y != -100).sum())
        want_loss.append(ce / n + aux)                        # the per-token mean + the balance losses' mean
        model.moe_step()
        after = os.path.join(tmp_path, "run", f"ckpt_{step + 1:06d}")
        got = Model.from_pretrained(after)
        for layer, want in zip(got.moe(), model.moe()):
            assert torch.equal(layer.balance_bias, want.balance_bias), f"step {step + 1}"
            assert layer.balance_bias.abs().max() > 0
        before = after
    log = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert all(len(r["moe_load_max_mean"]) == 3 for r in log)  # layers 1-3 are MoE
    assert [r["loss"] for r in log] == pytest.approx(want_loss, rel=1e-6) and min(want_loss) > 0


def test_bad_lines_name_file_line_and_field(tmp_path, byte_tok):
    conv = _short_conversations(1)[0]
    cases = [({"text": "hi"}, "missing field 'messages'"),
             ({"messages": conv["messages"][:1] + [{"role": "bot", "content": "x"}]},
              "field 'messages', message 1: unknown role 'bot' \\(expected one of system, user, assistant, tool\\)"),
             ({"messages": [{"role": "user"}]}, "field 'messages', message 0: expected \\{'role'"),
             ({**conv, "enable_thinking": "yes"}, "expected field 'enable_thinking' of type bool")]
    for row, message in cases:
        path = _write_jsonl(tmp_path / "c.jsonl", [conv, row])
        with pytest.raises(ValueError, match=f"c.jsonl:2: {message}"):
            pt.SFTLoader(path, byte_tok, 2048, 1)
    pair = _pairs(1)[0]
    for row, message in (({k: v for k, v in pair.items() if k != "chosen"}, "missing field 'chosen'"),
                         ({**pair, "rejected": [{"role": "critic", "content": "no"}]},
                          "field 'rejected', message 0: unknown role 'critic'"),
                         ({**pair, "prompt": 3}, "field 'prompt': expected a list of messages or a string, got int")):
        path = _write_jsonl(tmp_path / "p.jsonl", [pair, row])
        with pytest.raises(ValueError, match=f"p.jsonl:2: {message}"):
            pt.PreferenceLoader(path, byte_tok, 2048, 1)


def test_config_errors(tmp_path, init_dir, capsys):
    files = _method_files(tmp_path, "sft")
    for over, message in (({"loss_type": "kto"}, "loss_type='kto' must be one of"),
                          ({"overlong": "cut"}, "overlong='cut' must be 'skip' or 'truncate'"),
                          ({"init_from": None}, "init_from: post-training starts from a checkpoint"),
                          ({"init_from": str(tmp_path)}, "expected a run, checkpoint or HF model directory")):
        with pytest.raises(SystemExit) as e:
            pt.main(["sft", _run_config(tmp_path, init_dir, files, **over)])
        assert message in str(e.value)
    with pytest.raises(SystemExit) as e:
        pt.main(["grpo_nope"])
    assert e.value.code == 2 and "usage: python posttrain.py" in capsys.readouterr().err


def test_shipped_post_training_configs_hold_their_numbers():
    resolved = {}
    for stage in ("mid", "sft", "apo"):
        for size in ("tiny", "smollm3"):
            path = os.path.join(ROOT, "config", f"{size}_{stage}.py")
            resolved[size, stage] = pt.resolve(load([path], *pt.CONFIGS))
    for size in ("tiny", "smollm3"):
        (_, mid, _), (_, sft, _), (_, apo, pc) = (resolved[size, s] for s in ("mid", "sft", "apo"))
        assert apo.lr == pytest.approx(sft.lr / 10) and pc.loss_type == "apo_zero" and pc.beta == 0.1
        assert (mid.out_dir, sft.init_from, sft.out_dir, apo.init_from) == (
            f"out/{size}_mid", f"out/{size}_mid", f"out/{size}_sft", f"out/{size}_sft")
    assert resolved["smollm3", "sft"][1].lr == 2e-5 and resolved["smollm3", "apo"][1].lr == 2e-6
    dc, tc, _ = resolved["tiny", "sft"]
    assert tc.batch_size * dc.seq_len == 5_120 and resolved["tiny", "mid"][1].init_from == "out/tiny"
    assert resolved["smollm3", "sft"][1].batch_size * resolved["smollm3", "sft"][0].seq_len == 1_048_576
