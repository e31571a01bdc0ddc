"""lowbit.model: shapes, attention/RoPE/RMSNorm vs NumPy, MoE paths vs a float64 dense loop,
capacity dropping, auxiliary losses, analytic parameter/FLOP counts, remat, and GEMM hooks."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.model import (
    PRESETS,
    Attention,
    Decoder,
    ModelConfig,
    MoeBlock,
    RMSNorm,
    active_params,
    apply_rope,
    expert_capacity,
    flops_per_token,
    get_model_config,
    load_balance_loss,
    num_params,
    router_z_loss,
)
from lowbit.model.attention import resolve_attention_impl
from lowbit.model.decoder import embed_tokens
from lowbit.model.moe import _takes_impl, capacity_dispatch, route
from lowbit.nn import QuantRaggedDot


def tiny(**overrides) -> ModelConfig:
    return get_model_config("tiny", **overrides)


def f32_tiny(**overrides) -> ModelConfig:
    return tiny(dtype="float32", **overrides)


@functools.cache
def _jitted_forward(graphdef):
    """One jitted forward per model structure: calls on the same model reuse its compiled program."""
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))


def forward(model: Decoder, tokens: jax.Array):
    graphdef, state = nnx.split(model)
    return _jitted_forward(graphdef)(state, tokens)


def random_tokens(seed: int, batch: int, length: int, vocab: int = 256) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# NumPy references (float64)


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def np_rope(x, positions, theta):
    """Pairs (x_i, x_{i+d/2}) as complex numbers times exp(i * pos / theta^(2i/d))."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (2.0 * np.arange(half) / x.shape[-1])
    angle = np.asarray(positions, np.float64)[:, None] * freq  # [T, half]
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def np_attention(x, wq, wk, wv, wo, heads, kv_heads, head_dim, theta):
    batch, length, _ = x.shape
    q = (x @ wq).reshape(batch, length, heads, head_dim)
    k = (x @ wk).reshape(batch, length, kv_heads, head_dim)
    v = (x @ wv).reshape(batch, length, kv_heads, head_dim)
    positions = np.arange(length)
    q, k = np_rope(q, positions, theta), np_rope(k, positions, theta)
    out = np.zeros_like(q)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) / np.sqrt(head_dim)
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
        out[:, :, h] = np.einsum("bts,bsd->btd", np_softmax(scores), v[:, :, kv])
    return out.reshape(batch, length, heads * head_dim) @ wo


def np_moe_reference(x, router_w, wi_0, wi_1, wo, k, norm_topk_prob):
    """Dense loop: y_n = sum over the top-k experts e of token n of gate_{n,e} * SwiGLU_e(x_n)."""
    probs = np_softmax(x @ router_w)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        top = np.argsort(-probs[n], kind="stable")[:k]
        gates = probs[n, top]
        if norm_topk_prob:
            gates = gates / gates.sum()
        for e, gate in zip(top, gates, strict=True):
            hidden = np_silu(x[n] @ wi_0[e]) * (x[n] @ wi_1[e])
            out[n] += gate * (hidden @ wo[e])
    return out


def np_capacity_kept(expert_index, num_experts, capacity):
    """Queue slots choice-major (all first choices, then second choices), tokens in order."""
    tokens, k = expert_index.shape
    filled = np.zeros(num_experts, int)
    kept = np.zeros((tokens, k), bool)
    for j in range(k):
        for n in range(tokens):
            e = expert_index[n, j]
            kept[n, j] = filled[e] < capacity
            filled[e] += 1
    return kept


def np64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(num_query_heads=4, num_kv_heads=3), "num_query_heads"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(moe_impl="sparse"), "moe_impl"),
        (dict(remat_policy="everything"), "remat_policy"),
        (dict(dtype="int8"), "dtype"),
        (dict(head_dim=15), "head_dim"),
        (dict(first_num_dense_layers=3), "first_num_dense_layers"),
        (dict(emb_dim=0), "emb_dim"),
        (dict(moe_impl="capacity", capacity_factor=0.0), "capacity_factor"),
        (dict(attention_impl="flash"), "attention_impl"),
    ],
)
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        tiny(**overrides)


