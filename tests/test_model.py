"""model.py against independent references: per-document runs, float64 hand-written attention,
full-forward logits for the KV cache, transformers' SmolLM3ForCausalLM (fp32, bf16, bf16 autocast) and
its config parsing, and hand-computed counts; config/ against its documented errors."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import config
import model as M
from model import Model, ModelConfig
from train import CONFIGS as ALL


def small_cfg(**kw):
    base = dict(vocab_size=97, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, rope_theta=10000.0,
                nope_interval=4, max_position_embeddings=256, bos_id=1, eos_id=2, pad_id=0)
    base.update(kw)
    return ModelConfig(**base)


def make(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = Model(small_cfg(**kw)).to(dtype).eval()
    return m


def positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_packed_documents_equal_separate_runs():
    m = make()
    lengths = [7, 1, 12]
    x = torch.randint(3, 97, (1, sum(lengths)))
    packed = m(x, pos=positions(lengths))
    start = 0
    for n in lengths:
        alone = m(x[:, start:start + n])
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=0, atol=1e-5)
        start += n
    # and without doc masking the later documents do see the earlier ones
    m.cfg.doc_masking = False
    leaky = m(x, pos=positions(lengths))
    assert (leaky[:, 8:] - packed[:, 8:]).abs().max() > 1e-3


def attn_out(m, layer, x, pos):
    """Output of one layer's attention module for hidden input x."""
    cfg = m.cfg
    rope = M.rope_cos_sin(pos, cfg)
    mask = M.doc_causal_mask(pos, None, True)
    return m.layers[layer].attn(x, rope, pos, mask)


def test_nope_layers_ignore_rope_theta():
    m = make(n_layers=8, nope_interval=4)
    assert m.cfg.nope_layers == [3, 7]
    x = torch.randn(2, 10, 64)
    pos = torch.arange(10).expand(2, 10)
    before = {i: attn_out(m, i, x, pos) for i in range(8)}
    m.cfg.rope_theta = 1234.0
    for i in range(8):
        after = attn_out(m, i, x, pos)
        if i in (3, 7):
            assert torch.equal(before[i], after), f"NoPE layer {i} changed with rope_theta"
        else:
            assert (before[i] - after).abs().max() > 1e-4, f"RoPE layer {i} ignored rope_theta"
    m0 = make(n_layers=8, nope_interval=0)
    assert m0.cfg.nope_layers == []


def reference_attention(m, layer, x, pos):
    """Float64 attention written from the definitions: rotate-half RoPE, repeated KV heads, masked softmax."""
    cfg, a = m.cfg, m.layers[layer].attn
    B, T, _ = x.shape
    x = x.double()
    q = (x @ a.q.weight.double().t()).view(B, T, cfg.n_heads, cfg.head_dim)
    k = (x @ a.k.weight.double().t()).view(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = (x @ a.v.weight.double().t()).view(B, T, cfg.n_kv_heads, cfg.head_dim)
    if a.use_rope:
        d = cfg.head_dim
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = pos.double()[..., None] * freqs
        cos, sin = ang.cos(), ang.sin()

        def rot(t):
            t1, t2 = t[..., : d // 2], t[..., d // 2:]
            c, s = cos[:, :, None], sin[:, :, None]
            return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)
        q, k = rot(q), rot(k)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(cfg.head_dim)
    doc = torch.cumsum(pos == 0, 1)
    allowed = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
    if cfg.sliding_window:
        allowed &= (torch.arange(T)[:, None] - torch.arange(T)[None, :] < cfg.sliding_window)[None]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(B, T, -1)
    return o @ a.o.weight.double().t()


@pytest.mark.parametrize("n_kv_heads,window", [(4, None), (2, None), (1, None), (2, 5)])
def test_attention_matches_float64_reference(n_kv_heads, window):
    """MHA (n_kv == n_heads), GQA, MQA and sliding window against a plain float64 computation."""
    m = make(n_kv_heads=n_kv_heads, sliding_window=window)
    x = torch.randn(2, 13, 64)
    pos = torch.cat([positions([5, 8]), positions([13])])
    for layer in (0, 3):  # a RoPE layer and a NoPE layer
        cfg = m.cfg
        rope = M.rope_cos_sin(pos, cfg)
        ours = m.layers[layer].attn(x, rope, pos, M.doc_causal_mask(pos, window, True))
        torch.testing.assert_close(ours.double(), reference_attention(m, layer, x, pos), rtol=0, atol=2e-5)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_loss_paths_equal_full_cross_entropy(z_loss):
    """Both loss paths, chunked (a budget of 7 rows of 97 fp32 logits: 5 checkpointed chunks, the last one short)
    and one pass (the default budget), through CrossEntropy's hand-written backward, against autograd through
    F.cross_entropy (+ the z-loss) on the full logits: loss to 1e-6, every gradient to 1e-5 relative + 1e-7 absolute
    (the same fp32 math summed in another order)."""
    x = torch.randint(3, 97, (3, 11))
    y = torch.randint(0, 97, (3, 11))
    y[0, :4] = -100
    valid = y != -100
    m = make(z_loss=z_loss)
    logits = m(x)
    lse = torch.logsumexp(logits, -1)
    ref = F.cross_entropy(logits.view(-1, 97), y.view(-1), ignore_index=-100) + z_loss * lse[valid].square().mean()
    ref.backward()
    for budget_mb in (7 * 97 * 4 / 2**20, 1024.0):
        m2 = make(loss_budget_mb=budget_mb, z_loss=z_loss)
        _, loss = m2(x, y)
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
            torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-7, msg=f"{n}, budget {budget_mb} MB")
    m = make(loss_budget_mb=7 * 97 * 4 / 2**20, z_loss=1e-3)
    _, loss = m(x, y)
    _, per_tok = m(x, y, reduction="none")
    assert per_tok.shape == (3, 11) and torch.all(per_tok[0, :4] == 0)
    torch.testing.assert_close(per_tok.sum() / valid.sum(), loss)
    # under bf16 autocast the chunks see bf16 logits (as the full path does) but reduce them in fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_amp = m(x, y)
        logits = m(x)
    assert logits.dtype == torch.float32
    ref = F.cross_entropy(logits.view(-1, 97).double(), y.view(-1)) + 1e-3 * torch.logsumexp(logits.double(), -1)[valid].square().mean()
    torch.testing.assert_close(loss_amp.double(), ref, rtol=1e-6, atol=1e-6)


