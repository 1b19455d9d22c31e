"""posttrain.py — SmolLM3 post-training: the post-training loaders (SFT packing, preference pairs, RL prompts).

Sections:
  loaders   SFTLoader (best-fit-decreasing packing, per-conversation positions, assistant-only targets),
            PreferenceLoader (chosen/rejected rows, prompt masked), PromptLoader (generation prompts + answers);
            padding is pos = -1, y = -100
"""
import bisect

import numpy as np
import torch

from data import _draw, _field, _first_index, _key, read_jsonl, render_chat

# ---------------------------------------------------------------------------------------------- loaders

def pack_bfd(lengths, capacity):
    """Best-fit-decreasing bin packing -> bins (lists of item indices, in placement order). Longest item
    first (ties: lower index); each goes to the open bin with the least room that still fits it (ties:
    the older bin), else to a new bin."""
    room, bins = [], []  # room: sorted (free space, bin index) of bins with space left
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}; expected 1..{capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            free, b = capacity - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free:
            bisect.insort(room, (free, b))
    return bins


def _rows(path, fields, render):
    """render(*fields of each line) for the lines of a .jsonl file; a ValueError names path:line."""
    out = []
    for no, obj in read_jsonl(path):
        values = [_field(path, no, obj, key, kind) for key, kind in fields]
        try:
            out.append(render(*values))
        except ValueError as e:
            raise ValueError(f"{path}:{no}: {e}") from None
    return out


def _chat_xy(tok, messages, seq_len, n_prompt=0):
    """Render a conversation -> (x, y) int64 arrays: y[t] = ids[t+1] where that token is the model's to
    generate after the first n_prompt messages, else -100. Truncated to seq_len tokens."""
    ids, mask = render_chat(tok, messages)
    # turns are encoded one by one, so the prompt's rendering is a prefix of the conversation's
    prompt_len = len(render_chat(tok, messages[:n_prompt])[0]) if n_prompt else 0
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    mask[:prompt_len] = False
    return ids[:-1][:seq_len], np.where(mask[1:], ids[1:], -100)[:seq_len]


def _padded(tok, rows, T):
    """[(x, y)] -> (x, y, pos) int64 arrays [len(rows), T]: each row from position 0, then padding (pad id,
    y = -100, pos = -1, which nothing attends to or from)."""
    x = np.full((len(rows), T), tok.pad_id, dtype=np.int64)
    y, pos = np.full_like(x, -100), np.full_like(x, -1)
    for r, (xs, ys) in enumerate(rows):
        x[r, :len(xs)], y[r, :len(ys)], pos[r, :len(xs)] = xs, ys, np.arange(len(xs))
    return x, y, pos


class _Shuffled:
    """The shared order of the post-training loaders: the global sample index (as in Loader) drawn through
    per-epoch permutations of the n items."""

    def _setup(self, n, micro_batch_size, accum, seed, rank, world_size, path, kind):
        if n == 0:
            raise ValueError(f"{path}: no examples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.micro_batch_size, self.accum = n, micro_batch_size, accum
        self.rank, self.world_size = rank, world_size
        self._key = _key(seed, *kind.encode())

    def indices(self, step, micro_step):
        """Item indices [micro_batch_size] of this rank's micro-step."""
        g = _first_index(step, micro_step, self.micro_batch_size, self.accum, self.rank, self.world_size)
        return _draw(g + np.arange(self.micro_batch_size, dtype=np.int64), self.n, self._key)


class SFTLoader(_Shuffled):
    """SFT conversations ({"messages": [...]} per line) packed best-fit-decreasing into rows of seq_len, each
    with its own positions 0, 1, ... and targets (y = -100 but on assistant output), then padding (pos = -1)."""

    def __init__(self, path, tok, seq_len, micro_batch_size, accum=1, seed=0, rank=0, world_size=1):
        docs = _rows(path, [("messages", list)], lambda messages: _chat_xy(tok, messages, seq_len))
        self.bins = pack_bfd([len(x) for x, _ in docs], seq_len)
        packed = [[np.concatenate(a) for a in zip(*(docs[i] for i in items))] for items in self.bins]
        self.x, self.y, self.pos = _padded(tok, packed, seq_len)
        for r, items in enumerate(self.bins):  # positions restart at every conversation of a row
            starts = np.cumsum([0] + [len(docs[i][0]) for i in items])
            for a, b in zip(starts, starts[1:]):
                self.pos[r, a:b] = np.arange(b - a)
        self._setup(len(self.bins), micro_batch_size, accum, seed, rank, world_size, path, "sft")

    def get(self, step, micro_step):
        """-> (x, y, pos) int64 tensors [micro_batch_size, seq_len]."""
        rows = self.indices(step, micro_step)
        return tuple(torch.from_numpy(a[rows]) for a in (self.x, self.y, self.pos))


class PreferenceLoader(_Shuffled):
    """Preference pairs ({"prompt": [...], "chosen": [assistant], "rejected": [assistant]} per line), one per row:
    y = -100 on the prompt and on padding, so the sum of -CE over y != -100 is the completion's log-probability."""

    def __init__(self, path, tok, seq_len, micro_batch_size, accum=1, seed=0, rank=0, world_size=1):
        self.tok = tok
        sides = [("prompt", list), ("chosen", list), ("rejected", list)]
        self.pairs = _rows(path, sides, lambda prompt, *replies: [
            _chat_xy(tok, prompt + reply, seq_len, len(prompt)) for reply in replies])
        self._setup(len(self.pairs), micro_batch_size, accum, seed, rank, world_size, path, "preference")

    def get(self, step, micro_step):
        """-> ((x, y, pos) chosen, (x, y, pos) rejected), int64 tensors [micro_batch_size, T], T the longest side."""
        pairs = [self.pairs[i] for i in self.indices(step, micro_step).tolist()]
        T = max(len(x) for pair in pairs for x, _ in pair)
        return tuple(tuple(map(torch.from_numpy, _padded(self.tok, [p[side] for p in pairs], T))) for side in (0, 1))


class PromptLoader(_Shuffled):
    """RL prompts ({"prompt": [...], "answer": "N"} per line) -> get() = (prompt ids rendered with the
    generation prompt, answers as strings); rewards call eval.check_answer(completion, answer)."""

    def __init__(self, path, tok, micro_batch_size, accum=1, seed=0, rank=0, world_size=1, enable_thinking=True):
        rows = _rows(path, [("prompt", list), ("answer", str)], lambda prompt, answer: (
            render_chat(tok, prompt, True, enable_thinking=enable_thinking)[0], answer))
        self.prompts, self.answers = [ids for ids, _ in rows], [answer for _, answer in rows]
        self._setup(len(self.prompts), micro_batch_size, accum, seed, rank, world_size, path, "rl")

    def get(self, step, micro_step):
        """-> (prompts: list of id lists, answers: list of str), micro_batch_size of each."""
        idx = self.indices(step, micro_step).tolist()
        return [self.prompts[i] for i in idx], [self.answers[i] for i in idx]

