"""eval.py — evaluation: held-out bits per byte, multiple-choice log-likelihood tasks (cloze and lettered),
generative exact match through the one answer checker, and tokenizer metrics.

    python eval.py out/tiny/ckpt_000300 --tasks=math_mc,math_mc:mcf,math --chat=False  # embedded test sets
    python eval.py CKPT --tasks=gsm8k,hellaswag,arc_easy:mcf --data_dir=evaldata --shots=5 --limit=500
    python eval.py CKPT --tasks= --bpb=notes.txt,data/web/val_000000.bin   # bits per byte of files / shards
    python eval.py signal out/run_a out/run_b ... --tasks=math_mc  # which tasks are usable for ablations
    python eval.py report out/run_a out/run_b --out=report     # report.md + plots: loss, scores vs tokens
    python eval.py tokenizer TOK_A TOK_B FILE... [--field text]  # fertility / continued words, side by side
    python eval.py chat out/pipeline/merged --think=True         # talk to a checkpoint (--prompt=TEXT: one reply)

CHECKPOINT is any directory in transformers' SmolLM3 layout holding its tokenizer.json (ours carry one).
Benchmark files, one JSON object a line in their public formats, are read from --data_dir under the file
names in TASKS; a task name with ":mcf" is scored in the lettered multiple-choice formulation. The table
gives each task's metrics and its rate, n/s (n: questions; for a bpb file, the tokens scored).

Sections:
  loss             evaluate (held-out loss and bpb per source; train.py calls it), file_rows
  answers          strip_think, extract_answer, check_answer, completion_text, follows_format (GRPO's reward
                   calls them)
  generative       gsm8k_rows, exact_match: chat template, batched model.generate, greedy or avg@k;
                   chat_reply (a conversation's next turn, its oldest exchanges dropped to fit the context)
  multiple choice  parsers of the public formats, pairs (CF / MCF prompts, k-shot), model_scorer, mc_metrics
  signal           spearman, kendall_tau, signal (monotonicity, noise, above random, consistency)
  tokenizer        tokenizer_metrics (fertility, continued words, bytes per token), its command
  plots            plot_curves (SVG line plots: train.py's loss.svg, the report's)
  pipeline         checkpoint_metrics, TARGETS, pipeline_table (posttrain.py pipeline's numbers and table)
  command line     EvalConfig, TASKS, load_checkpoint, run, random_baseline, signal / report / chat commands, main
"""
import argparse
import collections
import contextlib
import datetime
import html
import itertools
import json
import math
import os
import pathlib
import random
import statistics
import sys
import time
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import regex
import torch

from config import load, schema, usage
from data import Tokenizer, _field, _with_pos, iter_documents, open_shard, problems, read_jsonl, render_chat
from model import Model, atomic_write

# ---------------------------------------------------------------------------------------------- loss
# Bits per byte: sum of CE nats / (ln 2 x UTF-8 bytes of the target tokens), so runs with different tokenizers
# compare; on fixed held-out rows (Loader.val_rows), so every eval of a run sees the same text.


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