def recording_sample(monkeypatch):
    """M.sample, recording the logits of every step it is given."""
    seen, orig = [], M.sample
    monkeypatch.setattr(M, "sample", lambda logits, *a, **k: seen.append(logits.clone()) or orig(logits, *a, **k))
    return seen


# the last case: a vocabulary of 96 on 2 threads, so generate splits the head into two shares (one bmm)
@pytest.mark.parametrize("n_kv_heads,window,vocab,threads", [(2, 6, 97, 0), (1, None, 97, 0), (4, None, 97, 0),
                                                             (2, None, 96, 2)])
def test_kv_cache_decoding_matches_full_forward(monkeypatch, n_kv_heads, window, vocab, threads):
    if threads:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    m = make(n_kv_heads=n_kv_heads, sliding_window=window, vocab_size=vocab)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    seen = recording_sample(monkeypatch)
    out = m.generate(prompts, max_new_tokens=5)
    assert [len(o) for o in out] == [5, 5, 5]
    for b, p in enumerate(prompts):
        full = m(torch.tensor([p + out[b]]))[0]       # [T, V]
        for t in range(5):
            torch.testing.assert_close(seen[t][b], full[len(p) - 1 + t], rtol=0, atol=1e-4)
        assert out[b] == full[len(p) - 1:-1].argmax(-1).tolist()  # greedy = the full forward's argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", [{}, {"n_experts": 4}, {"attention": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                                         "qk_rope_head_dim": 8, "v_head_dim": 16}])
