"""MLA and MoE (model.py) against independent references: transformers' DeepseekV3Attention and
DeepseekV3MoE with our weights mapped in (fp32, 1e-5), float64 dense references for what transformers
lacks (NoPE layers, softmax routing with capacity), a full forward for latent-cache decoding and for
packed documents, and hand counts for parameters, FLOPs, KV bytes and the balance losses."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import config
import model as M
from model import Model, ModelConfig
from test_train import corpus, make_ns, train_records  # noqa: F401 (corpus: the tiny two-source corpus fixture)
from train import CONFIGS

MLA = dict(attention="mla", kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)
MOE = dict(n_experts=4, n_experts_active=2, n_shared_experts=1, d_expert=24)


def make(*parts, seed=0, **kw):
    """A small model from the base keys, then each dict in parts, then kw."""
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, rope_theta=10000.0,
                nope_interval=4, max_position_embeddings=256, bos_id=1, eos_id=2, pad_id=0)
    torch.manual_seed(seed)
    for part in parts + (kw,):
        base.update(part)
    return Model(ModelConfig(**base)).eval()


def packed_pos(lengths, B=2):
    return torch.cat([torch.arange(n) for n in lengths])[None].repeat(B, 1)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3
    return transformers, modeling_deepseek_v3


def hf_config(hf, m, **kw):
    c = m.cfg
    cfg = hf[0].DeepseekV3Config(
        hidden_size=c.d_model, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
        kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, rms_norm_eps=c.rms_eps,
        n_routed_experts=c.n_experts or 1, num_experts_per_tok=c.n_experts_active, n_shared_experts=c.n_shared_experts,
        moe_intermediate_size=c.d_expert or c.d_ff, n_group=1, topk_group=1, norm_topk_prob=c.router_norm_topk,
        routed_scaling_factor=1.0, **kw)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.mark.parametrize("q_lora_rank,window", [(0, None), (20, 5)])
def test_mla_equals_transformers_deepseek_v3_attention(hf, q_lora_rank, window):
    m = make(MLA, q_lora_rank=q_lora_rank, sliding_window=window, nope_interval=0)
    ours = m.layers[1].attn
    theirs = hf[1].DeepseekV3Attention(hf_config(hf, m), layer_idx=1).eval()
    names = {"q_a_proj": "q_down", "q_a_layernorm": "q_norm", "q_b_proj": "q", "q_proj": "q",
             "kv_a_proj_with_mqa": "kv_down", "kv_a_layernorm": "kv_norm", "kv_b_proj": "kv_up", "o_proj": "o"}
    theirs.load_state_dict({k: ours.state_dict()[names[k.split(".")[0]] + ".weight"] for k in theirs.state_dict()})
    torch.manual_seed(1)
    x, pos = torch.randn(2, 14, 32), packed_pos([9, 5])               # two documents per row
    mask = M.doc_causal_mask(pos, window)
    rope = M.rope_cos_sin(pos, m.cfg)
    cos, sin = hf[1].DeepseekV3RotaryEmbedding(theirs.config)(x, pos)
    with torch.no_grad():
        want = theirs(x, (cos, sin), torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))[0]
        got = ours(x, rope, pos, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_mla_nope_layer_has_no_rope_part_and_matches_float64():
    m = make(MLA).double()
    attn = m.layers[3].attn                                             # nope_interval 4: layer 3 is NoPE
    assert attn.kv_down.weight.shape == (16, 32) and attn.q.weight.shape == (4 * 8, 32)
    x, pos = torch.randn(2, 10, 32, dtype=torch.float64), packed_pos([6, 4])
    mask = M.doc_causal_mask(pos)
    # by hand: keys and values from the normalised latent, scores over the 8 nope dims only
    c = attn.kv_down(x)
    c = c / c.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * attn.kv_norm.weight
    kv = attn.kv_up(c).view(2, 10, 4, 20)
    k, v, q = kv[..., :8], kv[..., 8:], attn.q(x).view(2, 10, 4, 8)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    o = torch.einsum("bhts,bshd->bthd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, M.rope_cos_sin(pos, m.cfg, torch.float64), pos, mask),
                                   attn.o(o.reshape(2, 10, 48)), rtol=0, atol=1e-7)  # RMSNorm runs in fp32


def deepseek_moe(hf, m):
    """Layer 0's MoE of m and transformers' DeepseekV3MoE holding its weights, after a random balance bias."""
    ours = m.layers[0].mlp
    torch.manual_seed(2)
    ours.balance_bias.copy_(0.3 * torch.randn(4))                      # changes the choice, not the weights
    theirs = hf[1].DeepseekV3MoE(hf_config(hf, m))
    e = ours.experts
    theirs.load_state_dict({
        "gate.weight": ours.router.weight, "gate.e_score_correction_bias": ours.balance_bias,
        "experts.gate_up_proj": torch.stack([torch.cat([x.gate.weight, x.up.weight]) for x in e]),
        "experts.down_proj": torch.stack([x.down.weight for x in e]),
        **{f"shared_experts.{n}_proj.weight": getattr(ours.shared, n).weight for n in ("gate", "up", "down")}})
    return ours, theirs


@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_moe_equals_transformers_deepseek_v3_moe(hf, capacity):
    m = make(MOE, router_score="sigmoid")
    ours, theirs = deepseek_moe(hf, m)
    e = ours.experts
    x = torch.randn(3, 8, 32)
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # with a capacity of ceil(1.0 * 24 * 2 / 4) = 12 assignments per expert, later tokens of a full expert
    # lose that expert's share (first come, first served in token order)
    m.cfg.moe_capacity_factor = capacity
    with torch.no_grad():
        got = ours(x).view(-1, 32)
    xf = x.view(-1, 32)
    chosen = (torch.sigmoid(xf @ ours.router.weight.t()) + ours.balance_bias).topk(2).indices
    ref = ours.shared(xf).clone()
    taken = [0] * 4
    for t in range(24):
        w = torch.sigmoid(xf[t] @ ours.router.weight.t())[chosen[t]]
        for j, ex in enumerate(chosen[t].tolist()):
            taken[ex] += 1
            if not capacity or taken[ex] <= 12:
                ref[t] += w[j] / w.sum() * e[ex](xf[t])
    if capacity:
        assert max(taken) > 12                                          # some assignment was dropped
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_moe_under_bf16_autocast_equals_transformers_deepseek_v3_moe(hf):
    """fp32 weights under bf16 autocast (train.py on GPU): our output is bf16, as a dense MLP's down projection
    gives; transformers' fp32 (it adds the bf16 expert outputs, times fp32 weights, in fp32). Tolerance: 1e-2
    of the output's scale, a few bf16 roundings (2^-8 = 3.9e-3 each; measured 2e-3)."""
    m = make(MOE, router_score="sigmoid")
    ours, theirs = deepseek_moe(hf, m)
    x = torch.randn(3, 8, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = theirs(x), ours(x)
        assert got.dtype == M.MLP(m.cfg)(x).dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("parts", [(MOE,), (MLA, MOE)], ids=["gqa-moe", "mla-moe"])
def test_moe_model_under_bf16_autocast_equals_fp32(parts):
    """config/tiny_moe.py's MoE (sigmoid router, bias and balance losses, a dense first layer), plus a capacity, with
    fp32 weights: under CPU bf16 autocast the loss and every gradient are finite and close to fp32's. Tolerances:
    loss 1e-3 relative (measured <= 3e-5), each gradient's ||g_bf16 - g_fp32|| / ||g_fp32|| <= 3e-2 (measured
    <= 1.2e-2: bf16 matmuls); the same expert loads, so no token's routing flipped to make it pass or fail."""
    m = make(*parts, router_score="sigmoid", moe_first_dense=1, moe_aux_loss=1e-4, moe_z_loss=1e-3,
             moe_bias_update=1e-3, moe_capacity_factor=1.0).train()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(3, 97, (2, 16), generator=gen), torch.randint(0, 97, (2, 16), generator=gen)
    runs = []
    for autocast in (False, True):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(x, y)[1]
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}, [l.mlp.load for l in m.layers[1:]]))
        for layer in m.layers[1:]:
            layer.mlp.load = 0
    (loss32, grads32, load32), (loss16, grads16, load16) = runs
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert all(torch.equal(a, b) for a, b in zip(load32, load16))
    assert abs(loss16 - loss32) <= 1e-3 * loss32
    for n, g in grads32.items():
        assert grads16[n].dtype == torch.float32 and torch.isfinite(grads16[n]).all(), n
        assert (grads16[n] - g).norm() <= 3e-2 * g.norm(), f"{n}: {((grads16[n] - g).norm() / g.norm()).item():.2e}"


