"""scan_layers: runs of identical decoder layers as one lax.scan, same numbers as the unrolled loop.

The scanned model stores its parameters per layer exactly like the unrolled one (the stacking
happens inside the step), so both are built from the same seed and hold identical parameters;
what differs is only how the layers execute. The references are the unrolled model (the existing,
separately tested path) and the recipe's keep-last rule computed by hand.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.config import load_config
from lowbit.model import Decoder, ModelConfig, get_model_config
from lowbit.model.decoder import layer_segments
from lowbit.train import build_step, train

# Two MoE layers (one segment when scanned), T=32 so B*T=64 tokens fit mxfp4's 64-wide Hadamard.
# float32 activations: bfloat16 would let XLA keep a rounded intermediate in f32 in one program and
# not the other (convert pairs fused differently in a loop body), a bf16-ulp difference by design.
# No auxiliary loss in the objective (its weights 0; the MoE stats are still compared): then both
# layers' branches can be made to see the same input and output gradient (the key test below).
SHAPE = dict(num_decoder_layers=2, max_target_length=32, dtype="float32", load_balance_loss_weight=0.0,
             router_z_loss_weight=0.0)


def build(scan: bool, recipe: str, rules: tuple[str, ...] = (), **overrides) -> nnx.Module:
    cfg = get_model_config("tiny", scan_layers=scan, **{**SHAPE, **overrides})
    rngs = nnx.Rngs(params=0, quant=1)
    return lowbit.quantize_model(Decoder(cfg, rngs=rngs), recipe, rules=rules, rngs=rngs)


def tokens(seed: int = 0) -> jax.Array:
    """[2, 33]: inputs are the first 32 (B*T = 64 tokens), targets the last 32."""
    return jax.random.randint(jax.random.key(seed), (2, 33), 0, 256, dtype=jnp.int32)


@functools.cache
def _value_and_grad(graphdef):
    """jit((params, rng_state, batch) -> ((loss, (rng_state, expert_load)), grads)), one per graph."""
    def loss(params, rng_state, batch):
        m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rng_state))
        logits, aux = m(batch[:, :-1])
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], -1))
        return ce + aux["aux_loss"], (nnx.split(m, nnx.Param, ...)[2], aux["expert_load"])

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def loss_and_grads(model: nnx.Module, batch: jax.Array):
    """(loss, grads per parameter, RNG state after the step, expert_load [layers, E])."""
    graphdef, params, rng_state = nnx.split(model, nnx.Param, ...)
    (value, (rng_after, load)), grads = _value_and_grad(graphdef)(params, rng_state, batch)
    return value, grads, rng_after, load


# mxfp4 on the three expert GEMMs per layer only (attention kept BF16 by a rule): the quantized
# backward programs are large, and two layers of them compile in ~15 s on this CPU.
RULES = {"mxfp4": ("attention",), "bf16": ()}


def run(scan: bool, recipe: str, remat: str):
    model = build(scan, recipe, RULES[recipe], remat_policy=remat)
    return nnx.state(model, nnx.Param), *loss_and_grads(model, tokens())


def layer_grads(grads, index: int) -> list[np.ndarray]:
    return [np.asarray(g, np.float32) for g in jax.tree.leaves(grads["layers"][index])]


# (1) same loss and gradients -------------------------------------------------------------------

# bf16 with full remat (the policy must act inside the scanned body); mxfp4 (Tseng et al.):
# stochastic rounding and random Hadamard signs in both backward GEMMs, so every GEMM call needs
# its own key. The scan carries the quant RNG stream, so layer i draws exactly the keys it draws
# unrolled; the scan body runs the same XLA ops on the same values in the same order. Hence a
# tolerance of a few float32 ulps (rtol 1e-6), room only for XLA fusing the loop body differently.
@pytest.mark.parametrize("recipe, remat", [("bf16", "full"), ("mxfp4", "none")])
def test_scanned_model_matches_unrolled_loss_grads_and_rng(recipe, remat):
    params_u, loss_u, grads_u, rng_u, load_u = run(False, recipe, remat)
    params_s, loss_s, grads_s, rng_s, load_s = run(True, recipe, remat)
    assert jax.tree.structure(params_u) == jax.tree.structure(params_s)  # same stored layout
    for a, b in zip(jax.tree.leaves(params_u), jax.tree.leaves(params_s), strict=True):
        np.testing.assert_array_equal(a, b)  # same seed, same init
    assert float(loss_u) == pytest.approx(math.log(256), rel=0.1)  # an untrained byte model
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    np.testing.assert_array_equal(load_s, load_u)  # per-layer MoE stats come out of the scan in order
    for a, b in zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads_s), strict=True):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-5, atol=1e-8)
    # The quant stream advanced by one count per quantized GEMM call, as unrolled.
    counts_u, counts_s = (jax.tree.leaves(r) for r in (rng_u, rng_s))
    assert [int(c) for c in counts_u if c.dtype == jnp.uint32] == [
        int(c) for c in counts_s if c.dtype == jnp.uint32]


@pytest.mark.parametrize("recipe, remat, differ", [("mxfp4", "none", True), ("bf16", "full", False)])
def test_scanned_layers_draw_different_keys(recipe, remat, differ):
    # Two layers with the same weights whose branches output zero (out and wo kernels zero, no aux
    # loss): both layers see the same input and the same output gradient, so their expert `wo`
    # gradients (wgrad: SR + Hadamard in mxfp4) differ only through their keys. bf16 is the control.
    model = build(True, recipe, RULES[recipe], remat_policy=remat)
    for layer in model.layers:
        layer.attention.out.kernel[...] = jnp.zeros_like(layer.attention.out.kernel[...])
        layer.moe.experts.wo[...] = jnp.zeros_like(layer.moe.experts.wo[...])
    nnx.update(model.layers[1], nnx.state(model.layers[0], nnx.Param))
    _, grads, _, _ = loss_and_grads(model, tokens())
    g0, g1 = (np.asarray(grads["layers"][i]["moe"]["experts"]["wo"]) for i in (0, 1))
    assert np.any(g0 != 0)
    assert (not np.array_equal(g0, g1)) == differ


# (2) gradients reach every layer ---------------------------------------------------------------


@pytest.mark.parametrize("recipe, remat", [("bf16", "full"), ("mxfp4", "none")])
def test_every_scanned_layer_gets_its_own_nonzero_gradient(recipe, remat):
    _, _, grads, _, _ = run(True, recipe, remat)
    per_layer = [layer_grads(grads, i) for i in range(SHAPE["num_decoder_layers"])]
    for i, leaves in enumerate(per_layer):
        assert all(np.any(g != 0) and np.all(np.isfinite(g)) for g in leaves), f"layer {i}"
    for a, b in zip(per_layer[0], per_layer[1], strict=True):
        assert not np.allclose(a, b)


# (3) segments ----------------------------------------------------------------------------------


def test_segments_follow_layer_type_and_recipe_treatment():
    cfg = dict(num_decoder_layers=8, first_num_dense_layers=1)
    # nvfp4 keeps the last ceil(0.15 * 8) = 2 layers in BF16: dense 0 | quantized MoE 1-5 | BF16 MoE 6-7.
    kept = math.ceil(lowbit.get_recipe("nvfp4").keep_last_fraction * 8)
    assert kept == 2
    assert layer_segments(build(True, "nvfp4", **cfg).layers) == [(0, 1), (1, 6), (6, 8)]
    assert layer_segments(build(True, "bf16", **cfg).layers) == [(0, 1), (1, 8)]
    # All layers different (dense, quantized MoE, BF16 MoE): segments of length 1.
    all_different = build(True, "nvfp4", num_decoder_layers=3, first_num_dense_layers=1)
    assert layer_segments(all_different.layers) == [(0, 1), (1, 2), (2, 3)]


def test_per_layer_state_keeps_a_layer_out_of_segments():
    model = build(True, "bf16", num_decoder_layers=3)
    assert layer_segments(model.layers) == [(0, 3)]
    model.layers[1].extra = nnx.BatchStat(jnp.zeros(()))  # a Variable only layer 1 owns
    assert layer_segments(model.layers) == [(0, 1), (1, 2), (2, 3)]


def _primitives(jaxpr) -> list[str]:
    """Names of all primitives in a (closed) jaxpr, including inside sub-jaxprs."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                names += _primitives(sub)
    return names