def test_generate_under_autocast_equals_generate_without(monkeypatch, dtype, arch):
    """generate under bf16 autocast (train.py's and posttrain.py's regime) runs in the weights' dtype: the same
    tokens and step logits as without autocast, for fp32 and bf16 weights, on the decode fast path (GQA) and the
    layers' own (MoE, MLA). An fp32 model's cache once met autocast's bf16 keys and failed."""
    m = make(dtype=dtype, **arch)
    seen = recording_sample(monkeypatch)
    runs = []
    for autocast in (False, True):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            runs.append((m.generate([[5, 6, 7, 8], [9]], 6, num_samples=2), list(seen)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_generate_stops_and_samples():
    m = make()
    first = m.generate([[5, 6]], max_new_tokens=1)[0][0]
    out = m.generate([[5, 6], [7]], max_new_tokens=6, stop_ids=[first])
    assert out[0] == [first]  # stopped at the stop token, which is included
    assert out[1] == m.generate([[7]], max_new_tokens=6, stop_ids=[first])[0]  # the other row is unaffected
    assert m.generate([], max_new_tokens=3) == []
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(M.sample(logits, 1.0, top_k=1, generator=g), torch.ones(2000, dtype=torch.long))
    draws = M.sample(logits, 1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 2}
    frac = (draws == 1).float().mean().item()  # p = e^3 / (e^3 + e^2) = 0.731
    assert abs(frac - math.e / (math.e + 1)) < 0.04
    # nucleus 0.7: token 1 alone has 0.644 of the mass (< 0.7) so tokens 1 and 2 are kept
    draws = M.sample(logits, 1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {1, 2}
    assert set(M.sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1}
    # 100k draws of 5 ids against their probabilities (3 standard errors), the masked ends never drawn
    logits = torch.tensor([[-1e9, 0.5, -1.0, 2.0, 1.0, 0.0, -1e9]])
    want = logits[0, 1:6].softmax(-1)
    counts = torch.bincount(M.sample(logits.expand(100_000, 7), 1.0, top_k=5, generator=g), minlength=7) / 100_000
    assert counts[0] == counts[6] == 0 and ((counts[1:6] - want).abs() < 3 * (want * (1 - want) / 1e5).sqrt()).all()


def test_sample_at_the_ends_of_the_uniform_draw(monkeypatch):
    """A uniform draw of 0 picks the first id with mass; one whose product with the total mass rounds up to the total
    (u = 1 here) the last id with mass, never a masked id past it; in between, the id whose interval holds it."""
    logits = torch.tensor([[float("-inf"), 0.0, 0.0, float("-inf"), 0.0, 0.0, 0.0, float("-inf")]])  # 5 ids of 0.2
    for u, want in ((0.0, 1), (1.0, 6), (1 - 2 ** -53, 6), (0.3, 2), (0.5, 4), (0.79, 5)):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full((1, 1), u, dtype=torch.float64))
        assert M.sample(logits, 1.0).item() == want, u


def test_shared_prefill_samples_equal_separate_prefills(monkeypatch):
    """num_samples=G prefills each prompt once and expands the cache G times: with the same generator seed it
    draws the tokens of the prompts repeated G times (each row prefilled on its own), and every step's logits
    equal theirs (atol 1e-5: rows of different batch shapes). Left padding and a sliding window included."""
    m = make(sliding_window=6)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    seen = recording_sample(monkeypatch)
    runs = []
    for rows, G in [(prompts, 3), ([p for p in prompts for _ in range(3)], 1)]:
        seen.clear()
        out = m.generate(rows, 10, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(0), num_samples=G)
        runs.append((out, list(seen)))
    (shared, shared_logits), (separate, separate_logits) = runs
    assert shared == separate and len(shared) == 6
    assert len({tuple(o) for o in shared[:3]}) > 1  # the samples of one prompt differ
    for a, b in zip(shared_logits, separate_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="generate: num_samples must be >= 1, got 0"):
        m.generate(prompts, 3, num_samples=0)


def test_compiled_decode_equals_eager_and_compiles_once(monkeypatch):
    """generate(compile=True): inductor's decode step gives eager's greedy tokens and logits (atol 1e-5: fused
    kernels reorder sums) on a padded GQA batch with a RoPE and a NoPE layer; every step, and a second call of
    the same shapes, reuse one graph."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = make(n_layers=2, nope_interval=2, d_model=32, d_ff=48)
    prompts = [[5, 6, 7], [8]]
    seen = recording_sample(monkeypatch)
    runs = []
    for compile in (False, True, True):
        seen.clear()
        runs.append((m.generate(prompts, 4, compile=compile), list(seen)))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    for a, b in zip(runs[0][1], runs[1][1] + runs[2][1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]


def test_greedy_left_padded_batch_equals_transformers(tmp_path, hf):
    """Prompts of 7, 1 and 4 tokens in one left-padded batch: our greedy tokens equal transformers' generate
    given the same padding in its attention_mask, row by row (GQA, a NoPE layer, tied head)."""
    m = make()
    m.save_pretrained(tmp_path)
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16]]
    x = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    with torch.no_grad():
        peer = theirs.generate(x, attention_mask=(x != 0).long(), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[:, 7:]
    assert m.generate(prompts, 12) == peer.tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip_bit_exact(tmp_path, tied):
    m = make(tie_embeddings=tied, qk_norm=not tied, nope_interval=4 if tied else 6)  # 6 > n_layers: all RoPE
    m.save_pretrained(tmp_path)
    m2 = Model.from_pretrained(tmp_path)
    assert m2.cfg == m.cfg
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_load_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    m = make()
    m.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(path)
    cases = {
        "missing tensor(s) model.layers.1.mlp.up_proj.weight": {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"},
        "unexpected tensor 'model.layers.9.mlp.up_proj.weight'": {**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)},
        "'model.norm.weight' has shape (3,), expected (64,)": {**good, "model.norm.weight": torch.zeros(3)},
    }
    for msg, tensors in cases.items():
        save_file(tensors, path)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            Model.from_pretrained(tmp_path)


def test_parameter_count_smollm3_on_meta():
    ns = config.load(["config/smollm3.py"], *ALL)
    cfg = ModelConfig(**config.pick(ns, ModelConfig))
    with torch.device("meta"):
        m = Model(cfg)
    assert m.num_params() == 3_075_098_624
    # by hand: embedding + 36 * (attention + MLP + 2 norms) + final norm
    per_layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 11008 + 2 * 2048
    assert m.num_params() == 128256 * 2048 + 36 * per_layer + 2048
    assert "3,075,098,624" in M.summary(cfg)


def test_config_errors(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("d_model = 64\nn_layrs = 2\n")
    with pytest.raises(ValueError, match=r"c.py:2: unknown config key 'n_layrs' \(did you mean n_layers"):
        config.load([str(f)], *ALL)
    f.write_text("d_model = '64'\n")
    with pytest.raises(ValueError, match=r"c.py:1: key 'd_model': expected int, got str '64'"):
        config.load([str(f)], *ALL)
    with pytest.raises(ValueError, match="override --rope_theta: key 'rope_theta': expected float"):
        config.load(["--rope_theta=[1]"], *ALL)
    with pytest.raises(ValueError, match="config file not found: nope/missing.py"):
        config.load(["nope/missing.py"], *ALL)
    f.write_text("import os\n")
    with pytest.raises(ValueError, match=r"c.py:1: expected `name = value`"):
        config.load([str(f)], *ALL)
    f.write_text("d_model = os.system('true')\n")
    with pytest.raises(ValueError, match=r"c.py:1: expected a literal value"):
        config.load([str(f)], *ALL)
    f.write_text("d_model = 32 * 2\nsliding_window = None\n")
    ns = config.load([str(f), "--sliding_window=128", "--rope_theta=5e5", "--attn_impl=triton"], *ALL)
    assert (ns.d_model, ns.sliding_window, ns.rope_theta, ns.attn_impl) == (64, 128, 5e5, "triton")
    assert isinstance(ns.rope_theta, float)
    # typed containers are checked element by element, and the message points at the element
    f.write_text("mixture = {'web': 3, 'code': 1.5}\nstages = [[100, {'web': 1}]]\nsample_prompts = ['a']\n")
    ns = config.load([str(f), "--init_from=2024", "--out_dir=1e3"], *ALL)
    assert ns.mixture == {"web": 3.0, "code": 1.5} and ns.stages == [[100, {"web": 1}]]
    assert (ns.init_from, ns.out_dir) == ("2024", "1e3")  # a string key takes the override as typed
    bad = {"mixture = {'web': 'x'}": r"c.py:1: key 'mixture'\['web'\]: expected float, got str 'x'",
           "sample_prompts = ['a', 3]": r"c.py:1: key 'sample_prompts'\[1\]: expected str, got int 3",
           "init_from = 3": r"c.py:1: key 'init_from': expected str \| None, got int 3",
           "seq_len = 4096 // 0": r"c.py:1: 4096 // 0: integer division or modulo by zero",
           "mixture = {**{}}": r"c.py:1: expected a literal value"}
    for line, msg in bad.items():
        f.write_text(line + "\n")
        with pytest.raises(ValueError, match=msg):
            config.load([str(f)], *ALL)
    f.write_text("d_model = 64\n")
    with pytest.raises(ValueError, match="give one config file, before the --key=value overrides"):
        config.load([str(f), str(f)], *ALL)
    for kw, msg in [({"loss_budget_mb": 0}, "loss_budget_mb must be > 0"), ({"d_model": 65}, "d_model \\(65\\) must be divisible by n_heads")]:
        with pytest.raises(ValueError, match=msg):
            small_cfg(**kw)


def test_config_classes_named_by_the_entry_point(tmp_path, capsys):
    """Only the named classes' keys are known; a shared key needs one type; --help lists keys and exits."""
    from dataclasses import dataclass

    @dataclass
    class AConfig:
        lr: float = 1.0
        steps: int = 3

    @dataclass
    class BConfig:
        lr: float = 2.0

    @dataclass
    class CConfig:
        lr: int = 2

    ns = config.load(["--lr=0.5"], AConfig, BConfig)
    assert ns.lr == 0.5 and config.pick(ns, BConfig) == {"lr": 0.5}
    assert config.load([], AConfig).lr == 1.0      # the first class's default where both have one
    with pytest.raises(ValueError, match="config key 'lr' is float in AConfig but int in CConfig"):
        config.load([], AConfig, CConfig)
    with pytest.raises(ValueError, match="unknown config key 'd_model'"):
        config.load(["--d_model=3"], AConfig)
    f = tmp_path / "c.py"
    f.write_text("lr = 0.1\nd_model = 64\n")
    with pytest.raises(ValueError, match=r"c.py:2: unknown config key 'd_model'"):
        config.load([str(f)], AConfig)
    assert vars(config.load([str(f)], AConfig, strict=False)) == {"lr": 0.1, "steps": 3}
    with pytest.raises(ValueError, match=r"'steps=3': overrides start with two dashes \(did you mean --steps=3\?\)"):
        config.load([str(f), "steps=3"], AConfig)
    for argv, code in [(["--help"], 0), ([str(f), "-h"], 0), ([], 2)]:
        with pytest.raises(SystemExit) as e:
            config.load(argv, AConfig, prog="python x.py")
        assert e.value.code == code
        out = capsys.readouterr()
        assert (out.out if code == 0 else out.err).splitlines() == [
            "usage: python x.py CONFIG_FILE [--key=value ...]", "AConfig:", "  --lr=1.0  (float)", "  --steps=3  (int)"]


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("tied,window", [(True, None), (False, 5)])
def test_transformers_loads_ours_and_agrees(tmp_path, hf, tied, window):
    """transformers' SmolLM3ForCausalLM gives our logits from a directory we wrote, and we give theirs:
    fp32 to 1e-5, and bit-for-bit under bf16 autocast (the training regime: fp32 weights, bf16 matmuls)."""
    m = make(tie_embeddings=tied, n_layers=8, sliding_window=window)
    m.save_pretrained(tmp_path / "ours")
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    x = torch.randint(3, 97, (2, 16))
    with torch.no_grad():
        ref = theirs(input_ids=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_amp, ours_amp = theirs(input_ids=x).logits, m(x)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    assert torch.equal(ours_amp, ref_amp.float())
    # and back: their save_pretrained -> our from_pretrained
    theirs.save_pretrained(tmp_path / "theirs")
    back = Model.from_pretrained(tmp_path / "theirs")
    assert back.cfg == m.cfg
    torch.testing.assert_close(back(x), ref, rtol=0, atol=1e-5)


def write_released_style(path, m, shards):
    """A checkpoint laid out like the published SmolLM3-3B: bf16 shards named by an index, a config.json
    of transformers 4.54 (rope_scaling null, top-level rope_theta, bos null, an eos list)."""
    from safetensors.torch import save_file
    os.makedirs(path)
    tensors = {M.hf_name(k): v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
    weight_map = {}
    for i, names in enumerate(shards):
        f = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, os.path.join(path, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    c = m.cfg
    hf_cfg = {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "attention_bias": False,
              "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": [7, 2], "pad_token_id": 0,
              "hidden_act": "silu", "hidden_size": c.d_model, "intermediate_size": c.d_ff, "initializer_range": 0.02,
              "max_position_embeddings": c.max_position_embeddings, "max_window_layers": c.n_layers, "mlp_bias": False,
              "no_rope_layer_interval": 4, "no_rope_layers": [int(i not in c.nope_layers) for i in range(c.n_layers)],
              "num_attention_heads": c.n_heads, "num_hidden_layers": c.n_layers, "num_key_value_heads": c.n_kv_heads,
              "pretraining_tp": 2, "rms_norm_eps": c.rms_eps, "rope_scaling": None, "rope_theta": c.rope_theta,
              "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "transformers_version": "4.54.0", "use_cache": False, "use_sliding_window": False, "vocab_size": c.vocab_size}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    return tensors


def test_released_sharded_bf16_checkpoint_matches_transformers_bit_for_bit(tmp_path, hf):
    """Sharded bf16 weights + index, a tied lm_head copy in a shard: we load what transformers loads, keep
    bf16, and our bf16 forward (RMSNorm and RoPE casts included) equals theirs bit-for-bit."""
    m = make(n_layers=8)
    names = [M.hf_name(k) for k in m.state_dict()]
    write_released_style(tmp_path / "ck", m, [names[:20], names[20:]])
    from safetensors.torch import save_file
    # the tied head written out as a copy of the embedding in a third shard, as some exports do
    save_file({"lm_head.weight": m.tok_emb.weight.to(torch.bfloat16)}, tmp_path / "ck" / "model-00003-of-00003.safetensors")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00003-of-00003.safetensors"
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps(index))
    ours = Model.from_pretrained(tmp_path / "ck").eval()
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert (ours.cfg.eos_id, ours.cfg.nope_interval, ours.cfg.sliding_window, ours.cfg.tie_embeddings) == (7, 4, None, True)
    assert all(torch.equal(v, m.state_dict()[k].to(torch.bfloat16)) for k, v in ours.state_dict().items())
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16).eval()
    x = torch.randint(3, 97, (2, 40))
    with torch.no_grad():
        ref = theirs(input_ids=x).logits
    assert torch.equal(ours(x), ref.float())
    # a tensor written to two shards is an error naming both files
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, tmp_path / "ck" / "model-00003-of-00003.safetensors")
    with pytest.raises(ValueError, match=r"model-00003-of-00003.safetensors: tensor 'model.norm.weight' is also in model-0000[12]-of"):
        Model.from_pretrained(tmp_path / "ck")


def test_config_from_hf_reads_like_transformers(tmp_path, hf):
    """config.json variants: each either parses to what SmolLM3ForCausalLM computes, or is an error."""
    make().save_pretrained(tmp_path)
    base = json.loads((tmp_path / "config.json").read_text())
    path = tmp_path / "c.json"

    def parse(**change):
        path.write_text(json.dumps({**base, **change}))
        return Model.config_from_hf(path)
    assert parse(rope_theta=1.0, rope_parameters={"rope_type": "default", "rope_theta": 777.0}).rope_theta == 777.0
    assert parse(rope_parameters=None, rope_scaling=None, rope_theta=500.0).rope_theta == 500.0
    yarn = parse(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})
    assert (yarn.yarn_factor, yarn.yarn_original_max_position) == (2.0, 64)
    llama = {k: v for k, v in base.items() if k not in ("tie_word_embeddings", "no_rope_layers", "no_rope_layer_interval")}
    path.write_text(json.dumps({**llama, "model_type": "llama"}))
    cfg = Model.config_from_hf(path)
    assert (cfg.tie_embeddings, cfg.nope_interval) == (False, 0)  # LlamaConfig's defaults
    window = parse(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"] * 4)
    assert window.sliding_window == 8
    errors = {
        "use_sliding_window, sliding_window": ({"use_sliding_window": True, "sliding_window": 8, "layer_types": None},
                                               "sliding window on only some layers"),
        "hidden_act": ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        "attention_bias": ({"attention_bias": True}, "attention_bias=True is not supported"),
        "no_rope_layers short": ({"no_rope_layers": [1, 1, 1]}, "no_rope_layers has 3 entries for 4 layers"),
        "no_rope_layers aperiodic": ({"no_rope_layers": [0, 1, 1, 1]}, "not a periodic RNoPE pattern"),
        "yarn beta": ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "rope_theta": 1e4}}, "'beta_fast': 16"),
        "llama3 rope": ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "RoPE 'llama3'"),
        "type": ({"hidden_size": "64"}, "c.json: hidden_size: expected int, got str '64'"),
        "interval type": ({"no_rope_layer_interval": "4"}, "c.json: no_rope_layer_interval: expected int, got str '4'"),
        "eos type": ({"eos_token_id": "2"}, "c.json: eos_token_id: expected int | list[int] | None, got str '2'"),
        "nanosmol type": ({"nanosmol": {"qk_norm": 1}}, "c.json: nanosmol.qk_norm: expected bool, got int 1"),
    }
    for name, (change, msg) in errors.items():
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse(**change)
    # transformers agrees that the default layer_types window only the NoPE layers
    conf = hf.SmolLM3Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8)
    assert conf.layer_types == ["full_attention"] * 3 + ["sliding_attention"]