def test_config_from_dict_rejects_unknown_keys_and_presets_build():
    with pytest.raises(ValueError, match="emb_dimm"):
        ModelConfig.from_dict({"emb_dimm": 3})
    with pytest.raises(ValueError, match="unknown model config"):
        get_model_config("gpt5")
    for name in PRESETS:
        assert get_model_config(name).vocab_size > 0
    cfg = tiny(num_experts=0)
    assert (cfg.num_dense_layers, cfg.num_moe_layers) == (2, 0)
    assert tiny(first_num_dense_layers=1).num_moe_layers == 1


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, paths


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_decoder_shapes_and_dtypes(dtype):
    cfg = tiny(dtype=dtype, num_decoder_layers=3, first_num_dense_layers=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    logits, aux = forward(model, random_tokens(0, 2, 16))
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert aux["aux_loss"].shape == () and aux["dropped_fraction"].shape == ()
    assert aux["expert_load"].shape == (2, cfg.num_experts)
    np.testing.assert_allclose(aux["expert_load"].sum(axis=1), 1.0, rtol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0  # dropless
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)  # f32 master weights


def test_dense_model_and_module_paths():
    cfg = tiny(num_experts=0)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    logits, aux = forward(model, random_tokens(1, 1, 8))
    assert logits.shape == (1, 8, 256)
    assert aux["expert_load"].shape == (0, 0) and float(aux["aux_loss"]) == 0.0
    moe_model = Decoder(tiny(num_decoder_layers=2, first_num_dense_layers=1, num_shared_experts=1),
                        rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, v in nnx.iter_graph(moe_model) if isinstance(v, nnx.Module)}
    expected = {"token_embedder", "decoder_norm", "logits_dense", "layers/0/pre_attention_norm",
                "layers/0/post_attention_norm", "layers/0/mlp/wi_0", "layers/0/mlp/wi_1", "layers/0/mlp/wo",
                "layers/1/moe/router", "layers/1/moe/experts", "layers/1/moe/shared_expert/wi_0",
                "layers/1/moe/shared_expert/wo"}
    expected |= {f"layers/{i}/attention/{n}" for i in range(2) for n in ("query", "key", "value", "out")}
    assert expected <= paths, expected - paths
    assert "layers/0/moe" not in paths and "layers/1/mlp" not in paths


# ---------------------------------------------------------------------------------------------
# attention, RoPE, RMSNorm


def test_causal_masking_future_token_does_not_change_past_logits():
    model = Decoder(f32_tiny(), rngs=nnx.Rngs(0))
    tokens = random_tokens(2, 2, 16)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 7) % 256)
    logits, _ = forward(model, tokens)
    logits_changed, _ = forward(model, changed)
    np.testing.assert_array_equal(logits[:, :10], logits_changed[:, :10])
    assert float(jnp.max(jnp.abs(logits[:, 10:] - logits_changed[:, 10:]))) > 1e-3


def test_attention_matches_numpy_reference():
    cfg = f32_tiny(num_query_heads=4, num_kv_heads=2, head_dim=8, emb_dim=32)
    attention = Attention(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 12, cfg.emb_dim), jnp.float32)
    got = attention(x, jnp.arange(12))
    weights = [np64(getattr(attention, n).kernel[...]) for n in ("query", "key", "value", "out")]
    want = np_attention(np64(x), *weights, 4, 2, 8, cfg.rope_theta)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "impl, dtype, head_dim, platform, want",
    [
        ("auto", jnp.bfloat16, 128, "gpu", "cudnn"),
        ("auto", jnp.float16, 64, "cuda", "cudnn"),
        ("auto", jnp.float32, 64, "gpu", "xla"),  # cuDNN flash attention takes bf16/fp16 only
        ("auto", jnp.bfloat16, 256, "gpu", "xla"),  # wider than cuDNN's 128 on Hopper
        ("auto", jnp.bfloat16, 60, "gpu", "xla"),  # not a multiple of 8
        ("auto", jnp.bfloat16, 64, "cpu", "xla"),
        (None, jnp.bfloat16, 64, "gpu", None),  # explicit values pass through
        ("cudnn", jnp.float32, 64, "cpu", "cudnn"),
    ],
)
def test_resolve_attention_impl(impl, dtype, head_dim, platform, want):
    assert resolve_attention_impl(impl, dtype, head_dim, platform) == want


@pytest.mark.parametrize(
    "platform_version, compute_capability, want",
    [
        ("PJRT C API\ncuda 12080", "9.0", "cudnn"),
        ("PJRT C API\ncuda 12080", "8.0", "cudnn"),
        ("PJRT C API\ncuda 12080", "7.5", "xla"),  # Turing: cuDNN flash attention needs sm80+
        ("PJRT C API\nrocm 60302", "gfx90a", "xla"),  # jax calls ROCm "gpu" too; it has no cuDNN
    ],
)
def test_auto_attention_reads_the_gpu_vendor_and_compute_capability(
        monkeypatch, platform_version, compute_capability, want):
    from jax.extend import backend as jax_backend

    class FakeBackend:
        pass

    class FakeDevice:
        pass

    fake_backend, fake_device = FakeBackend(), FakeDevice()
    fake_backend.platform_version = platform_version
    fake_device.compute_capability = compute_capability
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax_backend, "get_backend", lambda *a: fake_backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [fake_device])
    assert resolve_attention_impl("auto", jnp.bfloat16, 64) == want
    assert resolve_attention_impl("auto", jnp.float32, 64) == "xla"


