"""Corpus preparation, the embedded default corpus and the loaders of data.py (the tokenizer and chat
template have tests/test_tokenizer.py). Oracles: token streams built by hand or by encoding each document
directly, byte offsets of hand-made documents, hand-derived bin packings, and an independent ast-based
evaluator for the generated math."""
import ast
import json
import multiprocessing
import operator
import os
import re

import numpy as np
import pytest
import torch

import data
import eval as ev
import posttrain as pt
from data import DataConfig, Loader, Tokenizer


TOK = data.load_tokenizer  # a Loader takes the run's tokenizer, loaded once


def TOKD(**kw):
    """(DataConfig(**kw), its tokenizer): the first two arguments of a Loader."""
    cfg = DataConfig(**kw)
    return cfg, TOK(cfg)


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _leftovers(root):
    """Files under root that are shards in progress or shards not listed as done."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if ".bin" in f or ".tmp" in f)


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory, byte_tok):
    """Three sources whose documents use disjoint letters (a-f, g-m, n-t), so a row's source can be read off
    its tokens; ~300 rows of 33 tokens each."""
    root = tmp_path_factory.mktemp("mix")
    byte_tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    for source, letters in (("a", "abcdef"), ("b", "ghijklm"), ("c", "nopqrst")):
        docs = ["".join(rng.choice(list(letters), size=rng.integers(1, 60))) for _ in range(400)]
        data.prepare([_write_jsonl(root / f"{source}.jsonl", [{"text": d} for d in docs])], str(root), byte_tok,
                     source)
        data.prepare([_write_jsonl(root / f"{source}_val.jsonl", [{"text": d} for d in docs[:50]])], str(root),
                     byte_tok, source, split="val")
    return str(root)


def _source_of_rows(x):
    """Source of each row from its letters (EOT and other ids ignored) -> list of 'a' | 'b' | 'c'."""
    out = []
    for row in x.tolist():
        letters = {chr(t) for t in row if 97 <= t < 123}
        found = {s for s, ls in (("a", "abcdef"), ("b", "ghijklm"), ("c", "nopqrst")) if letters & set(ls)}
        assert len(found) == 1, f"row mixes sources {found}"
        out.append(found.pop())
    return out


# ---------------------------------------------------------------------------------------------- order

def test_permutation_is_a_keyed_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097, 65537):
        p = data.permute(np.arange(n), n, 12345)
        assert sorted(p.tolist()) == list(range(n)), n
        idx = np.arange(n)[::7]
        assert np.array_equal(data.permute(idx, n, 12345), p[idx])  # a pure function of each index
        if n >= 1000:
            assert (p == np.arange(n)).mean() < 0.01  # actually shuffles
            assert (data.permute(np.arange(n), n, 54321) != p).mean() > 0.99  # another key, another order
    assert data.permute(np.arange(12).reshape(3, 4), 12, 1).shape == (3, 4)


def test_dp_equals_gradient_accumulation(mix_dir):
    cfg = DataConfig(data_dir=mix_dir, seq_len=32, mixture={"a": 0.5, "b": 0.3, "c": 0.2})
    single = Loader(cfg, TOK(cfg), micro_batch_size=3, accum=4, seed=7)
    ranks = [Loader(cfg, TOK(cfg), micro_batch_size=3, accum=1, seed=7, dp_rank=r, dp_size=4) for r in range(4)]
    two = [Loader(cfg, TOK(cfg), micro_batch_size=3, accum=2, seed=7, dp_rank=r, dp_size=2) for r in range(2)]
    for step in (0, 1, 13):
        for m in range(4):
            want = single.get(step, m)
            for got in (ranks[m].get(step, 0), two[m % 2].get(step, m // 2)):
                assert all(torch.equal(w, g) for w, g in zip(want, got)), (step, m)


def test_same_step_same_batch_any_order(mix_dir):
    cfg = DataConfig(data_dir=mix_dir, seq_len=32, mixture={"a": 0.5, "b": 0.5})
    l1, l2 = Loader(cfg, TOK(cfg), 4, 2, seed=3), Loader(cfg, TOK(cfg), 4, 2, seed=3)
    in_order = {(s, m): l1.get(s, m) for s in range(6) for m in range(2)}
    backwards = {(s, m): l2.get(s, m) for s in (5, 4, 3, 2, 1, 0) for m in (1, 0)}  # e.g. after a resume
    for key, batch in in_order.items():
        assert all(torch.equal(u, v) for u, v in zip(batch, backwards[key])), key
    assert not torch.equal(Loader(cfg, TOK(cfg), 4, 2, seed=4).get(0, 0)[0], in_order[0, 0][0])


def test_rows_cover_each_epoch_once_and_match_the_stream(mix_dir, byte_tok):
    T = 32
    loader = Loader(*TOKD(data_dir=mix_dir, seq_len=T, mixture={"a": 1.0}), 1, 1, seed=0)
    R = loader.rows["a"]
    stream = np.fromfile(os.path.join(mix_dir, "a", "train_00000.bin"), dtype=np.uint16, offset=128)
    assert R == (len(stream) - 1) // T
    epochs = [[loader.locate(s, 0)[1][0] for s in range(e * R, (e + 1) * R)] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(R)) and epochs[0] != epochs[1]
    # row r is tokens [r*T, r*T + T + 1) of the shard, read here straight from the file
    loader = Loader(*TOKD(data_dir=mix_dir, seq_len=T, mixture={"a": 1.0}), 6, 1, seed=0)
    x, y, _ = loader.get(2, 0)
    for i, r in enumerate(loader.locate(2, 0)[1].tolist()):
        assert x[i].tolist() == stream[r * T:r * T + T].tolist()
        assert y[i].tolist() == stream[r * T + 1:r * T + T + 1].tolist()


def test_mixture_within_one_percent_over_10k_rows(mix_dir):
    for weights in ({"a": 0.7, "b": 0.2, "c": 0.1}, {"a": 0.5, "b": 0.333, "c": 0.167}):
        loader = Loader(*TOKD(data_dir=mix_dir, seq_len=16, mixture=weights), 50, 1, seed=1)
        src = sum((_source_of_rows(loader.get(s, 0)[0]) for s in range(200)), [])
        assert len(src) == 10_000
        for s, w in weights.items():
            assert abs(src.count(s) / len(src) - w / sum(weights.values())) < 0.01, (weights, s)


def test_mixture_counts_stay_within_the_number_of_sources():
    """The exact claim of the loader's comment: for all n <= 100,000, |count_k(n) - n*w_k| < number of sources."""
    n = np.arange(100_001, dtype=np.int64)
    for weights in ({"a": 0.7, "b": 0.2, "c": 0.1}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"a": 0.85, "b": 0.15},
                    {"a": 0.63, "b": 0.24, "c": 0.13, "d": 1e-4}, {"a": 0.001, "b": 0.999}, {"a": 1.0}):
        names = sorted(weights)
        counts = data._counts(data._levels(weights, names), n, len(names))
        assert (sum(counts) == n).all()
        for k, name in enumerate(names):
            w = weights[name] / sum(weights.values())
            assert np.abs(counts[k] - n * w).max() < len(names), (weights, name)
            assert (np.diff(counts[k]) >= 0).all() and (np.diff(counts[k]) <= 1).all()  # one sample at a time