def test_transformers_config_defaults_give_smollm3(hf, tmp_path):
    """Their default SmolLM3Config (the released 3B shape) parses to our smollm3 config."""
    hf.SmolLM3Config().to_json_file(tmp_path / "config.json")
    cfg = Model.config_from_hf(tmp_path / "config.json")
    ns = config.load(["config/smollm3.py"], *ALL)
    ours = ModelConfig(**config.pick(ns, ModelConfig))
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "nope_interval", "rms_eps", "tie_embeddings", "head_dim"):
        assert getattr(cfg, k) == getattr(ours, k), k


def test_triton_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # conftest.py sets it only without a CUDA device
    m = make(attn_impl="triton")
    with pytest.raises(RuntimeError, match="attn_impl='triton' needs a CUDA GPU"):
        m(torch.randint(3, 97, (1, 4)))


def test_summary_cli_prints_smollm3_count(capsys):
    M.main(["config/smollm3.py"])  # what `python model.py config/smollm3.py` runs (in-process: no 3 s torch import)
    out = capsys.readouterr().out
    assert "parameters = 3,075,098,624" in out and "NoPE layers = [3, 7, 11, 15, 19, 23, 27, 31, 35] (9 of 36)" in out
    # by hand: 6 * 3,075,098,624 (tied head counted once) + 12 * 36 layers * 16 heads * 128 * 2048 keys on average
    assert f"FLOPs/token @4096 = {6 * 3_075_098_624 + 12 * 36 * 16 * 128 * 2048:,}" in out
    assert f"KV cache/token (bf16) = {2 * 36 * 4 * 128 * 2:,} bytes" in out  # K and V, 36 layers, 4 KV heads
    # an untied head is one more matrix to store, but the same one matmul per token
    assert make(tie_embeddings=False).flops_per_token(64) == make().flops_per_token(64)
    with pytest.raises(SystemExit, match="override --n_layer: unknown config key 'n_layer'"):
        M.main(["config/smollm3.py", "--n_layer=3"])


