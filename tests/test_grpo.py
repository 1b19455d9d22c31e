"""posttrain.py's GRPO against hand-derived values and direct float64 computations: group advantages, DAPO's
overlong penalty, the clipped ratio loss under each aggregation, zero gradient from a group of equal rewards,
rewards of tricky completions through eval's checker, k3 KL against the exact KL, the rollout's rows and scores,
and the log's trained tokens and tokens/s."""
import math

import pytest
import torch

import data
import posttrain as pt
import train
from data import Tokenizer
from model import Model, ModelConfig

MODEL = dict(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_position_embeddings=256,
             nope_interval=2, rope_theta=10000.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def test_group_advantages_on_a_hand_made_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 0.0, 0.0])
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: equal rewards; group 3: mean 0.5,
    # std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1
    s1 = math.sqrt(1 / 3)
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4)] * 2
    want = [want[0], want[1], want[1], want[0], 0, 0, 0, 0, 1.5 / 1.0001, -0.5 / 1.0001, -0.5 / 1.0001, -0.5 / 1.0001]
    assert pt.group_advantages(rewards, 4).tolist() == pytest.approx(want, rel=1e-6)
    no_std = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1.5, -0.5, -0.5, -0.5]
    assert pt.group_advantages(rewards, 4, scale=False).tolist() == pytest.approx(no_std, rel=1e-6)
    # 0.1 + 0.2 - 0.3 style rounding: a group of equal rewards is exactly 0, scaled or not
    eq = torch.full((7,), 0.1) * 3
    assert eq.mean() != eq[0] and pt.group_advantages(eq, 7).tolist() == [0.0] * 7


@pytest.mark.parametrize("length,want", [(0, 0.0), (14, 0.0), (15, 0.0), (16, -0.2), (18, -0.6), (19, -0.8),
                                         (20, -1.0), (21, -1.0), (500, -1.0)])
def test_overlong_penalty_regions_and_boundaries(length, want):
    # L_max 20, L_cache 5: 0 up to 15 inclusive, (15 - L) / 5 on 16..20, -1 beyond 20
    assert pt.overlong_penalty(length, 20, 5) == pytest.approx(want, abs=1e-12)


def _reference_loss(logp, old, adv, mask, agg, eps_low, eps_high, max_len, beta=0.0, ref=None):
    """The GRPO objective written out token by token in float64 (Python floats)."""
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(len(logp)):
        terms = []
        for t in range(len(logp[i])):
            if mask[i][t]:
                ratio = math.exp(logp[i][t] - old[i][t])
                clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
                term = -min(ratio * adv[i], clipped * adv[i])
                if beta:
                    d = ref[i][t] - logp[i][t]
                    term += beta * (math.exp(d) - d - 1)
                terms.append(term)
        per_seq.append(sum(terms) / max(len(terms), 1))
        total, n_tok = total + sum(terms), n_tok + len(terms)
    return {"grpo": sum(per_seq) / len(logp), "dapo": total / n_tok, "dr_grpo": total / (len(logp) * max_len)}[agg]


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_clipped_ratio_loss_matches_a_direct_computation(agg, beta):
    g = torch.Generator().manual_seed(0)
    N, T = 6, 9
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3   # ratios on both sides of the clip
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = torch.arange(T)[None] < lengths[:, None]
    gc = pt.GRPOConfig(eps_low=0.2, eps_high=0.28, kl_beta=beta, loss_agg=agg, max_new_tokens=12)
    per_token, clip = pt.grpo_token_loss(logp, old, adv, gc, ref)
    w = pt.token_weights(mask, agg, gc.max_new_tokens)
    want = _reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), agg, 0.2, 0.28, 12,
                           beta, ref.tolist())
    # the weights are float32 (1 / count rounded once), the rest float64
    assert (per_token * w).sum().item() == pytest.approx(want, rel=1e-6)
    # the weights are global: micro-batches of rows sum to the whole batch's loss
    parts = sum((per_token[i:i + 4] * w[i:i + 4]).sum() for i in (0, 4))
    assert parts.item() == pytest.approx((per_token * w).sum().item(), rel=1e-12)
    ratio = (logp - old).exp()
    active = torch.where(adv[:, None] > 0, ratio > 1.28, ratio < 0.8)
    assert torch.equal(clip & mask, active & mask) and (active & mask).any() and (~active & mask).any()