def test_auto_attention_passes_rocm_and_old_gpus_to_xla():
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, "rocm") == "xla"
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, "tpu") == "xla"
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, "cuda", (7, 0)) == "xla"
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, "cuda", (10, 0)) == "cudnn"


def test_auto_attention_on_cpu_is_xla_bit_for_bit():
    cfg = tiny(num_query_heads=4, num_kv_heads=2, head_dim=8, emb_dim=32)
    assert cfg.attention_impl == "auto"  # the default
    auto = Attention(cfg, rngs=nnx.Rngs(3))
    xla = Attention(dataclasses.replace(cfg, attention_impl="xla"), rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 12, cfg.emb_dim), jnp.bfloat16)
    if jax.default_backend() != "cpu":
        pytest.skip("auto is cuDNN on a GPU: this checks the CPU fallback")
    np.testing.assert_array_equal(np.asarray(auto(x, jnp.arange(12)), np.float32),
                                  np.asarray(xla(x, jnp.arange(12)), np.float32))


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = f32_tiny(num_query_heads=4, num_kv_heads=2, head_dim=8, emb_dim=32)
    mha_cfg = dataclasses.replace(gqa_cfg, num_kv_heads=4)
    gqa, mha = Attention(gqa_cfg, rngs=nnx.Rngs(5)), Attention(mha_cfg, rngs=nnx.Rngs(6))
    for name in ("query", "out"):
        getattr(mha, name).kernel[...] = getattr(gqa, name).kernel[...]
    for name in ("key", "value"):
        kernel = getattr(gqa, name).kernel[...].reshape(32, 2, 8)  # [emb, kv_heads, head_dim]
        getattr(mha, name).kernel[...] = jnp.repeat(kernel, 2, axis=1).reshape(32, 32)
    x = jax.random.normal(jax.random.key(7), (2, 10, 32), jnp.float32)
    np.testing.assert_allclose(gqa(x, jnp.arange(10)), mha(x, jnp.arange(10)), rtol=1e-5, atol=1e-6)


