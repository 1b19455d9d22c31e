"""posttrain.py — SmolLM3 post-training on train.py's loop: mid-training, SFT, preference optimisation
(DPO, IPO, APO-zero, APO-down), GRPO with verifiable rewards, linear merging, and the tiny pipeline.

    python posttrain.py sft config/tiny_sft.py --init_from=out/tiny       # SFT: loss on assistant tokens
    python posttrain.py mid config/tiny_mid.py --init_from=out/tiny       # mid-training: loss on every token
    python posttrain.py dpo config/tiny_apo.py --init_from=out/tiny_sft   # loss_type dpo | ipo | apo_zero | apo_down
    python posttrain.py sft config/tiny_sft.py --init_from=out/tiny --resume=True   # continue a killed run exactly
    python posttrain.py grpo config/tiny_grpo.py --init_from=out/tiny_apo  # RLVR on the embedded arithmetic prompts
    python posttrain.py merge out/tiny_final out/tiny_apo:0.9 out/tiny_mid:0.1     # 0.9 x APO + 0.1 x mid
    python posttrain.py pipeline config/tiny.py    # CPU, from nothing: pretrain -> mid -> SFT -> APO -> GRPO -> merge
    torchrun --standalone --nproc_per_node=2 posttrain.py sft config/tiny_sft.py --init_from=out/tiny   # DP 2

Every method starts from a checkpoint (init_from: a run directory, one of its checkpoints, or any HF
SmolLM3-layout directory, with the tokenizer beside it) and runs train.run_loop: optimizer groups, schedule,
accumulation, clipping, the spike/NaN guard, atomic checkpoints, exact resume and the logs are pretraining's
own; a method supplies its batches and its loss. Data are jsonl: conversations {"messages": [{"role",
"content"}, ...], "enable_thinking": optional} rendered with data.py's chat template (dated chat_date, kept
in the checkpoints, so a resumed run renders the same tokens), pairs {"prompt", "chosen", "rejected"} (message
lists or strings), prompts {"prompt", "answer"}; "default" means the embedded sets. Under torchrun every
method is data parallel (tp=1), its loss the whole batch's (token counts gathered from every rank).

Sections
  embedded sets default_sets: SFT, preference and RL rows of data.py's generated problems (data_file writes them)
  loaders       pack_bfd, SFTLoader (packing, per-conversation positions), PreferenceLoader, PromptLoader
  loop glue     PostConfig, setup (start checkpoint, model, optimizer, DDP, resume, chat date), gathered, fit
  SFT and mid   sft_batches, sft_loss (the per-token mean over the whole step), sft
  preference    LOSSES, pair_logps, reference log-probs (frozen copy or a table), dpo
  GRPO          GRPOConfig, overlong_penalty, completion_reward (eval's checker), group_advantages, token_weights
                (grpo / dapo / dr_grpo), k3_kl, grpo_token_loss (clipped ratio), rollout_model (a bf16 twin),
                rollout, dynamic_sample, grpo
  merge         merge (weighted sum of HF-layout checkpoints, shapes and configs checked)
  pipeline      PipelineConfig, STAGES, pipeline (its numbers and table: eval.checkpoint_metrics, pipeline_table)
  command line  main
"""
import bisect
import collections
import copy
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import parallel
import train
from config import load, pick
from data import (_ROLES, DataConfig, Tokenizer, _draw, _field, _first_index, _key, load_tokenizer, problems,
                  read_jsonl, render_chat)
from eval import (check_answer, checkpoint_metrics, completion_text, evaluate, exact_match, follows_format,
                  pipeline_table, task_rows)
from model import Model, atomic_write, check

# ----------------------------------------------------------------------------------------- embedded sets
# The default data, in TRL's conversational formats, made of data.py's generated problems. SFT {"messages"}: half
# /think (the worked steps inside <think>, then the answer), half /no_think (the answer alone), a fifth of them
# two-turn. Preference {"prompt", "chosen", "rejected"}, of graded difficulty: half /think, the rejected reply's
# answer contradicting its own worked steps (the tiny SFT model ranks ~all of these right), half /no_think, the
# rejected reply parroting a number of the question (it prefers the parrot ~60% of the time: what APO fixes). An
# error inside an equation is no use here: telling it takes the arithmetic, which 75 APO steps do not teach
# (measured: held-out accuracy 0.73 -> 0.69). RL {"prompt": [user], "answer": "N"}.
_PERSONAS = ("", "You are a helpful assistant. ", "You are a careful math tutor. ", "Answer briefly. ")


def _system(rng, think):
    return {"role": "system", "content": rng.choice(_PERSONAS) + ("/think" if think else "/no_think")}


def _reply(lines, answer, think):
    final = f"The answer is {answer}."
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n{final}" if think else final


def _sft_row(rng, problems):
    think = rng.random() < 0.5
    messages = [_system(rng, think)]
    for question, lines, answer in problems:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": _reply(lines, answer, think)}]
    return {"messages": messages}


def _pref_row(rng, problem):
    question, lines, answer = problem
    parrots = [int(n) for n in re.findall(r"\d+", question) if int(n) != answer]
    think = rng.random() < 0.5 or not parrots
    wrong = answer + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if answer + d >= 0]) if think else \
        rng.choice(parrots)
    return {"prompt": [_system(rng, think), {"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": _reply(lines, answer, think)}],
            "rejected": [{"role": "assistant", "content": _reply(lines, wrong, think)}]}


def default_sets(n=None):
    """{name: rows} of the embedded sft_train/sft_val, pref_train/pref_val and rl_train sets (deterministic);
    n: at most n rows each (tests)."""
    rng = random.Random(0)
    # sft_train's problems come in pairs; the second is used when the conversation is two-turn
    two = problems("sft_train", n and 2 * n)
    sft = [_sft_row(rng, pair if rng.random() < 0.2 else pair[:1]) for pair in zip(two[::2], two[1::2])]
    return {"sft_train": sft, "sft_val": [_sft_row(rng, [x]) for x in problems("sft_val", n)],
            "pref_train": [_pref_row(rng, x) for x in problems("pref_train", n)],
            "pref_val": [_pref_row(rng, x) for x in problems("pref_val", n)],
            "rl_train": [{"prompt": [{"role": "user", "content": q}], "answer": str(a)}
                         for q, _, a in problems("rl_train", n)]}


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
    """render(*fields of each line) for the lines of a .jsonl file; a ValueError names path:line. A field given
    as (key, kind, default) may be absent."""
    out = []
    for no, obj in read_jsonl(path):
        values = [spec[2] if len(spec) == 3 and spec[0] not in obj else _field(path, no, obj, *spec[:2])
                  for spec in fields]
        try:
            out.append(render(*values))
        except ValueError as e:
            raise ValueError(f"{path}:{no}: {e}") from None
    return out