def test_softmax_router_and_balance_losses_by_hand():
    m = make(MOE, router_score="softmax", router_norm_topk=False, moe_aux_loss=0.01, moe_z_loss=1e-3,
             n_shared_experts=0).train()
    x = torch.randn(2, 16, 32)
    ours = m.layers[0].mlp
    out = ours(x).double()
    xf = x.view(-1, 32).double()
    logits = xf @ ours.router.weight.double().t()
    p = logits.softmax(-1)
    top = p.topk(2).indices
    gate = torch.zeros_like(p).scatter(1, top, p.gather(1, top))        # unnormalised top-2 softmax weights
    w = lambda lin: lin.weight.double().t()
    dense = torch.stack([(F.silu(xf @ w(e.gate)) * (xf @ w(e.up))) @ w(e.down) for e in ours.experts], 1)  # [N, E, C]
    torch.testing.assert_close(out.view(-1, 32), (gate[..., None] * dense).sum(1), rtol=0, atol=1e-6)
    counts = torch.bincount(top.flatten(), minlength=4).double()
    aux = 0.01 * 4 * (counts / 64 * p.mean(0)).sum() + 1e-3 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(ours.aux_loss.double(), aux, rtol=1e-6, atol=0)
    # Model.forward: the mean loss is the mean CE plus every MoE layer's balance loss
    y = torch.randint(0, 97, (2, 16))
    _, loss = m(y, y)
    _, ce = m(y, y, reduction="none")
    torch.testing.assert_close(loss, ce.mean() + sum(l.mlp.aux_loss for l in m.layers), rtol=1e-6, atol=0)
    loss.backward()
    assert m.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_moe_step_moves_the_bias_and_reports_the_load():
    m = make(MOE, moe_bias_update=0.01, moe_capacity_factor=1.0, moe_layer_interval=2).train()
    assert m.cfg.moe_layers == [1, 3]
    x = torch.randint(0, 97, (2, 16))
    m(x, x)
    m(x, x)                                                             # two micro-batches count together
    loads = [l.mlp.load.clone().double() for l in (m.layers[1], m.layers[3])]
    dropped = sum(l.mlp.dropped for l in (m.layers[1], m.layers[3])).item()
    stats = m.moe_step()
    assert stats["moe_load_max_mean"] == [round((l.max() / l.mean()).item(), 3) for l in loads]
    assert stats["moe_dropped"] == pytest.approx(dropped / 256) and 0 < dropped
    for layer, l in zip((m.layers[1], m.layers[3]), loads):
        torch.testing.assert_close(layer.mlp.balance_bias.double(), 0.01 * torch.sign(l.mean() - l))
    assert m.moe_step() == {}                                           # nothing counted since