def test_config_base_file_is_read_first(tmp_path):
    (tmp_path / "a.py").write_text("d_model = 64\nn_layers = 2\n")
    (tmp_path / "b.py").write_text('"""an ablation"""\nbase = "a.py"\nn_layers = 3\n')
    ns = config.load([str(tmp_path / "b.py"), "--d_model=32"], *ALL)
    assert (ns.d_model, ns.n_layers) == (32, 3)
    (tmp_path / "a.py").write_text('base = "b.py"\n')
    with pytest.raises(ValueError, match="loops back"):
        config.load([str(tmp_path / "b.py")], *ALL)
    (tmp_path / "c.py").write_text('n_layers = 3\nbase = "a.py"\n')
    with pytest.raises(ValueError, match=r"c.py:2: `base` must be the first assignment"):
        config.load([str(tmp_path / "c.py")], *ALL)


def test_yarn_matches_transformers(tmp_path, hf):
    """YaRN (factor 4 over an original 32-token context) against transformers' rope_type 'yarn'."""
    m = make(yarn_factor=4.0, yarn_original_max_position=32, head_dim=32, n_heads=2, n_kv_heads=1)
    inv, scale = M.rope_frequencies(m.cfg)
    base = M.rope_frequencies(small_cfg(head_dim=32, n_heads=2, n_kv_heads=1))[0]
    assert inv[0] == base[0] and torch.isclose(inv[-1], base[-1] / 4) and scale == pytest.approx(1 + 0.1 * math.log(4))
    m.save_pretrained(tmp_path)
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(3, 97, (1, 100))
    with torch.no_grad():
        ref = theirs(input_ids=x).logits
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    assert Model.from_pretrained(tmp_path).cfg == m.cfg
    assert (m(x) - make(head_dim=32, n_heads=2, n_kv_heads=1)(x)).abs().max() > 1e-3  # YaRN changed something


