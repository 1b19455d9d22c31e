"""data.py — tokenizer, chat template, token shards, the embedded default corpus and the pretraining loader.

    python data.py default config/tiny.py          # embedded corpus + tokenizer.json for a config (~5 s)
    python data.py prepare --out data/web --tokenizer data/default/tokenizer.json --source web a.jsonl b.parquet
    python data.py prepare --out data/web --tokenizer data/default/tokenizer.json --source web --split val v.jsonl

Train on a prepared directory with `--dataset=data/web --tokenizer=PATH --mixture="{'web': 1.0}"`. Under
torchrun, build data once (rank 0, or before launching): the steps are idempotent, not a lock.

Sections:
  tokenizer       byte-level BPE on tiktoken; tokenizer.json (ours and HF's) is the one file format; train_bpe
  chat template   SmolLM3's, exactly: render_chat_text (the string), render_chat (ids + loss mask)
  shards          128-byte header + uint16/uint32 ids; read_jsonl / iter_documents; prepare -> manifest.json
  default corpus  this Python's stdlib as "code", generated math with worked solutions (and the problems of
                  the post-training and test sets)
  loader          DataConfig, load_tokenizer; Loader, a pure function of (seed, sample index) over a staged
                  mixture (the SFT / preference / prompt loaders are in posttrain.py)
  command line    prepare, default (benchmark: tests/bench_data.py)
"""
import argparse
import base64
import bisect
import collections
import contextlib
import datetime
import functools
import hashlib
import heapq
import itertools
import json
import os
import pathlib
import random
import struct
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import regex
import tiktoken
import torch
from tqdm import tqdm

from config import load
from model import ModelConfig, atomic_write

# ------------------------------------------------------------------------------------- tokenizer

# Llama-3's pre-tokenization pattern (SmolLM3 inherits it): English contractions, letter runs with at
# most one leading non-letter (so " the" is one chunk), numbers in groups of at most three digits,
# punctuation runs with their trailing newlines, newline runs, and whitespace that leaves its last space
# to lead the next word. BPE never merges across chunks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Our special tokens, given ids in this order right after the regular ranks. Names follow Llama-3 / SmolLM3
# (pad is Llama's <|finetune_right_pad_id|>); a loaded file may lack some (their attribute is then None).
SPECIALS = {"bos_id": "<|begin_of_text|>", "eos_id": "<|end_of_text|>", "im_start_id": "<|im_start|>",
            "im_end_id": "<|im_end|>", "pad_id": "<|finetune_right_pad_id|>", "think_id": "<think>",
            "think_end_id": "</think>"}


class Tokenizer:
    """Byte-level BPE in a tiktoken.Encoding. ranks: {token bytes: rank 0..N-1} (rank = merge priority, as
    tiktoken wants); specials: {name: id N..V-1}. encode() adds no BOS and never yields a special id."""

    def __init__(self, ranks, specials, pattern=LLAMA3_PATTERN):
        n = len(ranks)
        if missing := [s for s in ("<|begin_of_text|>", "<|end_of_text|>") if s not in specials]:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        if sorted(ranks.values()) != list(range(n)):
            outside = sorted(set(ranks.values()) - set(range(n)))
            raise ValueError(f"regular token ids must be exactly 0..{n - 1}, with the special tokens after them; "
                             f"outside that range: {outside[:8]}")
        if sorted(specials.values()) != list(range(n, n + len(specials))):
            outside = sorted(set(specials.values()) - set(range(n, n + len(specials))))
            raise ValueError(f"special token ids must be exactly {n}..{n + len(specials) - 1}, right after the {n} "
                             f"regular tokens without gaps or repeats; outside that range: {outside[:8]}")
        self.ranks, self.specials, self.pattern = ranks, dict(specials), pattern
        self.enc = tiktoken.Encoding("nanosmol", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.specials)
        self.n_vocab = n + len(specials)
        for attr, name in SPECIALS.items():
            setattr(self, attr, self.specials.get(name))
        # The hash covers what encoding depends on (pattern, specials, ranks), not the file's formatting; these
        # lines are the earlier tokenizer.txt's, so shards prepared before tokenizer.json keep their hash.
        canonical = ["# nanosmol tokenizer v1", "# pattern " + json.dumps(pattern)]
        canonical += [f"# special {json.dumps(s)} {i}" for s, i in sorted(specials.items(), key=_by_id)]
        canonical += [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=_by_id)]
        self.hash = hashlib.sha256(("\n".join(canonical) + "\n").encode()).hexdigest()[:16]  # in shard headers

    @classmethod
    def byte_level(cls):
        """The 256 single bytes, no merges, then our specials (tests, bench)."""
        return cls({bytes([i]): i for i in range(256)}, {s: 256 + i for i, s in enumerate(SPECIALS.values())})

    def encode(self, text):
        # encode_ordinary: a special token's name inside text is plain text, never the control token.
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self):
        """[n_vocab] int64: byte length of each token, 0 for specials (bits-per-byte denominators)."""
        out = np.zeros(self.n_vocab, dtype=np.int64)
        out[list(self.ranks.values())] = [len(b) for b in self.ranks]
        return out

    def save(self, path):
        """A tokenizer.json in Llama-3's layout, which HF encodes to our ids (no post-processor: no BOS added)."""
        # tiktoken merges any two adjacent parts that form a token, at that token's rank: so every split of a
        # token into two tokens is listed, sorted by the rank of the token it makes, and ignore_merges mirrors
        # tiktoken's whole-chunk lookup.
        merges = []
        for t, _ in sorted(self.ranks.items(), key=_by_id):
            splits = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in self.ranks and t[i:] in self.ranks]
            merges += [[_bytes_to_str(a), _bytes_to_str(b)] for a, b in sorted(splits, key=lambda s: self.ranks[s[0]])]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for s, i in sorted(self.specials.items(), key=_by_id)]
        split = {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False}
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                 "merges": merges, "vocab": {_bytes_to_str(t): r for t, r in sorted(self.ranks.items(), key=_by_id)}}
        doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
               "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
               "post_processor": None, "decoder": byte_level, "model": model}
        _write_text(path, json.dumps(doc, ensure_ascii=False))

    @classmethod
    def load(cls, path):
        """Read a byte-level BPE tokenizer.json (ours, Llama-3.2's, SmolLM3's, a BpeTrainer's) or a folder holding
        one. What tiktoken cannot encode exactly as HF does is a one-line ValueError naming the file."""
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path}")

        def fail(msg):
            raise ValueError(f"{path}: {msg}")
        try:
            doc = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"not a JSON tokenizer file ({e})")
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            fail("expected model.type == 'BPE' (a byte-level BPE tokenizer.json)")
        for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                fail(f"expected model.{key} to be unset, got {json.dumps(model[key])}")
        if doc.get("normalizer") is not None:
            fail("expected no normalizer (null)")
        pre = doc.get("pre_tokenizer")
        seq = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
        ok = isinstance(seq, list) and len(seq) == 2 and all(isinstance(p, dict) for p in seq)
        split, level = seq if ok else ({}, {})
        if not (split.get("type") == "Split" and isinstance(split.get("pattern"), dict)
                and isinstance(split["pattern"].get("Regex"), str) and split.get("behavior") == "Isolated"
                and not split.get("invert") and level.get("type") == "ByteLevel"
                and not level.get("add_prefix_space") and not level.get("use_regex", True)):
            fail("expected pre_tokenizer Sequence[Split(Regex, behavior Isolated), ByteLevel(add_prefix_space "
                 "false, use_regex false)] as in Llama-3")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            fail("expected model.vocab to be an object and model.merges a list")
        added = {}
        for t in doc.get("added_tokens", []):
            if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
                fail(f"expected added_tokens entries with 'content' and 'id', got {str(t)[:60]}")
            added[t["content"]] = t["id"]
        if wrong := [s for s, i in vocab.items() if s in added and added[s] != i]:
            fail(f"token {wrong[0]!r} has id {vocab[wrong[0]]} in model.vocab but {added[wrong[0]]} in added_tokens")
        try:
            ranks = {_str_to_bytes(s): i for s, i in vocab.items() if s not in added}
        except KeyError as e:
            fail(f"model.vocab has a token with {e.args[0]!r}, a character outside the ByteLevel alphabet")
        if taken := [(s, i) for s, i in added.items() if i in set(ranks.values())]:
            fail(f"added token {taken[0][0]!r} has id {taken[0][1]}, which model.vocab gives to another token")
        if missing := [b for b in range(256) if bytes([b]) not in ranks]:
            fail(f"model.vocab lacks the single-byte tokens for bytes {missing[:8]}; byte-level BPE needs all 256")
        _check_merges(ranks, merges, model.get("ignore_merges", False), fail)
        try:
            return cls(ranks, added, split["pattern"]["Regex"])
        except ValueError as e:
            fail(str(e))


