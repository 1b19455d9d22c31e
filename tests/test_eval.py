"""eval.py against oracles: bits per byte of a uniform model (log2 V per token), answers extracted from
hand-written strings, scores of a stub scorer with known log-probs computed by hand, every file format from
a small fixture, and per-choice log-likelihoods from transformers' SmolLM3ForCausalLM."""
import json
import math
import statistics
import xml.etree.ElementTree as ET

import pytest
import torch

import data
import eval as ev
import posttrain as pt
from data import Tokenizer
from model import Model, ModelConfig
from test_tokenizer import tiny_hf, write

MODEL = dict(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_position_embeddings=128,
             nope_interval=2, rope_theta=10000.0)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- bits per byte --------------------------------------------------------------------------------------

def test_bpb_of_a_uniform_model_is_log2_vocab_per_token(tmp_path):
    tok = Tokenizer.byte_level()
    model = Model(ModelConfig(**MODEL))
    torch.nn.init.zeros_(model.tok_emb.weight)       # tied head: every logit is 0, every token 1 / V
    (tmp_path / "a.txt").write_text("héllo wörld", encoding="utf-8")
    text_ids = list("héllo wörld".encode()) + [tok.eos_id]   # 13 bytes, then EOT
    data.write_shard(str(tmp_path / "a.bin"), [(text_ids * 3, 3)], tok.hash, 2)
    for name, ids in (("a.txt", text_ids), ("a.bin", text_ids * 3)):
        x, y, pos = ev.file_rows(str(tmp_path / name), tok, seq_len=8)
        assert (y != -100).sum() == len(ids) - 1 and torch.equal(y[y != -100], torch.tensor(ids[1:]))
        loss, bpb = ev.evaluate(model, {name: (x, y, pos)}, torch.from_numpy(tok.token_bytes()), 2,
                                torch.autocast("cpu", enabled=False), torch.device("cpu"))
        n_bytes = sum(t < 256 for t in ids[1:])           # the first token is never predicted; EOT has no bytes
        assert loss[name] == pytest.approx(math.log(264), rel=1e-6)
        assert bpb[name] == pytest.approx(math.log2(264) * (len(ids) - 1) / n_bytes, rel=1e-6)


# ---- answers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,answer", [
    ("no answer here", None),
    ("3 apples and 4 pears make 7 fruit", "7"),                       # last number
    ("#### 1,234", "1234"),
    ("The answer is -5. Then 9 more words 10", "-5"),                 # a marker beats the last number
    ("so \\boxed{+12} and The answer is 3", "12"),                    # boxed beats 'The answer is'
    ("#### 4\n\\boxed{5}", "4"),                                      # '####' beats boxed
    ("The answer is 2. No, the answer is 3.5.", "3.5"),               # the last one wins
    ("<think>The answer is 8</think>", None),                         # only inside the reasoning
    ("<think>\n6 * 7 = 42\n</think>\nThe answer is 42.<|im_end|>", "42"),
    ("<think>I think 9 is right, unclosed", None),
    ("1, 2, 3 then 3-5", "5"),                                        # commas of a list, a minus between digits
    ("<|im_start|>assistant\nIt is $1,000,000<|end_of_text|>", "1000000"),
])
def test_extract_answer_on_tricky_strings(text, answer):
    assert ev.extract_answer(text) == answer


def test_strip_think_and_check_answer():
    assert ev.strip_think("<think>\nsteps 1 2\n</think>\nIt is 3.") == "\nIt is 3."
    assert ev.strip_think("a <think>b") == "a " and ev.strip_think("plain") == "plain"
    assert ev.check_answer("The answer is 3.50", "3.5") and ev.check_answer("#### 1,234", "1234")
    assert not ev.check_answer("<think>The answer is 4</think>The answer is 5", "4")
    assert not ev.check_answer("nothing", "0") and not ev.check_answer("__import__('os') 7", "6")


