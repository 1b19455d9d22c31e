"""data.py — tokenizer, chat template, corpus preparation, the embedded default corpus and loaders.

(Docstring to be completed: design choices + how to run: `python data.py prepare ...`,
`python data.py tokenizer-eval ...`, `python data.py bench`.)
"""
import base64
import collections
import hashlib
import heapq
import json
import multiprocessing
import os
import sysconfig
import time

import numpy as np
import regex
import tiktoken

# ==== TOKENIZER SECTION (BPE training, tiktoken encoding, HF tokenizer.json import/export, metrics, chat template) ====

# Llama-3's pre-tokenization pattern (SmolLM3 inherits it): English contractions, letter runs with at
# most one leading non-letter (so " the" is one chunk), numbers in groups of at most three digits,
# punctuation runs with their trailing newlines, newline runs, and whitespace that leaves its last space
# to lead the next word. BPE never merges across chunks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Our special tokens, given ids in this order right after the regular ranks. The names are Llama-3's /
# SmolLM3's (pad is Llama's <|finetune_right_pad_id|>), so an imported SmolLM3 tokenizer.json has them all.
SPECIALS = {"bos_id": "<|begin_of_text|>", "eos_id": "<|end_of_text|>", "im_start_id": "<|im_start|>",
            "im_end_id": "<|im_end|>", "pad_id": "<|finetune_right_pad_id|>", "think_id": "<think>",
            "think_end_id": "</think>"}

_FORMAT_HEADER = "# nanosmol tokenizer v1"


class Tokenizer:
    """Byte-level BPE in a tiktoken.Encoding plus named special-token ids.

    ranks: {token bytes: rank} for the regular tokens, ranks exactly 0..N-1 (rank = merge priority, as
    tiktoken wants); specials: {name: id} with ids N..V-1 and every name of SPECIALS present."""

    def __init__(self, ranks, specials, pattern=LLAMA3_PATTERN):
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"tokenizer ranks must be exactly 0..{n - 1}")
        if sorted(specials.values()) != list(range(n, n + len(specials))):
            raise ValueError(f"special token ids must be exactly {n}..{n + len(specials) - 1} (after the ranks)")
        missing = [s for s in SPECIALS.values() if s not in specials]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.ranks, self.specials, self.pattern = ranks, dict(specials), pattern
        self.enc = tiktoken.Encoding("nanosmol", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.specials)
        self.n_vocab = n + len(specials)
        for attr, name in SPECIALS.items():
            setattr(self, attr, self.specials[name])
        self._hash = None

    @classmethod
    def byte_level(cls):
        """The 256 single bytes (rank = byte value), no merges, then our specials: handy for tests."""
        return cls({bytes([i]): i for i in range(256)}, {s: 256 + i for i, s in enumerate(SPECIALS.values())})

    def encode(self, text):
        # encode_ordinary: a special token's name inside text is plain text, never the control token.
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def token_bytes(self):
        """[n_vocab] int64: UTF-8 byte length of each token, 0 for specials (bits-per-byte denominators)."""
        out = np.zeros(self.n_vocab, dtype=np.int64)
        for b, r in self.ranks.items():
            out[r] = len(b)
        return out

    def _serialize(self):
        # Header lines start with '#', which base64 never does; the rank lines are tiktoken's own format.
        lines = [_FORMAT_HEADER, "# pattern " + json.dumps(self.pattern)]
        lines += [f"# special {name} {i}" for name, i in sorted(self.specials.items(), key=lambda kv: kv[1])]
        lines += [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        return "\n".join(lines) + "\n"

    @property
    def hash(self):
        """Stable 16-hex-digit hash of pattern + ranks + specials (stored in shard headers)."""
        if self._hash is None:
            self._hash = hashlib.sha256(self._serialize().encode()).hexdigest()[:16]
        return self._hash

    def save(self, path):
        _atomic_write(path, self._serialize())

    @classmethod
    def load(cls, path):
        """Read the format written by save(); a malformed line is a ValueError naming path:line."""
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines or lines[0] != _FORMAT_HEADER:
            raise ValueError(f"{path}:1: expected the header line {_FORMAT_HEADER!r}")
        pattern, specials, ranks = None, {}, {}
        for no, line in enumerate(lines[1:], start=2):
            try:
                if line.startswith("# pattern "):
                    pattern = json.loads(line[len("# pattern "):])
                elif line.startswith("# special "):
                    name, i = line[len("# special "):].rsplit(" ", 1)
                    specials[name] = int(i)
                else:
                    token, rank = line.split(" ")
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{no}: expected '# pattern JSON', '# special NAME ID' or 'BASE64 RANK', "
                                 f"got {line[:60]!r}") from None
        if not isinstance(pattern, str):
            raise ValueError(f"{path}: missing the '# pattern' line")
        try:
            return cls(ranks, specials, pattern)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _count_chunks(texts):
    """Counter of pre-token chunks over a list of texts (a multiprocessing worker)."""
    pat = regex.compile(LLAMA3_PATTERN)
    counts = collections.Counter()
    for t in texts:
        counts.update(pat.findall(t))
    return counts


def _batches(texts, chars):
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _chunk_counts(texts, batch_chars=2 << 20):
    """Count unique chunks; batches of ~2M characters go to one worker per core once there are two."""
    batches = _batches(texts, batch_chars)
    first, second = next(batches, []), next(batches, None)
    if second is None:
        return _count_chunks(first)
    total = collections.Counter()
    with multiprocessing.Pool(len(os.sched_getaffinity(0))) as pool:
        for counts in pool.imap_unordered(_count_chunks, [first, second, *batches]):
            total.update(counts)  # sums are order-independent, so the result is deterministic
    return total


def train_bpe(texts, vocab_size):
    """Train byte-level BPE on an iterable of strings -> Tokenizer with exactly vocab_size ids (specials included).

    Chunks (LLAMA3_PATTERN) are counted once; each merge then touches only the chunks that contain its
    pair (an index pair -> chunk ids) and updates pair counts by difference. The pair to merge is the most
    frequent; ties go to the smallest (left id, right id), so training is deterministic."""
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


def bench_tokenizer(vocab_size=16384, megabytes=10):
    """Time train_bpe on the first ~10 MB (sorted paths) of this interpreter's standard-library source."""
    texts, size = [], 0
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py") and size < megabytes << 20:
                with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
                size += len(texts[-1].encode("utf-8"))
    t0 = time.perf_counter()
    tok = train_bpe(texts, vocab_size)
    dt = time.perf_counter() - t0
    n = sum(len(ids) for ids in tok.encode_batch(texts))
    print(f"train_bpe: {vocab_size} vocab on {size / 1e6:.1f} MB ({len(texts)} files) in {dt:.1f} s; "
          f"{size / n:.2f} bytes/token on that text")

# ==== END TOKENIZER SECTION ====

# ==== CORPUS + LOADER SECTION (prepare shards, embedded default corpus, Loader, SFT packing, preference/RL batches, bench) ====

# ==== END CORPUS + LOADER SECTION ====