def _by_id(item):
    return item[1]


def _byte_to_char():
    """GPT-2's ByteLevel alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes (space,
    control characters, ...) for chr(256 + k) in byte order, so every token is a printable string."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


_B2C = _byte_to_char()
_C2B = {c: b for b, c in _B2C.items()}


def _bytes_to_str(b):
    return "".join(_B2C[x] for x in b)


def _str_to_bytes(s):
    return bytes(_C2B[c] for c in s)


def _check_merges(ranks, merges_raw, ignore_merges, fail):
    """Fail unless HF's merges encode every chunk as tiktoken does with ranks (tiktoken takes a chunk that is a
    token whole, else merges the adjacent pair that makes the lowest-rank token, leftmost first)."""
    listed, prev = set(), -1
    for i, m in enumerate(merges_raw):
        parts = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
            fail(f"model.merges[{i}]: expected 'a b' or ['a', 'b'], got {json.dumps(m)[:60]}")
        try:
            a, b = _str_to_bytes(parts[0]), _str_to_bytes(parts[1])
        except KeyError:
            fail(f"model.merges[{i}] {parts}: characters outside the ByteLevel alphabet")
        if a not in ranks or b not in ranks or a + b not in ranks:
            fail(f"model.merges[{i}] {parts}: both parts and their concatenation must be in model.vocab")
        if ranks[a + b] < prev or (ranks[a + b] == prev and not ignore_merges):
            fail(f"model.merges[{i}] {parts} makes id {ranks[a + b]} after a merge that made id {prev}; tiktoken "
                 "applies merges in the order of the ids they make, so merges must be sorted by that id"
                 + ("" if ignore_merges else ", one merge per id"))
        if not ignore_merges and max(ranks[a], ranks[b]) > ranks[a + b]:
            fail(f"model.merges[{i}] {parts}: a part has a higher id than the token it makes")
        prev = ranks[a + b]
        listed.add((a, b))
    if ignore_merges:
        # Llama-3's layout: HF takes a chunk that is a token whole, as tiktoken does, and every split of a
        # token into two tokens is listed, so both merge the same pairs in the same order.
        if unlisted := [(t[:i], t[i:]) for t in ranks for i in range(1, len(t))
                        if t[:i] in ranks and t[i:] in ranks and (t[:i], t[i:]) not in listed]:
            a, b = min(unlisted, key=lambda s: ranks[s[0] + s[1]])
            fail(f"model.merges lacks the merge {_bytes_to_str(a)!r} + {_bytes_to_str(b)!r} -> id {ranks[a + b]}: "
                 "tiktoken merges any two adjacent tokens that form a token, so every such split must be listed "
                 "(as in Llama-3's tokenizer.json)")
        return
    # A trainer's layout (ignore_merges false, one merge per token, its parts older than it): HF applies merges
    # in increasing id order, so up to id r both hold the same parts. tiktoken could differ only by joining
    # two adjacent parts a, b through an unlisted split of t = a + b; those parts cover t exactly, so HF's
    # merges alone would split the text t into [a, b] too. Hence: if HF's merges turn every token's own text
    # into that one token, no unlisted split ever fires, and tiktoken's whole-chunk lookup agrees as well.
    for t in ranks:
        parts = [bytes([c]) for c in t]
        while pairs := [k for k in range(len(parts) - 1) if (parts[k], parts[k + 1]) in listed]:
            k = min(pairs, key=lambda k: ranks[parts[k] + parts[k + 1]])
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        if parts != [t]:
            fail(f"model.merges turn the token {_bytes_to_str(t)!r} (id {ranks[t]}) into "
                 f"{[_bytes_to_str(p) for p in parts]}, but tiktoken takes a chunk that is a token whole "
                 "(ignore_merges false)")


def _write_text(path, text):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


# Encoding and chunk counting run in this process: a pool of 2 processes gained nothing measurable on 2 cores
# (tests/bench_data.py, old vs new in turn, load 3-4: prepare 14.5/13.8 s vs 15.2/10.6 s, train_bpe 9.5/15.4 s vs
# 13.6/9.0 s; pickling Counters back from the pool costs what the second core gains), nor did tiktoken's threads.
def _chunk_counts(texts):
    """Counter of pre-token chunks over an iterable of texts."""
    pattern, counts = regex.compile(LLAMA3_PATTERN), collections.Counter()
    for t in texts:
        counts.update(pattern.findall(t))
    return counts


def train_bpe(texts, vocab_size):
    """Byte-level BPE on strings -> Tokenizer of exactly vocab_size ids (specials included). The most frequent pair
    wins, ties the smallest (left id, right id); each merge updates only the chunks holding its pair."""
    n_merges = vocab_size - 256 - len(SPECIALS)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIALS)} (256 bytes + specials), got {vocab_size}")
    counts = _chunk_counts(texts)
    words = [list(c.encode("utf-8")) for c in counts]
    freq = list(counts.values())
    pair_count = collections.defaultdict(int)
    where = collections.defaultdict(set)  # pair -> indices of words that (may) contain it
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freq[wi]
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    token = [bytes([i]) for i in range(256)]
    while len(token) < 256 + n_merges:
        if not heap:
            raise ValueError(f"text too small for vocab_size={vocab_size}: only {len(token) - 256} merges possible")
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -neg:
            continue  # stale entry: this pair's count changed and was pushed again
        a, b = pair
        new = len(token)
        token.append(token[a] + token[b])
        delta = collections.defaultdict(int)
        for wi in where.pop(pair):
            w, out, i, n = words[wi], [], 0, len(words[wi])
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) == n:
                continue  # the word lost this pair to an earlier merge
            f = freq[wi]
            for p in zip(w, w[1:]):
                delta[p] -= f
            for p in zip(out, out[1:]):
                delta[p] += f
                if new in p:
                    where[p].add(wi)
            words[wi] = out
        for p, d in delta.items():
            if d:
                c = pair_count[p] + d
                if c:
                    pair_count[p] = c
                    heapq.heappush(heap, (-c, p))
                else:
                    del pair_count[p]
    ranks = {t: r for r, t in enumerate(token)}
    if len(ranks) != len(token):
        raise RuntimeError("BPE produced the same token twice; tiktoken needs unique token bytes")
    return Tokenizer(ranks, {s: len(token) + i for i, s in enumerate(SPECIALS.values())})


# ------------------------------------------------------------------------------------- chat template

# SmolLM3's chat template, rendered without jinja. A conversation is laid out as segments (text, is_special,
# in_loss): render_chat_text joins them, render_chat encodes them. Only the template's own text may hold
# control tokens; message text is always encoded as text (HF's tokenizer would turn a "<|im_end|>" typed by a
# user into the control token, we never do).
_ROLES = ("system", "user", "assistant", "tool")
_THINK_TAGS = regex.compile(r"(<think>|</think>)")
_CONTROL = regex.compile(r"(<\|im_start\|>|<\|im_end\|>|<think>|</think>)")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # the template's strftime("%d %B %Y"), without the locale
_DEFAULT_SYSTEM = {
    "/think": "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant "
    "involves thoroughly exploring questions through a systematic thinking process before providing the final "
    "precise and accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, "
    "exploration, reassessment, reflection, backtracking, and iteration to develop well-considered thinking "
    "process. Please structure your response into two main sections: Thought and Solution using the specified "
    "format: <think> Thought section </think> Solution section. In the Thought section, detail your reasoning "
    "process in steps. Each step should include detailed considerations such as analysing questions, "
    "summarizing relevant findings, brainstorming new ideas, verifying the accuracy of the current steps, "
    "refining any errors, and revisiting previous steps. In the Solution section, based on various attempts, "
    "explorations, and reflections from the Thought section, systematically present the final solution that "
    "you deem correct. The Solution section should be logical, accurate, and concise and detail necessary "
    "steps needed to reach the conclusion.",
    "/no_think": "You are a helpful AI assistant named SmolLM, trained by Hugging Face."}
# (text before the tool list, text after it) for the template's xml_tools and python_tools
_TOOLS = {
    "xml": ("You may call one or more functions to assist with the user query.\nYou are provided with function "
            "signatures within <tools></tools> XML tags:\n\n<tools>\n",
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>"),
    "python": ("When you send a message containing Python code between '<code>' and '</code>' tags, it will be "
               "executed in a stateful Jupyter notebook environment, and you will then be given the output to "
               "continued reasoning in an agentic loop.\n\nYou can use the following tools in your python code "
               "like regular functions:\n<tools>\n",
               "</tools>\n\nThe state persists between code executions: so variables that you define in one step "
               "are still available thereafter.")}


def _template(text, loss=0):
    """The template's own text: its <|im_start|>, <|im_end|> and <think> tags are control tokens."""
    return [(p, k % 2 == 1, loss) for k, p in enumerate(_CONTROL.split(text))]