def test_rope_matches_complex_rotation_and_preserves_norm():
    x = jax.random.normal(jax.random.key(8), (1, 9, 3, 16), jnp.float32)
    positions = np.arange(9) * 37
    got = apply_rope(x, jnp.asarray(positions), 10_000.0)
    np.testing.assert_allclose(got, np_rope(np64(x), positions, 10_000.0), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros(9, jnp.int32), 10_000.0), x)


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(9), (2, 1, 1, 1, 32), jnp.float32)

    def score(m, n):
        rq = apply_rope(q, jnp.array([m]), 10_000.0)
        rk = apply_rope(k, jnp.array([n]), 10_000.0)
        return float(jnp.sum(rq * rk))

    for m, n, shift in [(5, 2, 100), (0, 7, 1234), (40, 40, 3)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_rmsnorm_matches_numpy():
    norm = RMSNorm(24, epsilon=1e-6, dtype=jnp.float32)
    norm.scale[...] = jnp.linspace(0.5, 2.0, 24)
    x = jax.random.normal(jax.random.key(10), (3, 5, 24), jnp.float32) * 3
    xs = np64(x)
    want = xs / np.sqrt(np.mean(xs**2, axis=-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2.0, 24)
    np.testing.assert_allclose(norm(x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MoE


def moe_params(block: MoeBlock):
    return (np64(block.router.kernel[...]), np64(block.experts.wi_0[...]), np64(block.experts.wi_1[...]),
            np64(block.experts.wo[...]))


@pytest.mark.parametrize("moe_impl", ["dropless", "capacity"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_paths_match_dense_loop_reference(moe_impl, norm_topk_prob):
    # capacity_factor = E / k makes capacity = all tokens: nothing can be dropped.
    cfg = f32_tiny(moe_impl=moe_impl, norm_topk_prob=norm_topk_prob, num_experts=4,
                   num_experts_per_tok=2, capacity_factor=2.0, emb_dim=32, moe_mlp_dim=48)
    block = MoeBlock(cfg, rngs=nnx.Rngs(11))
    x = jax.random.normal(jax.random.key(12), (2, 24, 32), jnp.float32)
    y, stats = jax.jit(lambda b, x: b(x))(block, x)
    want = np_moe_reference(np64(x).reshape(48, 32), *moe_params(block), 2, norm_topk_prob)
    np.testing.assert_allclose(np.asarray(y).reshape(48, 32), want, rtol=1e-5, atol=1e-5)
    assert float(stats["dropped_fraction"]) == 0.0


def test_moe_with_shared_expert_adds_swiglu_of_shared_weights():
    cfg = f32_tiny(num_shared_experts=2, emb_dim=16, moe_mlp_dim=8, num_experts=3, num_experts_per_tok=1)
    block = MoeBlock(cfg, rngs=nnx.Rngs(13))
    x = jax.random.normal(jax.random.key(14), (1, 10, 16), jnp.float32)
    y, _ = nnx.jit(lambda b, x: b(x))(block, x)
    xs = np64(x).reshape(10, 16)
    shared = block.shared_expert
    assert shared.wi_0.kernel.shape == (16, 16)  # width num_shared_experts * moe_mlp_dim
    shared_out = (np_silu(xs @ np64(shared.wi_0.kernel[...])) * (xs @ np64(shared.wi_1.kernel[...]))
                  ) @ np64(shared.wo.kernel[...])
    want = np_moe_reference(xs, *moe_params(block), 1, True) + shared_out
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", ["capacity", "pallas"])
def test_full_model_dropless_and_other_moe_impl_agree_in_value_and_grad(other):
    # capacity at factor 2 drops nothing here; pallas is the one-launch grouped kernel (interpret mode).
    dropless = f32_tiny(moe_impl="dropless")
    capacity = dataclasses.replace(dropless, moe_impl=other, capacity_factor=2.0)
    tokens = random_tokens(15, 2, 16)

    def loss_and_grads(cfg):
        graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

        def loss(s):
            logits, aux = nnx.merge(graphdef, s)(tokens)
            return jnp.mean(logits**2) + aux["aux_loss"]

        return jax.jit(jax.value_and_grad(loss))(state)

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(dropless), loss_and_grads(capacity)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)
    router_grad = grads_a["layers"][0]["moe"]["router"]["kernel"][...]
    assert float(jnp.max(jnp.abs(router_grad))) > 0  # gates and lb loss train the router


def test_capacity_drops_beyond_capacity_and_dropped_slots_output_zero():
    """Capacity applies per sequence (routing group): each of two sequences queues on its own."""
    cfg = f32_tiny(moe_impl="capacity", capacity_factor=0.25, emb_dim=16, moe_mlp_dim=8,
                   num_experts=4, num_experts_per_tok=2)
    block = MoeBlock(cfg, rngs=nnx.Rngs(16))
    x = jax.random.normal(jax.random.key(17), (2, 32, 16), jnp.float32)
    capacity = expert_capacity(32, cfg)
    assert capacity == math.ceil(32 * 2 / 4 * 0.25) == 4
    _, expert_index, _ = route(block.router(x.reshape(64, 16)), 2, True)
    expert_index = expert_index.reshape(2, 32, 2)
    y_slots, kept = nnx.jit(capacity_dispatch, static_argnums=3)(block.experts, x, expert_index, capacity)
    want_kept = np.stack([np_capacity_kept(np.asarray(expert_index[g]), 4, capacity) for g in range(2)])
    np.testing.assert_array_equal(kept, want_kept)
    for g in range(2):
        assert int(want_kept[g].sum()) <= 4 * capacity and not want_kept[g].all()
    np.testing.assert_array_equal(np.asarray(y_slots)[~want_kept], 0.0)
    _, wi_0, wi_1, wo = moe_params(block)
    xs = np64(x)
    for g, n, j in zip(*np.nonzero(want_kept), strict=True):
        e = int(expert_index[g, n, j])
        expert_out = (np_silu(xs[g, n] @ wi_0[e]) * (xs[g, n] @ wi_1[e])) @ wo[e]
        np.testing.assert_allclose(y_slots[g, n, j], expert_out, rtol=1e-5, atol=1e-5)
    _, stats = nnx.jit(lambda b, x: b(x))(block, x)
    np.testing.assert_allclose(stats["dropped_fraction"], 1.0 - want_kept.mean(), rtol=1e-6)
    assert float(stats["dropped_fraction"]) > 0


def test_capacity_slots_not_a_multiple_of_a_recipe_block_are_padded():
    """3 sequences x C=27 = 81 slots per expert: nvfp4's wgrad Hadamard (16-wide, along the slots)
    needs a multiple of 16; the zero rows padded up to SLOT_ALIGN change nothing (float64 check in
    the test above, whose 2 x 4 slots are padded too)."""
    cfg = f32_tiny(moe_impl="capacity", num_experts=3, max_target_length=32)
    assert 3 * expert_capacity(32, cfg) == 81
    rngs = nnx.Rngs(params=0, quant=1)
    block = MoeBlock(cfg, rngs=rngs)
    lowbit.quantize_model(block, "nvfp4", rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (3, 32, cfg.emb_dim), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda b, x: jnp.mean(b(x)[0] ** 2)))(block, x)
    expert_grads = jax.tree.leaves(nnx.state(grads.experts))
    assert expert_grads and all(bool(jnp.all(jnp.isfinite(g))) for g in expert_grads)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in expert_grads)


def test_load_balance_loss_uniform_is_one_and_skewed_is_larger():
    num_tokens, num_experts, k = 64, 8, 2
    uniform_probs = jnp.full((num_tokens, num_experts), 1.0 / num_experts)
    balanced_index = (jnp.arange(num_tokens * k) % num_experts).reshape(num_tokens, k)
    assert float(load_balance_loss(uniform_probs, balanced_index)) == pytest.approx(1.0, rel=1e-6)
    # all tokens to experts {0, 1} with 45% router mass each: E * (0.5 * 0.45 + 0.5 * 0.45) = 0.45 E
    skewed_probs = jnp.tile(jnp.array([0.45, 0.45] + [0.1 / 6] * 6), (num_tokens, 1))
    skewed_index = jnp.tile(jnp.array([0, 1]), (num_tokens, 1))
    assert float(load_balance_loss(skewed_probs, skewed_index)) == pytest.approx(0.45 * num_experts, rel=1e-5)
    # random routing vs the formula in NumPy
    logits = jax.random.normal(jax.random.key(18), (num_tokens, num_experts)) * 2
    _, index, probs = route(logits, k, True)
    f = np.bincount(np.asarray(index).ravel(), minlength=num_experts) / (num_tokens * k)
    want = num_experts * np.sum(f * np_softmax(np64(logits)).mean(axis=0))
    assert float(load_balance_loss(probs, index)) == pytest.approx(want, rel=1e-5)
    assert want > 1.0


def test_router_z_loss_matches_numpy():
    logits = jax.random.normal(jax.random.key(19), (40, 6), jnp.float32) * 5
    ls = np64(logits)
    lse = ls.max(-1) + np.log(np.exp(ls - ls.max(-1, keepdims=True)).sum(-1))
    assert float(router_z_loss(logits)) == pytest.approx(np.mean(lse**2), rel=1e-5)


def test_aux_loss_is_weighted_sum_over_moe_layers():
    cfg = f32_tiny(num_decoder_layers=3, first_num_dense_layers=1, load_balance_loss_weight=0.5,
                   router_z_loss_weight=0.25)
    model = Decoder(cfg, rngs=nnx.Rngs(20))
    tokens = random_tokens(21, 1, 12)
    _, aux = forward(model, tokens)
    # recompute the router inputs layer by layer through the public sub-modules
    x = model.token_embedder(tokens)
    want = 0.0
    for layer in model.layers:
        x = x + layer.attention(layer.pre_attention_norm(x), jnp.arange(12))
        hidden = layer.post_attention_norm(x)
        if layer.is_moe:
            logits = np64(hidden).reshape(12, -1) @ np64(layer.moe.router.kernel[...])
            probs = np_softmax(logits)
            top = np.argsort(-probs, axis=-1)[:, :2]
            f = np.bincount(top.ravel(), minlength=4) / top.size
            lse = np.log(np.exp(logits).sum(-1))
            want += 0.5 * 4 * np.sum(f * probs.mean(0)) + 0.25 * np.mean(lse**2)
            ffn, _ = layer.moe(hidden)
        else:
            ffn = layer.mlp(hidden)
        x = x + ffn
    assert float(aux["aux_loss"]) == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# parameter and FLOP counts


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_experts=0), dict(num_shared_experts=2, first_num_dense_layers=1, num_decoder_layers=3),
     dict(logits_via_embedding=True, num_experts=8, num_experts_per_tok=1)],
)
def test_num_params_matches_model_leaves(overrides):
    cfg = tiny(**overrides)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    actual = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert num_params(cfg) == actual
    unused_experts = cfg.num_experts - cfg.num_experts_per_tok
    inactive = cfg.num_moe_layers * unused_experts * 3 * cfg.emb_dim * cfg.moe_mlp_dim
    assert active_params(cfg) == actual - (inactive if cfg.num_experts else 0)