@pytest.mark.parametrize("kw", [dict(MLA, sliding_window=6), dict(MLA, q_lora_rank=12, **MOE, nope_interval=2)])
def test_latent_kv_cache_decoding_matches_full_forward(monkeypatch, kw):
    m = make(**kw)
    caches = []
    real = M.KVCache
    monkeypatch.setattr(M, "KVCache", lambda *a: caches.append(real(*a)) or caches[-1])
    seen = []
    monkeypatch.setattr(M, "sample", lambda logits, *a, **k: seen.append(logits.clone()) or logits.argmax(-1))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    out = m.generate(prompts, max_new_tokens=5)
    for b, p in enumerate(prompts):
        full = m(torch.tensor([p + out[b]]))[0]
        for t in range(5):
            torch.testing.assert_close(seen[t][b], full[len(p) - 1 + t], rtol=0, atol=1e-5)
    # what is cached: the latent and the rope key, one "head" each; nothing of rope in a NoPE layer
    (cache,) = caches
    nope = m.cfg.nope_layers
    assert [tuple(k.shape) for k in cache.k] == [(3, 1, 12, 16)] * 4
    assert [tuple(v.shape) for v in cache.v] == [(3, 1, 12, 0 if i in nope else 4) for i in range(4)]


def test_mla_moe_packed_documents_equal_separate_runs():
    m = make(MLA, MOE)
    lengths = [7, 1, 12]
    x = torch.randint(3, 97, (1, sum(lengths)))
    packed = m(x, pos=packed_pos(lengths, 1))
    start = 0
    for n in lengths:
        torch.testing.assert_close(packed[:, start:start + n], m(x[:, start:start + n]), rtol=0, atol=1e-5)
        start += n


def test_counts_by_hand_active_and_total():
    cfg = dict(MLA, q_lora_rank=20, **MOE, moe_first_dense=1, tie_embeddings=False)
    with torch.device("meta"):
        m = make(**cfg)
    C, H = 32, 4
    mla_rope = C * 20 + 20 + 20 * H * 12 + C * 20 + 16 + 16 * H * 20 + H * 12 * C  # q_down, q_norm, q, kv_down, ..
    mla_nope = mla_rope - 20 * H * 4 - C * 4                                       # no rope dims in q, kv_down
    dense, expert = 3 * C * 48, 3 * C * 24
    moe_total = C * 4 + 4 * expert + expert                                        # router, 4 routed, 1 shared
    moe_active = C * 4 + 2 * expert + expert
    norms = 2 * C
    body = 3 * (mla_rope + norms) + mla_nope + norms + dense + C                   # layer 3 NoPE, final norm
    total, active = body + 3 * moe_total + 2 * 97 * C, body + 3 * moe_active + 2 * 97 * C
    assert m.num_params() == total and m.num_params(active=True) == active
    assert m.num_params(non_embedding=True, active=True) == active - 2 * 97 * C
    # FLOPs: 6 x (active matmul params + LM head) + 6 H (D_qk + D_v) T/2 per layer (D_qk: 12, 8 in NoPE layer 3)
    n = active - 2 * 97 * C + 97 * C
    assert m.flops_per_token(64) == 6 * n + 6 * H * (3 * (12 + 12) + (8 + 12)) * 32
    # bf16 KV bytes per token: latent 16 + rope key 4 in three layers, latent only in the NoPE layer
    text = M.summary(m.cfg, 64)
    assert f"{2 * (3 * 20 + 16):,} bytes" in text and f"{2 * 4 * 2 * 8 * 2:,} bytes with 2 KV heads of 8" in text
    assert f"active parameters = {active:,}" in text