def _chat_segments(messages, add_generation_prompt=False, enable_thinking=True, xml_tools=(), python_tools=(),
                   today=None, cutoff="June 2025"):
    messages = list(messages)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i}: expected {{'role': one of {_ROLES}, 'content': str}}, got {str(m)[:80]}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    # a flag in the system text beats enable_thinking; the flags are cut out, trailing space trimmed
    mode = "/no_think" if "/no_think" in system else "/think" if "/think" in system or enable_thinking else "/no_think"
    custom = system.replace("/no_think", "").replace("/think", "").rstrip()
    assistant = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n" if mode == "/no_think" else "")
    if "/system_override" in system:  # the user's text alone, no metadata
        segs = _template("<|im_start|>system\n") + [(custom.replace("/system_override", "").rstrip(), False, 0)]
        segs += _template("<|im_end|>\n")
    else:
        today = today or datetime.date.today()
        segs = _template(f"<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: {cutoff}\nToday Date: "
                         f"{today.day:02d} {_MONTHS[today.month - 1]} {today.year}\nReasoning Mode: {mode}\n\n"
                         "## Custom Instructions\n\n")
        segs += [(custom + "\n\n", False, 0)] if custom else _template(_DEFAULT_SYSTEM[mode] + "\n\n")
        if xml_tools or python_tools:
            segs += _template("### Tools\n\n")
            for kind, tools in (("xml", xml_tools), ("python", python_tools)):
                if tools:  # a tool is written as Python's str() of it, as jinja's `string` filter does
                    head, tail = _TOOLS[kind]
                    segs += _template(head) + [("".join(f"{t}\n" for t in tools), False, 0)] + _template(tail)
            segs += _template("\n\n<|im_end|>\n")
        # without tools the template never closes the system turn: the first user turn follows directly
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            parts = _THINK_TAGS.split(m["content"].lstrip("\n"))  # odd indices are the tags the model emits
            if mode == "/no_think" and len(parts) > 1:
                raise ValueError(f"message {i}: assistant content has <think> tags but the mode is /no_think")
            segs += _template(assistant) + [(p, k % 2 == 1, 1) for k, p in enumerate(parts)]
            segs += _template("<|im_end|>", loss=1) + _template("\n")
        elif m["role"] != "system":  # a tool result is a user turn
            segs += _template("<|im_start|>user\n") + [(m["content"], False, 0)] + _template("<|im_end|>\n")
    if add_generation_prompt:
        segs += _template(assistant)
    return [s for s in segs if s[0]]


def render_chat_text(messages, add_generation_prompt=False, **options):
    """The rendered conversation as SmolLM3's template writes it (special tokens by name). options:
    enable_thinking (default True), xml_tools, python_tools, today (a datetime.date; default today), cutoff."""
    return "".join(text for text, _, _ in _chat_segments(messages, add_generation_prompt, **options))