def test_published_model_sizes():
    # Mixtral 8x7B: 46.7B total, 12.9B active (Mistral AI); Llama 4 Scout: 109B total (incl. vision
    # encoder), 17B active (Meta).
    mixtral, scout = get_model_config("mixtral-8x7b"), get_model_config("llama4-scout")
    assert num_params(mixtral) / 1e9 == pytest.approx(46.7, rel=0.01)
    assert active_params(mixtral) / 1e9 == pytest.approx(12.9, rel=0.01)
    assert num_params(scout) / 1e9 == pytest.approx(109, rel=0.03)
    assert active_params(scout) / 1e9 == pytest.approx(17, rel=0.03)
    small = get_model_config("small")
    assert num_params(small) / 1e6 == pytest.approx(100, rel=0.05)


def test_flops_per_token_matches_xla_cost_analysis_for_dense_model():
    cfg = f32_tiny(num_experts=0, emb_dim=128, mlp_dim=256, vocab_size=512, max_target_length=64)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.ones((1, 64), jnp.int32)
    compiled = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    # XLA computes the masked full score matrix; its count also includes softmax/norm FLOPs (~2%).
    assert cost["flops"] == pytest.approx(64 * flops_per_token(cfg, causal=False), rel=0.05)
    assert flops_per_token(cfg, causal=True) < flops_per_token(cfg, causal=False)


# ---------------------------------------------------------------------------------------------
# remat