def _rows(tok, completions, prompt_len=5):
    rows = [(torch.arange(prompt_len + len(c) - 1) % 200, torch.tensor([-100] * (prompt_len - 1) + c)) for c in completions]
    return tuple(map(torch.from_numpy, pt._padded(tok, [(x.numpy(), y.numpy()) for x, y in rows],
                                                  max(len(x) for x, _ in rows))))


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_a_group_of_equal_rewards_gives_zero_gradient(tok, agg):
    torch.manual_seed(0)
    model = Model(ModelConfig(**MODEL))
    x, y, pos = _rows(tok, [[65, 66, 67], [70, 71], [72, 73, 74, 75], [80]])
    gc = pt.GRPOConfig(loss_agg=agg, max_new_tokens=8)
    adv = pt.group_advantages(torch.tensor([0.75, 0.75, 0.75, 0.75]), 4)
    logp = pt.token_logprobs(model, x, y, pos, 1.0)
    per_token, _ = pt.grpo_token_loss(logp, logp.detach(), adv, gc)
    (per_token * pt.token_weights(y != -100, agg, 8)).sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    # and a group that differs moves the weights
    model.zero_grad()
    adv = pt.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    logp = pt.token_logprobs(model, x, y, pos, 1.0)
    per_token, _ = pt.grpo_token_loss(logp, logp.detach(), adv, gc)
    (per_token * pt.token_weights(y != -100, agg, 8)).sum().backward()
    assert torch.count_nonzero(model.tok_emb.weight.grad) > 0


def test_token_logprobs_against_log_softmax(tok):
    torch.manual_seed(0)
    model = Model(ModelConfig(**MODEL))
    x, y, pos = _rows(tok, [[65, 66, 67], [70]])
    with torch.no_grad():
        logits = model(x, pos=pos).double()
        got = pt.token_logprobs(model, x, y, pos, 0.7)
    for b, t in [(0, 4), (0, 6), (1, 4)]:
        assert got[b, t].item() == pytest.approx((logits[b, t] / 0.7).log_softmax(-1)[y[b, t]].item(), rel=1e-5)
    assert torch.count_nonzero(got[y == -100]) == 0