def render_chat(tok, messages, add_generation_prompt=False, **options):
    """-> (ids, mask), mask 1 on what the model generates (assistant content, <think> block, <|im_end|>). Text of one
    mask is encoded together: ids equal HF's tokenization of the string except where a mask boundary splits a token."""
    segs = []
    for text, special, loss in _chat_segments(messages, add_generation_prompt, **options):
        if special and text not in tok.specials:
            if text in ("<|im_start|>", "<|im_end|>"):
                raise ValueError("render_chat: this tokenizer has no <|im_start|>/<|im_end|> tokens (not a chat "
                                 "tokenizer)")
            special = False  # no <think> token in this vocabulary: the tag is text, encoded with its neighbours
        segs.append((text, special, loss))
    ids, mask = [], []
    for (special, loss), group in itertools.groupby(segs, key=lambda seg: seg[1:]):
        texts = [text for text, _, _ in group]
        part = [tok.specials[t] for t in texts] if special else tok.encode("".join(texts))
        ids += part
        mask += [loss] * len(part)
    return ids, mask


# ----------------------------------------------------------- token shards: input files, prepare, manifest

# A shard is a 128-byte header then the token ids (uint16, or uint32 past 65,536 ids), every document
# followed by the end-of-text token. The header lets a reader refuse a shard written by another tokenizer
# or cut short by a crash; the inputs digest lets `prepare` skip shards whose inputs did not change.
_HEADER = struct.Struct("<8sIIQQ64s32s")  # magic, version, itemsize, n_tokens, n_docs, tokenizer hash, inputs digest
SHARD_MAGIC, SHARD_VERSION = b"NSMLSHRD", 1
TEXT_SUFFIXES = (".txt", ".md", ".py")  # one file = one document
SPLITS = ("train", "val")


def read_shard_header(path):
    """-> (itemsize, n_tokens, n_docs, tokenizer hash, inputs digest), magic and file size checked."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except FileNotFoundError:
        raise ValueError(f"shard not found: {path}") from None
    if len(head) < _HEADER.size:
        raise ValueError(f"{path}: truncated shard ({size} bytes, shorter than its {_HEADER.size}-byte header)")
    magic, version, itemsize, n_tokens, n_docs, tok_hash, digest = _HEADER.unpack(head)
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: not a nanosmol token shard (magic {magic!r}, expected {SHARD_MAGIC!r})")
    if version != SHARD_VERSION or itemsize not in (2, 4):
        raise ValueError(f"{path}: unsupported shard version {version} / item size {itemsize}")
    if size != _HEADER.size + n_tokens * itemsize:
        raise ValueError(f"{path}: truncated shard: its header promises {n_tokens} tokens "
                         f"({_HEADER.size + n_tokens * itemsize} bytes) but the file has {size} bytes")
    return itemsize, n_tokens, n_docs, tok_hash.rstrip(b"\0").decode(), digest


def open_shard(path, tok_hash):
    """np.memmap [n_tokens] of a shard's ids, refusing a shard written with a different tokenizer."""
    itemsize, n_tokens, _, h, _ = read_shard_header(path)
    if h != tok_hash:
        raise ValueError(f"{path}: shard was written with tokenizer {h}, but the tokenizer in use is {tok_hash}")
    return np.memmap(path, dtype=f"<u{itemsize}", mode="r", offset=_HEADER.size, shape=(n_tokens,))


def write_shard(path, chunks, tok_hash, itemsize, digest=bytes(32)):
    """Write (tokens, n_docs) chunks as one shard -> (n_tokens, n_docs). Written to a temporary name, header
    last, then renamed: a failure at any point leaves no file at path."""
    tmp = f"{path}.tmp{os.getpid()}"
    n_tokens = n_docs = 0
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(_HEADER.size))
            for tokens, docs in chunks:
                f.write(np.asarray(tokens, dtype=f"<u{itemsize}").tobytes())
                n_tokens, n_docs = n_tokens + len(tokens), n_docs + docs
            f.seek(0)
            f.write(_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, itemsize, n_tokens, n_docs, tok_hash.encode(), digest))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n_tokens, n_docs


def read_jsonl(path):
    """Yield (line number, object) for each non-blank line; a bad line is a ValueError naming path:line."""
    if not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    with open(path, "rb") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: malformed JSON line ({e.msg} at character {e.pos})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{no}: not UTF-8") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{no}: expected a JSON object, got {type(obj).__name__}")
            yield no, obj


def _parquet_texts(path, field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}; choose "
                         "another with --field)")
    texts = (t for batch in pf.iter_batches(columns=[field], batch_size=4096) for t in batch.column(0).to_pylist())
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {row}: column {field!r} is {type(text).__name__}, expected a string")
        yield text


def iter_documents(path, field="text"):
    """Yield the documents of one input file: a .txt/.md/.py file is one document, a .jsonl line or a
    .parquet row is one (its `field`). Empty documents are skipped; a file with none is an error."""
    if path.endswith(TEXT_SUFFIXES):
        raw = pathlib.Path(path).read_bytes()
        try:
            texts = [raw.decode("utf-8")]
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif path.endswith(".jsonl"):
        texts = (_field(path, no, obj, field, str, " (choose another with --field)") for no, obj in read_jsonl(path))
    elif path.endswith(".parquet"):
        texts = _parquet_texts(path, field)
    else:
        raise ValueError(f"{path}: unsupported input type (expected {', '.join(TEXT_SUFFIXES)}, .jsonl or .parquet)")
    n_docs = 0
    for n_docs, text in enumerate(filter(None, texts), start=1):
        yield text
    if n_docs == 0:
        raise ValueError(f"{path}: empty file (no documents)")