def test_remat_policies_give_identical_loss_and_grads():
    tokens = random_tokens(22, 2, 16)
    results = {}
    for policy in ("none", "full", "minimal", "save_dot_except_mlp"):
        cfg = f32_tiny(remat_policy=policy, moe_impl="capacity", capacity_factor=1.0)
        graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

        def loss(s, graphdef=graphdef):
            logits, aux = nnx.merge(graphdef, s)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + aux["aux_loss"]

        results[policy] = jax.jit(jax.value_and_grad(loss))(state)
    base_loss, base_grads = results.pop("none")
    for policy, (value, grads) in results.items():
        np.testing.assert_allclose(value, base_loss, rtol=1e-6, err_msg=policy)
        for ga, gb in zip(jax.tree.leaves(base_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-7, err_msg=policy)


# ---------------------------------------------------------------------------------------------
# hooks: every GEMM reaches a replaceable attribute


class CountingHook(nnx.Module):
    """Stand-in for lowbit.nn.QuantDotGeneral: a stateful module that counts its calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, lhs, rhs, *args, **kwargs):
        self.calls[...] += 1
        return self.fn(lhs, rhs, *args, **kwargs)


def install_counting_hooks(model):
    hooks = {}
    for path, module in list(nnx.iter_graph(model)):
        name = "/".join(map(str, path))
        if isinstance(module, CountingHook):
            continue
        for attr in ("dot_general", "ragged_dot"):
            if isinstance(module, nnx.Module) and callable(getattr(module, attr, None)):
                hook = CountingHook(getattr(module, attr))
                # flax >= 0.12 needs nnx.data to put a module on an attribute that held a function.
                setattr(module, attr, nnx.data(hook) if hasattr(nnx, "data") else hook)
                hooks[f"{name}.{attr}"] = hook
    return hooks


@pytest.mark.parametrize("moe_impl, remat", [("dropless", "none"), ("capacity", "full")])
def test_hooks_reach_every_projection_and_expert_gemm(moe_impl, remat):
    cfg = tiny(moe_impl=moe_impl, num_decoder_layers=3, first_num_dense_layers=1, num_shared_experts=1,
               remat_policy=remat)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    hooks = install_counting_hooks(model)
    projections = {"/".join(map(str, p)) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Linear)}
    assert len(projections) == 1 + 3 * 4 + 3 + 2 * (1 + 3)  # head, attention, mlp, router + shared
    assert {f"{p}.dot_general" for p in projections} <= set(hooks)

    @nnx.jit
    def run(model, tokens):
        return model(tokens)

    logits, _ = run(model, random_tokens(23, 2, 8))
    assert logits.shape == (2, 8, 256)
    calls = {name: int(hook.calls[...]) for name, hook in hooks.items()}
    for name in projections:
        assert calls[f"{name}.dot_general"] == 1, name
    for i in (1, 2):
        experts = f"layers/{i}/moe/experts"
        used, unused = ("ragged_dot", "dot_general")
        if moe_impl == "capacity":
            used, unused = unused, used
        assert calls[f"{experts}.{used}"] == 3 and calls[f"{experts}.{unused}"] == 0


class PlainRaggedHook(nnx.Module):
    """A user's own module hook with exactly the ragged_dot(lhs, rhs, group_sizes) contract: no impl=."""

    def __init__(self):
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, lhs, rhs, group_sizes):
        self.calls[...] += 1
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def test_pallas_moe_passes_impl_only_to_hooks_that_take_it():
    """moe_impl=pallas gives impl="pallas" to QuantRaggedDot-like hooks (impl or **kwargs), never to a plain
    module hook, which would fail with an unexpected keyword."""
    cfg = f32_tiny(moe_impl="pallas", num_decoder_layers=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    experts = next(m for _, m in nnx.iter_graph(model) if hasattr(m, "ragged_impl"))
    assert experts.ragged_impl == "pallas"
    plain = PlainRaggedHook()
    experts.ragged_dot = nnx.data(plain) if hasattr(nnx, "data") else plain
    logits, _ = model(random_tokens(24, 2, 8))
    assert logits.shape == (2, 8, cfg.vocab_size) and int(plain.calls[...]) == 3
    seen = []
    def recording(lhs, rhs, sizes, **kw):
        seen.append(kw)
        return jax.lax.ragged_dot(lhs, rhs, sizes)

    counting = CountingHook(recording)
    experts.ragged_dot = nnx.data(counting) if hasattr(nnx, "data") else counting
    model(random_tokens(24, 2, 8))
    assert seen == [{"impl": "pallas"}] * 3


def _keeps_signature(fn):  # a decorator written with functools.wraps: inspect sees the wrapped signature
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class WrappedPlainHook(nnx.Module):
    @_keeps_signature
    def __call__(self, lhs, rhs, group_sizes):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)


