"""posttrain.py — SmolLM3 post-training: the post-training loaders (SFT packing, preference pairs, RL prompts).

Sections:
  loaders   SFTLoader (best-fit-decreasing packing, per-conversation positions, assistant-only targets),
            PreferenceLoader (chosen/rejected rows, prompt masked), PromptLoader (generation prompts + answers);
            padding is pos = -1, y = -100
"""
import bisect
import time
from dataclasses import dataclass

import numpy as np
import torch

from data import _draw, _field, _first_index, _key, read_jsonl, render_chat
from eval import check_answer, completion_text, follows_format

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


# ---------------------------------------------------------------------------------------------- GRPO
# Group Relative Policy Optimization (DeepSeekMath) with DAPO's changes, as the playbook's RL stage runs it:
# G completions per prompt; reward = the verified answer (eval.check_answer), an optional format bonus and
# the soft overlong penalty; advantage = reward against its group; a per-token clipped ratio with
# asymmetric ε (DAPO's clip-higher); no KL by default (β = 0); token-level aggregation by default.

@dataclass
class GRPOConfig:
    rl_data: str = "data/default/rl_train.jsonl"   # {"prompt": [messages], "answer": "N"} per line
    enable_thinking: bool = True    # the dataset's mode; an example's system turn with /think or /no_think wins
    prompts_per_step: int = 8       # all of a step's prompts x group_size go through one batched generate
    group_size: int = 8             # G completions per prompt
    max_new_tokens: int = 256       # L_max: the generation budget
    overlong_cache: int = 64        # L_cache: DAPO's soft penalty starts at L_max - L_cache; 0 = off
    format_reward: float = 0.0      # added when the completion follows the chat format (eval.follows_format)
    temperature: float = 1.0        # sampling; the log-probs are those of the same tempered distribution
    top_k: int | None = None
    top_p: float | None = None
    eps_low: float = 0.2            # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.28
    beta: float = 0.0               # k3 KL to the initial policy; 0 = no reference model
    scale_rewards: bool = True      # divide by the group's std; False = Dr. GRPO
    loss_agg: str = "dapo"          # "grpo" | "dapo" | "dr_grpo" (see token_weights)
    num_iterations: int = 1         # updates per rollout batch, each against the rollout's log-probs
    rollout_batch: int = 64         # completions per generate call (bounds the KV cache)


def overlong_penalty(length, max_len, cache):
    """DAPO's soft overlong punishment of a completion of `length` tokens: 0 up to max_len - cache, then a
    linear ramp down to -1 at max_len, -1 beyond."""
    if length <= max_len - cache:
        return 0.0
    return (max_len - cache - length) / cache if length <= max_len else -1.0


def completion_reward(tok, ids, answer, think, gc):
    """Reward of one completion (generated ids, stop token included): 1 if its answer checks, plus the format
    bonus, plus the overlong penalty. The text is parsed by eval's checker, never executed."""
    r = float(check_answer(completion_text(tok, ids), answer))
    if gc.format_reward:
        r += gc.format_reward * follows_format(tok, ids, think)
    if gc.overlong_cache:
        r += overlong_penalty(len(ids), gc.max_new_tokens, gc.overlong_cache)
    return r


def group_advantages(rewards, group_size, scale=True):
    """rewards [N * G] (groups contiguous) -> advantages [N * G]: (r - group mean) / (group std + 1e-4), the
    std unbiased as in TRL; scale=False keeps r - mean (Dr. GRPO). A group of equal rewards gets exactly 0."""
    r = rewards.view(-1, group_size)
    std = r.std(1, keepdim=True)
    a = r - r.mean(1, keepdim=True)
    a = a / (std + 1e-4) if scale else a
    return torch.where(std > 0, a, 0.0).view(-1)


def token_weights(mask, agg, max_len):
    """Per-token weights [N, T] that turn a per-token loss into the batch loss by one weighted sum, so any
    split into micro-batches sums to the same loss. grpo: mean over each sequence, then over sequences;
    dapo: sum over all tokens / total tokens; dr_grpo: sum / (sequences x max_len, the generation budget)."""
    m = mask.float()
    if agg == "grpo":
        return m / m.sum(1, keepdim=True).clamp(min=1) / len(m)
    if agg == "dapo":
        return m / m.sum().clamp(min=1)
    if agg == "dr_grpo":
        return m / (len(m) * max_len)
    raise ValueError(f"loss_agg must be 'grpo', 'dapo' or 'dr_grpo', got {agg!r}")


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(π || π_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def grpo_token_loss(logp, old_logp, adv, gc, ref_logp=None):
    """Per-token loss [N, T]: -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A) with ρ = exp(logp - old_logp), plus
    β k3 KL; and the per-token mask of where the clip is active (its gradient is then 0)."""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - gc.eps_low, 1 + gc.eps_high) * a
    loss = -torch.minimum(unclipped, clipped)
    if gc.beta:
        loss = loss + gc.beta * k3_kl(logp, ref_logp)
    return loss, clipped < unclipped


def token_logprobs(model, x, y, pos, temperature):
    """log π(y_t | x_<=t) [B, T] under the tempered distribution sampled from; 0 where y == -100."""
    logp = (model(x, pos=pos) / temperature).log_softmax(-1)
    return torch.where(y == -100, 0.0, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0])


def rollout(model, tok, prompts, answers, gc, generator):
    """Sample G completions of every prompt (batched generate, KV cache) -> (rows (x, y, pos) [N*G, T] with y
    on the completion tokens only, rewards [N*G], completion lengths [N*G], tokens generated per second)."""
    stop = [t for t in (tok.im_end_id, tok.eos_id) if t is not None]
    batch = [p for p in prompts for _ in range(gc.group_size)]
    model.eval()
    t0, outs = time.perf_counter(), []
    for i in range(0, len(batch), gc.rollout_batch):
        outs += model.generate(batch[i:i + gc.rollout_batch], gc.max_new_tokens, gc.temperature, gc.top_k, gc.top_p,
                               stop, generator)
    seconds = time.perf_counter() - t0
    model.train()
    # the /no_think generation prompt ends in the template's prefilled empty think block
    thinks = [not tok.decode(p[-8:]).endswith("<think>\n\n</think>\n") for p in prompts]
    g = gc.group_size
    rewards = [completion_reward(tok, out, answers[i // g], thinks[i // g], gc) for i, out in enumerate(outs)]
    rows = [(np.asarray(p + o[:-1], dtype=np.int64), np.asarray([-100] * (len(p) - 1) + o, dtype=np.int64))
            for p, o in zip(batch, outs)]
    lengths = torch.tensor([len(o) for o in outs], dtype=torch.float32)
    return (tuple(map(torch.from_numpy, _padded(tok, rows, max(len(x) for x, _ in rows)))),
            torch.tensor(rewards), lengths, lengths.sum().item() / seconds)