def _messages(key, value):
    """A message list or a string (a plain-text prompt or reply, no template); a bad message names its field."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"field {key!r}: expected a list of messages or a string, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise ValueError(f"field {key!r}, message {i}: expected {{'role': ..., 'content': str}}, got {str(m)[:60]}")
        if m.get("role") not in _ROLES:
            raise ValueError(f"field {key!r}, message {i}: unknown role {m.get('role')!r} "
                             f"(expected one of {', '.join(_ROLES)})")
    return value


def _chat_xy(tok, messages, n_prompt=0, all_tokens=False, enable_thinking=True, today=None):
    """Render a conversation (its system turn dated `today`) -> (x, y) int64 arrays: y[t] = ids[t+1] where that
    token is the model's to generate after the first n_prompt messages (every token with all_tokens), else -100.
    Not truncated."""
    ids, mask = render_chat(tok, messages, enable_thinking=enable_thinking, today=today)
    # turns are encoded one by one, so the prompt's rendering is a prefix of the conversation's
    prompt_len = len(render_chat(tok, messages[:n_prompt], enable_thinking=enable_thinking, today=today)[0]) \
        if n_prompt else 0
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool) | all_tokens
    mask[:prompt_len] = False
    return ids[:-1], np.where(mask[1:], ids[1:], -100)


def _text_xy(tok, prompt, reply):
    """A plain-text pair side: prompt then reply then end-of-text, the loss on the reply and the end token."""
    p, r = tok.encode(prompt), tok.encode(reply) + [tok.eos_id]
    ids = np.asarray(p + r, dtype=np.int64)
    return ids[:-1], np.concatenate([np.full(len(p) - 1, -100, dtype=np.int64), ids[len(p):]]) if p else ids[1:]


def _fit(items, seq_len, overlong, path):
    """Items (lists of (x, y), one per side) no longer than seq_len: a longer one is dropped (overlong "skip") or cut to
    seq_len ("truncate") -> (kept items, {"examples": n, "skipped" or "truncated": count})."""
    long = [max(len(x) for x, _ in item) > seq_len for item in items]
    if overlong == "skip":
        kept = [item for item, too_long in zip(items, long) if not too_long]
    else:
        kept = [[(x[:seq_len], y[:seq_len]) for x, y in item] for item in items]
    if not kept:
        raise ValueError(f"{path}: all {len(items)} examples are longer than seq_len={seq_len}")
    return kept, {"examples": len(items), {"skip": "skipped", "truncate": "truncated"}[overlong]: sum(long)}


def _padded(tok, rows, T):
    """[(x, y) or (x, y, pos)] -> (x, y, pos) int64 arrays [len(rows), T]: each row's tokens at its positions
    (default 0, 1, ...), then padding (pad id, y = -100, pos = -1, which nothing attends to or from)."""
    x = np.full((len(rows), T), tok.pad_id, dtype=np.int64)
    y, pos = np.full_like(x, -100), np.full_like(x, -1)
    for r, (xs, ys, *ps) in enumerate(rows):
        x[r, :len(xs)], y[r, :len(ys)], pos[r, :len(xs)] = xs, ys, ps[0] if ps else np.arange(len(xs))
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
    """SFT conversations ({"messages": [...], "enable_thinking": bool} per line) packed best-fit-decreasing into
    rows of seq_len, each with its own positions 0, 1, ... and targets (y = -100 but on assistant output, or on
    every token with all_tokens), then padding (pos = -1). `counts`: examples read, skipped or truncated. `today`:
    the date in the template's metadata (a datetime.date; None: today)."""

    def __init__(self, path, tok, seq_len, micro_batch_size, accum=1, seed=0, rank=0, world_size=1, overlong="skip",
                 all_tokens=False, today=None):
        fields = [("messages", list), ("enable_thinking", bool, True)]
        docs = _rows(path, fields, lambda messages, think: [
            _chat_xy(tok, _messages("messages", messages), all_tokens=all_tokens, enable_thinking=think, today=today)])
        docs, self.counts = _fit(docs, seq_len, overlong, path)
        docs = [(x, y, np.arange(len(x))) for (x, y), in docs]   # positions restart at every conversation
        self.bins = pack_bfd([len(x) for x, _, _ in docs], seq_len)
        packed = [[np.concatenate(a) for a in zip(*(docs[i] for i in items))] for items in self.bins]
        self.x, self.y, self.pos = _padded(tok, packed, seq_len)
        self._setup(len(self.bins), micro_batch_size, accum, seed, rank, world_size, path, "sft")

    def get(self, step, micro_step):
        """-> (x, y, pos) int64 tensors [micro_batch_size, seq_len]."""
        rows = self.indices(step, micro_step)
        return tuple(torch.from_numpy(a[rows]) for a in (self.x, self.y, self.pos))


class PreferenceLoader(_Shuffled):
    """Preference pairs ({"prompt", "chosen", "rejected"} per line, each a message list or a plain string; an
    optional "enable_thinking"), one per row: y = -100 on the prompt and on padding, so the sum of -CE over
    y != -100 is the completion's log-probability. `counts`: pairs read, skipped or truncated."""

    def __init__(self, path, tok, seq_len, micro_batch_size, accum=1, seed=0, rank=0, world_size=1, overlong="skip",
                 today=None):
        self.tok = tok

        def render(prompt, chosen, rejected, think):
            sides = {k: _messages(k, v) for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}
            if len({type(v) for v in sides.values()}) > 1:
                raise ValueError("prompt, chosen and rejected must all be message lists or all strings")
            if isinstance(prompt, str):
                return [_text_xy(tok, prompt, reply) for reply in (chosen, rejected)]
            return [_chat_xy(tok, prompt + reply, len(prompt), enable_thinking=think, today=today)
                    for reply in (chosen, rejected)]
        fields = [("prompt", object), ("chosen", object), ("rejected", object), ("enable_thinking", bool, True)]
        self.pairs, self.counts = _fit(_rows(path, fields, render), seq_len, overlong, path)
        self._setup(len(self.pairs), micro_batch_size, accum, seed, rank, world_size, path, "preference")

    def rows(self, items):
        """-> ((x, y, pos) chosen, (x, y, pos) rejected) of pairs `items`, int64 tensors [len(items), T], T the
        longest side."""
        pairs = [self.pairs[i] for i in items]
        T = max(len(x) for pair in pairs for x, _ in pair)
        return tuple(tuple(map(torch.from_numpy, _padded(self.tok, [p[side] for p in pairs], T))) for side in (0, 1))

    def get(self, step, micro_step):
        """-> rows(this micro-step's pairs)."""
        return self.rows(self.indices(step, micro_step).tolist())


class PromptLoader(_Shuffled):
    """RL prompts ({"prompt": [...], "answer": "N", "enable_thinking": optional bool} per line) -> get() = (prompt
    ids rendered with the generation prompt, answers as strings); the line's enable_thinking beats the loader's,
    a /think or /no_think in the prompt's system turn beats both (the template's rule)."""

    def __init__(self, path, tok, micro_batch_size, accum=1, seed=0, rank=0, world_size=1, enable_thinking=True,
                 today=None):
        fields = [("prompt", list), ("answer", str), ("enable_thinking", bool, enable_thinking)]
        rows = _rows(path, fields, lambda prompt, answer, think: (
            render_chat(tok, _messages("prompt", prompt), True, enable_thinking=think, today=today)[0], answer))
        self.prompts, self.answers = [ids for ids, _ in rows], [answer for _, answer in rows]
        self._setup(len(self.prompts), micro_batch_size, accum, seed, rank, world_size, path, "rl")

    def get(self, step, micro_step):
        """-> (prompts: list of id lists, answers: list of str), micro_batch_size of each."""
        idx = self.indices(step, micro_step).tolist()
        return [self.prompts[i] for i in idx], [self.answers[i] for i in idx]


# -------------------------------------------------------------------------------------------- loop glue

@dataclass
class PostConfig:
    """What post-training adds to DataConfig (data_dir, tokenizer, seq_len) and TrainConfig (the loop's keys)."""
    train_data: str = "default"     # .jsonl; "default": <data_dir>/sft_train.jsonl (sft, mid) or pref_train.jsonl (dpo)
    val_data: str = "default"       # held-out .jsonl; "default": sft_val.jsonl or pref_val.jsonl; "" = none
    overlong: str = "skip"          # a conversation or pair longer than seq_len: "skip" or "truncate" (both counted)
    loss_type: str = "apo_zero"     # preference loss: "dpo" (sigmoid) | "ipo" | "apo_zero" | "apo_down"
    beta: float = 0.1               # preference: reward scale beta (the strength of the pull to the reference)
    ref_logps: str = "precompute"   # "precompute": reference log-probs once, to out_dir/ref_logps.safetensors;
                                    # "frozen": a frozen copy of the start model scores every batch
    attn_impl: str = "sdpa"         # how to run attention ("triton" on GPU); a checkpoint does not record it
    act_ckpt: bool = False          # recompute each layer in backward (ModelConfig.act_ckpt)
    chat_date: str = ""             # "YYYY-MM-DD": the chat template's "Today Date"; "": the day the run started
                                    # (kept in run.json and the checkpoints, so a resumed run sees the same tokens)