def test_save_load_roundtrip_in_our_layout(tmp_path):
    from safetensors.torch import load_file
    m = make(MLA, MOE, q_lora_rank=12, router_score="sigmoid", moe_bias_update=1e-3)
    m.layers[2].mlp.balance_bias.fill_(0.25)
    m.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nanosmol" and saved["kv_lora_rank"] == 16 and saved["n_experts"] == 4
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "layers.2.mlp.experts.3.down.weight" in names and "layers.0.attn.kv_up.weight" in names
    m2 = Model.from_pretrained(tmp_path).eval()
    assert m2.cfg == m.cfg
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(m(x), m2(x))
    saved["n_expert"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="config.json: unknown ModelConfig field.s. n_expert"):
        Model.from_pretrained(tmp_path)
    # a SmolLM3 model still writes transformers' layout
    make().save_pretrained(tmp_path / "smol")
    assert json.loads((tmp_path / "smol" / "config.json").read_text())["model_type"] == "smollm3"
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(tmp_path / "smol" / "model.safetensors")


def test_ablation_configs_change_only_attention_or_mlp():
    """ablation_mla / ablation_moe are the 1B baseline with MLA / MoE keys only, at the counts their comments
    state; tiny_mla / tiny_moe likewise on tiny.py."""
    def resolve(name):
        ns = config.load([f"config/{name}.py"], *CONFIGS)
        with torch.device("meta"):
            return vars(ns), Model(ModelConfig(**config.pick(ns, ModelConfig)))
    mla_keys = {"attention", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}
    moe_keys = {"n_experts", "n_experts_active", "n_shared_experts", "d_expert", "moe_first_dense", "router_score",
                "moe_bias_update", "moe_aux_loss"}
    for base, mla, moe, counts in [("smollm3_1b_ablation", "ablation_mla", "ablation_moe",
                                    (1_234_771_968, 2_179_778_560, 1_236_060_160)),
                                   ("tiny", "tiny_mla", "tiny_moe", (1_305_920, 1_867_904, 1_314_944))]:
        b, _ = resolve(base)
        (ns_a, a), (ns_e, e) = resolve(mla), resolve(moe)
        assert {k for k in ns_a if ns_a[k] != b[k]} <= mla_keys | {"out_dir", "attn_impl"}
        assert {k for k in ns_e if ns_e[k] != b[k]} <= moe_keys | {"out_dir"}
        assert (a.num_params(), e.num_params(), e.num_params(active=True)) == counts


def test_activation_checkpointing_keeps_the_balance_loss_gradients():
    """The balance loss leaves each layer beside its output; recomputing the layer in backward must give the
    same gradients (and the recomputation's second count leaves the load ratios as they are)."""
    x, grads = torch.randint(0, 97, (2, 16)), []
    for ckpt in (False, True):
        m = make(MLA, MOE, moe_z_loss=1e-3, act_ckpt=ckpt).train()
        m(x, x)[1].backward()
        grads.append([p.grad for p in m.parameters()])
        assert m.layers[0].mlp.router.weight.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))



def test_train_py_logs_the_load_and_moves_the_bias(tmp_path, corpus):
    """Through train.py: each logged step carries every MoE layer's load, and the final checkpoint holds
    biases moved by whole steps of moe_bias_update (one per update) and loads back as the same model."""
    import train
    ns = make_ns(tmp_path, corpus, **MLA, n_experts=4, n_experts_active=2, d_expert=32, router_score="sigmoid",
                 moe_bias_update=0.01, max_steps=3, warmup_steps=1, eval_interval=3, ckpt_interval=3)
    train.train(ns)
    records = train_records(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(len(r["moe_load_max_mean"]) == 2 and min(r["moe_load_max_mean"]) >= 1 for r in records)
    ckpt = tmp_path / "run" / "ckpt_000003"
    m = Model.from_pretrained(ckpt)
    assert m.cfg.attention == "mla" and m.cfg.n_experts == 4
    for layer in m.layers:
        steps = layer.mlp.balance_bias / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3 and steps.abs().sum() > 0