def _field(path, no, obj, key, kind, hint=""):
    """obj[key] of a .jsonl line, checked to be a `kind` (ValueError naming path:line otherwise)."""
    if key not in obj:
        raise ValueError(f"{path}:{no}: missing field {key!r}{hint}")
    if not isinstance(obj[key], kind):
        raise ValueError(f"{path}:{no}: expected field {key!r} of type {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _documents(files, field, bar):
    """The documents of files in order; the byte progress bar moves by each one's length, capped at the file size."""
    for path in files:
        left = os.path.getsize(path)
        for text in iter_documents(path, field):
            bar.update(min(len(text), left))
            left -= min(len(text), left)
            yield text
        bar.update(left)


def _plan_shards(files, shard_bytes):
    """Group input files into shards: consecutive text files until shard_bytes; each .jsonl/.parquet alone.
    Depends on names and sizes only, so a re-run finds the same shards without reading any input."""
    units, size = [], shard_bytes  # size: bytes in the last text group (shard_bytes: no group open)
    for path in files:
        text = path.endswith(TEXT_SUFFIXES)
        if not text or size >= shard_bytes:  # a .jsonl/.parquet file closes the open group and is one alone
            units.append([])
            size = 0 if text else shard_bytes
        units[-1].append(path)
        size += os.path.getsize(path) if text else 0
    return units


def read_manifest(root):
    """root/manifest.json: {"tokenizer_hash", "n_vocab", "sources": {source: {split: entry}}} (see prepare)."""
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: prepare the dataset first (`python data.py prepare ...`, "
                         f"or `python data.py default CONFIG` for the embedded corpus)")
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: malformed manifest ({e})") from None


def prepare(files, out_dir, tok, source, split="train", field="text", shard_bytes=1 << 28):
    """Tokenize files into shards out_dir/<source>/<split>_NNNNN.bin listed in out_dir/manifest.json -> the
    (source, split) entry. A shard whose header matches (tokenizer hash, inputs' names/sizes/mtimes) is kept."""
    if not regex.fullmatch(r"[A-Za-z0-9_.-]+", source):
        raise ValueError(f"source name {source!r}: use letters, digits, '_', '-' or '.'")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if not files:
        raise ValueError("prepare: no input files given")
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"input file not found: {path}")
        if not path.endswith((*TEXT_SUFFIXES, ".jsonl", ".parquet")):
            raise ValueError(f"{path}: unsupported input type (expected {', '.join(TEXT_SUFFIXES)}, .jsonl, .parquet)")
    manifest_path = os.path.join(out_dir, "manifest.json")
    manifest = read_manifest(out_dir) if os.path.isfile(manifest_path) else {
        "version": 1, "tokenizer_hash": tok.hash, "n_vocab": tok.n_vocab, "sources": {}}
    if manifest["tokenizer_hash"] != tok.hash:
        raise ValueError(f"{manifest_path}: {out_dir} holds shards of tokenizer {manifest['tokenizer_hash']}, "
                         f"not of this one ({tok.hash}); prepare into another directory")
    itemsize = 2 if tok.n_vocab <= 1 << 16 else 4  # uint16 ids while they fit
    plan = []  # (relative path, input files, digest, (n_tokens, n_docs) if already complete else None)
    for i, unit in enumerate(_plan_shards(files, shard_bytes)):
        name = f"{source}/{split}_{i:05d}.bin"
        stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in unit]
        digest = hashlib.sha256(json.dumps([stats, field, tok.hash]).encode()).digest()
        try:
            _, n_tokens, n_docs, h, d = read_shard_header(os.path.join(out_dir, name))
            done = (n_tokens, n_docs) if (h, d) == (tok.hash, digest) else None
        except ValueError:
            done = None
        plan.append((name, unit, digest, done))
    todo = sum(os.path.getsize(f) for _, unit, _, done in plan if done is None for f in unit)
    new_dirs = [d for d in (out_dir, os.path.join(out_dir, source)) if not os.path.isdir(d)]
    os.makedirs(os.path.join(out_dir, source), exist_ok=True)
    shards = []
    try:
        with tqdm(total=todo, unit="B", unit_scale=True, desc=f"{source}/{split}", disable=not todo) as bar:
            for name, unit, digest, done in plan:
                if done is None:  # each document followed by the end-of-text token
                    chunks = ((tok.encode(text) + [tok.eos_id], 1) for text in _documents(unit, field, bar))
                    done = write_shard(os.path.join(out_dir, name), chunks, tok.hash, itemsize, digest)
                shards.append({"path": name, "tokens": done[0], "documents": done[1]})
    except BaseException:
        for d in reversed(new_dirs):  # a failed first run leaves no empty directories behind
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    entry = {"files": [os.path.abspath(f) for f in files], "documents": sum(s["documents"] for s in shards),
             "tokens": sum(s["tokens"] for s in shards), "tokenizer_hash": tok.hash, "shards": shards}
    manifest["sources"].setdefault(source, {})[split] = entry
    _write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return entry

# ------------------------------------------------------------------------------ embedded default corpus