def test_activation_checkpointing_gives_identical_gradients():
    grads = []
    for act_ckpt in (False, True):
        m = make(act_ckpt=act_ckpt).train()
        calls = []
        m.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        x, y = torch.randint(3, 97, (2, 12)), torch.randint(0, 97, (2, 12))
        m(x, y, positions([5, 7]).expand(2, 12))[1].backward()
        assert len(calls) == (2 if act_ckpt else 1)  # checkpointed layers run again in backward
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_autocast_attention_gets_one_dtype(monkeypatch):
    """Under bf16 autocast the fp32 RoPE tables and qk-norm weights promote q and k; the attention backend
    (SDPA here, the Triton kernel on GPU, which requires it) must still get q, k, v in one dtype."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)
    m = make(qk_norm=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randint(3, 97, (1, 6)))
    assert seen == [(torch.bfloat16,) * 3] * 4


def test_doc_causal_mask_by_hand():
    """pos -1 (padding) sees nothing and is seen by nothing; documents start at pos 0 or after padding."""
    pos = torch.tensor([[-1, 0, 1, 0, 1, -1, 2]])
    pairs = lambda m: {(i, j) for i, j in zip(*torch.nonzero(m[0, 0], as_tuple=True)) for i, j in [(int(i), int(j))]}
    assert pairs(M.doc_causal_mask(pos)) == {(1, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (6, 6)}
    causal = {(i, j) for i in (1, 2, 3, 4, 6) for j in (1, 2, 3, 4, 6) if j <= i}
    assert pairs(M.doc_causal_mask(pos, doc_masking=False)) == causal
    assert pairs(M.doc_causal_mask(pos, window=2, doc_masking=False)) == {(i, j) for i, j in causal if i - j < 2}


@pytest.mark.parametrize("doc_masking,window", [(True, None), (False, None), (True, 3), (False, 3)])
def test_padding_changes_nothing_on_real_tokens(doc_masking, window):
    """Left, middle and right padding (pos -1, y -100): the real tokens' logits, the loss and every
    gradient equal the unpadded rows'; a padding query's attention output is exactly 0; nothing is NaN."""
    m = make(doc_masking=doc_masking, sliding_window=window, n_kv_heads=1)
    x = torch.randint(3, 97, (2, 9))
    y = torch.randint(0, 97, (2, 9))
    pos = positions([4, 5]).expand(2, 9)
    # row 0: 3 pads on the left; row 1: 2 pads between its documents (one causal row without doc masking)
    # and 2 on the right
    cols = [list(range(3, 12)), [0, 1, 2, 3, 6, 7, 8, 9, 10]]
    T = 13
    xp, yp, pp = torch.zeros(2, T, dtype=torch.long), torch.full((2, T), -100), torch.full((2, T), -1)
    for b, c in enumerate(cols):
        xp[b, c], yp[b, c], pp[b, c] = x[b], y[b], pos[b]
    if not doc_masking:  # the reference row is one sequence: padding between documents closes no gap
        pos = None
    zeros = []
    # by the pos the layer sees: without doc masking, forward moves each row's padding to its end
    hook = m.layers[0].attn.register_forward_hook(lambda mod, args, out: zeros.append(out[args[2] < 0]))
    logits = m(xp, pos=pp)
    hook.remove()
    assert not zeros[0].any() and zeros[0].shape[0] == int((pp < 0).sum())
    ref = m(x, pos=pos)
    for b, c in enumerate(cols):
        torch.testing.assert_close(logits[b, c], ref[b], rtol=0, atol=1e-5)
    grads = []
    for args in [(xp, yp, pp), (x, y, pos)]:
        m.zero_grad()
        loss = m(*args)[1]
        loss.backward()
        grads.append((loss, {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-6)
    for n, g in grads[0][1].items():
        assert not g.isnan().any(), n
        torch.testing.assert_close(g, grads[1][1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_special_ids_without_pad_or_past_the_vocabulary(tmp_path, hf):
    """pad_token_id null: config.json stays null (transformers loads it) and generate still pads prompts of
    unequal length; an id past the vocabulary is one line naming it and vocab_size."""
    m = make(pad_id=None, bos_id=None)
    m.save_pretrained(tmp_path)
    conf = hf.SmolLM3Config.from_pretrained(tmp_path)
    assert (conf.pad_token_id, conf.bos_token_id, conf.eos_token_id) == (None, None, 2)
    hf.SmolLM3ForCausalLM.from_pretrained(tmp_path)
    assert Model.from_pretrained(tmp_path).cfg == m.cfg
    prompts = [[5, 6, 7, 8], [9]]
    out = m.generate(prompts, max_new_tokens=4)
    assert out == [m.generate([p], max_new_tokens=4)[0] for p in prompts]
    base = json.loads((tmp_path / "config.json").read_text())
    for change, msg in [({"eos_token_id": 600}, "eos_id 600 is outside the vocabulary (vocab_size 97)"),
                        ({"eos_token_id": [120, 2]}, "eos_id 120 is outside the vocabulary (vocab_size 97)"),
                        ({"pad_token_id": 97}, "pad_id 97 is outside the vocabulary (vocab_size 97)")]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ValueError, match=re.escape(f"config.json: model config: {msg}")):
            Model.from_pretrained(tmp_path)
    # absent ids take SmolLM3Config's defaults, which a 97-token vocabulary cannot hold
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in base.items() if k != "bos_token_id"}))
    with pytest.raises(ValueError, match=re.escape("bos_id 128000 is outside the vocabulary (vocab_size 97)")):
        Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape("generate: prompt token id 97 is outside the vocabulary")):
        m.generate([[5, 97]], max_new_tokens=1)


def test_model_cli_without_arguments_prints_usage(capsys):
    for argv, code in [([], 2), (["--help"], 0)]:
        with pytest.raises(SystemExit) as e:
            M.main(argv)
        assert e.value.code == code
        out = capsys.readouterr()
        lines = (out.out if code == 0 else out.err).splitlines()
        assert lines[:3] == ["usage: python model.py CONFIG_FILE [--key=value ...]", "ModelConfig:", "  --vocab_size=128256  (int)"]


def test_generate_syncs_with_the_host_once_per_step(monkeypatch):
    """Every read of a tensor value on the host (tolist, item, bool, int, float) during generate is counted."""
    m = make(sliding_window=4)
    calls = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _orig=orig, _n=name: calls.append(_n) or _orig(self, *a))
    m.generate([[5, 6, 7], [8]], max_new_tokens=6)
    assert calls == ["tolist"] * 6


def test_padding_never_meets_an_empty_softmax_row(monkeypatch):
    """Textbook attention gives NaN for a query with nothing to attend to (CUDA's kernels may too); with it
    in place of SDPA, a padded batch's logits and gradients stay finite and equal SDPA's."""
    def textbook(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~attn_mask, float("-inf"))
        return s.softmax(-1) @ v
    empty = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    kv = torch.ones(1, 1, 3, 2)
    assert textbook(torch.ones(1, 1, 1, 2), kv, kv, attn_mask=empty).isnan().all()
    m = make()
    x, y = torch.randint(3, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    pos = torch.tensor([[-1, -1, 0, 1, 2, 0, 1, -1], [0, 1, 2, 3, 4, 5, 6, 7]])
    y[pos < 0] = -100
    results = []
    for attention in (F.scaled_dot_product_attention, textbook):
        monkeypatch.setattr(M.F, "scaled_dot_product_attention", attention)
        m.zero_grad()
        logits = m(x, pos=pos)
        m(x, y, pos)[1].backward()
        results.append([logits] + [p.grad.clone() for p in m.parameters()])
    for ref, got in zip(*results):
        assert got.isfinite().all()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)

# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("act_ckpt", [False, True])
def test_compiled_training_step_equals_eager_and_does_not_recompile(act_ckpt):
    """Inductor on CPU: loss and every gradient equal eager's within fp32 rounding (atol 1e-5, rtol 1e-4:
    fused kernels reorder sums) on doc-masked GQA with a NoPE layer, with activation checkpointing too (the 3B
    step's setting on one GPU); packed rows with other document boundaries reuse the compiled graph (dynamo
    compiles one frame once)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = make(n_layers=2, nope_interval=2, d_model=32, d_ff=48, act_ckpt=act_ckpt).train()
    compiled = torch.compile(m)
    x, y = torch.randint(3, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    for lengths in ([5, 11], [9, 4, 3], [16]):
        pos = positions(lengths).expand(2, 16)
        results = []
        for f in (m, compiled):
            loss = f(x, y, pos)[1]
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
            m.zero_grad(set_to_none=True)
        (loss_e, grads_e), (loss_c, grads_c) = results
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-4)
        for n in grads_e:
            torch.testing.assert_close(grads_c[n], grads_e[n], atol=1e-5, rtol=1e-4, msg=n)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]