def test_ids_outside_the_vocabulary_name_the_shard_and_offset(tmp_path, byte_tok):
    byte_tok.save(str(tmp_path / "tokenizer.json"))
    stream = np.full(200, 97)
    stream[150] = byte_tok.n_vocab + 5  # a corrupt id: it must not reach the embedding
    os.makedirs(tmp_path / "s")
    n_tok, _ = data.write_shard(str(tmp_path / "s" / "train_00000.bin"), [(stream, 1)], byte_tok.hash, 2)
    shard = {"path": "s/train_00000.bin", "tokens": n_tok, "documents": 1}
    (tmp_path / "manifest.json").write_text(json.dumps({
        "version": 1, "tokenizer_hash": byte_tok.hash, "n_vocab": byte_tok.n_vocab, "sources": {"s": {
            split: {"files": [], "documents": 1, "tokens": n_tok, "shards": [shard]} for split in ("train", "val")}}}))
    loader = Loader(*TOKD(data_dir=str(tmp_path), seq_len=16, mixture={"s": 1.0}), 12, 1, 0)
    with pytest.raises(ValueError, match=rf"s/train_00000.bin: token id {byte_tok.n_vocab + 5} at offset 150 is "
                                         rf"outside the vocabulary \({byte_tok.n_vocab} ids\)"):
        loader.get(0, 0)  # 12 of the 12 rows: the one holding offset 150 among them
    with pytest.raises(ValueError, match="at offset 150 is outside the vocabulary"):
        loader.val_rows("s", 12)