def _scan_lengths(jaxpr) -> list[int]:
    return [eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]


def test_jaxpr_has_one_scan_per_segment_with_remat_inside():
    def forward_jaxpr(scan, remat):
        model = build(scan, "nvfp4", num_decoder_layers=8, first_num_dense_layers=1, remat_policy=remat)
        graphdef, state = nnx.split(model)
        return jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens()[:, :-1])[0])(state).jaxpr

    assert _scan_lengths(forward_jaxpr(False, "none")) == []
    scanned = forward_jaxpr(True, "full")
    assert _scan_lengths(scanned) == [5, 2]
    bodies = [eqn.params["jaxpr"].jaxpr for eqn in scanned.eqns if eqn.primitive.name == "scan"]
    # jax.checkpoint's primitive is named remat2 (older releases: checkpoint).
    assert all({"remat2", "checkpoint"} & set(_primitives(body)) for body in bodies)


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="scan_layers"):
        ModelConfig(scan_layers="yes")
    assert ModelConfig().scan_layers is False
    assert load_config("tiny", ["scan_layers=true"]).model.scan_layers is True


# (4) training ----------------------------------------------------------------------------------


def test_training_with_scan_layers_lowers_the_loss(tmp_path):
    config = load_config("tiny", ["max_target_length=32", "global_batch_size=8", "eval_every=0",
                                  "checkpoint_every=0", "warmup_steps=5", "steps=30",
                                  "learning_rate=1e-2", "num_decoder_layers=3", "scan_layers=true"])
    summary = train(config, "bf16", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert summary["nonfinite_count"] == 0 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.85 * losses[0]


# (5) one loop per direction, not one program per layer --------------------------------------------
# (compile times are a benchmark's business: `python -m lowbit.bench step` reports compile_s)


def test_scanned_step_lowers_each_moe_stack_to_one_loop_per_direction():
    loops = {}
    for scan in (False, True):
        config = load_config("tiny", ["max_target_length=32", "global_batch_size=8",
                                      f"scan_layers={str(scan).lower()}"])
        parts = build_step(config, "bf16")
        batch = {k: jnp.zeros((8, 32), jnp.int32) for k in ("inputs", "targets")}
        lowered = parts.train_step.lower(parts.state, batch, parts.schedule, jnp.float32(0))
        loops[scan] = lowered.as_text().count("stablehlo.while")
    assert loops[True] == loops[False] + 2  # the two MoE layers: one forward and one backward loop