def file_rows(path, tok, seq_len):
    """A token shard (.bin) or a text file (documents, each followed by EOT) -> (x, y, pos) rows of seq_len
    that predict every token but the first exactly once; the last row's tail is padding (pos -1, y -100)."""
    if path.endswith(".bin"):
        ids = np.asarray(open_shard(path, tok.hash), dtype=np.int64)
    else:
        ids = np.array([t for doc in iter_documents(path) for t in tok.encode(doc) + [tok.eos_id]], dtype=np.int64)
    n = len(ids) - 1
    if n < 1:
        raise ValueError(f"{path}: fewer than 2 tokens")
    buf = np.full((-(-n // seq_len), seq_len + 1), tok.eos_id, dtype=np.int64)
    for r in range(len(buf)):
        part = ids[r * seq_len:(r + 1) * seq_len + 1]
        buf[r, :len(part)] = part
    x, y, pos = _with_pos(buf, tok.eos_id)
    pad = torch.arange(buf.shape[0] * seq_len).view(-1, seq_len) >= n
    return x.masked_fill(pad, 0), y.masked_fill(pad, -100), pos.masked_fill(pad, -1)


# ------------------------------------------------------------------------------------------- answers
# A number: thousands commas only in groups of three (so "1, 2" is two numbers), a sign only where no digit
# precedes it ("3-5" is 3 and 5).
_NUM = r"(?<![\d.,])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_MARKED = (regex.compile(rf"####\s*\$?\s*({_NUM})"), regex.compile(rf"\\boxed\{{\s*\$?\s*({_NUM})\s*\}}"),
           regex.compile(rf"[Tt]he (?:final )?answer is:?\s*\$?\s*({_NUM})"))
_ANY_NUM = regex.compile(_NUM)


def strip_think(text):
    """The text without its reasoning: what follows the last </think>, cut at an unclosed <think>."""
    return text.rpartition("</think>")[2].partition("<think>")[0]


def extract_answer(text):
    """The final answer of a completion or solution, or None: reasoning removed (strip_think), then the last
    '#### N', else the last \\boxed{N}, else the last 'The answer is N', else the last number; commas dropped."""
    text = strip_think(text)
    found = next((f for f in (p.findall(text) for p in _MARKED) if f), None) or _ANY_NUM.findall(text)
    return found[-1].replace(",", "").lstrip("+") if found else None


def check_answer(text, gold):
    """Whether completion `text` states the number `gold` ("1,234", "-3.50"): compared as decimals, so 3.5
    equals 3.50. The one checker for evals and verifiable rewards; model text is parsed, never executed."""
    pred = extract_answer(text)
    return pred is not None and Decimal(pred) == Decimal(gold.replace(",", ""))


def completion_text(tok, ids):
    """Generated ids -> the text the checker reads: the <think> tags by name (strip_think needs them), every
    other special token dropped (<|im_end|> only ends the reply; a reserved token's name such as
    <|reserved_special_token_12|> holds digits that extract_answer would take for the answer)."""
    tags = {tok.think_id, tok.think_end_id}
    return tok.decode([t for t in ids if t in tags or t < len(tok.ranks)])


def follows_format(tok, ids, think):
    """Chat-format adherence of a completion (generated ids): it ends with <|im_end|> on its own (not cut at the
    token budget), with a reply after the reasoning; /think: one <think> ... </think> block first; /no_think:
    no think tags (the template prefilled the empty block)."""
    if not ids or ids[-1] != tok.im_end_id:
        return False
    text = completion_text(tok, ids)
    if think:
        head, closed, reply = text.partition("</think>")
        return bool(closed) and head.startswith("<think>") and head.count("<think>") == 1 and \
            "<think>" not in reply and "</think>" not in reply and bool(reply.strip())
    return "<think>" not in text and "</think>" not in text and bool(text.strip())


# ---------------------------------------------------------------------------------------- generative

def gsm8k_rows(path):
    """[(question, gold number)] of a GSM8K-format jsonl: `question`, and `answer` ending in '#### N'."""
    rows = []
    for no, obj in read_jsonl(path):
        question, answer = _field(path, no, obj, "question", str), _field(path, no, obj, "answer", str)
        gold = _MARKED[0].findall(answer)
        if not gold:
            raise ValueError(f"{path}:{no}: field 'answer' has no final '#### N'")
        rows.append((question, gold[-1].replace(",", "")))
    return rows


# A fixed date in the chat template's system block keeps a prompt (and so a greedy score) the same every day.
_EVAL_DAY = datetime.date(2025, 6, 1)


@torch.no_grad()
def exact_match(model, tok, rows, chat=True, think=False, samples=1, temperature=0.0, max_new_tokens=256,
                batch_size=16, seed=0):
    """avg@k exact match of [(question, gold)] -> (score, completions, format): chat: the user turn through
    SmolLM3's template (/think or /no_think), format = the share of completions that follow_format; else the
    pretraining corpus' "Problem: ...\\nSolution:\\n" form (format None). `samples` completions per question
    (temperature > 0), each scored with check_answer."""
    if samples > 1 and temperature == 0:
        raise ValueError("samples > 1 needs temperature > 0 (greedy completions are all the same)")
    if chat:
        prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True,
                               enable_thinking=think, today=_EVAL_DAY)[0] for q, _ in rows]
    else:
        prompts = [tok.encode(f"Problem: {q}\nSolution:\n") for q, _ in rows]
    prompts = [p for p in prompts for _ in range(samples)]
    stop = [t for t in (tok.im_end_id, tok.eos_id) if t is not None]
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    model.eval()
    outs = []
    for i in range(0, len(prompts), batch_size):
        outs += model.generate(prompts[i:i + batch_size], max_new_tokens, temperature, stop_ids=stop, generator=gen)
    texts = [completion_text(tok, out) for out in outs]
    hits = sum(check_answer(t, rows[i // samples][1]) for i, t in enumerate(texts))
    form = sum(follows_format(tok, out, think) for out in outs) / max(len(outs), 1) if chat else None
    return hits / max(len(texts), 1), texts, form


@torch.no_grad()
def chat_reply(model, tok, messages, think=False, temperature=0.0, max_new_tokens=256, generator=None):
    """The assistant's next turn after `messages` (user and assistant turns, alternating from a user one) through
    SmolLM3's chat template -> (text with its <think> block, how many of the oldest messages were left out so that
    prompt + max_new_tokens fit the model's context)."""
    dropped = 0
    while True:
        ids = render_chat(tok, messages[dropped:], add_generation_prompt=True, enable_thinking=think)[0]
        if len(ids) + max_new_tokens <= model.cfg.max_position_embeddings or len(messages) - dropped <= 1:
            break
        dropped += 2                               # one exchange: a user turn and its reply
    stop = [t for t in (tok.im_end_id, tok.eos_id) if t is not None]
    model.eval()
    out = model.generate([ids], max_new_tokens, temperature, stop_ids=stop, generator=generator)[0]
    return completion_text(tok, out), dropped


# ----------------------------------------------------------------------------------- multiple choice
# Each parser maps one line of a public format to {"stem", "choices", "gold", "ctx"}: stem is the question as
# the lettered (MCF) prompt shows it, ctx the cloze (CF) context each " " + choice continues. Winogrande
# instead gives "ctxs" (the sentence up to the blank, filled with each option) and "cont" (the rest of the
# sentence): partial scoring, the same continuation under each option.

def _index(path, no, obj, key, n, base=0):
    """An answer index: an int, or a digit string ("2"; base 1 for Winogrande's "1"/"2")."""
    v = obj.get(key)
    if key not in obj or not (isinstance(v, int) or isinstance(v, str) and v.isdigit()) or not 0 <= int(v) - base < n:
        raise ValueError(f"{path}:{no}: missing field {key!r}" if key not in obj else
                         f"{path}:{no}: field {key!r} is {v!r}, expected an index {base}..{n - 1 + base}")
    return int(v) - base


def _qa(stem, choices, gold):
    return {"stem": stem, "choices": choices, "gold": gold, "ctx": f"Question: {stem}\nAnswer:"}


def _wikihow(text):
    """HellaSwag's WikiHow rows carry markup ("[header] Making tea [title] Boil water. [step] ..."): a title
    ends a sentence and the other tags go, as the common eval harnesses clean them before scoring."""
    text = regex.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ").strip()


def _hellaswag(path, no, o):
    endings = [_wikihow(e) for e in _field(path, no, o, "endings", list)]
    ctx = _wikihow(f"{_field(path, no, o, 'ctx_a', str)} {_field(path, no, o, 'ctx_b', str).capitalize()}")
    return {"stem": ctx, "choices": endings, "gold": _index(path, no, o, "label", len(endings)), "ctx": ctx}


def _arc(path, no, o):
    """ARC, CommonsenseQA, OpenBookQA: nested {question: {stem, choices: [{text, label}]}, answerKey}, flat
    {question (or OpenBookQA's question_stem), choices: {text: [...], label: [...]}, answerKey}; labels A-D or 1-4."""
    if isinstance(o.get("question"), dict):
        q = o["question"]
        stem, raw = _field(path, no, q, "stem", str), _field(path, no, q, "choices", list)
        texts = [_field(path, no, c, "text", str) for c in raw]
        labels = [_field(path, no, c, "label", str) for c in raw]
    else:
        stem = _field(path, no, o, "question_stem" if "question_stem" in o else "question", str)
        raw = _field(path, no, o, "choices", dict)
        texts, labels = _field(path, no, raw, "text", list), [str(x) for x in _field(path, no, raw, "label", list)]
    key = str(_field(path, no, o, "answerKey", str))
    if key not in labels or len(texts) != len(labels):
        raise ValueError(f"{path}:{no}: answerKey {key!r} is not one of the labels {labels} of {len(texts)} choices")
    return _qa(stem, texts, labels.index(key))


def _mmlu(path, no, o):
    """MMLU: the HF form's answer is an index (0-3); other copies write the letter ("C")."""
    choices = _field(path, no, o, "choices", list)
    letter = o.get("answer")
    if isinstance(letter, str) and len(letter) == 1 and "A" <= letter <= chr(ord("A") + len(choices) - 1):
        o = {**o, "answer": ord(letter) - ord("A")}
    return _qa(_field(path, no, o, "question", str), choices, _index(path, no, o, "answer", len(choices)))


def _piqa(path, no, o):
    choices = [_field(path, no, o, "sol1", str), _field(path, no, o, "sol2", str)]
    return _qa(_field(path, no, o, "goal", str), choices, _index(path, no, o, "label", 2))


def _winogrande(path, no, o):
    sentence, options = _field(path, no, o, "sentence", str), [_field(path, no, o, f"option{i}", str) for i in (1, 2)]
    if "_" not in sentence:
        raise ValueError(f"{path}:{no}: field 'sentence' has no blank '_'")
    head, _, tail = sentence.partition("_")
    return {"stem": sentence, "choices": options, "gold": _index(path, no, o, "answer", 2, base=1),
            "ctxs": [head + opt for opt in options], "cont": " " + tail.strip()}


def _math_mc():
    """data.py's held-out math_mc_test problems, each answer among three near misses (seeded)."""
    rng, rows = random.Random(0), []
    for question, _, answer in problems("math_mc_test"):
        choices = {answer}
        while len(choices) < 4:
            choices.add(max(0, answer + rng.choice((-10, -3, -2, -1, 1, 2, 3, 10))))
        choices = sorted(choices)
        rng.shuffle(choices)
        rows.append(_qa(question, [str(c) for c in choices], choices.index(answer)))
    return rows


def _letters(n):
    return [chr(ord("A") + i) for i in range(n)]


def pairs(row, mcf=False):
    """[(context, continuation)] per choice. CF: the context, then " " + the choice (Winogrande: each filled
    context, then the rest of the sentence). MCF: the question with lettered options, then " A", " B", ..."""
    if mcf:
        ctx = f"Question: {row['stem']}\n" + "".join(f"{L}. {c}\n" for L, c in zip(_letters(99), row["choices"]))
        return [(ctx + "Answer:", f" {L}") for L in _letters(len(row["choices"]))]
    if "ctxs" in row:
        return [(c, row["cont"]) for c in row["ctxs"]]
    return [(row["ctx"], " " + c) for c in row["choices"]]


def with_shots(rows, mcf, k, seed):
    """Each question's pairs behind k solved examples drawn from the other rows (random.Random(seed + i),
    kept in file order), each its context + gold continuation, separated by blank lines."""
    out = []
    for i, row in enumerate(rows):
        others = [j for j in range(len(rows)) if j != i]
        shots = sorted(random.Random(seed + i).sample(others, min(k, len(others))))
        prefix = "".join("".join(pairs(rows[j], mcf)[rows[j]["gold"]]) + "\n\n" for j in shots)
        out.append([(prefix + c, a) for c, a in pairs(row, mcf)])
    return out


def model_scorer(model, tok, batch_size=16):
    """score(questions) for [[(context, continuation)] per choice] -> [[summed log-prob] per choice].

    Context and continuation are encoded apart, so every choice splits at the same token. The choices that
    share a context sit in one row: the context once, then each continuation, positions restarting after
    the context; a tree mask lets a continuation see the context and itself but no sibling, so a row's
    logits equal those of each context + continuation scored alone (transformers' SmolLM3 is the test's
    oracle)."""
    @torch.no_grad()
    def score(questions):
        rows = []                         # (question, [choice indices], context ids, [continuation ids])
        for qi, q in enumerate(questions):
            for ctx in dict.fromkeys(c for c, _ in q):
                idx = [k for k, (c, _) in enumerate(q) if c == ctx]
                # an empty context is one EOT: what the model saw before every document it was trained on
                rows.append((qi, idx, tok.encode(ctx) or [tok.eos_id], [tok.encode(q[k][1]) for k in idx]))
        out = [[0.0] * len(q) for q in questions]
        rows.sort(key=lambda r: -(len(r[2]) + sum(map(len, r[3]))))  # similar lengths share a batch
        for i in range(0, len(rows), batch_size):
            _score_rows(model, rows[i:i + batch_size], out)
        return out
    return score


def _score_rows(model, rows, out):
    dev = model.tok_emb.weight.device
    T = max(len(c) + sum(map(len, conts)) for _, _, c, conts in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    pos, seg = torch.full((len(rows), T), -1), torch.full((len(rows), T), -1)
    preds, targets, owners = [], [], []   # flat index predicting each continuation token, its id, its choice
    for b, (qi, idx, ctx, conts) in enumerate(rows):
        n = len(ctx)
        x[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(ctx), torch.arange(n), 0
        t = n
        for s, (k, cont) in enumerate(zip(idx, conts), start=1):
            m = len(cont)
            x[b, t:t + m], pos[b, t:t + m], seg[b, t:t + m] = torch.tensor(cont), torch.arange(n, n + m), s
            # the first token is predicted by the context's last, the others by their predecessor
            preds += [b * T + n - 1] + [b * T + j for j in range(t, t + m - 1)]
            targets += cont
            owners += [(qi, k)] * m
            t += m
    real = pos >= 0
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    tree = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])      # [B, query, key]
    mask = causal & tree & real[:, None, :] & real[:, :, None]
    if model.cfg.sliding_window is not None:   # the window counts positions, as in a context + continuation row
        mask &= pos[:, :, None] - pos[:, None, :] < model.cfg.sliding_window
    mask |= torch.eye(T, dtype=torch.bool)     # SDPA gives NaN for a padding query that sees nothing

    h = model.hidden(x.to(dev), pos.to(dev), mask[:, None].to(dev)).flatten(0, 1)[torch.tensor(preds, device=dev)]
    logp = torch.log_softmax((h @ model.head_weight.t()).float(), -1)
    lp = logp.gather(1, torch.tensor(targets, device=dev)[:, None])[:, 0].double().tolist()
    for (qi, k), v in zip(owners, lp):
        out[qi][k] += v


def mc_metrics(tok, questions, scores, golds):
    """acc (argmax of the summed log-prob), acc_norm (of log-prob per character of the continuation, as
    lighteval does) and acc_token (per token) over questions [[(context, continuation)] per choice]."""
    norms = {"acc": lambda c: 1, "acc_norm": lambda c: max(len(c), 1),
             "acc_token": lambda c: max(len(tok.encode(c)), 1)}
    hits = dict.fromkeys(norms, 0)
    for q, s, gold in zip(questions, scores, golds):
        for name, size in norms.items():
            hits[name] += max(range(len(s)), key=lambda k: s[k] / size(q[k][1])) == gold
    return {name: h / max(len(questions), 1) for name, h in hits.items()}


PARSERS = {"hellaswag": _hellaswag, "arc": _arc, "mmlu": _mmlu, "piqa": _piqa, "winogrande": _winogrande}


def read_task(path, parser):
    """Parsed rows of a benchmark jsonl (a malformed line is a ValueError naming path:line and the field)."""
    return [parser(path, no, obj) for no, obj in read_jsonl(path)]


# -------------------------------------------------------------------------------------------- signal
# The playbook's criteria for an ablation eval: its score rises with training (monotonicity), differs little
# between seeds (noise), sits above chance, and orders runs the same way at every step (consistency).

def _ranks(v):
    """Ranks 1..n of the values v, ties sharing their average rank."""
    order, ranks = sorted(range(len(v)), key=v.__getitem__), [0.0] * len(v)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman's rho: Pearson's correlation of the ranks; nan when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den else math.nan


def kendall_tau(x, y):
    """Kendall's tau-b: (concordant - discordant pairs) / sqrt((pairs - tied in x) (pairs - tied in y))."""
    conc = disc = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        s = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        tied_x, tied_y = tied_x + (s[0] == 0), tied_y + (s[1] == 0)
        conc, disc = conc + (s[0] * s[1] > 0), disc + (s[0] * s[1] < 0)
    n0 = len(x) * (len(x) - 1) // 2
    den = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return (conc - disc) / den if den else math.nan


def _mean(values):
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def signal(table, baseline):
    """One task's signal over {config: {seed: {step: score}}} (runs that differ only in seed share a config):
    monotonicity (mean Spearman of score vs step per run), noise (mean std across seeds at a step), distance of
    the final scores above the random baseline, consistency (mean Kendall tau between the configs' seed-averaged
    rankings at consecutive steps). Usable for ablations (our thresholds): monotonicity >= 0.5, final scores more
    than 2 noise above random, consistency >= 0.5 where there are two or more configs."""
    runs = [by_step for seeds in table.values() for by_step in seeds.values()]
    mono = _mean([spearman(sorted(r), [r[s] for s in sorted(r)]) for r in runs if len(r) > 1])
    noise = _mean([statistics.stdev([r[s] for r in seeds.values()]) for seeds in table.values()
                   for s in set.intersection(*map(set, seeds.values())) if len(seeds) > 1])
    above = _mean([r[max(r)] - baseline for r in runs])
    mean = {c: {s: statistics.mean(r[s] for r in seeds.values()) for s in set.intersection(*map(set, seeds.values()))}
            for c, seeds in table.items()}
    steps = sorted(set.intersection(*map(set, mean.values())))
    cons = _mean([kendall_tau([m[a] for m in mean.values()], [m[b] for m in mean.values()])
                  for a, b in zip(steps, steps[1:])]) if len(mean) > 1 else math.nan
    usable = mono >= 0.5 and above > 2 * (0 if math.isnan(noise) else noise) and (math.isnan(cons) or cons >= 0.5)
    return {"monotonicity": mono, "noise": noise, "above_random": above, "consistency": cons, "usable": usable}


# ----------------------------------------------------------------------------------------- tokenizer
# Words for the playbook's tokenizer metrics: letter/digit runs, punctuation runs, and single Han / kana
# characters (CJK writes no spaces; one character per word is the usual convention there).
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORD = regex.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[\p{{L}}\p{{M}}\p{{N}}])+|[^\s\p{{L}}\p{{M}}\p{{N}}]+")


def tokenizer_metrics(tok, text):
    """Fertility (tokens per word), continued words (the share of words overlapping >= 2 tokens of the
    in-context encoding) and bytes per token -> dict(words, tokens, fertility, continued, bytes_per_token)"""
    ids = tok.encode(text)
    ends = np.cumsum(tok.token_bytes()[ids])               # byte offset where each token ends
    starts = np.concatenate([[0], ends[:-1]])
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_start = np.concatenate([[0], np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000))])
    spans = np.array([m.span() for m in _WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)
    s, e = char_start[spans[:, 0]], char_start[spans[:, 1]]  # word byte spans [s, e)
    per_word = np.searchsorted(starts, e, "left") - np.searchsorted(ends, s, "right")
    n_words = max(len(spans), 1)
    return {"words": len(spans), "tokens": len(ids), "fertility": len(ids) / n_words,
            "continued": float((per_word >= 2).sum()) / n_words,
            "bytes_per_token": len(text.encode("utf-8")) / max(len(ids), 1)}


def _tokenizer_main(argv):
    p = argparse.ArgumentParser(prog="python eval.py tokenizer", description="Tokenizer metrics per file, "
                                "side by side (one file per language, say)")
    p.add_argument("tokenizers", nargs=2, metavar="TOK", help="a tokenizer.json, or a folder holding one")
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt/.md/.py, .jsonl or .parquet (documents joined)")
    p.add_argument("--field", default="text", help=".jsonl text field / .parquet column (default: text)")
    a = p.parse_args(argv)
    missing = [f for f in a.files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"text file not found: {missing[0]}")
    toks = [Tokenizer.load(t) for t in a.tokenizers]
    print(f"A = {a.tokenizers[0]} ({toks[0].n_vocab} ids)\nB = {a.tokenizers[1]} ({toks[1].n_vocab} ids)")
    print(f"{'file':<24}{'words':>9}{'fertility A':>13}{'B':>7}{'continued A':>13}{'B':>7}{'bytes/tok A':>13}{'B':>7}")
    for path in a.files:
        text = "\n\n".join(iter_documents(path, a.field))
        m, n = (tokenizer_metrics(t, text) for t in toks)
        print(f"{os.path.basename(path)[:23]:<24}{m['words']:>9}{m['fertility']:>13.3f}{n['fertility']:>7.3f}"
              f"{m['continued']:>12.1%}{n['continued']:>8.1%}{m['bytes_per_token']:>13.2f}{n['bytes_per_token']:>7.2f}")


# --------------------------------------------------------------------------------------------- plots

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _ticks(lo, hi, n=6):
    """About n round tick values in [lo, hi] (steps of 1, 2 or 5 x 10^k) and the decimals to print them with."""
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    return [(k * step, decimals) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def plot_curves(path, series, width=800, height=480, xlabel="step", ylabel="loss", max_points=2000):
    """Line plot of `series` = [(label, [(x, y), ...]), ...] as SVG (text: no plotting package, opens in any
    browser). A series longer than `max_points` is drawn through every k-th point, counted back from its
    last, so the curve still ends where the run is."""
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
               f'<text x="{left}" y="{top - 10}">{html.escape(ylabel)}</text>')
    for k, (label, pts) in enumerate(series):
        color, pts = _COLORS[k % len(_COLORS)], sorted(pts)
        pts = pts[::-math.ceil(len(pts) / max_points)][::-1] if pts else pts
        svg.append(f'<polyline points="{" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)}" fill="none" '
                   f'stroke="{color}" stroke-width="1.5" clip-path="url(#area)"/>'
                   # the legend: each label in its curve's colour, top right
                   f'<text x="{right - 8}" y="{top + 16 * (k + 1)}" text-anchor="end" fill="{color}">'
                   f'{html.escape(label)}</text>')
    text = "\n".join(svg + ["</svg>\n"])
    atomic_write(path, lambda p: pathlib.Path(p).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------- pipeline
# posttrain.py's pipeline scores every checkpoint of the tiny recipe (checkpoint_metrics) and prints their table.

@torch.no_grad()
def checkpoint_metrics(path, data_dir, device, chat=True, questions=128, pairs=200):
    """Held-out numbers of one checkpoint: math bpb (64 rows of the math val shard), exact match and format share
    in /think and /no_think (exact_match on the first `questions` of math_test), and the share of the first `pairs`
    pref_val pairs whose chosen reply the model gives more log-probability than the rejected one (posttrain's
    preference loader and scorer; chat=False: bpb only). In float32 on `device`."""
    from posttrain import PreferenceLoader, logps_table   # posttrain imports this module: at call time
    model, tok = Model.from_pretrained(path, attn_impl="sdpa").float().to(device).eval(), Tokenizer.load(path)
    x, y, pos = (t[:64] for t in file_rows(os.path.join(data_dir, "math", "val_00000.bin"), tok, 256))
    out = {"math_bpb": evaluate(model, {"math": (x, y, pos)}, torch.from_numpy(tok.token_bytes()), 16,
                                contextlib.nullcontext(), device)[1]["math"]}
    if not chat:
        return out
    for mode, think in (("think", True), ("no_think", False)):
        out[f"em_{mode}"], _, out[f"format_{mode}"] = exact_match(model, tok, task_rows("math", "")[:questions], True,
                                                                  think, max_new_tokens=96, batch_size=64)
    lp = logps_table(model, PreferenceLoader(os.path.join(data_dir, "pref_val.jsonl"), tok, 640, 16), 16,
                     contextlib.nullcontext(), device)[:pairs]
    out["pref_acc"] = (lp[:, 0] > lp[:, 1]).sum().item() / len(lp)
    return out


# stage -> [(metric, higher is better)] it targets, compared with the checkpoint it started from
TARGETS = {"pretrain": [("math_bpb", False)], "sft": [(f"{m}_{k}", True) for k in ("think", "no_think")
                                                       for m in ("format", "em")],
           "apo": [("pref_acc", True)], "grpo": [("em_think", True)],   # its prompts are /think
           "merged": [("em_think", True), ("em_no_think", True)]}
PARENT = {"pretrain": "init", "mid": "pretrain", "sft": "mid", "apo": "sft", "grpo": "apo", "merged": "grpo"}
COLUMNS = ["math_bpb", "format_think", "em_think", "format_no_think", "em_no_think", "pref_acc"]


def pipeline_table(metrics, times, mid_evals):
    """Markdown: one row per checkpoint with its held-out metrics, its stage's wall time, and the metrics its
    stage targets, before -> after, each marked improved or not."""
    head = ("| checkpoint | stage s | math bpb | /think format | /think EM | /no_think format | /no_think EM | "
            "pref acc | its stage's targets, before -> after |")
    lines = [head, "|" + "---|" * 9]
    for stage, m in metrics.items():
        if stage == "mid":   # mid-training targets the loss on every token of held-out conversations
            first, last = (r["val_loss"]["mid"] for r in (mid_evals[0], mid_evals[-1]))
            targets = [("chat loss", first, last, last < first)]
        else:
            before = metrics.get(PARENT.get(stage), {})
            targets = [(k, before[k], m[k], m[k] > before[k] if up else m[k] < before[k])
                       for k, up in TARGETS.get(stage, []) if k in m and k in before]
        cells = [f"{m[k]:.3f}" if k in m else "" for k in COLUMNS]
        said = "; ".join(f"{k} {a:.3f} -> {b:.3f} {'improved' if ok else '**not improved**'}"
                         for k, a, b, ok in targets) or "(untrained model)"
        wall = f"{times[stage]:.0f}" if stage in times else ""
        lines.append(f"| {stage} | {wall} | " + " | ".join(cells) + f" | {said} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- command line

@dataclass
class EvalConfig:
    tasks: str = "math_mc,math_mc:mcf,math"  # comma-separated TASKS names; NAME:mcf = lettered options
    data_dir: str = "evaldata"   # where the benchmark files are (file names in TASKS)
    bpb: str = ""                # comma-separated text files / token shards: loss and bits per byte
    limit: int = 0               # the first N questions of each task (0: all)
    shots: int = 0               # k-shot: solved examples drawn from the task's other questions
    seed: int = 0                # k-shot draws and sampling
    batch_size: int = 16         # rows per forward (questions when scoring, prompts when generating)
    chat: bool = True            # generative: the chat template; False: "Problem: ...\nSolution:\n" (a base model)
    think: bool = False          # generative: /think (reasoning first) or /no_think
    samples: int = 1             # generative: avg@k over this many completions (needs temperature > 0)
    temperature: float = 0.0     # generative: 0 = greedy
    max_new_tokens: int = 256
    prompt: str = ""             # chat: reply to this one message and exit (else a conversation on stdin)
    seq_len: int = 1024          # bpb: tokens per row
    out: str = "report"          # report: the folder for report.md and its plots
    device: str = "auto"         # auto: cuda when there is one, else cpu


# name -> (parser, file in data_dir); None: data.py's embedded set. gsm8k and math are generative.
TASKS = {"hellaswag": ("hellaswag", "hellaswag.jsonl"), "arc_easy": ("arc", "arc_easy.jsonl"),
         "arc_challenge": ("arc", "arc_challenge.jsonl"), "commonsenseqa": ("arc", "commonsenseqa.jsonl"),
         "openbookqa": ("arc", "openbookqa.jsonl"), "mmlu": ("mmlu", "mmlu.jsonl"), "piqa": ("piqa", "piqa.jsonl"),
         "winogrande": ("winogrande", "winogrande.jsonl"), "math_mc": ("math_mc", None),
         "gsm8k": ("gsm8k", "gsm8k_test.jsonl"), "math": ("gsm8k", None)}


def task_rows(name, data_dir):
    """The parsed questions of task `name`: multiple-choice rows, or [(question, gold)] for generative ones."""
    parser, file = TASKS[name]
    if name == "math":
        return [(q, str(a)) for q, _, a in problems("math_test")]
    if name == "math_mc":
        return _math_mc()
    path = os.path.join(data_dir, file)
    return gsm8k_rows(path) if parser == "gsm8k" else read_task(path, PARSERS[parser])


def load_checkpoint(checkpoint, device="auto"):
    """(model, tokenizer, device) of a checkpoint directory, the model in fp32 on device ("auto": cuda if any)."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint directory not found: {checkpoint}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    # fp32 weights (the KV cache takes their dtype); the tree mask needs SDPA
    model = Model.from_pretrained(checkpoint, attn_impl="sdpa").float().to(device).eval()
    return model, Tokenizer.load(checkpoint), device


def run(checkpoint, cfg):
    """Evaluate a checkpoint directory on cfg's tasks and bpb files -> [(name, n, {metric: value}, seconds)]."""
    model, tok, device = load_checkpoint(checkpoint, cfg.device)
    results = []
    for path in filter(None, cfg.bpb.split(",")):
        t0 = time.perf_counter()
        x, y, pos = file_rows(path, tok, min(cfg.seq_len, model.cfg.max_position_embeddings))
        token_bytes = torch.from_numpy(tok.token_bytes()).to(device)
        loss, bpb = evaluate(model, {path: (x, y, pos)}, token_bytes, cfg.batch_size,
                             torch.autocast("cpu", enabled=False), torch.device(device))
        results.append((os.path.basename(path), int((y != -100).sum()), {"loss": loss[path], "bpb": bpb[path]},
                        time.perf_counter() - t0))
    score = model_scorer(model, tok, cfg.batch_size)
    for spec in filter(None, cfg.tasks.split(",")):
        name, _, form = spec.partition(":")
        if name not in TASKS or form not in ("", "mcf", "cf"):
            raise ValueError(f"--tasks: unknown task {spec!r}; expected one of {', '.join(TASKS)}, optionally :mcf")
        rows = task_rows(name, cfg.data_dir)[:cfg.limit or None]
        t0 = time.perf_counter()
        if TASKS[name][0] == "gsm8k":
            em, _, form = exact_match(model, tok, rows, cfg.chat, cfg.think, cfg.samples, cfg.temperature,
                                      cfg.max_new_tokens, cfg.batch_size, cfg.seed)
            metrics = {f"avg@{cfg.samples}" if cfg.temperature else "exact_match": em}
            if form is not None:
                metrics["format"] = form
        else:
            questions = with_shots(rows, form == "mcf", cfg.shots, cfg.seed)
            metrics = mc_metrics(tok, questions, score(questions), [r["gold"] for r in rows])
        results.append((spec, len(rows), metrics, time.perf_counter() - t0))
    return results


def random_baseline(name, data_dir):
    """The score of guessing: the mean of 1 / choices over a multiple-choice task's questions; 0 when generative."""
    if TASKS[name][0] == "gsm8k":
        return 0.0
    return statistics.mean(1 / len(r["choices"]) for r in task_rows(name, data_dir))


def _signal_main(argv):
    """python eval.py signal RUN_DIR... [--key=value ...]: every checkpoint of every run on cfg's tasks."""
    from train import TRAINER_STATE  # here, not at the top: train.py imports this file
    cfg = EvalConfig(**vars(load([a for a in argv if a.startswith("--")], EvalConfig)))
    cfg.bpb = ""
    tables = collections.defaultdict(dict)                # task -> config -> seed -> {step: score}
    for run_dir in (a for a in argv if not a.startswith("--")):
        for path in _checkpoints(run_dir):
            with open(os.path.join(path, TRAINER_STATE)) as f:
                state = json.load(f)
            config = state["config"]
            # runs that differ only in their seed (and where they write) are seeds of one configuration
            key = json.dumps({k: v for k, v in config.items() if k not in ("seed", "out_dir", "resume")},
                             sort_keys=True)
            for name, _, metrics, _ in run(path, cfg):
                tables[name].setdefault(key, {}).setdefault(config["seed"], {})[state["step"]] = _main_metric(metrics)
    print(f"{'task':<24}{'random':>8}{'monotonic':>11}{'noise':>8}{'above':>8}{'consistent':>12}  usable")
    for name, table in tables.items():
        base = random_baseline(name.partition(":")[0], cfg.data_dir)
        s = signal(table, base)
        print(f"{name[:23]:<24}{base:>8.3f}{s['monotonicity']:>11.3f}"
              f"{s['noise']:>8.3f}{s['above_random']:>8.3f}{s['consistency']:>12.3f}  {'yes' if s['usable'] else 'no'}")


def _main_metric(metrics):
    return metrics.get("acc_norm", next(iter(metrics.values())))


def _checkpoints(run_dir):
    ckpts = sorted((d for d in os.listdir(run_dir) if d.startswith("ckpt_")), key=lambda d: int(d[5:]))
    if not ckpts:
        raise ValueError(f"{run_dir}: no checkpoints (ckpt_*)")
    return [os.path.join(run_dir, d) for d in ckpts]


def report(run_dirs, cfg, out):
    """Write out/report.md (per run: config, parameters, tokens, throughput, every checkpoint's evals) and SVG
    plots with every run on one plot: loss.svg (train loss) and one per task (score vs tokens)."""
    import train  # here, not at the top: train.py imports this file
    os.makedirs(out, exist_ok=True)
    md, losses, curves = ["# nanosmol report", ""], [], collections.defaultdict(list)
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        log = train.read_log(os.path.join(run_dir, "log.jsonl"))
        steps, bpb = [r for r in log if r["kind"] == "train"], {r["step"]: r["val_bpb"]["all"] for r in log
                                                                 if r["kind"] == "eval"}
        table = []
        for path in _checkpoints(run_dir):
            with open(os.path.join(path, train.TRAINER_STATE)) as f:
                state = json.load(f)
            results = run(path, cfg)
            table.append((state["step"], state["tokens"], [(t, _main_metric(m)) for t, _, m, _ in results]))
            for task, score in table[-1][2]:
                curves[task].append((name, state["tokens"], score))
        with torch.device("meta"):
            model = Model(Model.config_from_hf(os.path.join(path, "config.json")))
        md += [f"## {name}", "", f"- parameters: {model.num_params():,} ({model.num_params(non_embedding=True):,} "
               f"non-embedding)", f"- tokens: {state['tokens']:,} in {state['step']:,} steps",
               f"- throughput: {steps[-1]['tok_per_s']:,.0f} tokens/s" if steps else "- throughput: not logged",
               f"- config: `{json.dumps(state['config'], sort_keys=True)}`", "",
               "| step | tokens | val bpb | " + " | ".join(t for t, _ in table[0][2]) + " |",
               "|---" * (3 + len(table[0][2])) + "|"]
        md += [f"| {step:,} | {tokens:,} | " + (f"{bpb[step]:.4f}" if step in bpb else "-") + " | "
               + " | ".join(f"{s:.4f}" for _, s in scores) + " |" for step, tokens, scores in table]
        md.append("")
        losses.append((name, [(r["step"], r["loss"]) for r in steps if not r["skipped"]]))
    plot_curves(os.path.join(out, "loss.svg"), losses)
    md += ["## plots", "", "![train loss](loss.svg)", ""]
    for task, points in curves.items():
        runs = dict.fromkeys(r for r, _, _ in points)
        file = regex.sub(r"[^\w.-]", "_", task) + ".svg"
        plot_curves(os.path.join(out, file), [(r, [(t, s) for q, t, s in points if q == r]) for r in runs],
                          xlabel="tokens", ylabel=task)
        md += [f"![{task}]({file})", ""]
    text = "\n".join(md)
    atomic_write(os.path.join(out, "report.md"), lambda p: pathlib.Path(p).write_text(text, encoding="utf-8"))


def _report_main(argv):
    """python eval.py report RUN_DIR... [--key=value ...]: the report card of runs in cfg.out."""
    cfg = EvalConfig(**vars(load([a for a in argv if a.startswith("--")], EvalConfig)))
    cfg.bpb = ""
    report([a for a in argv if not a.startswith("--")], cfg, cfg.out)
    print(f"wrote {os.path.join(cfg.out, 'report.md')}")


def _chat_main(argv):
    """python eval.py chat CHECKPOINT [--key=value ...]: a conversation with a checkpoint, or one reply (--prompt)."""
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1:
        raise ValueError(f"chat: expected one checkpoint directory, got {paths or 'none'}")
    cfg = EvalConfig(**vars(load([a for a in argv if a.startswith("--")], EvalConfig)))
    model, tok, device = load_checkpoint(paths[0], cfg.device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    reply = lambda messages: chat_reply(model, tok, messages, cfg.think, cfg.temperature,  # noqa: E731
                                        cfg.max_new_tokens, gen)
    if cfg.prompt:
        print(reply([{"role": "user", "content": cfg.prompt}])[0])
        return
    print(f"{paths[0]}: {'/think' if cfg.think else '/no_think'}, "
          f"{f'temperature {cfg.temperature}' if cfg.temperature else 'greedy'}; /clear forgets, Ctrl-D ends")
    messages = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() == "/clear":
            messages = []
        elif line.strip():
            messages.append({"role": "user", "content": line})
            try:
                text, dropped = reply(messages)
            except ValueError as e:                # a message longer than the context: say so, keep the rest
                print(f"error: {e}")
                messages.pop()
                continue
            print(text)
            # the template keeps a /think reply's reasoning in the history; /no_think turns carry no tags
            messages = messages[dropped:] + [{"role": "assistant", "content": text if cfg.think else strip_think(text)}]


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        keys = usage("", schema(EvalConfig)).split("\n", 1)[1]
        print(f"{__doc__}\nusage: python eval.py CHECKPOINT [--key=value ...]\n{keys}",
              file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    try:
        commands = {"tokenizer": _tokenizer_main, "signal": _signal_main, "report": _report_main, "chat": _chat_main}
        if argv[0] in commands:
            return commands[argv[0]](argv[1:])
        results = run(argv[0], EvalConfig(**vars(load(argv[1:], EvalConfig))))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{'task':<24}{'n':>7}  {'metrics':<48}{'n/s':>12}")
    for name, n, metrics, dt in results:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{name[:23]:<24}{n:>7}  {shown:<48}{n / max(dt, 1e-9):>12.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