# (a) code: the standard library of the running interpreter. Its test suites are left out (they are large
# and repetitive); files whose path hash falls in 3 of 100 buckets are the validation split, which keeps
# the choice fixed across machines with the same Python and independent of directory order.
def stdlib_files():
    """-> (train files, val files): the .py files of this interpreter's standard library, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    train, val = [], []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in {"site-packages", "test", "tests", "idle_test", "__pycache__"})
        for name in sorted(files):
            path = os.path.join(d, name)
            if name.endswith(".py") and os.path.getsize(path) > 0:  # empty __init__.py files are no documents
                (val if zlib.crc32(os.path.relpath(path, root).encode()) % 100 < 3 else train).append(path)
    return train, val


# (b) math: short, regular word and arithmetic problems with worked solutions. Every solution line holds
# exactly one equation `a op b = c` (integers, no negatives), and the last line states the result of the
# last equation, so any answer can be re-derived from the text. One small generator per kind.
_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Lena", "Max", "Nora",
          "Omar", "Priya", "Sam")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells", "stamps", "eggs")


def _solved(question, *steps):
    """-> (question, solution lines, answer): step (before, a, op, b, after) is the line "before a op b = c after."
    and the answer is the last c."""
    lines = []
    for before, a, op, b, after in steps:
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        lines.append(" ".join(filter(None, (before, f"{a} {op} {b} = {c}", after))) + ".")
    return question, lines, c


def _chain(rng):
    acc = rng.randint(10, 99)
    expr, steps = str(acc), []
    for _ in range(rng.randint(2, 3)):
        op = "-" if acc > 10 and rng.random() < 0.5 else "+"
        b = rng.randint(1, min(acc, 99)) if op == "-" else rng.randint(2, 99)
        steps.append(("", acc, op, b, ""))
        expr, acc = expr + f" {op} {b}", acc - b if op == "-" else acc + b
    return _solved(f"Compute {expr}.", *steps)


def _product(rng):
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    tens, ones = b - b % 10, b % 10
    if ones == 0:
        return _solved(f"Compute {a} * {b}.", ("", a, "*", b, ""))
    return _solved(f"Compute {a} * {b}.", ("", a, "*", tens, ""), ("", a, "*", ones, ""),
                   ("", a * tens, "+", a * ones, ""))


def _quotient(rng):
    d, q = rng.randint(2, 12), rng.randint(2, 40)
    return _solved(f"Compute {d * q} / {d}.", ("", d * q, "/", d, ""))


def _precedence(rng):
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 12)
    form = rng.randrange(4)
    if form == 0:
        return _solved(f"Evaluate {a} + {b} * {c}.", ("Multiply first:", b, "*", c, ""), ("Then", a, "+", b * c, ""))
    if form == 1:
        return _solved(f"Evaluate ({a} + {b}) * {c}.", ("Parentheses first:", a, "+", b, ""),
                       ("Then", a + b, "*", c, ""))
    if form == 2:
        c = rng.randint(1, a * b)
        return _solved(f"Evaluate {a} * {b} - {c}.", ("Multiply first:", a, "*", b, ""), ("Then", a * b, "-", c, ""))
    d = rng.randint(1, c - 1)
    return _solved(f"Evaluate {a} + {b} * ({c} - {d}).", ("Parentheses first:", c, "-", d, ""),
                   ("Then multiply:", b, "*", c - d, ""), ("Finally", a, "+", b * (c - d), ""))


def _shopping(rng):
    name, n, p = rng.choice(_NAMES), rng.randint(2, 9), rng.randint(2, 15)
    bill = rng.choice([b for b in (20, 50, 100, 200) if b >= n * p])
    return _solved(f"{name} buys {n} notebooks at {p} dollars each and pays with a {bill} dollar bill. How much "
                   f"change does {name} get?", ("The notebooks cost", n, "*", p, "dollars"),
                   ("The change is", bill, "-", n * p, "dollars"))


def _sharing(rng):
    name, item, k, q = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(2, 25)
    return _solved(f"{name} has {k * q} {item} and shares them equally among {k} friends. How many {item} does "
                   f"each friend get?", ("Each friend gets", k * q, "/", k, item))


def _travel(rng):
    v, t = rng.randint(3, 12) * 10, rng.randint(2, 9)
    return _solved(f"A train travels at {v} kilometers per hour for {t} hours. How far does it travel?",
                   ("It travels", v, "*", t, "kilometers"))


def _savings(rng):
    name, a, w = rng.choice(_NAMES), rng.randint(3, 20), rng.randint(2, 12)
    s = rng.randint(1, a * w)
    return _solved(f"{name} saves {a} dollars each week. After {w} weeks, {name} spends {s} dollars. How many "
                   f"dollars are left?", (f"{name} saves", a, "*", w, "dollars"),
                   ("", a * w, "-", s, "dollars are left"))


def _chairs(rng):
    r, c = rng.randint(3, 15), rng.randint(4, 12)
    k = rng.randint(1, r * c)
    return _solved(f"A hall has {r} rows of {c} chairs. {k} chairs are taken. How many chairs are free?",
                   ("There are", r, "*", c, "chairs"), ("", r * c, "-", k, "chairs are free"))


def _ages(rng):
    a, d, y = rng.randint(5, 40), rng.randint(2, 30), rng.randint(2, 20)
    n1, n2 = rng.sample(_NAMES, 2)
    return _solved(f"{n1} is {a} years old. {n2} is {d} years older than {n1}. How old will {n2} be in {y} years?",
                   (f"{n2} is", a, "+", d, "years old now"), (f"In {y} years {n2} will be", a + d, "+", y, ""))


def _boxes(rng):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    b, c, e = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    g = rng.randint(1, b * c + e)
    return _solved(f"{name} has {b} boxes with {c} {item} in each box and {e} more {item} on the table. {name} gives "
                   f"away {g} {item}. How many {item} does {name} have left?", ("The boxes hold", b, "*", c, item),
                   ("With the table that is", b * c, "+", e, ""), ("After giving some away:", b * c + e, "-", g, ""))


MATH_KINDS = (_chain, _product, _quotient, _precedence, _shopping, _sharing, _travel, _savings, _chairs, _ages, _boxes)


def math_problems(seed, n, exclude=frozenset(), unique=False):
    """n problems [(question, solution lines, answer)] from a seeded generator. A question in `exclude`
    (the held-out sets) is drawn again, and with unique=True so is any question already drawn."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        problem = rng.choice(MATH_KINDS)(rng)
        if problem[0] not in seen:
            out.append(problem)
            if unique:
                seen.add(problem[0])
    return out


def math_text(question, lines, answer):
    """A pretraining document: the problem, a worked solution (one equation per line), the answer."""
    return f"Problem: {question}\nSolution:\n" + "\n".join(lines) + f"\nThe answer is {answer}."


# (c) the problems of every embedded set. The held-out sets (seeds 1-5) hold unique questions that no training
# set (seeds 100-103) draws. posttrain.py makes the SFT / preference / RL rows of them, eval.py the test rows.
DEFAULT_SIZES = {"math_test": 500, "math_mc_test": 500, "math_val": 2_000, "sft_val": 200, "pref_val": 200,
                 "math_train": 50_000, "sft_train": 8_000, "pref_train": 2_000, "rl_train": 2_000}
_HELD_OUT = ("math_test", "math_mc_test", "math_val", "sft_val", "pref_val")


@functools.cache
def _held_out_questions():
    return frozenset(q for name in _HELD_OUT for q, _, _ in problems(name))


def problems(name, n=None):
    """The first n (default: all) problems [(question, solution lines, answer)] of embedded set `name`."""
    n = DEFAULT_SIZES[name] if n is None else n
    if name in _HELD_OUT:
        return math_problems(1 + _HELD_OUT.index(name), n, unique=True)
    return math_problems(100 + list(DEFAULT_SIZES).index(name) - len(_HELD_OUT), n, _held_out_questions())