# The dataclasses whose fields a post-training config may set; TrainConfig's keys mean what they mean for
# pretraining (lr, batch_size, max_steps, eval_interval, ckpt_interval, init_from, resume, ...).
CONFIGS = (DataConfig, train.TrainConfig, PostConfig)


@dataclass
class Run:
    """What setup() prepares for a method: configs, device, model, optimizer step, tokenizer, start."""
    dc: DataConfig
    tc: train.TrainConfig
    pc: PostConfig
    device: torch.device
    autocast: object
    model: Model
    fwd: object                     # the model as trained (torch.compile'd on CUDA)
    opts: list
    update: train.Step
    tok: Tokenizer
    init: str                       # the checkpoint the run started from (the reference of preference losses)
    ckpt: str | None                # the checkpoint resumed from, or None
    start: int
    config: dict
    today: datetime.date            # the date every conversation of the run is rendered with
    grid: object = None             # parallel.Grid under torchrun (data parallel), else None
    log: train.Logger | None = None

    dp = property(lambda self: self.grid.dp if self.grid else 1)
    dp_rank = property(lambda self: self.grid.dp_rank if self.grid else 0)
    master = property(lambda self: self.dp_rank == 0)     # rank 0 logs, evaluates and writes


def gathered(run, t):
    """Tensor t [n, ...] of every DP rank, concatenated in rank order (the global batch's order); t in one process."""
    return parallel.gather_cat(t.to(run.device), run.grid.dp_group, 0).to(t.device) if run.grid else t


def balance_loss(model):
    """The MoE balance losses of the model's last forward (0 for a dense model): each method's training loss adds
    them, as pretraining's mean loss does (a forward with reduction "sum" or "none" leaves them out)."""
    return sum((m.aux_loss for m in model.moe()), 0.0)


def real_tokens(run, positions):
    """The tokens of a step that are not padding (pos >= 0), summed over every DP rank: the log's tok_per_s counts
    these, not the rows' padded length."""
    return int(gathered(run, torch.tensor([sum(int((p >= 0).sum()) for p in positions)])).sum())


def checkpoint_dir(path, what):
    """A run directory's newest intact checkpoint, else `path` itself; it must hold an HF config.json."""
    if os.path.isfile(os.path.join(path, "latest")):
        path = train.latest_checkpoint(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what}={path!r}: expected a run, checkpoint or HF model directory with config.json")
    return path


def load_model(path, pc, device, **overrides):
    """Model of HF directory `path` in fp32 (the master weights; bf16 comes from autocast) on `device`."""
    return Model.from_pretrained(path, attn_impl=pc.attn_impl, act_ckpt=pc.act_ckpt, **overrides).float().to(device)


def resolve(ns):
    """(DataConfig, TrainConfig, PostConfig) of a namespace; post-training's own keys checked (the model's and the
    loop's are checked by setup against the start checkpoint)."""
    dc, tc, pc = (cls(**pick(ns, cls)) for cls in CONFIGS)
    checks = [(pc.overlong in ("skip", "truncate"), f"overlong={pc.overlong!r} must be 'skip' or 'truncate'"),
              (pc.loss_type in LOSSES, f"loss_type={pc.loss_type!r} must be one of {sorted(LOSSES)}"),
              (pc.beta > 0, f"beta={pc.beta} must be > 0"),
              (pc.ref_logps in ("precompute", "frozen"),
               f"ref_logps={pc.ref_logps!r} must be 'precompute' or 'frozen'"),
              (tc.init_from, "init_from: post-training starts from a checkpoint; pass --init_from=RUN_OR_CHECKPOINT"),
              (tc.tp == 1, "tp: posttrain.py runs data parallel only (tp=1; zero=1 shards AdamW's state)"),
              (not pc.chat_date or re.fullmatch(r"\d{4}-\d{2}-\d{2}", pc.chat_date),
               f"chat_date={pc.chat_date!r} must be a date YYYY-MM-DD or '' (the day the run started)")]
    errors = [msg for ok, msg in checks if not ok]
    check(not errors, "config: " + "; ".join(errors))
    return dc, tc, pc


def setup(ns, method, **overrides):
    """Check the config, find the start (init_from, or out_dir's latest checkpoint with --resume=True), build the
    model, optimizers, guard and Step, restore a resumed run. Writes nothing. `overrides`: ModelConfig fields.
    Under torchrun every rank trains on its share of each step's rows (parallel.DDP, as in train.py)."""
    dc, tc, pc = resolve(ns)
    _, world, local_rank = train.dist_env()
    init = checkpoint_dir(tc.init_from, "init_from")
    mc = Model.config_from_hf(os.path.join(init, "config.json"), attn_impl=pc.attn_impl, act_ckpt=pc.act_ckpt,
                              **overrides)
    train.check_config(mc, dc, tc, world)
    device, autocast = train.setup_device(tc, mc, local_rank)
    grid = parallel.init(1, mc, tc.dist_timeout_s) if world > 1 else None
    ckpt, _ = train.find_start(tc, mc)
    tok_file = os.path.join(init, "tokenizer.json")
    tok = Tokenizer.load(tok_file) if dc.tokenizer == "default" and os.path.isfile(tok_file) else load_tokenizer(dc)
    if tok.n_vocab > mc.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids but {init} has vocab_size={mc.vocab_size}")
    torch.manual_seed(tc.seed)
    model = load_model(init, pc, device, **overrides)
    model.train()
    # train.py's wiring at tp 1: DDP's hooks sit on the parameters (rank 0's, broadcast), or ZeRO-1 shards AdamW;
    # either way the plain module runs
    _, opts, clip, sync = parallel.setup(model, grid, tc.zero, lambda m: train.build_optimizers(m, tc, device))
    guard = train.Guard(tc.spike_factor)
    saved = train.load_checkpoint(ckpt, model, opts, grid) if ckpt else {}
    # the template's date: the configured one, else the one the run started with (a resumed run renders the
    # same tokens on any later day), else today's
    chat_date = pc.chat_date or saved.get("config", {}).get("chat_date") or datetime.date.today().isoformat()
    try:
        today = datetime.date.fromisoformat(chat_date)
    except ValueError:
        raise ValueError(f"chat_date={chat_date!r}: not a date (expected YYYY-MM-DD)") from None
    if grid:                   # rank 0's date on every rank: a start at midnight may straddle two days
        day = torch.tensor([today.toordinal()], device=device)
        dist.broadcast(day, 0)
        today = datetime.date.fromordinal(int(day))
    chat_date = today.isoformat()
    config, start = {**vars(ns), "chat_date": chat_date, "method": method, "init_path": init}, 0
    master = not grid or grid.rank == 0
    if ckpt:
        start = saved["step"]
        guard.load_state_dict(saved["guard"])
        changed = {k: (saved["config"].get(k), v) for k, v in config.items()
                   if saved["config"].get(k) != v and k != "resume"}
        if master:
            print(f"resuming from {ckpt} at step {start}" + (f"; config changes: {changed}" if changed else ""))
    elif master:
        print(f"{method}: starting from {init}")
    if master and (warn := parallel.fit_warning(mc, dc.seq_len, tc, world, device)):
        print(warn)            # the training step's bound; GRPO's rollouts add rollout_batch rows of KV cache
    update = train.Step(opts, guard, tc, autocast, clip_grad_norm=clip, ddp=sync)
    fwd = torch.compile(model) if train.use_compile(tc, device) else model
    return Run(dc, tc, pc, device, autocast, model, fwd, opts, update, tok, init, ckpt, start, config, today, grid)