class PositionalImplHook(nnx.Module):
    def __call__(self, lhs, rhs, group_sizes, impl="xla", /):  # impl= by keyword would be a TypeError
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)


class KeywordImplHook(nnx.Module):
    def __call__(self, lhs, rhs, group_sizes, *, impl):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _ragged_with_impl(lhs, rhs, group_sizes, impl="xla"):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


@pytest.mark.parametrize("make_hook, takes", [
    (lambda: QuantRaggedDot("fp8"), True),  # quantize_model's own hook
    (KeywordImplHook, True),
    (PlainRaggedHook, False),
    (WrappedPlainHook, False),
    (PositionalImplHook, False),
    (lambda: _ragged_with_impl, False),  # plain functions keep the contract whatever they accept
], ids=["QuantRaggedDot", "keyword_only", "plain", "wraps_decorated_plain", "positional_only", "function"])
def test_takes_impl_reads_the_hooks_call_signature(make_hook, takes):
    assert _takes_impl(make_hook()) is takes


def test_hooks_receive_compute_dtype_operands_and_float32_router():
    cfg = tiny(dtype="bfloat16", moe_impl="capacity")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    seen = {}

    def recording(name, fn):
        def hook(lhs, rhs, *args, **kwargs):
            seen[name] = (lhs.dtype, rhs.dtype)
            return fn(lhs, rhs, *args, **kwargs)
        return hook

    model.layers[0].attention.query.dot_general = recording("query", jax.lax.dot_general)
    model.layers[0].moe.router.dot_general = recording("router", jax.lax.dot_general)
    model.layers[0].moe.experts.dot_general = recording("experts", jax.lax.dot_general)
    nnx.jit(lambda m, t: m(t))(model, random_tokens(24, 1, 8))  # hooks record at trace time
    assert seen["query"] == (jnp.bfloat16, jnp.bfloat16)
    assert seen["experts"] == (jnp.bfloat16, jnp.bfloat16)
    assert seen["router"] == (jnp.float32, jnp.float32)