def test_stages_switch_at_their_start_step(mix_dir):
    G = 8
    cfg = DataConfig(data_dir=mix_dir, seq_len=16, mixture={"a": 1.0},
                     stages=[[5, {"b": 0.5, "c": 0.5}], [9, {"a": 0.75, "b": 0.25}]])
    loader = Loader(cfg, TOK(cfg), G, 1, seed=0)
    assert loader.weights_at(4) == {"a": 1.0} and loader.weights_at(5) == {"b": 0.5, "c": 0.5}
    assert loader.weights_at(9) == {"a": 0.75, "b": 0.25}
    seen = {s: set(_source_of_rows(loader.get(s, 0)[0])) for s in range(14)}
    assert all(seen[s] == {"a"} for s in range(5))
    assert all(seen[s] <= {"b", "c"} for s in range(5, 9))
    assert set().union(*(seen[s] for s in range(5, 9))) == {"b", "c"}
    later = sum((_source_of_rows(loader.get(s, 0)[0]) for s in range(9, 59)), [])
    assert abs(later.count("a") / len(later) - 0.75) < 0.01
    # source a continues its epoch after the b/c stage: no row repeats before all its rows were drawn
    draws = [r for s in range(140) for src, r in zip(*(v.tolist() for v in loader.locate(s, 0)))
             if loader.sources[src] == "a"]
    R = loader.rows["a"]
    assert len(draws) >= R and len(set(draws[:R])) == R
    with pytest.raises(ValueError, match=r"stages\[1\]: start step 5"):
        Loader(*TOKD(data_dir=mix_dir, stages=[[5, {"a": 1.0}], [5, {"b": 1.0}]]), 1, 1, 0)
    with pytest.raises(ValueError, match="no train split of source 'web'"):
        Loader(*TOKD(data_dir=mix_dir, mixture={"web": 1.0}), 1, 1, 0)