def data_file(run, path, name):
    """A configured data file; "default" is <data_dir>/<name>.jsonl, the embedded sets, (re)written where a file
    is missing or differs from them (a recipe changed since it was written)."""
    if path != "default":
        return path
    path = os.path.join(run.dc.data_dir, f"{name}.jsonl")
    if run.master:
        os.makedirs(run.dc.data_dir, exist_ok=True)
        for set_name, rows in default_sets().items():
            target, text = os.path.join(run.dc.data_dir, f"{set_name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows)
            if not os.path.isfile(target) or Path(target).read_text(encoding="utf-8") != text:
                atomic_write(target, lambda p: Path(p).write_text(text, encoding="utf-8"))
    if run.grid:
        dist.barrier()                                         # the other ranks wait for rank 0's files
    return path


def fit(run, batches, loss_fn, held_out, extra=None, counts=None, rows_per_example=1):
    """Open the run (run.json, log.jsonl cut back to the start step) and run train.run_loop: a fresh run logs
    the data `counts` and a held-out eval at step 0 first (the before), every run ends in a checkpoint.
    rows_per_example: rows of seq_len per batch_size unit (a preference pair is two). Under torchrun rank 0
    logs, evaluates (held_out, in eval mode) and writes; every rank trains and joins the checkpoint's gather."""
    tc, model, master = run.tc, run.model, run.master
    tokens_per_step, peak = rows_per_example * tc.batch_size * run.dc.seq_len, train.peak_flops(run.device)
    if master:
        os.makedirs(tc.out_dir, exist_ok=True)
        info = train.start_run(tc.out_dir, run.config, run.device, run.start, run.ckpt)
        print(json.dumps(run.config, indent=1))
        print(f"python {info['python']}, torch {info['torch']}, device {info['device']}, commit {info['git_commit']}")
        print(f"{model.num_params():,} parameters; up to {tokens_per_step:,} tokens per step: {tc.batch_size} "
              f"{'pairs' if rows_per_example == 2 else 'rows'} ({tc.micro_batch_size} x "
              f"{tc.batch_size // (tc.micro_batch_size * run.dp)} accum x {run.dp} dp) of <= {run.dc.seq_len} tokens")
    run.log = train.Logger(tc.out_dir, run.start, tc, tokens_per_step, model.flops_per_token(run.dc.seq_len),
                           peak and peak * run.dp, master)

    def evaluate(done):   # eval mode: an MoE router counts only the training forwards' load (Model.moe_step)
        if master:
            model.eval()
            held_out(done)
            model.train()

    def step_extra():     # every rank: moe_step all-reduces the experts' load, then moves the balance biases
        return {**(extra() if extra else {}), **model.moe_step()}

    if run.start == 0:
        if counts:
            run.log.write({"kind": "data", "step": 0, **counts})
            run.log.say(f"data: {counts}")
        evaluate(0)
        run.log.restart_clock()

    def save(done):
        state = {"step": done, "guard": run.update.guard.state_dict(), "config": run.config}
        train.save_checkpoint(tc.out_dir, model, run.opts, state, tc.keep_ckpts, run.tok, run.grid)

    with parallel.settling(run.grid):  # a collective failed: if a rank is lost, the heartbeat names it and exits
        train.run_loop(tc, run.start, run.update, run.log, batches, loss_fn, save, run.start if run.ckpt else None,
                       evaluate, step_extra)
    if run.grid:
        parallel.shutdown(model)


# ------------------------------------------------------------------------------------------ SFT and mid

def sft(ns, all_tokens=False):
    """SFT (loss on what the assistant generates, <|im_end|> included) or, with all_tokens, mid-training (loss on
    every token) of conversations packed into rows; the loss is the mean over every target token of the step."""
    run = setup(ns, "mid" if all_tokens else "sft")
    dc, tc, pc = run.dc, run.tc, run.pc
    accum = tc.batch_size // (tc.micro_batch_size * run.dp)
    loaders = {"train": SFTLoader(data_file(run, pc.train_data, "sft_train"), run.tok, dc.seq_len,
                                  tc.micro_batch_size, accum, tc.seed, run.dp_rank, run.dp, pc.overlong, all_tokens,
                                  run.today)}
    val_path = data_file(run, pc.val_data, "sft_val")
    if val_path:
        loaders["val"] = SFTLoader(val_path, run.tok, dc.seq_len, tc.micro_batch_size, overlong=pc.overlong,
                                   all_tokens=all_tokens, today=run.today)

    tokens = [0]

    def batches(step):
        out = sft_batches(loaders["train"], step, accum, run)
        tokens[0] = real_tokens(run, [pos for _, _, pos, _ in out])
        return out

    def loss_fn(batch):
        return sft_loss(run.fwd, batch, run.device) + balance_loss(run.model)

    def held_out(done):
        if "val" in loaders:
            val = loaders["val"]
            rows = [torch.from_numpy(a[:tc.eval_rows]) for a in (val.x, val.y, val.pos)]   # the mean over their targets
            loss = evaluate(run.model, {"val": rows}, torch.from_numpy(run.tok.token_bytes()).to(run.device),
                            tc.micro_batch_size, run.autocast, run.device)[0]["val"]
            run.log.held_out(done, {run.config["method"]: loss})

    counts = {k: loader.counts for k, loader in loaders.items()}
    fit(run, batches, loss_fn, held_out, lambda: {"tokens": tokens[0]}, counts)


def sft_batches(loader, step, accum, run=None):
    """This rank's micro-batches (x, y, pos, scale) of the step. Step backpropagates each micro-batch's loss /
    accum and logs their mean, and DDP averages over the dp ranks, so with scale = accum x dp / n (n: the target
    tokens of the whole step, all ranks: all-reduced) a micro-batch's token sum x scale makes the step's loss and
    gradient the per-token mean over the whole batch: a short conversation weighs what its tokens weigh, not
    what a mean of per-micro-batch (or per-rank) means would give it."""
    micro = [loader.get(step, m) for m in range(accum)]
    n = sum(int((y != -100).sum()) for _, y, _ in micro)
    n, dp = (int(gathered(run, torch.tensor([n])).sum()), run.dp) if run else (n, 1)
    return [(x, y, pos, accum * dp / max(n, 1)) for x, y, pos in micro]


def sft_loss(model, batch, device):
    """A micro-batch's cross-entropy summed over its targets (y != -100), times its scale."""
    x, y, pos, scale = batch
    return model(*(t.to(device, non_blocking=True) for t in (x, y, pos)), reduction="sum")[1] * scale


# ------------------------------------------------------------------------------------------- preference
# r_w, r_l = the log-ratios log pi(y) - log pi_ref(y) of the chosen and rejected completions (summed over their
# tokens). DPO: Rafailov et al. 2023; IPO: Azar et al. 2023; APO: D'Oosterlinck et al. 2024. 1 - sigmoid(z) is
# written sigmoid(-z): the same value without the cancellation near z >> 0.
LOSSES = {
    "dpo": lambda beta, rw, rl: -F.logsigmoid(beta * (rw - rl)),
    "ipo": lambda beta, rw, rl: (rw - rl - 1 / (2 * beta)) ** 2,
    "apo_zero": lambda beta, rw, rl: torch.sigmoid(-beta * rw) + torch.sigmoid(beta * rl),
    "apo_down": lambda beta, rw, rl: torch.sigmoid(beta * rw) + torch.sigmoid(-beta * (rw - rl)),
}


def pair_logps(model, chosen, rejected, device):
    """Summed completion log-probs ([B] chosen, [B] rejected) of padded pair rows, both sides in one forward."""
    x, y, pos = (torch.cat([c, r]).to(device, non_blocking=True) for c, r in zip(chosen, rejected))
    return (-model(x, y, pos, reduction="none")[1].sum(1)).chunk(2)


def reward_stats(beta, rw, rl, chosen, rejected):
    """The numbers log.jsonl tracks per batch of pairs: implicit rewards beta * r, their margin, the
    share of pairs the rewards rank right, and the share the policy itself gives the chosen reply more mass."""
    return {"rewards/chosen": beta * rw.mean(), "rewards/rejected": beta * rl.mean(),
            "rewards/margin": beta * (rw - rl).mean(), "rewards/accuracy": (rw > rl).float().mean(),
            "logps/accuracy": (chosen > rejected).float().mean()}


@torch.no_grad()
def logps_table(model, loader, micro_batch_size, autocast, device):
    """Completion log-probs [n_pairs, 2] (chosen, rejected) of every pair of `loader`, in order."""
    out = []
    for i in range(0, len(loader.pairs), micro_batch_size):
        with autocast:
            out.append(torch.stack(pair_logps(model, *loader.rows(range(i, min(i + micro_batch_size,
                                                                                len(loader.pairs)))), device), 1))
    return torch.cat(out).float().cpu()


def reference_tables(run, loaders, paths):
    """{split: [n_pairs, 2] reference log-probs}, computed once by the start model and kept in
    out_dir/ref_logps.safetensors; reused while the start checkpoint, data files and seq_len are the same."""
    path = os.path.join(run.tc.out_dir, "ref_logps.safetensors")
    digest = {split: train.file_digest(p)["sha256"] for split, p in
              {"init": os.path.join(run.init, "model.safetensors"), **paths}.items()}
    meta = {"seq_len": str(run.dc.seq_len), "overlong": run.pc.overlong, **digest}
    fresh = False
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            fresh = f.metadata() == meta
    if run.master and not fresh:
        ref = load_model(run.init, run.pc, run.device, z_loss=0.0)
        tables = {split: logps_table(ref, loader, run.tc.micro_batch_size, run.autocast, run.device)
                  for split, loader in loaders.items()}
        os.makedirs(run.tc.out_dir, exist_ok=True)
        atomic_write(path, lambda p: save_file(tables, p, metadata=meta))
    if run.grid:
        dist.barrier()                                         # the other ranks wait for rank 0's table
    return load_file(path)


def dpo(ns):
    """Preference optimisation (loss_type dpo, ipo, apo_zero, apo_down) of the start model on pairs, against the
    start model as the reference (a frozen copy, or its log-probs precomputed once)."""
    run = setup(ns, "dpo", z_loss=0.0)      # log-probs are the plain cross-entropy: no z-loss term
    dc, tc, pc = run.dc, run.tc, run.pc
    accum = tc.batch_size // (tc.micro_batch_size * run.dp)
    paths = {"train": data_file(run, pc.train_data, "pref_train"), "val": data_file(run, pc.val_data, "pref_val")}
    paths = {split: p for split, p in paths.items() if p}    # val_data "": no held-out pairs
    # every rank the same number of pairs a step: the mean of the ranks' means is the mean over the batch's pairs
    loaders = {split: PreferenceLoader(p, run.tok, dc.seq_len, tc.micro_batch_size, accum, tc.seed, run.dp_rank,
                                       run.dp, pc.overlong, run.today) for split, p in paths.items()}
    tables = reference_tables(run, loaders, paths) if pc.ref_logps == "precompute" else None
    frozen = None if tables else load_model(run.init, pc, run.device, z_loss=0.0).eval().requires_grad_(False)

    @torch.no_grad()
    def reference(split, items, chosen, rejected):
        return tables[split][items].to(run.device).unbind(1) if tables else pair_logps(frozen, chosen, rejected,
                                                                                          run.device)

    def pair_loss(split, items, chosen, rejected, model):
        policy = pair_logps(model, chosen, rejected, run.device)
        rw, rl = (p - r for p, r in zip(policy, reference(split, items, chosen, rejected)))
        return LOSSES[pc.loss_type](pc.beta, rw, rl), reward_stats(pc.beta, rw.detach(), rl.detach(),
                                                                   *(p.detach() for p in policy))

    stats, tokens = [], [0]

    def batches(step):
        items = [loaders["train"].indices(step, m).tolist() for m in range(accum)]
        out = [(idx, *loaders["train"].rows(idx)) for idx in items]
        tokens[0] = real_tokens(run, [pos for _, chosen, rejected in out for _, _, pos in (chosen, rejected)])
        return out

    def loss_fn(batch):
        loss, s = pair_loss("train", *batch, run.fwd)
        stats.append(s)
        return loss.mean() + balance_loss(run.model)

    def extra():   # the means over every rank's pairs
        means = gathered(run, torch.stack([torch.stack([s[k] for s in stats]).mean() for k in stats[0]])[None])
        out = dict(zip(stats[0], means.mean(0).tolist()))
        stats.clear()
        return out | {"tokens": tokens[0]}

    @torch.no_grad()
    def held_out(done):
        if "val" not in loaders:
            return
        n, mb, sums = min(tc.eval_rows, len(loaders["val"].pairs)), tc.micro_batch_size, collections.Counter()
        for i in range(0, n, mb):                            # the first eval_rows held-out pairs
            items = list(range(i, min(i + mb, n)))
            with run.autocast:
                loss, s = pair_loss("val", items, *loaders["val"].rows(items), run.model)
            sums.update({"loss": loss.sum().item(), **{f"val_{k}": v.item() * len(items) for k, v in s.items()}})
        mean = {k: v / n for k, v in sums.items()}
        run.log.held_out(done, {pc.loss_type: mean.pop("loss")}, extra=mean)

    counts = {k: loader.counts for k, loader in loaders.items()}
    fit(run, batches, loss_fn, held_out, extra, counts, rows_per_example=2)


# ------------------------------------------------------------------------------------------------- GRPO
# Group Relative Policy Optimization (DeepSeekMath) with DAPO's changes, as the playbook's RL stage runs it:
# G completions per prompt; reward = the verified answer (eval.check_answer), an optional format bonus and
# the soft overlong penalty; advantage = reward against its group; a per-token clipped ratio with
# asymmetric ε (DAPO's clip-higher); no KL by default (β = 0); token-level aggregation by default.

@dataclass
class GRPOConfig:
    """GRPO's keys; TrainConfig's mean what they mean elsewhere, batch_size counting completions per step
    (prompts x group_size), max_steps optimizer updates."""
    rl_data: str = "default"        # {"prompt", "answer"} lines (PromptLoader); "default": <data_dir>/rl_train.jsonl
    enable_thinking: bool = True    # the dataset's mode (an example's own enable_thinking or system flag wins)
    group_size: int = 8             # G completions per prompt
    max_new_tokens: int = 256       # L_max, the generation budget
    overlong_cache: int = 64        # L_cache: DAPO's soft penalty ramps over the last L_cache tokens; 0 = off
    format_reward: float = 0.0      # added when a completion follows the chat format (eval.follows_format)
    temperature: float = 1.0        # sampling; the log-probs are those of the same tempered distribution
    top_k: int | None = None
    top_p: float | None = None
    eps_low: float = 0.2            # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.28
    kl_beta: float = 0.0            # k3 KL to the start model; 0 = no reference model (DAPO, the playbook)
    scale_rewards: bool = True      # divide by the group's std; False = Dr. GRPO
    loss_agg: str = "dapo"          # "grpo" | "dapo" | "dr_grpo" (see token_weights)
    num_iterations: int = 1         # optimizer updates per rollout batch, each against the rollout's log-probs
    rollout_batch: int = 64         # rows per generate call (whole groups or a divisor of group_size): the KV cache
    rollout_dtype: str = "auto"     # "bfloat16" | "float32" | "auto": bf16 on a GPU under bf16 autocast, else fp32
    sample_rounds: int = 1          # DAPO's dynamic sampling: up to this many rollouts a step, until its groups
                                    # all have unequal rewards (1 = off)
    eval_questions: int = 64        # held-out math_test questions for greedy exact match at each eval; 0 = none


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
    a = r - r.mean(1, keepdim=True)
    a = a / (r.std(1, keepdim=True) + 1e-4) if scale else a
    # the mean of equal floats can differ from them in the last bit: such a group is zeroed, not near-zero
    return torch.where(r.amax(1, keepdim=True) > r.amin(1, keepdim=True), a, 0.0).view(-1)


def token_weights(mask, agg, max_len, sequences=None, tokens=None):
    """Per-token weights [N, T] that turn a per-token loss into the batch loss by one weighted sum, so any
    split into micro-batches (or ranks) sums to the same loss. grpo: mean over each sequence, then over
    sequences; dapo: sum over all tokens / total tokens; dr_grpo: sum / (sequences x max_len, the generation
    budget). sequences, tokens: the whole batch's, when `mask` is one rank's share (default: mask's own)."""
    m = mask.float()
    sequences = len(m) if sequences is None else sequences
    if agg == "grpo":
        return m / m.sum(1, keepdim=True).clamp(min=1) / sequences
    if agg == "dapo":
        return m / (m.sum() if tokens is None else torch.tensor(float(tokens))).clamp(min=1)
    if agg == "dr_grpo":
        return m / (sequences * max_len)
    raise ValueError(f"loss_agg must be 'grpo', 'dapo' or 'dr_grpo', got {agg!r}")


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(π || π_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def grpo_token_loss(logp, old_logp, adv, gc, ref_logp=None):
    """Per-token loss [N, T]: -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A) with ρ = exp(logp - old_logp), plus
    kl_beta x k3 KL; and the per-token mask of where the clip is active (its gradient is then 0)."""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - gc.eps_low, 1 + gc.eps_high) * a
    loss = -torch.minimum(unclipped, clipped)
    if gc.kl_beta:
        loss = loss + gc.kl_beta * k3_kl(logp, ref_logp)
    return loss, clipped < unclipped


def token_logprobs(model, x, y, pos, temperature):
    """log π(y_t | x_<=t) [B, T] under the tempered distribution sampled from; 0 where y == -100."""
    logp = (model(x, pos=pos) / temperature).log_softmax(-1)
    return torch.where(y == -100, 0.0, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0])