def test_generated_math_answers_extract():
    for q, lines, a in data.problems("math_test", 50):
        assert ev.check_answer(data.math_text(q, lines, a), str(a))
    for row in pt.default_sets(50)["sft_val"]:
        assert ev.extract_answer(row["messages"][-1]["content"]) is not None


def test_exact_match_renders_the_chat_template_and_scores(tmp_path, monkeypatch):
    tok = Tokenizer.byte_level()
    model = Model(ModelConfig(**MODEL))
    rows = [("What is 2+2?", "4"), ("What is 3*3?", "9")]
    replies = {0: "<think>\n2+2=4\n</think>\nThe answer is 4.", 1: "The answer is 8."}
    seen = []

    def generate(prompts, max_new_tokens, temperature, stop_ids, generator):
        seen.extend(prompts)
        assert tok.im_end_id in stop_ids and tok.eos_id in stop_ids
        return [tok.encode(replies[(len(seen) - len(prompts) + i) % 2]) + [tok.im_end_id] for i in range(len(prompts))]
    monkeypatch.setattr(model, "generate", generate)
    score, texts, form = ev.exact_match(model, tok, rows, chat=True, think=True, batch_size=1)
    assert score == 0.5 and texts == [replies[0], replies[1]]
    assert form == 0.5                         # the second reply has no <think> block in /think mode
    want = [data.render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True,
                             enable_thinking=True, today=ev._EVAL_DAY)[0] for q, _ in rows]
    assert seen == want
    seen.clear()
    ev.exact_match(model, tok, rows[:1], chat=True, think=False)
    assert tok.decode(seen[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n")   # /no_think
    seen.clear()
    ev.exact_match(model, tok, rows[:1], chat=False, samples=3, temperature=1.0)
    assert seen == [tok.encode("Problem: What is 2+2?\nSolution:\n")] * 3
    with pytest.raises(ValueError, match="samples > 1 needs temperature > 0"):
        ev.exact_match(model, tok, rows, samples=2)


def test_chat_keeps_the_conversation_and_drops_its_oldest_exchanges(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    Model(ModelConfig(**{**MODEL, "max_position_embeddings": 2048})).save_pretrained(tmp_path / "ckpt")
    tok = Tokenizer.byte_level()
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    user = lambda text: {"role": "user", "content": text}                          # noqa: E731
    prompt = lambda messages, think: data.render_chat(tok, messages, add_generation_prompt=True,  # noqa: E731
                                                      enable_thinking=think)[0]
    # a real greedy reply: what model.generate continues the rendered prompt with, up to <|im_end|>
    ev.main(["chat", str(tmp_path / "ckpt"), "--prompt=What is 2+2?", "--max_new_tokens=12"])
    model = Model.from_pretrained(str(tmp_path / "ckpt"))
    want = model.generate([prompt([user("What is 2+2?")], False)], 12, stop_ids=[tok.im_end_id, tok.eos_id])[0]
    assert capsys.readouterr().out == ev.completion_text(tok, want) + "\n"

    think = "<think>\n3+6\n</think>\nThe answer is 9."
    replies = iter(["Four.", "Six.", think, "Ten."])
    seen = []

    def generate(self, prompts, max_new_tokens, temperature, stop_ids, generator):
        seen.append(prompts[0])
        return [tok.encode(next(replies)) + [tok.im_end_id]]
    monkeypatch.setattr(Model, "generate", generate)
    a1, a3 = {"role": "assistant", "content": "Four."}, {"role": "assistant", "content": think}
    long = "What is 2+2? " + "Say it twice. " * 20
    # max_new_tokens that leave room for the last two exchanges, not for the long first one and the next question
    budget = 2048 - len(prompt([user("And 3+6?"), a3, user("Then 3+7?")], True))
    assert len(prompt([user(long), a1, user("And 2+4?")], True)) + budget > 2048
    lines = [long, "", "And 2+4?", "/clear", "And 3+6?", "Then 3+7?"]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(lines) + "\n"))
    ev.main(["chat", str(tmp_path / "ckpt"), "--think=True", f"--max_new_tokens={budget}"])
    out = capsys.readouterr().out
    assert [ln for ln in out.split("> ")[1:] if ln.strip()] == ["Four.\n", "Six.\n", think + "\n", "Ten.\n"]
    assert seen == [prompt([user(long)], True), prompt([user("And 2+4?")], True),   # the long exchange dropped
                    prompt([user("And 3+6?")], True),                               # after /clear
                    prompt([user("And 3+6?"), a3, user("Then 3+7?")], True)]        # a /think reply, reasoning kept
    with pytest.raises(SystemExit, match="chat: expected one checkpoint directory"):
        ev.main(["chat"])


def test_gsm8k_rows_and_errors(tmp_path):
    path = jsonl(tmp_path / "g.jsonl", [{"question": "Q1", "answer": "steps\n#### 1,200"}, {"question": "Q2"}])
    with pytest.raises(ValueError, match=r"g.jsonl:2: missing field 'answer'"):
        ev.gsm8k_rows(path)
    path = jsonl(tmp_path / "g.jsonl", [{"question": "Q1", "answer": "steps\n#### 1,200"},
                                        {"question": "Q2", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"g.jsonl:2: field 'answer' has no final '#### N'"):
        ev.gsm8k_rows(path)
    assert ev.gsm8k_rows(jsonl(tmp_path / "h.jsonl", [{"question": "Q1", "answer": "#### -3"}])) == [("Q1", "-3")]


# ---- file formats ------------------------------------------------------------------------------------------

FORMATS = {
    "hellaswag": ({"ctx_a": "A man sits.", "ctx_b": "he", "endings": ["runs.", "eats."], "label": "1"},
                  {"stem": "A man sits. He", "choices": ["runs.", "eats."], "gold": 1, "ctx": "A man sits. He"}),
    "arc": ({"question": {"stem": "Sky?", "choices": [{"text": "blue", "label": "A"}, {"text": "red", "label": "B"}]},
             "answerKey": "B"},
            {"stem": "Sky?", "choices": ["blue", "red"], "gold": 1, "ctx": "Question: Sky?\nAnswer:"}),
    "mmlu": ({"question": "2+2?", "choices": ["3", "4"], "answer": 1},
             {"stem": "2+2?", "choices": ["3", "4"], "gold": 1, "ctx": "Question: 2+2?\nAnswer:"}),
    "piqa": ({"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0},
             {"stem": "Open a jar", "choices": ["twist", "shout"], "gold": 0, "ctx": "Question: Open a jar\nAnswer:"}),
    "winogrande": ({"sentence": "Tom gave Ann a gift because _ was kind.", "option1": "Tom", "option2": "Ann",
                    "answer": "1"},
                   {"stem": "Tom gave Ann a gift because _ was kind.", "choices": ["Tom", "Ann"], "gold": 0,
                    "ctxs": ["Tom gave Ann a gift because Tom", "Tom gave Ann a gift because Ann"],
                    "cont": " was kind."}),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_parses_and_names_a_missing_field(tmp_path, fmt):
    line, want = FORMATS[fmt]
    path = jsonl(tmp_path / f"{fmt}.jsonl", [line, line])
    assert ev.read_task(path, ev.PARSERS[fmt]) == [want, want]
    key = next(iter(line))
    broken = {k: v for k, v in line.items() if k != key}
    path = jsonl(tmp_path / f"{fmt}.jsonl", [line, broken])
    with pytest.raises(ValueError, match=rf"{fmt}.jsonl:2: missing field '{key}'"):
        ev.read_task(path, ev.PARSERS[fmt])


def test_mmlu_answer_as_index_or_letter():
    row = {"question": "2 + 2?", "choices": ["3", "4", "5", "6"]}
    assert [ev._mmlu("m.jsonl", 1, {**row, "answer": a})["gold"] for a in (1, "1", "B", "D")] == [1, 1, 1, 3]
    with pytest.raises(ValueError, match=r"m.jsonl:1: field 'answer' is 'E', expected an index 0..3"):
        ev._mmlu("m.jsonl", 1, {**row, "answer": "E"})


def test_hellaswag_wikihow_markup_is_cleaned():
    row = {"ctx_a": "[header] Making tea [title] Boil water.", "ctx_b": "", "label": 0,
           "endings": ["[step] Pour it [substeps] slowly.", "Drink it."]}
    q = ev._hellaswag("h.jsonl", 1, row)
    assert q["ctx"] == "Making tea. Boil water." and q["choices"] == ["Pour it slowly.", "Drink it."]


def test_arc_flat_forms_and_numeric_labels(tmp_path):
    want = {"stem": "Sky?", "choices": ["blue", "red", "green"], "gold": 2, "ctx": "Question: Sky?\nAnswer:"}
    rows = [{"question": "Sky?", "choices": {"text": ["blue", "red", "green"], "label": ["1", "2", "3"]},
             "answerKey": "3"},
            {"question_stem": "Sky?", "choices": {"text": ["blue", "red", "green"], "label": ["A", "B", "C"]},
             "answerKey": "C"},                                                     # OpenBookQA's HF form
            {"question": {"stem": "Sky?", "choices": [{"text": t, "label": str(i + 1)}
                                                      for i, t in enumerate(["blue", "red", "green"])]},
             "answerKey": "3"}]
    assert ev.read_task(jsonl(tmp_path / "arc.jsonl", rows), ev._arc) == [want] * 3
    bad = [{**rows[0], "answerKey": "D"}]
    with pytest.raises(ValueError, match=r"arc.jsonl:1: answerKey 'D' is not one of the labels \['1', '2', '3'\]"):
        ev.read_task(jsonl(tmp_path / "arc.jsonl", bad), ev._arc)
    with pytest.raises(ValueError, match=r"w.jsonl:1: field 'answer' is '3', expected an index 1..2"):
        ev.read_task(jsonl(tmp_path / "w.jsonl", [{**FORMATS["winogrande"][0], "answer": "3"}]), ev._winogrande)


# ---- scoring with a stub of known log-probs ------------------------------------------------------------------

def stub_scorer(logprob):
    """A scorer whose continuation log-prob is sum(logprob(context, char)) over the continuation's chars."""
    return lambda questions: [[sum(logprob(c, ch) for ch in a) for c, a in q] for q in questions]


def test_acc_and_acc_norm_disagree_when_answer_lengths_differ():
    tok = Tokenizer.byte_level()
    rows = [{"stem": "Q", "choices": ["ab", "abcdefgh"], "gold": 1, "ctx": "Q:"}]
    qs = ev.with_shots(rows, mcf=False, k=0, seed=0)
    assert qs == [[("Q:", " ab"), ("Q:", " abcdefgh")]]
    # every character costs -1: " ab" sums to -3 (acc picks it), per character both are -1 (a tie: the first
    # wins); make the long answer's characters cheaper so that only acc_norm picks it
    scores = stub_scorer(lambda c, ch: -0.5 if ch in "cdefgh" else -1.0)(qs)
    assert scores == [[-3.0, -6.0]]                   # per char: -1.0 vs -6/9 = -0.667
    m = ev.mc_metrics(tok, qs, scores, [1])
    assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_token": 1.0}   # byte-level: tokens = characters


def test_mcf_scores_the_letter():
    rows = [{"stem": "2+2?", "choices": ["3", "4", "5"], "gold": 1, "ctx": "unused"}]
    qs = ev.with_shots(rows, mcf=True, k=0, seed=0)
    ctx = "Question: 2+2?\nA. 3\nB. 4\nC. 5\nAnswer:"
    assert qs == [[(ctx, " A"), (ctx, " B"), (ctx, " C")]]
    scores = stub_scorer(lambda c, ch: {"A": -2.0, "B": -0.5, "C": -1.0}.get(ch, 0.0))(qs)
    assert scores == [[-2.0, -0.5, -1.0]]
    assert ev.mc_metrics(Tokenizer.byte_level(), qs, scores, [1])["acc"] == 1.0


def test_winogrande_partial_scoring():
    _, row = FORMATS["winogrande"]
    qs = ev.with_shots([row], mcf=False, k=0, seed=0)
    assert qs == [[("Tom gave Ann a gift because Tom", " was kind."),
                   ("Tom gave Ann a gift because Ann", " was kind.")]]
    # the same continuation, likelier after "Tom": -0.1 per char vs -0.2 -> option 1 (gold 0)
    scores = stub_scorer(lambda c, ch: -0.1 if c.endswith("Tom") else -0.2)(qs)
    assert scores[0][0] == pytest.approx(-1.0) and scores[0][1] == pytest.approx(-2.0)
    assert ev.mc_metrics(Tokenizer.byte_level(), qs, scores, [0]) == {"acc": 1.0, "acc_norm": 1.0, "acc_token": 1.0}


def test_k_shot_prompt_exactly():
    rows = [{"stem": f"q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2, "ctx": f"Question: q{i}\nAnswer:"}
            for i in range(3)]
    qs = ev.with_shots(rows, mcf=False, k=2, seed=0)
    # question 0's shots are the other two rows, in file order, each with its gold answer
    shots = "Question: q1\nAnswer: b1\n\nQuestion: q2\nAnswer: a2\n\n"
    assert qs[0] == [(shots + "Question: q0\nAnswer:", " a0"), (shots + "Question: q0\nAnswer:", " b0")]
    one = ev.with_shots(rows * 4, mcf=True, k=1, seed=7)
    assert one == ev.with_shots(rows * 4, mcf=True, k=1, seed=7)                # a fixed seed, the same draws
    shot = one[0][0][0].split("\n\n")[0]                                        # "Question: qJ ... Answer: L"
    assert one[0][0][0].count("Answer:") == 2 and shot.endswith("Answer: " + "AB"[int(shot[len("Question: q")]) % 2])


# ---- the model scorer against transformers ------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 6])
def test_per_choice_loglik_matches_transformers(tmp_path, window):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    model = Model(ModelConfig(**MODEL, sliding_window=window)).eval()
    model.save_pretrained(tmp_path)
    theirs = transformers.SmolLM3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _, wino = FORMATS["winogrande"]
    rows = [{"stem": "Sky?", "choices": ["blue", "dark red", "g"], "gold": 0, "ctx": "Question: Sky?\nAnswer:"},
            {"stem": "A longer question here?", "choices": ["yes", "no"], "gold": 1, "ctx": "Q: A longer question?"},
            wino]
    qs = ev.with_shots(rows, mcf=False, k=1, seed=0) + ev.with_shots(rows, mcf=True, k=0, seed=0)
    got = ev.model_scorer(model, tok, batch_size=2)(qs)              # padding, shared contexts, Winogrande
    for q, scores in zip(qs, got):
        for (ctx, cont), s in zip(q, scores):
            c, a = tok.encode(ctx), tok.encode(cont)
            with torch.no_grad():
                logp = torch.log_softmax(theirs(input_ids=torch.tensor([c + a])).logits[0].double(), -1)
            want = sum(logp[len(c) - 1 + i, t].item() for i, t in enumerate(a))
            assert s == pytest.approx(want, abs=1e-4)          # fp32 sums of up to ~10 log-probs


# ---- signal analysis ---------------------------------------------------------------------------------------

def test_rank_correlations_on_hand_computed_values():
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60; tau: 5 concordant, 1 discordant pair of 6
    assert ev.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert ev.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties: x ranks 1, 2.5, 2.5, 4 and y 1, 2, 3.5, 3.5, centred (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 1, 1):
    # sum of products 2.25 + 1.5 = 3.75, squared norms 4.5 and 4.5
    assert ev.spearman([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(3.75 / 4.5)
    # tau-b: 4 concordant, 0 discordant, one pair tied in x, one in y: 4 / sqrt(5 * 5)
    assert ev.kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert ev.kendall_tau([3, 2, 1], [1, 2, 3]) == -1.0 and math.isnan(ev.spearman([1, 1], [1, 2]))


def test_signal_on_a_synthetic_score_table():
    # two configs x two seeds x three steps; config b beats a at every step
    table = {"a": {0: {1: 0.30, 2: 0.40, 3: 0.50}, 1: {1: 0.32, 2: 0.38, 3: 0.52}},
             "b": {0: {1: 0.40, 2: 0.50, 3: 0.60}, 1: {1: 0.42, 2: 0.48, 3: 0.62}}}
    s = ev.signal(table, baseline=0.25)
    noise = statistics.mean([statistics.stdev(p) for p in ((0.30, 0.32), (0.40, 0.38), (0.50, 0.52))] * 2)
    assert s["monotonicity"] == 1.0 and s["consistency"] == 1.0 and s["usable"]
    assert s["noise"] == pytest.approx(noise)
    assert s["above_random"] == pytest.approx((0.5 + 0.52 + 0.6 + 0.62) / 4 - 0.25)
    # scores that fall with training, and configs swapping places: unusable
    flipped = {"a": {0: {1: 0.5, 2: 0.3}}, "b": {0: {1: 0.4, 2: 0.45}}}
    s = ev.signal(flipped, baseline=0.25)
    assert s["monotonicity"] == 0.0 and s["consistency"] == -1.0 and math.isnan(s["noise"]) and not s["usable"]


def test_signal_command_groups_seeds(tmp_path, capsys):
    tok, scores = Tokenizer.byte_level(), {}
    for run, seed in (("r0", 0), ("r1", 1)):
        for step in (1, 2):
            ckpt = tmp_path / run / f"ckpt_{step:06d}"
            torch.manual_seed(10 * seed + step)
            Model(ModelConfig(**MODEL)).save_pretrained(ckpt)
            tok.save(str(ckpt / "tokenizer.json"))
            (ckpt / "trainer").mkdir()
            (ckpt / "trainer" / "state.json").write_text(json.dumps({"step": step, "tokens": 64 * step,
                                                                    "config": {"seed": seed, "out_dir": run, "lr": 1}}))
            cfg = ev.EvalConfig(tasks="math_mc", limit=8)
            scores[(seed, step)] = ev.run(str(ckpt), cfg)[0][2]["acc_norm"]
    ev.main(["signal", str(tmp_path / "r0"), str(tmp_path / "r1"), "--tasks=math_mc", "--limit=8"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    table = {"one": {s: {1: scores[(s, 1)], 2: scores[(s, 2)]} for s in (0, 1)}}
    want = ev.signal(table, ev.random_baseline("math_mc", ""))
    assert row[0] == "math_mc" and float(row[1]) == pytest.approx(0.25, abs=1e-3)
    assert [float(v) for v in row[3:5]] == pytest.approx([want["noise"], want["above_random"]], abs=1e-3)
    assert row[5] == "nan" and row[6] == ("yes" if want["usable"] else "no")    # one configuration: no ranking


def test_report_card_and_plots(tmp_path, capsys):
    tok, runs = Tokenizer.byte_level(), {}
    for run, lr in (("a", 1e-3), ("b", 2e-3)):
        log = []
        for step in (2, 4):
            ckpt = tmp_path / run / f"ckpt_{step:06d}"
            torch.manual_seed(step + (run == "b"))
            Model(ModelConfig(**MODEL)).save_pretrained(ckpt)
            tok.save(str(ckpt / "tokenizer.json"))
            (ckpt / "trainer").mkdir()
            (ckpt / "trainer" / "state.json").write_text(json.dumps({"step": step, "tokens": 128 * step,
                                                                    "config": {"seed": 0, "lr": lr}}))
            log += [{"kind": "train", "step": s, "loss": 5.0 - s / 10, "skipped": False, "tok_per_s": 1000.0 + s}
                    for s in (step - 1, step)]
        log.append({"kind": "eval", "step": 4, "val_loss": {"all": 3.0}, "val_bpb": {"all": 1.25}})
        (tmp_path / run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        runs[run] = [ev.run(str(tmp_path / run / f"ckpt_{s:06d}"), ev.EvalConfig(tasks="math_mc", limit=4))[0][2]
                     for s in (2, 4)]
    out = tmp_path / "rep"
    ev.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--tasks=math_mc", "--limit=4", f"--out={out}"])
    md = (out / "report.md").read_text()
    n = Model(ModelConfig(**MODEL)).num_params()
    assert f"- parameters: {n:,}" in md and "- tokens: 512 in 4 steps" in md and "- throughput: 1,004 tokens/s" in md
    assert f"| 2 | 256 | - | {runs['a'][0]['acc_norm']:.4f} |" in md
    assert f"| 4 | 512 | 1.2500 | {runs['b'][1]['acc_norm']:.4f} |" in md
    for svg, n_lines in (("loss.svg", 2), ("math_mc.svg", 2)):
        root = ET.parse(out / svg).getroot()
        assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == n_lines and f"]({svg})" in md


# ---- command line ------------------------------------------------------------------------------------------

def test_command_line_table_and_usage(tmp_path, capsys):
    for argv, code in (([], 2), (["--help"], 0)):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == code and "--tasks=" in "".join(capsys.readouterr())
    torch.manual_seed(0)
    Model(ModelConfig(**MODEL)).save_pretrained(tmp_path / "ckpt")
    Tokenizer.byte_level().save(str(tmp_path / "ckpt" / "tokenizer.json"))
    (tmp_path / "bench").mkdir()
    jsonl(tmp_path / "bench" / "piqa.jsonl", [FORMATS["piqa"][0]] * 3)
    jsonl(tmp_path / "bench" / "gsm8k_test.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    (tmp_path / "t.txt").write_text("some text", encoding="utf-8")
    ev.main([str(tmp_path / "ckpt"), "--tasks=piqa,piqa:mcf,math_mc,gsm8k", f"--data_dir={tmp_path / 'bench'}",
             "--limit=2", "--chat=False", "--max_new_tokens=4", f"--bpb={tmp_path / 't.txt'}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "n", "metrics", "n/s"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["t.txt", "9"], ["piqa", "2"], ["piqa:mcf", "2"],
                                                   ["math_mc", "2"], ["gsm8k", "1"]]
    assert lines[1].split()[2::2][:2] == ["loss", "bpb"]
    assert lines[2].split()[2::2][:3] == ["acc", "acc_norm", "acc_token"]
    for argv, want in (([str(tmp_path / "nope")], "checkpoint directory not found"),
                       ([str(tmp_path / "ckpt"), "--tasks=nosuch"], "unknown task 'nosuch'"),
                       ([str(tmp_path / "ckpt"), "--tasks=hellaswag", f"--data_dir={tmp_path}"], "hellaswag.jsonl")):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert want in e.value.code and e.value.code.count("\n") == 0


# ---- tokenizer metrics (moved from data.py) -----------------------------------------------------------------

def test_metrics_hand_computed(tmp_path, capsys):
    byte = Tokenizer.byte_level()
    # 2 words, 5 byte tokens; each word spans 2 tokens.  CJK: one word per character, 3 bytes each.
    assert ev.tokenizer_metrics(byte, "ab cd") == {"words": 2, "tokens": 5, "fertility": 2.5, "continued": 1.0,
                                                   "bytes_per_token": 1.0}
    m = ev.tokenizer_metrics(byte, "日本")
    assert (m["words"], m["tokens"], m["fertility"], m["continued"]) == (2, 6, 3.0, 1.0)
    tiny = Tokenizer.load(write(tmp_path, tiny_hf()))
    # "hello hell, hey": [hello][Ġ][hell][,][Ġ][he][y]; words hello, hell, ",", hey -> only "hey" continues.
    m = ev.tokenizer_metrics(tiny, "hello hell, hey")
    assert (m["words"], m["tokens"], m["fertility"], m["continued"]) == (4, 7, 1.75, 0.25)
    byte.save(tmp_path / "byte.json")
    (tmp_path / "en.txt").write_text("hello hell, hey", encoding="utf-8")
    ev.main(["tokenizer", str(tmp_path / "tokenizer.json"), str(tmp_path / "byte.json"), str(tmp_path / "en.txt")])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row == ["en.txt", "4", "1.750", "3.750", "25.0%", "75.0%", "2.14", "1.00"]


def test_tokenizer_command_input_errors(tmp_path, capsys):
    Tokenizer.byte_level().save(str(tmp_path / "tok.json"))
    (tmp_path / "latin1.txt").write_bytes(b"fine\nstill fine\ncaf\xe9\n")
    missing = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b"}])
    for path, want in ((str(tmp_path / "latin1.txt"), "latin1.txt:3: not UTF-8 text"),
                       (missing, "d.jsonl:2: missing field 'text' (choose another with --field)")):
        with pytest.raises(SystemExit) as e:
            ev.main(["tokenizer", str(tmp_path / "tok.json"), str(tmp_path / "tok.json"), path])
        assert want in e.value.code and e.value.code.count("\n") == 0
    body = jsonl(tmp_path / "b.jsonl", [{"body": "one two"}, {"body": "three"}])
    ev.main(["tokenizer", str(tmp_path / "tok.json"), str(tmp_path / "tok.json"), body, "--field", "body"])
    assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["b.jsonl", "3"]


# ---- the loss-curve plot ----------------------------------------------------------------------------------

def test_loss_svg_draws_the_data(tmp_path):
    path = str(tmp_path / "p.svg")
    curve = [(10 * i, 5 / (1 + i)) for i in range(501)]               # longer than max_points: thinned
    evals = [(1000 * k, 0.5 + 0.1 * k) for k in range(6)]
    ev.plot_curves(path, [("train", curve), ("val a&b", evals)], width=400, height=300, max_points=100)
    svg = "{http://www.w3.org/2000/svg}"
    root = ET.parse(path).getroot()                                   # well-formed: the & is escaped
    area = root.find(f"{svg}clipPath/{svg}rect").attrib
    top, bottom = float(area["y"]), float(area["y"]) + float(area["height"])
    drawn = [[tuple(map(float, xy.split(","))) for xy in line.get("points").split()]
             for line in root.iter(f"{svg}polyline")]
    assert len(drawn) == 2 and len(drawn[1]) == len(evals) and 80 <= len(drawn[0]) <= 100
    # The eval points fix the affine data -> pixel map; every drawn point must invert to a data point.
    (ax, ay), (bx, by) = drawn[1][0], drawn[1][-1]
    sx, sy = (bx - ax) / 5000, (by - ay) / 0.5

    def data(px, py):
        return (px - ax) / sx, 0.5 + (py - ay) / sy
    for (px, py), (x, y) in zip(drawn[1], evals):
        assert data(px, py) == pytest.approx((x, y), abs=1e-3)
    steps = [data(px, py) for px, py in drawn[0]]
    assert steps[-1][0] == pytest.approx(5000, abs=0.1)                # the curve ends at the last step
    for x, y in steps:
        i = round(x / 10)
        assert abs(x - 10 * i) < 1 and y == pytest.approx(5 / (1 + i), abs=2e-3), (x, y)
    # up is smaller y; the evals lie inside the plot area, the first steps (loss > 1) above it, clipped
    assert sy < 0 and top <= ay <= bottom and top <= by <= bottom and drawn[0][0][1] < top
    ticks = [t for t in root.iter(f"{svg}text") if t.get("text-anchor") == "middle" and t.text[0].isdigit()]
    assert [t.text for t in ticks] == ["0", "1000", "2000", "3000", "4000", "5000"]
    assert all(float(t.get("x")) == pytest.approx(ax + sx * float(t.text), abs=0.2) for t in ticks)
    assert "val a&b" in [t.text for t in root.iter(f"{svg}text")]