def prepare_default(data_dir, vocab_size):
    """The default corpus in data_dir: math_train/math_val.jsonl, a tokenizer.json of vocab_size ids trained on
    a sample, the train/val shards of sources "code" and "math". Idempotent: what is complete is kept (a rerun
    takes ~1 s)."""
    t0 = time.perf_counter()
    os.makedirs(data_dir, exist_ok=True)
    paths = {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("math_train", "math_val")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            _write_text(path, "".join(json.dumps({"text": math_text(*x)}) + "\n" for x in problems(name)))
    code_train, code_val = stdlib_files()
    tok_path = os.path.join(data_dir, "tokenizer.json")
    if os.path.isfile(tok_path):
        tok = Tokenizer.load(tok_path)
        if tok.n_vocab != vocab_size:
            raise ValueError(f"{tok_path} has {tok.n_vocab} ids but vocab_size is {vocab_size}; use another data_dir")
    else:
        # the tokenizer's training text (~3.5 MB): every fifth code file and the first 8,000 math documents
        code = (text for path in code_train[::5] for text in iter_documents(path))
        math = (obj["text"] for _, obj in itertools.islice(read_jsonl(paths["math_train"]), 8_000))
        tok = train_bpe(itertools.chain(code, math), vocab_size)
        tok.save(tok_path)
    for source, split, files in (("code", "train", code_train), ("code", "val", code_val),
                                 ("math", "train", [paths["math_train"]]), ("math", "val", [paths["math_val"]])):
        entry = prepare(files, data_dir, tok, source, split)
        print(f"{source}/{split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens")
    print(f"default corpus ready in {data_dir} ({time.perf_counter() - t0:.1f} s)")


# ----------------------------------------------------------------------------------------------- loader

@dataclass
class DataConfig:
    """Pretraining data: where it lives, row length, and the per-source mixture over training steps."""
    data_dir: str = "data/default"  # the embedded corpus and its tokenizer (posttrain.py writes its sets here)
    tokenizer: str = "default"       # "default": <data_dir>/tokenizer.json; else a tokenizer.json or its folder
    dataset: str = "default"         # "default": the embedded corpus in data_dir; else a `data.py prepare` --out
    seq_len: int = 1024
    mixture: dict[str, float] = field(default_factory=lambda: {"code": 0.6, "math": 0.4})  # source -> weight
    stages: list = field(default_factory=list)  # [[start_step, {source: weight}], ...], each replacing the last


def load_tokenizer(cfg):
    """cfg.tokenizer: "default" = <data_dir>/tokenizer.json, else a path for Tokenizer.load."""
    path = os.path.join(cfg.data_dir, "tokenizer.json") if cfg.tokenizer == "default" else cfg.tokenizer
    if cfg.tokenizer == "default" and not os.path.isfile(path):
        raise ValueError(f"tokenizer not found: {path} (build the default corpus: `python data.py default CONFIG`)")
    return Tokenizer.load(path)


# Every loader maps a global sample index to a row as a pure function of (seed, index): nothing is
# stored per step, so memory and time per batch do not grow with the step or the corpus (the playbook's
# nanosets slowdown came from index arrays that did), and resuming needs only the step.
_M64 = (1 << 64) - 1
# One hash family: splitmix64's output function (Steele, Lea & Flood 2014), on uint64 arrays. Its two odd
# multipliers are the constants its authors found to best spread every input bit over all output bits, the
# shifts 30/27/31 fold the high bits back down; each step is a bijection of 64-bit words.
_K1, _K2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z):
    z = np.atleast_1d(np.asarray(z, dtype=np.uint64))
    z = (z ^ (z >> np.uint64(30))) * _K1  # uint64 products wrap mod 2^64, as the hash intends
    z = (z ^ (z >> np.uint64(27))) * _K2
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=4096)
def _key(*parts):
    """A 64-bit key from ints, each mixed into the running hash (cached: every micro-batch asks again)."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _mix(h ^ np.uint64(p & _M64))
    return int(h[0])


def permute(i, n, key):
    """A bijection of [0, n) keyed by a 64-bit int, applied to the int array i (any shape) in O(len(i)) memory."""
    # A 4-round Feistel network permutes [0, 2^b), b the bits of n - 1: each round maps (left, right) to
    # (right, left ^ F(right)), invertible whatever F is. A value at or past n goes through again (cycle
    # walking) until inside [0, n), still a bijection; the domain is < 2n, so fewer than two passes on average.
    shape, i = np.shape(i), np.asarray(i, dtype=np.uint64).reshape(-1)
    b, keys = (n - 1).bit_length(), [np.uint64(_key(key, r)) for r in range(4)]

    def feistel(x):
        wl, wr = (b + 1) // 2, b // 2
        left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) >> np.uint64(64 - wl) if wl else np.zeros_like(left))
            wl, wr = wr, wl
        return (left << np.uint64(wr)) | right
    out = feistel(i)
    bad = np.flatnonzero(out >= n)
    while len(bad):
        out[bad] = feistel(out[bad])
        bad = bad[out[bad] >= n]
    return out.astype(np.int64).reshape(shape)


def _draw(k, n, key):
    """Row of the k-th draw (int64 array) from n rows: epoch e = k // n uses its own permutation of the rows."""
    epoch, out = k // n, np.empty_like(k)
    for e in np.unique(epoch).tolist():  # one micro-batch rarely straddles an epoch
        out[epoch == e] = permute(k[epoch == e] % n, n, _key(key, e))
    return out


def _first_index(step, micro_step, micro_batch_size, accum, rank, world_size):
    """Global index of a micro-batch's first sample: step*G + (micro_step*world_size + rank)*micro_batch_size
    with G = micro_batch_size*accum*world_size, so DP=1 with k accumulation steps sees the rows of DP=k."""
    return step * micro_batch_size * accum * world_size + (micro_step * world_size + rank) * micro_batch_size


def _with_pos(buf, eos_id):
    """[B, T+1] ids -> (x, y, pos) int64 tensors [B, T]; pos restarts at 0 at each row start and after each EOT."""
    x, y = np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])
    start = np.empty(x.shape, dtype=bool)
    start[:, 0], start[:, 1:] = True, x[:, :-1] == eos_id
    first = np.flatnonzero(start)  # flat index of each document's first token
    pos = np.arange(x.size) - np.repeat(first, np.diff(first, append=x.size))
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos.reshape(x.shape))


def _schedule(mixture, stages):
    """[(start_step, {source: weight})] from cfg.mixture (step 0) and cfg.stages, validated and normalised."""
    out = [(0, mixture)]
    for i, stage in enumerate(stages):
        if not (isinstance(stage, (list, tuple)) and len(stage) == 2 and isinstance(stage[0], int)
                and isinstance(stage[1], dict)):
            raise ValueError(f"stages[{i}]: expected [start_step, {{source: weight}}], got {stage!r}")
        if stage[0] == 0 and i == 0:
            out = []
        elif stage[0] <= out[-1][0]:
            raise ValueError(f"stages[{i}]: start step {stage[0]} must exceed the previous stage's {out[-1][0]}")
        out.append(tuple(stage))
    for start, weights in out:
        if not all(isinstance(w, (int, float)) and w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture of the stage starting at step {start}: expected {{source: weight >= 0}} with "
                             f"a positive sum, got {weights!r}")
    return [(start, {s: w / sum(weights.values()) for s, w in weights.items()}) for start, weights in out]


# A stage's mixture as nested Beatty sequences: level k takes P_k/2^24 of the samples no earlier level took,
# floor(m*P_k/2^24 + 1/2) of the first m, and the last level takes the rest. So count_k(n), source k's share
# of a stage's first n samples, is O(1) exact integer arithmetic, and |count_k(n) - n*w_k| < number of
# sources for every n (tests/test_data.py checks n <= 100,000). 2^24 steps keep n*P in int64 up to 2^39.
_ONE = 1 << 24


def _levels(weights, names):
    """[(source index, P)] of a mixture, the last level's P = 2^24."""
    items = [(names.index(s), w) for s, w in weights.items() if w > 0]
    left, levels = sum(w for _, w in items), []
    for idx, w in items:
        levels.append((idx, min(_ONE, round(w / left * _ONE))))
        left -= w
    levels[-1] = (levels[-1][0], _ONE)
    return levels