def padded(*parts):
    """pos [1, T] of documents (lengths > 0) and padding runs (-n: n tokens of pos -1)."""
    return torch.cat([torch.arange(n) if n > 0 else torch.full((-n,), -1) for n in parts])[None]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a CPU model: needs Triton's interpreter")
@pytest.mark.parametrize("doc_masking,window,padding", [(True, None, False), (True, 3, True), (False, None, True),
                                                        (False, 3, True)])
def test_triton_attention_through_the_model_equals_sdpa(doc_masking, window, padding):
    """attn_impl="triton" under Triton's interpreter (conftest.py) at a tiny size: in fp32 the loss and every
    gradient equal SDPA's within summation-order rounding (atol 1e-5, rtol 1e-4), doc masking, GQA, NoPE.
    Without doc masking, padding between real tokens (row 0 starts pos [0, 1, -1, 0, 1]) hides only itself from
    the kernel too, whose mask (one key range per query) cannot skip a key: forward moves padding to the row's end."""
    x, y = torch.randint(3, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    pos = torch.cat([padded(2, -1, 2, 4, -2, 5), padded(-3, 9, -1, 3)]) if padding else \
        torch.stack([positions([5, 11])[0], positions([9, 4, 3])[0]])
    y = y.masked_fill(pos < 0, -100)
    results = []
    for impl in ("sdpa", "triton"):
        m = make(attn_impl=impl, n_layers=2, nope_interval=2, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48,
                 doc_masking=doc_masking, sliding_window=window).train()
        loss = m(x, y, pos)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss_s, grads_s), (loss_t, grads_t) = results
    torch.testing.assert_close(loss_t, loss_s, atol=1e-5, rtol=1e-4)
    for n in grads_s:
        torch.testing.assert_close(grads_t[n], grads_s[n], atol=1e-5, rtol=1e-4, msg=n)


def test_decode_benchmark_tokens_equal_transformers(hf, capsys):
    """tests/bench_decode.py's comparison: greedy tokens of ours and transformers' generate, batch 1 and 3."""
    from bench_decode import bench_decode
    bench_decode(small_cfg(), prompt_len=5, new_tokens=12, batches=(1, 3), repeats=1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["batch 1", "batch 3"]
    assert all(line.endswith("tokens identical") for line in lines[1:]), lines