def rollout_model(model, dtype):
    """The model rollouts decode with: `model`, or a copy of it in `dtype`. bf16 halves a decode step's weight reads
    and the KV cache (3B, 16 rows of 22.5k tokens: 26.6 GB, not 53); its samples are then a hair off the autocast
    policy the loss scores, as with any separate inference engine."""
    return model if model.tok_emb.weight.dtype == dtype else copy.deepcopy(model).to(dtype).eval()


def rollout(model, tok, prompts, answers, gc, generator):
    """G completions of every prompt (batched generate, KV cache) -> (rows (x, y, pos) [N*G, T], the completion tokens
    the only targets; scores [N*G, 3] float64: reward, length, correct answer (0/1); seconds of generation)."""
    stop, g = [t for t in (tok.im_end_id, tok.eos_id) if t is not None], gc.group_size
    batch = [p for p in prompts for _ in range(g)]
    model.eval()
    # a call's samples of a prompt share one prefill of it (num_samples): whole groups per call, or a group in
    # calls of rollout_batch samples when one group's KV cache would not fit
    n = min(gc.rollout_batch, g)
    t0, outs, per_call = time.perf_counter(), [], max(gc.rollout_batch // g, 1)
    for i in range(0, len(prompts), per_call):
        for _ in range(g // n):
            outs += model.generate(prompts[i:i + per_call], gc.max_new_tokens, gc.temperature, gc.top_k, gc.top_p,
                                   stop, generator, num_samples=n)
    seconds = time.perf_counter() - t0
    model.train()
    # the /no_think generation prompt ends in the template's prefilled empty think block
    thinks = [not tok.decode(p[-8:]).endswith("<think>\n\n</think>\n") for p in prompts]
    rewards = [completion_reward(tok, out, answers[i // g], thinks[i // g], gc) for i, out in enumerate(outs)]
    rows = [(np.asarray(p + o[:-1], dtype=np.int64), np.asarray([-100] * (len(p) - 1) + o, dtype=np.int64))
            for p, o in zip(batch, outs)]
    correct = [check_answer(completion_text(tok, o), answers[i // g]) for i, o in enumerate(outs)]
    scores = torch.tensor([rewards, [len(o) for o in outs], correct], dtype=torch.float64).T
    return tuple(map(torch.from_numpy, _padded(tok, rows, max(len(x) for x, _ in rows)))), scores, seconds


def varied_groups(scores, group_size):
    """[N] bool: which groups of a rollout's scores [N * G, 3] have unequal rewards (a nonzero advantage)."""
    r = scores[:, 0].view(-1, group_size)
    return r.amax(1) > r.amin(1)


def dynamic_sample(rounds, group_size, n_groups, pad_id):
    """DAPO's dynamic sampling over one step's rollouts [((x, y, pos), scores, seconds)]: n_groups groups, those
    with unequal rewards first (an equal-reward group has zero advantage: no gradient), then the first others, in
    rollout order -> ((x, y, pos), scores), rows right-padded to the longest kept one."""
    groups = [(r, i) for r, (_, scores, _) in enumerate(rounds) for i in range(len(scores) // group_size)]
    kept = sorted(sorted(groups, key=lambda ri: not varied_groups(rounds[ri[0]][1], group_size)[ri[1]])[:n_groups])
    T = max(rounds[r][0][0].shape[1] for r, _ in kept)
    rows = tuple(torch.cat([F.pad(rounds[r][0][k][i * group_size:(i + 1) * group_size],
                                  (0, T - rounds[r][0][k].shape[1]), value=fill) for r, i in kept])
                 for k, fill in enumerate((pad_id, -100, -1)))
    return rows, torch.cat([rounds[r][1][i * group_size:(i + 1) * group_size] for r, i in kept])


def rollout_stats(scores, group_size, seconds, generated):
    """The log's numbers of a step's rollouts (all ranks): scores [N*G, 3] of the groups kept, the slowest rank's
    seconds, the tokens generated in every round of dynamic sampling, kept or not (the rollouts' throughput)."""
    rewards, lengths = scores[:, 0].float(), scores[:, 1]
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            "zero_std_groups": (rewards.view(-1, group_size).std(1) == 0).float().mean().item(),
            "completion_length": lengths.mean().item(), "completion_length_max": int(lengths.max()),
            "correct": scores[:, 2].mean().item(), "rollout_tok_per_s": generated / seconds}


def grpo(ns):
    """GRPO of the start model on prompts with verifiable answers: every num_iterations steps a rollout of
    batch_size completions (batch_size / group_size prompts), then that many updates against its log-probs."""
    run = setup(ns, "grpo", z_loss=0.0)     # log-probs are the plain softmax: no z-loss term
    gc = GRPOConfig(**pick(ns, GRPOConfig))
    # the loss sits near 0 and changes sign, so "a spike above 3x the running mean" means nothing here; the
    # guard still skips a non-finite loss or gradient
    run.update.guard.spike_factor = 0.0
    tc, tok, mu, g = run.tc, run.tok, gc.num_iterations, gc.group_size
    checks = [(gc.loss_agg in ("grpo", "dapo", "dr_grpo"),
               f"loss_agg={gc.loss_agg!r} must be 'grpo', 'dapo' or 'dr_grpo'"),
              # a group stays on one rank: its advantages need only its own rewards
              (g >= 2 and tc.batch_size % (g * run.dp) == 0,
               f"batch_size={tc.batch_size} must be a multiple of group_size={g} >= 2 x dp={run.dp}"),
              (0 <= gc.overlong_cache < gc.max_new_tokens,
               f"overlong_cache={gc.overlong_cache} must be in [0, max_new_tokens={gc.max_new_tokens})"),
              (gc.temperature > 0, f"temperature={gc.temperature} must be > 0 (greedy samples of a group are all one)"),
              (gc.rollout_batch >= g or g % gc.rollout_batch == 0,
               f"rollout_batch={gc.rollout_batch} must be >= group_size={g} or divide it"),
              (gc.rollout_dtype in ("auto", "bfloat16", "float32"),
               f"rollout_dtype={gc.rollout_dtype!r} must be 'auto', 'bfloat16' or 'float32'"),
              # a checkpoint then always falls on a rollout boundary, so a resumed run is the uninterrupted one
              (tc.ckpt_interval % mu == 0 and tc.max_steps % mu == 0,
               f"ckpt_interval={tc.ckpt_interval} and max_steps={tc.max_steps} must be multiples of num_iterations={mu}")]
    errors = [msg for ok, msg in checks if not ok]
    check(not errors, "config: " + "; ".join(errors))
    n_groups = tc.batch_size // (g * run.dp)       # this rank's groups per step
    loader = PromptLoader(data_file(run, gc.rl_data, "rl_train"), tok, n_groups, gc.sample_rounds, tc.seed,
                          run.dp_rank, run.dp, gc.enable_thinking, run.today)
    ref = load_model(run.init, run.pc, run.device, z_loss=0.0).eval().requires_grad_(False) if gc.kl_beta else None
    generator = torch.Generator(run.device)
    bf16 = gc.rollout_dtype == "auto" and run.device.type == "cuda" and tc.dtype == "bfloat16"
    rollout_dtype = torch.bfloat16 if bf16 or gc.rollout_dtype == "bfloat16" else torch.float32
    held = task_rows("math", "")[:gc.eval_questions] if gc.eval_questions else []   # eval.py's math_test
    buffer, stats = [], {}

    @torch.no_grad()
    def scored(model, rows):   # under the loss's autocast: the first update's ratio is then exactly 1
        training = model.training
        model.eval()           # an MoE router counts the load of training forwards only
        with run.autocast:
            out = torch.cat([token_logprobs(model, *(t.to(run.device) for t in r), gc.temperature).float().cpu()
                             for r in rows])
        model.train(training)
        return out

    def batches(step):
        if step % mu:                                        # the same rollout again, against its old log-probs
            return buffer
        # the rollout of step s on DP rank r is a function of (seed, s, r, weights): a resumed run samples what it
        # would have, and no two ranks draw the same samples
        generator.manual_seed(tc.seed * 1_000_003 + step * run.dp + run.dp_rank)
        rounds, signal, policy = [], 0, rollout_model(run.model, rollout_dtype)
        for r in range(gc.sample_rounds):   # round r's prompts are the loader's micro-step r
            rounds.append(rollout(policy, tok, *loader.get(step // mu, r), gc, generator))
            signal += int(varied_groups(rounds[-1][1], g).sum())
            if signal >= n_groups:
                break
        (x, y, pos), scores = dynamic_sample(rounds, g, n_groups, tok.pad_id) if len(rounds) > 1 else rounds[0][:2]
        adv = group_advantages(scores[:, 0].float(), g, gc.scale_rewards)
        # normalised by the whole batch's sequences and completion tokens (all ranks): DDP's mean of the ranks'
        # gradients is then the gradient of the one-process loss
        counts = gathered(run, torch.tensor([[len(y), int((y != -100).sum())]])).sum(0).tolist()
        w = token_weights(y != -100, gc.loss_agg, gc.max_new_tokens, *counts)
        part = [slice(i, i + tc.micro_batch_size) for i in range(0, len(x), tc.micro_batch_size)]
        rows = [(x[s], y[s], pos[s]) for s in part]
        old, ref_lp = (None if m is None else scored(m, rows) for m in (run.model if mu > 1 else None, ref))
        buffer[:] = [(*r, adv[s], w[s], None if old is None else old[s], None if ref_lp is None else ref_lp[s])
                     for r, s in zip(rows, part)]
        took = gathered(run, torch.tensor([[sum(r[2] for r in rounds), sum(r[1][:, 1].sum().item() for r in rounds),
                                            len(rounds)]], dtype=torch.float64))
        stats.update(rollout_stats(gathered(run, scores), g, took[:, 0].max().item(), took[:, 1].sum().item()),
                     clipped=0, completion_tokens=0, rollout_rounds=int(took[:, 2].max()),
                     tokens=int(gathered(run, (pos >= 0).sum()[None]).sum()))
        return buffer

    def loss_fn(batch):
        x, y, pos, adv, w, old, ref_lp = (t if t is None else t.to(run.device, non_blocking=True) for t in batch)
        logp = token_logprobs(run.fwd, x, y, pos, gc.temperature)
        per_token, clip = grpo_token_loss(logp, logp.detach() if old is None else old, adv, gc, ref_lp)
        mask = y != -100
        stats["clipped"] = stats["clipped"] + (clip & mask).sum()
        stats["completion_tokens"] = stats["completion_tokens"] + mask.sum()
        # Step backpropagates loss / (number of micro-batches) and DDP averages over the dp ranks: the weights
        # already make the sum over all ranks the batch loss
        return (per_token * w).sum() * len(buffer) * run.dp + balance_loss(run.model)

    def extra():   # "tokens": what the update trained on (every rank), which the log's tok_per_s counts
        clipped, n = gathered(run, torch.stack([stats["clipped"], stats["completion_tokens"]])[None]).sum(0).tolist()
        stats.update(clipped=0, completion_tokens=0)
        return {k: v for k, v in stats.items() if k not in ("clipped", "completion_tokens")} | {
            "clip_frac": clipped / max(n, 1)}

    def held_out(done):
        if held:
            policy = rollout_model(run.model, rollout_dtype)
            em, _, form = exact_match(policy, tok, held, True, gc.enable_thinking,
                                      max_new_tokens=gc.max_new_tokens, batch_size=gc.rollout_batch)
            run.log.held_out(done, {}, extra={"exact_match": em, "format": form})

    fit(run, batches, loss_fn, held_out, extra)


# ------------------------------------------------------------------------------------------------ merge

# Fields that say how to run a model, not what it computes: checkpoints that differ only here may be merged.
_RUNTIME_KEYS = ("attn_impl", "act_ckpt", "loss_budget_mb")


def merge(out, specs):
    """Write sum_i w_i * theta_i of the HF-layout checkpoints `specs` ("DIR:WEIGHT", weights summing to 1; a run
    directory means its newest checkpoint) to directory `out`, with the first's config.json and tokenizer.json.
    Refuses checkpoints whose model configs or tensors (names, shapes, dtypes) differ, naming the difference."""
    if not specs:
        raise ValueError("merge: expected OUT and at least one CHECKPOINT:WEIGHT")
    parts = []
    for spec in specs:
        path, _, w = spec.rpartition(":")
        if not (path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", w)):
            raise ValueError(f"merge: {spec!r}: expected CHECKPOINT:WEIGHT, e.g. out/tiny_apo:0.9")
        parts.append((checkpoint_dir(path, "merge"), float(w)))
    total = sum(w for _, w in parts)
    if abs(total - 1) > 1e-6:
        raise ValueError(f"merge: the weights sum to {total:g}; a linear merge's weights sum to 1")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"merge: {out} exists and is not an empty directory; choose another OUT")
    base = parts[0][0]
    configs = [dataclasses.asdict(Model.config_from_hf(os.path.join(p, "config.json"))) for p, _ in parts]
    for (path, _), cfg in zip(parts[1:], configs[1:]):
        diff = [f"{k}: {configs[0][k]} vs {v}" for k, v in cfg.items() if k not in _RUNTIME_KEYS and v != configs[0][k]]
        if diff:
            raise ValueError(f"merge: {path} has another model config than {base}: {', '.join(diff)}")
    handles = [[safe_open(os.path.join(p, f), framework="pt") for f in Model.tensor_files(p)] for p, _ in parts]
    where = [{k: h for h in hs for k in h.keys()} for hs in handles]
    merged = {}
    for name in sorted(where[0]):
        first = where[0][name].get_tensor(name)
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for (path, w), names in zip(parts, where):
            if name not in names:
                raise ValueError(f"merge: tensor {name!r} is in {base} but not in {path}")
            t = names[name].get_tensor(name)
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"merge: tensor {name!r} is {first.dtype} {tuple(first.shape)} in {base} but "
                                 f"{t.dtype} {tuple(t.shape)} in {path}")
            acc += w * t.double()
        merged[name] = acc.to(first.dtype)
    for (path, _), names in zip(parts[1:], where[1:]):
        extra = sorted(set(names) - set(where[0]))
        if extra:
            raise ValueError(f"merge: tensor {extra[0]!r} is in {path} but not in {base}")
    # written whole into a temporary directory and renamed, so OUT is either absent or complete
    tmp = f"{out.rstrip('/')}.tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(merged, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        if os.path.isfile(os.path.join(base, name)):
            shutil.copyfile(os.path.join(base, name), os.path.join(tmp, name))
    Path(tmp, "merge.json").write_text(json.dumps({"merge": [{"checkpoint": p, "weight": w} for p, w in parts]},
                                                  indent=1))
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    print(f"merged {len(merged)} tensors of " + " + ".join(f"{w:g} x {p}" for p, w in parts) + f" into {out}")
    return out


# --------------------------------------------------------------------------------------------- pipeline
# `python posttrain.py pipeline config/tiny.py`: the whole recipe at toy scale from nothing, tokenizer ->
# pretrain -> mid-train -> SFT -> APO -> GRPO -> merge, each stage in its own directory under pipeline_dir
# from the stage's config (config/tiny.py, tiny_mid.py, tiny_sft.py, tiny_apo.py, tiny_grpo.py) with the
# pipeline's step counts; a stage whose checkpoint exists is skipped. Then a table of held-out metrics for
# every checkpoint, all from eval.py (bpb, exact_match and its format share) and the preference log-probs.

@dataclass
class PipelineConfig:
    pipeline_dir: str = "out/pipeline"
    pretrain_steps: int = 300       # optimizer steps per stage (the stage configs' max_steps are for longer runs)
    mid_steps: int = 30
    sft_steps: int = 150
    apo_steps: int = 75
    grpo_steps: int = 30
    eval_questions: int = 128       # held-out math_test questions per mode (/think, /no_think)
    eval_pairs: int = 200           # held-out pref_val pairs (all of them)
    merge_weights: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.1])   # GRPO model, mid-training


# stage -> (config file, the stage it starts from, method); pretraining is train.py's
STAGES = {"mid": ("config/tiny_mid.py", "pretrain", "mid"), "sft": ("config/tiny_sft.py", "mid", "sft"),
          "apo": ("config/tiny_apo.py", "sft", "dpo"), "grpo": ("config/tiny_grpo.py", "apo", "grpo")}


def pipeline(argv):
    """Run the stages that have no checkpoint yet, then print (and write to pipeline_dir/table.md) the table.
    argv: config/tiny.py (pretraining's config) and --key=value overrides, PipelineConfig's keys included."""
    ns = load(argv, *train.CONFIGS, PipelineConfig, prog="python posttrain.py pipeline")
    pc = PipelineConfig(**pick(ns, PipelineConfig))
    root, t_start = pc.pipeline_dir, time.perf_counter()
    dirs = {s: os.path.join(root, s) for s in ("pretrain", *STAGES, "merged")}
    times_path, metrics_path = os.path.join(root, "times.json"), os.path.join(root, "metrics.json")
    os.makedirs(root, exist_ok=True)
    times = json.loads(Path(times_path).read_text()) if os.path.isfile(times_path) else {}

    def timed(stage, fn):
        t0 = time.perf_counter()
        fn()
        times[stage] = time.perf_counter() - t0
        atomic_write(times_path, lambda p: Path(p).write_text(json.dumps(times, indent=1)))

    # the metrics this toy recipe targets are arithmetic, so pretraining reads the math source only
    def stage_ns(argv, classes, steps):   # the stage's config at the pipeline's step count (warmup at most half)
        ns = load(argv + [f"--max_steps={steps}", f"--eval_interval={steps}", f"--ckpt_interval={steps}"], *classes)
        ns.warmup_steps = min(ns.warmup_steps, steps // 2)
        return ns

    pre_ns = stage_ns(argv + [f"--out_dir={dirs['pretrain']}", "--mixture={'math': 1.0}", "--sample_tokens=0"],
                      (*train.CONFIGS, PipelineConfig), pc.pretrain_steps)
    if not os.path.isfile(os.path.join(dirs["pretrain"], "latest")):
        timed("pretrain", lambda: train.train(pre_ns))
    for stage, (cfg_file, parent, method) in STAGES.items():
        if os.path.isfile(os.path.join(dirs[stage], "latest")):
            continue
        sns = stage_ns([cfg_file, f"--init_from={dirs[parent]}", f"--out_dir={dirs[stage]}",
                        f"--data_dir={pre_ns.data_dir}"] + ["--eval_questions=0"] * (method == "grpo"),
                       COMMAND_CONFIGS.get(method, CONFIGS), getattr(pc, f"{stage}_steps"))  # the table scores GRPO
        timed(stage, lambda: COMMANDS[method](sns))
    if not os.path.isfile(os.path.join(dirs["merged"], "config.json")):
        w_grpo, w_mid = pc.merge_weights
        timed("merged", lambda: merge(dirs["merged"], [f"{dirs['grpo']}:{w_grpo}", f"{dirs['mid']}:{w_mid}"]))

    metrics = json.loads(Path(metrics_path).read_text()) if os.path.isfile(metrics_path) else {}
    init_dir = os.path.join(root, "init")
    mc, _, tc = train.resolve(pre_ns)
    device = train.setup_device(tc, mc, 0)[0]   # the run's device (CUDA where present) scores every checkpoint
    if not os.path.isfile(os.path.join(init_dir, "config.json")):   # the untrained model: pretraining's "before"
        tok = Tokenizer.load(os.path.join(checkpoint_dir(dirs["pretrain"], "pipeline"), "tokenizer.json"))
        torch.manual_seed(pre_ns.seed)
        Model(dataclasses.replace(mc, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)).save_pretrained(init_dir)
        tok.save(os.path.join(init_dir, "tokenizer.json"))
    for stage, d in [("init", init_dir), *dirs.items()]:
        if stage not in metrics:
            metrics[stage] = checkpoint_metrics(checkpoint_dir(d, "pipeline"), pre_ns.data_dir, device,
                                                stage not in ("init", "pretrain"), pc.eval_questions, pc.eval_pairs)
            atomic_write(metrics_path, lambda p: Path(p).write_text(json.dumps(metrics, indent=1)))
    mid_evals = [r for r in train.read_log(os.path.join(dirs["mid"], "log.jsonl")) if r["kind"] == "eval"]
    table = pipeline_table(metrics, times, mid_evals)
    atomic_write(os.path.join(root, "table.md"), lambda p: Path(p).write_text(table + "\n"))
    print(table)
    print(f"pipeline: {time.perf_counter() - t_start:.0f} s this run, {sum(times.values()):.0f} s of stage time in all "
          f"(load average {os.getloadavg()[0]:.1f})")
    return metrics


# ----------------------------------------------------------------------------------------- command line

COMMANDS = {"sft": sft, "mid": lambda ns: sft(ns, all_tokens=True), "dpo": dpo, "grpo": grpo}
COMMAND_CONFIGS = {"grpo": CONFIGS + (GRPOConfig,)}     # the dataclasses a command reads beyond CONFIGS
USAGE = (f"usage: python posttrain.py {{{','.join(COMMANDS)}}} CONFIG_FILE [--key=value ...]\n"
         "       python posttrain.py merge OUT CHECKPOINT:WEIGHT [CHECKPOINT:WEIGHT ...]\n"
         "       python posttrain.py pipeline config/tiny.py [--key=value ...]")


def main(argv):
    """Command line: bad input and a diverged run end in one line (exit 1); Ctrl-C in one line (exit 130)."""
    if not argv or argv[0] not in (*COMMANDS, "merge", "pipeline"):
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    try:
        if argv[0] == "merge":
            merge(argv[1] if len(argv) > 1 else "", argv[2:])
        elif argv[0] == "pipeline":
            pipeline(argv[1:])
        else:
            COMMANDS[argv[0]](load(argv[1:], *COMMAND_CONFIGS.get(argv[0], CONFIGS),
                                   prog=f"python posttrain.py {argv[0]}"))
    except (ValueError, train.Diverged) as e:
        sys.exit(f"posttrain.py: {e}")
    except KeyboardInterrupt as e:                             # 130 = 128 + SIGINT, what a shell reports
        print(f"posttrain.py: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