def _counts(levels, n, n_sources):
    """count_k(n) for every source k: how many of a stage's first n samples it takes (ints or int64 arrays)."""
    counts = [0] * n_sources
    for idx, P in levels:
        c = (n * P + _ONE // 2) >> 24
        counts[idx], n = c, n - c  # each source has one level
    return counts


class Loader:
    """Pretraining batches: row r of a source is tokens [r*T, r*T + T + 1) of its shards (T = seq_len; rows do not
    cross shards), so each token is a target once per epoch. A micro-batch takes count_k(end) - count_k(start) rows
    of source k (its in-stage sample range), drawn on from where k stopped through its epoch permutations."""

    def __init__(self, cfg, tok, micro_batch_size, accum, seed, dp_rank=0, dp_size=1):
        self.root = cfg.data_dir if cfg.dataset == "default" else cfg.dataset  # holds manifest.json + shards
        self.seq_len, self.tok, self.manifest = cfg.seq_len, tok, read_manifest(self.root)
        self.micro_batch_size, self.accum, self.rank, self.world_size = micro_batch_size, accum, dp_rank, dp_size
        self.G = micro_batch_size * accum * dp_size
        if self.manifest["tokenizer_hash"] != tok.hash:
            raise ValueError(f"{self.root}/manifest.json: the dataset was tokenized with "
                             f"{self.manifest['tokenizer_hash']}, but the tokenizer {cfg.tokenizer!r} is {tok.hash}")
        self.schedule = _schedule(cfg.mixture, cfg.stages)
        self.sources = sorted({s for _, weights in self.schedule for s, w in weights.items() if w > 0})
        self._streams = {}
        self.rows = {s: self._stream(s, "train")[1][-1] for s in self.sources}  # rows per epoch of each source
        self._keys = [_key(seed, *s.encode()) for s in self.sources]  # a name, not a path: data may move
        self._starts = [start for start, _ in self.schedule]
        self._levels = [_levels(weights, self.sources) for _, weights in self.schedule]
        self._offsets = [[0] * len(self.sources)]  # per stage: each source's draws before it
        for k in range(1, len(self._starts)):
            counts = _counts(self._levels[k - 1], (self._starts[k] - self._starts[k - 1]) * self.G, len(self.sources))
            self._offsets.append([a + b for a, b in zip(self._offsets[-1], counts)])

    def _stream(self, source, split):
        """(memmaps of the source's shards, row starts [n_shards + 1], shard paths) for one split, opened once."""
        if (source, split) not in self._streams:
            entry = self.manifest["sources"].get(source, {}).get(split)
            if entry is None:
                have = [f"{s}/{sp}" for s, d in self.manifest["sources"].items() for sp in d]
                raise ValueError(f"{self.root}/manifest.json: no {split} split of source {source!r} "
                                 f"(have: {', '.join(have)})")
            paths = [os.path.join(self.root, s["path"]) for s in entry["shards"]]
            # plain ndarray views of the memmaps: slicing a np.memmap builds a memmap object each time
            maps = [open_shard(p, self.tok.hash).view(np.ndarray) for p in paths]
            starts = [0, *itertools.accumulate((len(m) - 1) // self.seq_len for m in maps)]
            if starts[-1] == 0:
                raise ValueError(f"source {source!r} ({split}) has fewer than seq_len + 1 = {self.seq_len + 1} tokens")
            self._streams[source, split] = maps, starts, paths
        return self._streams[source, split]

    def _read(self, split, names, rows):
        """(x, y, pos) [len(rows), seq_len] of a split's rows (names: each row's source). One max per batch: an id
        outside the vocabulary (a corrupt shard) is an error naming its shard and offset before the embedding."""
        buf, where = np.empty((len(rows), self.seq_len + 1), dtype=np.int64), []
        for i, (name, r) in enumerate(zip(names, rows.tolist())):
            maps, starts, paths = self._stream(name, split)
            s = bisect.bisect_right(starts, r) - 1
            a = (r - starts[s]) * self.seq_len
            buf[i] = maps[s][a:a + self.seq_len + 1]
            where.append((paths[s], a))
        if buf.max() >= self.tok.n_vocab:
            i, t = (int(v[0]) for v in np.nonzero(buf >= self.tok.n_vocab))
            raise ValueError(f"{where[i][0]}: token id {buf[i, t]} at offset {where[i][1] + t} is outside the "
                             f"vocabulary ({self.tok.n_vocab} ids): a corrupt shard, or another tokenizer's")
        return _with_pos(buf, self.tok.eos_id)

    def weights_at(self, step):
        return dict(self.schedule[bisect.bisect_right(self._starts, step) - 1][1])

    def locate(self, step, micro_step):
        """-> (source index [B], row [B]) of a micro-batch: the whole data order, without reading tokens."""
        k, S = bisect.bisect_right(self._starts, step) - 1, len(self.sources)  # the step's stage
        j = _first_index(step, micro_step, self.micro_batch_size, self.accum, self.rank, self.world_size)
        j -= self._starts[k] * self.G  # the micro-batch's first in-stage sample
        lo, hi = _counts(self._levels[k], j, S), _counts(self._levels[k], j + self.micro_batch_size, S)
        draws = [np.arange(a, b, dtype=np.int64) + off for a, b, off in zip(lo, hi, self._offsets[k])]
        rows = [_draw(d, self.rows[name], key) for d, name, key in zip(draws, self.sources, self._keys)]
        return np.repeat(np.arange(S), [len(d) for d in draws]), np.concatenate(rows)

    def get(self, step, micro_step):
        """-> (x, y, pos) int64 tensors [micro_batch_size, seq_len] of this rank's micro-step."""
        src, rows = self.locate(step, micro_step)
        return self._read("train", [self.sources[s] for s in src.tolist()], rows)

    def val_rows(self, source, n_rows):
        """n_rows rows evenly spaced over a source's val split (row floor(r * have / n_rows)), so a small
        eval covers every held-out file rather than the first few -> (x, y, pos) [n_rows, seq_len]."""
        have = self._stream(source, "val")[1][-1]
        if n_rows > have:
            raise ValueError(f"source {source!r} has {have} val rows of {self.seq_len + 1} tokens; asked for "
                             f"{n_rows} (eval_rows must be at most {have})")
        return self._read("val", [source] * n_rows, np.arange(n_rows) * have // n_rows)


# ------------------------------------------------------------------------------------- command line

def _prepare_main(argv):
    p = argparse.ArgumentParser(prog="python data.py prepare", description="Tokenize text files into token shards")
    p.add_argument("files", nargs="+", help=".txt/.md/.py (a document each), .jsonl (one per line), .parquet (per row)")
    p.add_argument("--out", required=True, help="dataset directory (shards + manifest.json)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a folder holding one")
    p.add_argument("--source", default="web", help="source name, as the mixture weights name it (default: web)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--field", default="text", help=".jsonl text field / .parquet column (default: text)")
    p.add_argument("--shard_mb", type=int, default=256, help="text files are grouped into shards of about this size")
    a = p.parse_args(argv)
    entry = prepare(a.files, a.out, Tokenizer.load(a.tokenizer), a.source, a.split, a.field, a.shard_mb << 20)
    print(f"{a.source}/{a.split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens, "
          f"{len(entry['shards'])} shards in {a.out}")


def _default_main(argv):
    ns = load(argv, DataConfig, ModelConfig, prog="python data.py default", strict=False)
    prepare_default(ns.data_dir, ns.vocab_size)     # the BPE vocabulary is the model's


COMMANDS = {"default": _default_main, "prepare": _prepare_main}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        raise SystemExit(f"python data.py: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} "
                         "(-h for usage)")
    try:
        COMMANDS[argv[0]](argv[1:])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