def test_k3_kl_against_its_formula_and_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(5, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    ref = torch.randn(5, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    k3 = pt.k3_kl(logp, ref)
    r = (ref - logp).exp()
    assert torch.allclose(k3, r - torch.log(r) - 1, rtol=1e-12) and (k3 >= 0).all()
    # unbiased: its expectation under π over the whole vocabulary is KL(π || π_ref)
    exact = (logp.exp() * (logp - ref)).sum(-1)
    assert torch.allclose((logp.exp() * k3).sum(-1), exact, rtol=1e-10)


@pytest.fixture(scope="module")
def reserved_tok():
    base = Tokenizer.byte_level()
    specials = dict(base.specials, **{"<|reserved_special_token_7|>": 256 + len(base.specials)})
    return Tokenizer(base.ranks, specials)


def _ids(tok, *parts):
    """Text parts and special-token names -> ids, the names as their control tokens."""
    return [i for p in parts for i in ([tok.specials[p]] if p in tok.specials else tok.encode(p))]


@pytest.mark.parametrize("parts,answer,think,reward", [
    (["no number here", "<|im_end|>"], "4", False, 0.5),                 # no answer: the format bonus only
    (["3 apples and 4 pears, 7 fruit", "<|im_end|>"], "7", False, 1.5),               # the last number
    (["3 apples and 4 pears, 7 fruit", "<|im_end|>"], "3", False, 0.5),
    (["The answer is 12. Then 9 more words 10", "<|im_end|>"], "12", False, 1.5),      # the marker wins
    (["<think>", "\nThe answer is 8\n", "</think>", "<|im_end|>"], "8", True, 0.0),   # only inside <think>
    (["<think>", "\n6 * 7 = 42\n", "</think>", "\nThe answer is 42.", "<|im_end|>"], "42", True, 1.5),
    (["<think>", "\n6 * 7 = 42, unclosed", "<|im_end|>"], "42", True, 0.0),
    (["The answer is 5.<|im_end|><|im_start|>user 6"], "6", False, 0.0),              # names as text: no stop
    (["so it is 4", "<|reserved_special_token_7|>", "<|im_end|>"], "4", False, 1.5),   # a reserved token's digits
    (["The answer is 1,234.", "<|im_end|>"], "1234", False, 1.5),
    (["The answer is 3.50", "<|im_end|>"], "3.5", False, 1.5),
    (["The answer is 42.", "<|im_end|>"], "42", True, 1.0),                           # /think without reasoning
])
def test_reward_of_tricky_completions(reserved_tok, parts, answer, think, reward):
    gc = pt.GRPOConfig(format_reward=0.5, overlong_cache=0)
    assert pt.completion_reward(reserved_tok, _ids(reserved_tok, *parts), answer, think, gc) == reward


def test_reward_adds_the_overlong_penalty(tok):
    gc = pt.GRPOConfig(max_new_tokens=40, overlong_cache=10)
    ids = _ids(tok, "The answer is 7." + " " * 23)                       # 39 tokens, cut at the budget: no stop
    assert pt.completion_reward(tok, ids, "7", False, gc) == pytest.approx(1 + (30 - 39) / 10)
    assert pt.completion_reward(tok, _ids(tok, "The answer is 7.", "<|im_end|>"), "7", False, gc) == 1.0


@pytest.mark.parametrize("g, rollout_batch, calls", [(3, 4, [[0], [1]]), (2, 4, [[0, 1]]),
                                                     (4, 2, [[0], [0], [1], [1]])])
def test_rollout_rows_groups_and_the_prefilled_no_think_prompt(tok, g, rollout_batch, calls):
    """Whole groups per generate call, or (rollout_batch < group_size) a group over several calls."""
    torch.manual_seed(0)
    model = Model(ModelConfig(**MODEL, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id))
    # /system_override keeps the prompts short (no metadata block); the mode: the dataset's, then the example's
    msgs = [[{"role": "system", "content": "/system_override"}, {"role": "user", "content": "Compute 2 + 3."}],
            [{"role": "system", "content": "/system_override /no_think"}, {"role": "user", "content": "1 + 1?"}]]
    prompts = [data.render_chat(tok, m, True, enable_thinking=True)[0] for m in msgs]
    assert tok.decode(prompts[1]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    gc = pt.GRPOConfig(group_size=g, max_new_tokens=6, overlong_cache=0, rollout_batch=rollout_batch)
    seen, outs = [], []
    real_generate = model.generate

    def generate(batch, *args, num_samples):
        seen.append((batch, num_samples))
        outs.extend(real_generate(batch, *args, num_samples=num_samples))
        return outs[-len(batch) * num_samples:]
    model.generate = generate
    (x, y, pos), scores, seconds = pt.rollout(model, tok, prompts, ["5", "2"], gc, torch.Generator().manual_seed(0))
    assert seen == [([prompts[i] for i in call], min(g, rollout_batch)) for call in calls]
    assert x.shape[0] == y.shape[0] == 2 * g and scores.shape == (2 * g, 3) and seconds > 0
    want = [[pt.completion_reward(tok, o, ["5", "2"][r // g], True, gc), len(o),
             float(pt.check_answer(pt.completion_text(tok, o), ["5", "2"][r // g]))] for r, o in enumerate(outs)]
    assert scores.tolist() == want
    stats = pt.rollout_stats(scores, g, seconds, sum(map(len, outs)))
    assert stats["completion_length"] == sum(map(len, outs)) / (2 * g)
    assert stats["completion_length_max"] == max(map(len, outs))
    assert stats["rollout_tok_per_s"] == pytest.approx(sum(map(len, outs)) / seconds)
    for r in range(2 * g):
        p, o = prompts[r // g], outs[r]
        n = len(p) + len(o) - 1
        assert x[r, :n].tolist() == p + o[:-1] and (pos[r, :n] == torch.arange(n)).all() and (pos[r, n:] == -1).all()
        assert y[r, len(p) - 1:n].tolist() == o and (y[r, :len(p) - 1] == -100).all() and (y[r, n:] == -100).all()


def test_rollout_model_is_a_bf16_copy_that_leaves_the_fp32_weights_alone(tok):
    """The twin holds every tensor of the model cast to bf16 (an untied head too), in eval mode, sharing no storage
    with it; a model already in the dtype is its own twin."""
    torch.manual_seed(0)
    model = Model(ModelConfig(**dict(MODEL, tie_embeddings=False), eos_id=tok.eos_id))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = pt.rollout_model(model, torch.bfloat16)
    assert twin.state_dict().keys() == before.keys() and not twin.training and model.training
    assert all(torch.equal(twin.state_dict()[k], v.to(torch.bfloat16)) for k, v in before.items())
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert pt.rollout_model(model, torch.float32) is model


def test_grpo_runs_logs_and_resumes_exactly(tmp_path, tok):
    """Two GRPO updates per rollout (num_iterations 2) in micro-batches: the log has the rollout numbers (the
    second update of a rollout repeats them), and a run killed after step 2 and resumed ends with the weights
    of the uninterrupted run."""
    import json

    import config
    torch.manual_seed(0)
    Model(ModelConfig(**MODEL, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)).save_pretrained(tmp_path / "init")
    tok.save(str(tmp_path / "init" / "tokenizer.json"))
    rl = [{"prompt": [{"role": "system", "content": "/system_override"}, {"role": "user", "content": f"{a} + {b}?"}],
           "answer": str(a + b), "enable_thinking": a % 2 == 0} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl))

    def run(out, steps, resume=False):
        argv = [f"--init_from={tmp_path / 'init'}", f"--out_dir={out}", f"--rl_data={tmp_path / 'rl.jsonl'}",
                "--batch_size=8", "--micro_batch_size=4", "--group_size=4", "--max_new_tokens=8", "--overlong_cache=2",
                f"--max_steps={steps}", "--num_iterations=2", "--ckpt_interval=2", "--eval_interval=100",
                "--eval_questions=0", "--lr=1e-3", "--warmup_steps=0", "--seq_len=128", "--log_interval=1",
                "--spike_factor=0.0", "--dtype=float32", "--device=cpu", f"--resume={resume}"]
        pt.grpo(config.load(argv, *pt.COMMAND_CONFIGS["grpo"]))
        return Model.from_pretrained(pt.checkpoint_dir(str(out), "test")).state_dict()

    full = run(tmp_path / "a", 4)
    log = [r for r in map(json.loads, (tmp_path / "a" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    keys = ("reward_mean", "reward_std", "completion_length", "zero_std_groups", "correct", "rollout_tok_per_s")
    assert all(k in r for r in log for k in keys + ("clip_frac",))
    assert [log[0][k] for k in keys] == [log[1][k] for k in keys]          # one rollout, two updates
    assert log[0]["clip_frac"] == 0.0                                      # the first update: ratio exactly 1
    # tokens trained (tok_per_s counts these): each completion's row, its prompt then all but its stop token
    loader = pt.PromptLoader(str(tmp_path / "rl.jsonl"), tok, 2, seed=train.TrainConfig.seed)
    for r in log:
        prompts = loader.get((r["step"] - 1) // 2, 0)[0]
        assert r["tokens"] == 4 * sum(len(p) for p in prompts) + round(8 * r["completion_length"]) - 8
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_logged_tokens_per_second_counts_the_tokens_a_step_reports(tmp_path):
    """GRPO's steps vary in size: the log's tok_per_s is extra["tokens"] / step time, else tokens_per_step / time."""
    log = train.Logger(str(tmp_path), 0, train.TrainConfig(max_steps=2), 1000, 6, None, True)
    r, guard = train.StepResult(1.0, 1.0, 1e-3, None, 1.0), train.Guard(0.0)
    log.t_last -= 2.0                                                      # a step of 2 s ...
    log.train_step(1, r, guard, {"tokens": 10})
    log.restart_clock()                                                    # as run_loop does after each step
    log.t_last -= 4.0                                                      # ... then one of 4 s
    log.train_step(2, r, guard)
    log.bar.close()
    first, second = train.read_log(str(tmp_path / "log.jsonl"))
    assert first["tok_per_s"] == pytest.approx(10 / 2, rel=1e-2) and first["tokens"] == 10
    assert second["tok_per_s"] == pytest.approx(1000 / 4, rel=1e-2)


def test_pipeline_table_marks_each_stage_against_its_parent():
    m = {"init": {"math_bpb": 3.0}, "pretrain": {"math_bpb": 1.0},
         "mid": {"math_bpb": 1.1, "format_think": 0.5, "em_think": 0.1, "format_no_think": 0.2, "em_no_think": 0.0,
                 "pref_acc": 0.5}}
    m["sft"] = dict(m["mid"], format_think=0.9, em_think=0.1, format_no_think=0.8, em_no_think=0.05)
    m["apo"] = dict(m["sft"], pref_acc=0.7)
    m["grpo"] = dict(m["apo"], em_think=0.2)
    m["merged"] = dict(m["grpo"], em_think=0.15)
    evals = [{"val_loss": {"mid": 2.0}}, {"val_loss": {"mid": 1.5}}]
    rows = {line.split(" | ")[0][2:]: line for line in pt.pipeline_table(m, {"sft": 12.4}, evals).splitlines()[2:]}
    assert list(rows) == ["init", "pretrain", "mid", "sft", "apo", "grpo", "merged"]
    assert "math_bpb 3.000 -> 1.000 improved" in rows["pretrain"] and "chat loss 2.000 -> 1.500 improved" in rows["mid"]
    assert "| sft | 12 | 1.100 | 0.900 | 0.100 | 0.800 | 0.050 | 0.500 |" in rows["sft"]
    assert "em_think 0.100 -> 0.100 **not improved**" in rows["sft"] and "format_think 0.500 -> 0.900 improved" in rows["sft"]
    assert "pref_acc 0.500 -> 0.700 improved" in rows["apo"]
    assert rows["grpo"].endswith("| em_think 0.100 -> 0.200 improved |")     # its prompts are /think only
    assert "em_think 0.200 -> 0.150 **not improved**; em_no_think 0.050 -> 0.050 **not improved**" in rows["merged"]


def test_prompt_modes_per_dataset_and_per_example(tmp_path, tok):
    import json
    user = [{"role": "user", "content": "1 + 1?"}]
    rows = [{"prompt": user, "answer": "2"}, {"prompt": user, "answer": "2", "enable_thinking": False},
            {"prompt": [{"role": "system", "content": "/think"}] + user, "answer": "2", "enable_thinking": False}]
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for default in (True, False):
        loader = pt.PromptLoader(str(tmp_path / "rl.jsonl"), tok, 3, enable_thinking=default)
        want = [data.render_chat(tok, user, True, enable_thinking=default)[0],
                data.render_chat(tok, user, True, enable_thinking=False)[0],           # the line's own flag
                data.render_chat(tok, rows[2]["prompt"], True, enable_thinking=True)[0]]  # the system turn's flag
        assert loader.prompts == want
        ends = [tok.decode(p).endswith("<|im_start|>assistant\n<think>\n\n</think>\n") for p in loader.prompts]
        assert ends == [not default, True, False]


def test_rollout_throughput_counts_every_round_of_dynamic_sampling(tmp_path, tok, monkeypatch):
    """sample_rounds 3 on a random model (every reward 0: no round has a group with signal, so all 3 run): the log's
    rollout_tok_per_s is every generated token of the 3 rounds over their seconds (a clock that ticks 1 s a call).
    rollout_dtype bfloat16: every round decodes on the bf16 twin of the fp32 weights."""
    import json

    import config
    torch.manual_seed(0)
    Model(ModelConfig(**MODEL, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)).save_pretrained(tmp_path / "init")
    tok.save(str(tmp_path / "init" / "tokenizer.json"))
    rl = [{"prompt": [{"role": "system", "content": "/system_override"}, {"role": "user", "content": f"{a} + 9?"}],
           "answer": "-1"} for a in range(6)]
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl))
    generated, real_generate, clock = [], Model.generate, iter(range(10 ** 6))
    dtypes = []
    monkeypatch.setattr(Model, "generate", lambda *a, **k: dtypes.append(a[0].tok_emb.weight.dtype)
                        or generated.extend(real_generate(*a, **k)) or generated[-8:])
    monkeypatch.setattr(pt.time, "perf_counter", lambda: float(next(clock)))
    argv = [f"--init_from={tmp_path / 'init'}", f"--out_dir={tmp_path / 'out'}", f"--rl_data={tmp_path / 'rl.jsonl'}",
            "--batch_size=8", "--micro_batch_size=8", "--group_size=4", "--max_new_tokens=6", "--overlong_cache=0",
            "--max_steps=1", "--sample_rounds=3", "--rollout_batch=8", "--rollout_dtype=bfloat16",
            "--eval_questions=0", "--seq_len=128",
            "--warmup_steps=0", "--log_interval=1", "--dtype=float32", "--device=cpu"]
    pt.grpo(config.load(argv, *pt.COMMAND_CONFIGS["grpo"]))
    log = [r for r in map(json.loads, (tmp_path / "out" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert log[0]["rollout_rounds"] == 3 and log[0]["reward_mean"] == 0 and len(generated) == 24
    assert log[0]["rollout_tok_per_s"] == sum(map(len, generated)) / 3     # 3 rounds of 1 s; 8 of 24 rows kept
    assert dtypes == [torch.bfloat16] * 3


def test_dynamic_sample_keeps_the_groups_with_unequal_rewards_first():
    """Three rollouts of two groups of 2 (rewards: equal, unequal | equal, equal | unequal, unequal), rows of
    different lengths: 3 kept groups are the three unequal ones in rollout order, right-padded; with 4 the first
    equal one joins them in its place."""
    def roll(rewards, T, tag):
        n = len(rewards)
        x = torch.full((n, T), tag)
        return (x, x + 100, torch.arange(T).expand(n, T)), torch.tensor([[r, 1, 0] for r in rewards],
                                                                         dtype=torch.float64), 0.1
    rounds = [roll([1, 1, 0, 1], 3, 0), roll([0, 0, 1, 1], 5, 1), roll([0, 1, 1, 0], 4, 2)]
    assert pt.varied_groups(rounds[0][1], 2).tolist() == [False, True]
    (x, y, pos), scores = pt.dynamic_sample(rounds, 2, 3, pad_id=7)
    assert scores[:, 0].tolist() == [0, 1, 0, 1, 1, 0] and x.shape == (6, 4)
    assert x.tolist() == [[0, 0, 0, 7]] * 2 + [[2] * 4] * 4
    assert y[:2].tolist() == [[100, 100, 100, -100]] * 2 and pos[:2].tolist() == [[0, 1, 2, -1]] * 2
    (x, _, _), scores = pt.dynamic_sample(rounds, 2, 4, pad_id=7)
    assert scores[:, 0].tolist() == [1, 1, 0, 1, 0, 1, 1, 0] and x.shape == (8, 4)