def test_pos_restarts_at_every_document_start(tmp_path, byte_tok):
    byte_tok.save(str(tmp_path / "tokenizer.json"))
    eos, T = byte_tok.eos_id, 16
    lengths = [3, 1, 40, 16, 15, 2, 1, 1, 30, 5]  # with its EOT, each document is length + 1 tokens
    stream, doc_starts = [], []
    for k, n in enumerate(lengths):
        doc_starts.append(len(stream))
        stream += [65 + k] * n + [eos]
    tok_hash = byte_tok.hash
    os.makedirs(tmp_path / "s")
    n_tok, n_docs = data.write_shard(str(tmp_path / "s" / "val_00000.bin"), [(np.array(stream), len(lengths))],
                                     tok_hash, 2)
    shard = {"path": "s/val_00000.bin", "tokens": n_tok, "documents": n_docs}
    manifest = {"version": 1, "tokenizer_hash": tok_hash, "n_vocab": byte_tok.n_vocab,
                "sources": {"s": {split: {"files": [], "documents": n_docs, "tokens": n_tok, "shards": [shard]}
                                  for split in ("train", "val")}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = Loader(*TOKD(data_dir=str(tmp_path), seq_len=T, mixture={"s": 1.0}), 2, 1, 0)
    n_rows = (len(stream) - 1) // T
    x, y, pos = loader.val_rows("s", n_rows)
    for r in range(n_rows):
        assert x[r].tolist() == stream[r * T:(r + 1) * T] and y[r].tolist() == stream[r * T + 1:(r + 1) * T + 1]
        for t in range(T):
            o = r * T + t
            assert pos[r, t] == o - max([r * T] + [s for s in doc_starts if s <= o]), (r, t)
    x3, y3, _ = loader.val_rows("s", 3)  # fewer rows: evenly spaced over the split
    for r in range(3):
        assert torch.equal(x3[r], x[r * n_rows // 3]) and torch.equal(y3[r], y[r * n_rows // 3])
    with pytest.raises(ValueError, match=f"source 's' has {n_rows} val rows of 17 tokens; asked for {n_rows + 1} "
                                         rf"\(eval_rows must be at most {n_rows}\)"):
        loader.val_rows("s", n_rows + 1)


# -------------------------------------------------------------------------------------------- prepare

def test_prepare_writes_exact_streams_in_parallel_and_skips_done_shards(tmp_path):
    tok = data.train_bpe(["def f(x):\n    return x + 1\n", "The answer is 42. " * 20], 280)
    docs = [f"doc {i}: " + "x = 1 + 2 " * (700 + i % 7) + "é☃ end" for i in range(300)]  # 2.1 MB: 8 batches
    (tmp_path / "one.txt").write_text("a single text file\n", encoding="utf-8")
    files = [str(tmp_path / "one.txt"), _write_jsonl(tmp_path / "d.jsonl", [{"body": d} for d in docs])]
    want = [*tok.encode("a single text file\n"), tok.eos_id]
    for d in docs:
        want += tok.encode(d) + [tok.eos_id]
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    entry = data.prepare(files, str(out1), tok, "web", field="body")
    data.prepare(files, str(out2), tok, "web", field="body")
    got = np.concatenate([data.open_shard(str(out1 / s["path"]), tok.hash) for s in entry["shards"]])
    assert got.dtype == np.uint16 and got.tolist() == want
    assert entry["documents"] == 301 and entry["tokens"] == len(want)
    for s in entry["shards"]:
        assert (out1 / s["path"]).read_bytes() == (out2 / s["path"]).read_bytes()  # deterministic
    manifest = json.loads((out1 / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == tok.hash and manifest["sources"]["web"]["train"]["tokens"] == len(want)
    stamps = {s["path"]: os.stat(out1 / s["path"]).st_mtime_ns for s in entry["shards"]}
    assert data.prepare(files, str(out1), tok, "web", field="body") == entry
    assert stamps == {s["path"]: os.stat(out1 / s["path"]).st_mtime_ns for s in entry["shards"]}  # skipped
    assert _leftovers(out1) == sorted(s["path"] for s in entry["shards"])


def test_prepare_uses_uint32_past_65536_ids(tmp_path):
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)][:65_300]
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({p: 256 + i for i, p in enumerate(p for p in pairs if p not in ranks)})
    tok = Tokenizer(ranks, {s: len(ranks) + i for i, s in enumerate(data.SPECIALS.values())})
    assert tok.n_vocab > 1 << 16
    text = "zz zy yz " * 10  # pairs of high bytes: ranks above 65,535
    entry = data.prepare([_write_jsonl(tmp_path / "t.jsonl", [{"text": text}])], str(tmp_path / "o"), tok, "s")
    got = data.open_shard(str(tmp_path / "o" / entry["shards"][0]["path"]), tok.hash)
    assert got.dtype == np.uint32 and got.tolist() == tok.encode(text) + [tok.eos_id] and got.max() > 65_535


def test_bad_inputs_are_clear_errors_and_leave_no_shard(tmp_path, byte_tok):
    out = str(tmp_path / "out")

    def fails(files, match, **kw):
        with pytest.raises(ValueError, match=match):
            data.prepare(files, out, byte_tok, "web", **kw)
        assert _leftovers(tmp_path) == [] and not os.path.exists(out)  # no shard, no empty directory

    fails([str(tmp_path / "missing.jsonl")], "input file not found: .*missing.jsonl")
    (tmp_path / "empty.txt").write_text("")
    fails([str(tmp_path / "empty.txt")], r"empty.txt: empty file \(no documents\)")
    fails([_write_jsonl(tmp_path / "blank.jsonl", [])], r"blank.jsonl: empty file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "never read"}\n')
    fails([str(bad)], re.escape(f"{bad}:3: malformed JSON line"))
    fails([_write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"content": "x"}])],
          r"nofield.jsonl:2: missing field 'text' \(choose another with --field\)")
    fails([_write_jsonl(tmp_path / "int.jsonl", [{"text": 3}])], r"int.jsonl:1: expected field 'text' of type str, got int")
    (tmp_path / "latin1.txt").write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
    fails([str(tmp_path / "latin1.txt")], r"latin1.txt:2: not UTF-8 text \(invalid continuation byte at byte 12\)")
    (tmp_path / "a.csv").write_text("x")
    fails([str(tmp_path / "a.csv")], "unsupported input type")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        fails([str(tmp_path / "t.parquet")], "reading .parquet needs pyarrow")
    # a failure after several batches were encoded: the half-written shard is removed, no .bin appears
    many = [{"text": "y" * 5000} for _ in range(100)] + ["not an object"]
    with pytest.raises(ValueError, match=r"late.jsonl:101: expected a JSON object"):
        data.prepare([_write_jsonl(tmp_path / "late.jsonl", many)], out, byte_tok, "web")
    assert _leftovers(tmp_path) == [] and multiprocessing.active_children() == [] and not os.path.exists(out)


def test_shard_checks_tokenizer_and_size(tmp_path, mix_dir, byte_tok):
    other = data.train_bpe(["some other text " * 50], 270)
    src = os.path.join(mix_dir, "a", "val_00000.bin")
    with pytest.raises(ValueError, match=f"val_00000.bin: shard was written with tokenizer {byte_tok.hash}, "
                                         f"but the tokenizer in use is {other.hash}"):
        data.open_shard(src, other.hash)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="dataset was tokenized with"):
        Loader(*TOKD(data_dir=mix_dir, tokenizer=str(tmp_path / "other.json"), mixture={"a": 1.0}), 1, 1, 0)
    blob = open(src, "rb").read()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(blob[:-3])
    with pytest.raises(ValueError, match=r"cut.bin: truncated shard: its header promises \d+ tokens"):
        data.open_shard(str(cut), byte_tok.hash)
    cut.write_bytes(blob[:50])
    with pytest.raises(ValueError, match="cut.bin: truncated shard"):
        data.open_shard(str(cut), byte_tok.hash)
    cut.write_bytes(b"X" * len(blob))
    with pytest.raises(ValueError, match="cut.bin: not a nanosmol token shard"):
        data.open_shard(str(cut), byte_tok.hash)


def test_command_line_usage(capsys):
    for argv, code in (([], 2), (["-h"], 0), (["--help"], 0)):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == code and "python data.py prepare" in "".join(capsys.readouterr())


def test_default_command_reads_the_data_dir_and_the_models_vocab_size(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(data, "prepare_default", lambda *args: calls.append(args))
    tiny = os.path.join(os.path.dirname(__file__), "..", "config", "tiny.py")
    data.main(["default", tiny, f"--data_dir={tmp_path}", "--vocab_size=300"])
    assert calls == [(str(tmp_path), 300)]


# ----------------------------------------------------------------------------------- default corpus

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _evaluate(expr):
    def ev(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant)
        return node.value
    return ev(ast.parse(expr, mode="eval").body)


def _check_solution(question, lines, answer):
    """Every line holds one correct equation; operands come from the question or earlier results (word
    problems); 'Compute'/'Evaluate' questions re-evaluate to the answer; the answer is the last result."""
    known, result = set(map(int, re.findall(r"\d+", question))), None
    for line in lines:
        (a, op, b, c), = _EQ.findall(line)
        a, b, c = int(a), int(b), int(c)
        assert _evaluate(f"{a} {op} {b}") == c, line
        if not question.startswith(("Compute", "Evaluate")):
            assert a in known and b in known, (question, line)
        known.add(c)
        result = c
    assert result == answer
    m = re.fullmatch(r"(?:Compute|Evaluate) (.*)\.", question)
    if m:
        assert _evaluate(m.group(1)) == answer


def test_generated_math_answers_verify():
    sets = {name: data.problems(name, 300) for name in data.DEFAULT_SIZES}
    for name in ("math_train", "math_val", "math_test"):
        for q, lines, a in sets[name]:
            _check_solution(q, lines, a)
            assert ev.extract_answer(data.math_text(q, lines, a)) == str(a)
    rows = pt.default_sets(300)
    assert {k: len(v) for k, v in rows.items()} == {k: 300 for k in rows}
    think = 0
    for row in rows["sft_train"] + rows["sft_val"]:
        msgs = row["messages"]
        assert msgs[0]["role"] == "system" and msgs[0]["content"].endswith(("/think", "/no_think"))
        for q, a in zip(msgs[1::2], msgs[2::2]):
            ans = ev.extract_answer(a["content"])
            if msgs[0]["content"].endswith("/think"):
                steps = re.fullmatch(r"<think>\n(.*)\n</think>\nThe answer is \d+\.", a["content"], re.S).group(1)
                _check_solution(q["content"], steps.split("\n"), int(ans))
                think += 1
            else:
                assert re.fullmatch(r"The answer is \d+\.", a["content"])
    assert 0.4 < think / len(rows["sft_train"] + rows["sft_val"]) < 0.6
    think = 0
    for row in rows["pref_train"]:
        q, chosen, rejected = row["prompt"][-1]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]
        good, bad = ev.extract_answer(chosen), ev.extract_answer(rejected)
        assert good != bad
        m = re.fullmatch(r"(?:Compute|Evaluate) (.*)\.", q)
        if m:
            assert _evaluate(m.group(1)) == int(good) != int(bad)
        if row["prompt"][0]["content"].endswith("/think"):
            # the rejected reply is the chosen one up to its final answer, which contradicts the worked steps
            assert rejected.rsplit("\n", 1)[0] == chosen.rsplit("\n", 1)[0] and chosen.startswith("<think>")
            _check_solution(q, chosen.split("\n")[1:-2], int(good))
            think += 1
        else:   # /no_think: the answer alone; the rejected one is a number of the question
            assert chosen == f"The answer is {good}." and rejected == f"The answer is {bad}."
            assert bad in re.findall(r"\d+", q)
    assert 0.4 < think / len(rows["pref_train"]) < 0.6
    for row in rows["rl_train"]:
        m = re.fullmatch(r"(?:Compute|Evaluate) (.*)\.", row["prompt"][0]["content"])
        if m:
            assert _evaluate(m.group(1)) == int(row["answer"])
    for row in ev._math_mc():
        assert len(set(row["choices"])) == 4
        m = re.fullmatch(r"(?:Compute|Evaluate) (.*)\.", row["stem"])
        if m:
            assert _evaluate(m.group(1)) == int(row["choices"][row["gold"]])
    held = {q for q, _, _ in sets["math_test"]}
    assert len(held) == 300
    train_q = {q for name in ("math_train", "sft_train", "pref_train", "rl_train") for q, _, _ in sets[name]}
    assert not held & train_q and not {q for q, _, _ in data.problems("pref_val")} & train_q
    assert pt.default_sets(300) == rows and data.problems("math_test", 300) == sets["math_test"]  # deterministic


def test_prepare_default_builds_once(tmp_path):
    d = str(tmp_path / "default")
    data.prepare_default(d, 512)
    manifest = json.loads(open(os.path.join(d, "manifest.json")).read())
    code = manifest["sources"]["code"]
    assert set(manifest["sources"]) == {"code", "math"}
    assert all(set(v) == {"train", "val"} for v in manifest["sources"].values())
    assert not set(code["train"]["files"]) & set(code["val"]["files"]) and code["val"]["documents"] > 5
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in code["train"]["files"])
    tok = data.load_tokenizer(DataConfig(data_dir=d))
    assert tok.n_vocab == 512
    def stamps():
        return {f: os.stat(os.path.join(dp, f)).st_mtime_ns for dp, _, fs in os.walk(d) for f in fs
                if f != "manifest.json"}
    before = stamps()
    data.prepare_default(d, 512)
    assert stamps() == before  # nothing rebuilt
    x, y, pos = Loader(*TOKD(data_dir=d, seq_len=64), 4, 1, seed=0).get(0, 0)
    assert x.shape == (4, 64) and int(x.max()) < 512
    with pytest.raises(ValueError, match="has 512 ids but vocab_size is 1024"):
        data.prepare_default(d, 1024)