def test_tied_lm_head_is_scaled_embedding_transpose():
    cfg = f32_tiny(logits_via_embedding=True, num_experts=0, num_decoder_layers=1)
    model = Decoder(cfg, rngs=nnx.Rngs(25))
    assert model.logits_dense is None
    tokens = random_tokens(26, 1, 6)
    logits, _ = model(tokens)
    layer = model.layers[0]
    x = model.token_embedder(tokens)
    x = x + layer.attention(layer.pre_attention_norm(x), jnp.arange(6))
    x = x + layer.mlp(layer.post_attention_norm(x))
    final = np64(model.decoder_norm(x))
    want = final @ np64(model.token_embedder.embedding[...]).T / np.sqrt(cfg.emb_dim)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_iota_embed_matches_lookup_and_its_gradient_is_the_row_sums(dtype):
    # Skewed tokens (most are 3, as hot bytes in text) and one per-row count >= 2 exercise the sum.
    embedder = nnx.Embed(16, 8, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[3, 3, 3, 0, 15], [3, 7, 3, 3, 7]], jnp.int32)
    np.testing.assert_array_equal(embed_tokens(embedder, tokens, iota=True),
                                  embed_tokens(embedder, tokens, iota=False))
    cotangent = np.random.default_rng(1).standard_normal((2, 5, 8))
    graphdef, params = nnx.split(embedder)

    def pulled_back(iota):
        def f(params):
            out = embed_tokens(nnx.merge(graphdef, params), tokens, iota)
            return jnp.sum(out.astype(jnp.float32) * cotangent)
        return np64(jax.grad(f)(params)["embedding"][...])

    want = np.zeros((16, 8))
    np.add.at(want, np.asarray(tokens).ravel(), cotangent.reshape(-1, 8))
    # bf16: the cotangent is rounded to bf16 (rel 2^-8) before the f32 row sums of <= 6 terms.
    tol = 1e-6 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(pulled_back(True), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(pulled_back(False), want, rtol=tol, atol=tol)


# [2, 5] tokens; chunks of 5 // 2 columns: 1 (whole), 2 and 3 (a padded last chunk), 5 (one chunk)
@pytest.mark.parametrize("chunk", [1, 4, 7, 4096])
def test_gemm_embed_grad_is_the_gather_with_row_sum_gradient(monkeypatch, chunk):
    """grad="gemm": the gather's values, and a table gradient equal to the float64 row sums of the
    cotangent (hot token 3 summed 5 times); negative ids wrap as in jnp.take (-1 -> 15, -16 -> 0);
    ids out of range either way (16, -17) get no gradient, as with the scatter."""
    from lowbit.model import decoder

    monkeypatch.setattr(decoder, "_EMBED_GRAD_CHUNK", chunk)
    embedder = nnx.Embed(16, 8, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[3, 3, -1, -16, 15], [3, 7, 3, 16, -17]], jnp.int32)
    np.testing.assert_array_equal(embed_tokens(embedder, tokens[:, :3], False, "gemm"),
                                  embed_tokens(embedder, tokens[:, :3], False))
    cotangent = np.random.default_rng(2).standard_normal((2, 5, 8))
    graphdef, params = nnx.split(embedder)

    def loss(params, grad):
        out = embed_tokens(nnx.merge(graphdef, params), tokens, False, grad)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * cotangent)

    want = np.zeros((16, 8))
    ids = np.asarray(tokens).ravel()
    ids = np.where(ids < 0, ids + 16, ids)
    valid = (ids >= 0) & (ids < 16)
    np.add.at(want, ids[valid], cotangent.reshape(-1, 8)[valid])
    got = np64(jax.grad(loss)(params, "gemm")["embedding"][...])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np64(jax.grad(loss)(params, "scatter")["embedding"][...]), want,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="embedding gradient must be one of"):
        embed_tokens(embedder, tokens, False, "onehot")


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16"])
def test_embed_tokens_of_narrow_int_ids_over_a_large_vocabulary(dtype):
    """Ids in int8/uint8/int16 with V=300 > the dtype's range of V: the same values and table gradient as
    int32 ids for every grad path (an int8 -1 wraps to row 299, as jnp.take does; the one-hot's iota and
    the wrap ids + V are computed in int32, not in the narrow dtype)."""
    embedder = nnx.Embed(300, 4, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(embedder)
    ids = [0, 5, 127, 100, 5, -1] if dtype == "int8" else [0, 5, 127, 255, 5, 200]
    tokens = np.asarray([ids], dtype)
    cotangent = np.random.default_rng(5).standard_normal((1, 6, 4))
    want = np.zeros((300, 4))
    np.add.at(want, np.where(tokens.astype(np.int64) < 0, tokens.astype(np.int64) + 300, tokens)[0],
              cotangent[0])
    for iota, grad in ((False, "scatter"), (False, "gemm"), (True, "scatter")):
        def loss(params, ids, iota=iota, grad=grad):
            out = embed_tokens(nnx.merge(graphdef, params), ids, iota, grad)
            return jnp.sum(out * cotangent), out

        got, out = jax.grad(loss, has_aux=True)(params, jnp.asarray(tokens))
        got32, out32 = jax.grad(loss, has_aux=True)(params, jnp.asarray(tokens.astype(np.int32)))
        np.testing.assert_array_equal(out, out32)
        np.testing.assert_array_equal(got["embedding"][...], got32["embedding"][...])
        if not iota:  # the one-hot forward gives an out-of-range id (-1) a zero row instead of wrapping
            np.testing.assert_allclose(np64(got["embedding"][...]), want, rtol=1e-6, atol=1e-6)


def test_scatter_embed_grad_of_a_bf16_model_accumulates_in_float32():
    """A hot row summed 4096 times: the float32 scatter-add (grad="scatter") is within float32 rounding of
    the float64 sum of the bf16 cotangents; nnx.Embed's bf16 scatter-add is not (each add rounds to 2^-8)."""
    embedder = nnx.Embed(8, 4, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(embedder)
    tokens = jnp.full((2, 2048), 3, jnp.int32)
    cotangent = jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.0, (2, 2048, 4)), jnp.bfloat16)

    def table_grad(own):
        def loss(params):
            e = nnx.merge(graphdef, params)
            out = e(tokens) if own else embed_tokens(e, tokens, False, "scatter")
            return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))
        return np64(jax.grad(loss)(params)["embedding"][...])[3]

    want = np64(cotangent).reshape(-1, 4).sum(axis=0)  # ~3000 per column
    np.testing.assert_allclose(table_grad(False), want, rtol=1e-6)
    assert np.abs(table_grad(True) / want - 1).max() > 1e-3  # why: bf16 accumulation stalls near 2^11


def test_gemm_embed_grad_of_no_tokens_is_zero():
    """An empty batch has a zero table gradient (not a division by a zero-token chunk)."""
    embedder = nnx.Embed(16, 8, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(embedder)
    for shape in [(0, 5), (2, 0)]:
        tokens = jnp.zeros(shape, jnp.int32)

        def loss(params, tokens=tokens):
            return jnp.sum(embed_tokens(nnx.merge(graphdef, params), tokens, False, "gemm"))

        grad = jax.grad(loss)(params)
        np.testing.assert_array_equal(grad["embedding"][...], np.zeros((16, 8)))


def test_iota_embed_model_matches_lookup_model():
    tokens = random_tokens(27, 2, 8)
    logits = [forward(Decoder(tiny(use_iota_embed=iota, embed_grad=grad), rngs=nnx.Rngs(28)), tokens)[0]
              for iota, grad in ((False, "scatter"), (True, "scatter"), (False, "gemm"))]
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(logits[0], logits[2])
    with pytest.raises(ValueError, match="embed_grad must be one of"):
        tiny(embed_grad="onehot")
