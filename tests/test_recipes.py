"""Recipes: shipped YAMLs match their papers' per-pass settings; strict validation; values, not objects."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from lowbit.recipes import OperandConfig, PassConfig, Recipe, get_recipe, list_recipes, recipes_dir

SHIPPED = ["bf16", "fp8", "mxfp8", "nvfp4", "nvfp4-norht", "nvfp4-all-fp4", "mxfp4", "mxfp4-nosr",
           "mxfp4-norht"]


def test_shipped_recipes_listed_and_loadable():
    assert set(SHIPPED) <= set(list_recipes())
    for name in SHIPPED:
        recipe = get_recipe(name)
        assert recipe.name == name and recipe.description
        assert get_recipe(name.upper()) == recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_yaml_round_trip(name, tmp_path):
    recipe = get_recipe(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    assert get_recipe(str(path)) == recipe


def test_recipe_is_hashable_and_a_static_jit_argument():
    recipe = get_recipe("nvfp4")
    assert hash(recipe) == hash(get_recipe("nvfp4").replace())
    f = jax.jit(lambda x, r: x * (2.0 if r.needs_rng else 3.0), static_argnums=1)
    assert float(f(jnp.ones(()), recipe)) == 2.0
    assert float(f(jnp.ones(()), get_recipe("mxfp8"))) == 3.0
    assert "nvfp4" in str(recipe) and "nvfp4" in recipe.summary()


def test_bf16_reference_is_unquantized():
    recipe = get_recipe("bf16")
    assert not recipe.quantized and not recipe.needs_rng


def test_fp8_hybrid_formats():
    r = get_recipe("fp8")
    assert (r.fprop.lhs.format, r.fprop.rhs.format) == ("fp8", "fp8")
    assert (r.dgrad.lhs.format, r.dgrad.rhs.format) == ("fp8_e5m2", "fp8")  # dY E5M2, W E4M3
    assert (r.wgrad.lhs.format, r.wgrad.rhs.format) == ("fp8", "fp8_e5m2")  # X E4M3, dY E5M2
    assert not r.needs_rng


def test_mxfp8_everywhere_rceil():
    r = get_recipe("mxfp8")
    ops = [op for pc in r.passes.values() for op in (pc.lhs, pc.rhs)]
    assert all(op == OperandConfig("mxfp8", scale_mode="rceil") for op in ops)


def test_nvfp4_matches_nvidia_recipe():
    r = get_recipe("nvfp4")
    assert r.formats == {"nvfp4"}
    # W: 16x16 tiles in fprop and dgrad (one quantization for W and W^T); X, dY 1x16.
    assert r.fprop.rhs.block_2d and r.dgrad.rhs.block_2d
    assert not (r.fprop.lhs.block_2d or r.dgrad.lhs.block_2d or r.wgrad.lhs.block_2d or r.wgrad.rhs.block_2d)
    # SR exactly on the gradient dY (dgrad lhs, wgrad rhs); RNE elsewhere.
    stochastic = {(p, s) for p, pc in r.passes.items() for s in ("lhs", "rhs")
                  if getattr(pc, s).rounding == "stochastic"}
    assert stochastic == {("dgrad", "lhs"), ("wgrad", "rhs")}
    # RHT 16 on wgrad only.
    assert (r.fprop.hadamard_block, r.dgrad.hadamard_block, r.wgrad.hadamard_block) == (None, None, 16)
    assert any("router" in rule for rule in r.high_precision_rules)
    assert r.keep_last_fraction == pytest.approx(0.15)
    assert get_recipe("nvfp4-norht") == r.replace(
        name="nvfp4-norht", description=get_recipe("nvfp4-norht").description,
        wgrad=dataclasses.replace(r.wgrad, hadamard_block=None))
    all_fp4 = get_recipe("nvfp4-all-fp4")
    assert all_fp4.high_precision_rules == () and all_fp4.keep_last_fraction == 0
    assert all_fp4.passes == r.passes


def test_mxfp4_matches_tseng_recipe():
    r = get_recipe("mxfp4")
    assert not r.fprop.quantized
    for pc in (r.dgrad, r.wgrad):
        assert pc.hadamard_block == 64
        for op in (pc.lhs, pc.rhs):
            assert op == OperandConfig("mxfp4", "stochastic", "floor", False, 0.75)
    nosr, norht = get_recipe("mxfp4-nosr"), get_recipe("mxfp4-norht")
    assert all(op.rounding == "nearest" and op.prescale == 1.0
               for pc in (nosr.dgrad, nosr.wgrad) for op in (pc.lhs, pc.rhs))
    assert nosr.dgrad.hadamard_block == nosr.wgrad.hadamard_block == 64
    assert norht.dgrad.hadamard_block is None and norht.wgrad.hadamard_block is None
    assert norht.dgrad.lhs.stochastic and norht.needs_rng and nosr.needs_rng


def test_unknown_recipe_lists_known_names_with_descriptions():
    with pytest.raises(ValueError, match="unknown recipe 'nope'") as info:
        get_recipe("nope")
    assert "mxfp8: MXFP8" in str(info.value) and "nvfp4" in str(info.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nfprop: {lhs: {fromat: mxfp8}}\n", "unknown key.*fromat.*allowed keys.*format"),
        ("name: x\nfprop: {lhs: {format: mxfp9}}\n", "'format'.*mxfp8"),
        ("name: x\nfprop: {lhs: {format: mxfp8, rounding: up}}\n", "'rounding'.*stochastic"),
        ("name: x\nfprop: {lhs: {format: mxfp8, scale_mode: ceil}}\n", "'scale_mode'.*rceil"),
        ("name: x\nfprop: {lhs: {format: fp8, block_2d: true}}\n", "block_2d"),
        ("name: x\nfprop: {lhs: {format: mxfp4, prescale: 2}}\n", "'prescale'"),
        ("name: x\nwgrad: {hadamard_block: 24}\n", "'hadamard_block'.*power of two"),
        ("name: x\nbackend: tpu\n", "'backend'.*emulate"),
        ("name: x\nkeep_last_fraction: 1.5\n", "'keep_last_fraction'"),
        ("name: x\nhigh_precision_rules: ['(']\n", "not a regex"),
        ("name: x\nextra: 1\n", "unknown key.*extra"),
        ("description: no name\n", "missing required key 'name'"),
    ],
)
def test_strict_yaml_validation(text, match, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Recipe.from_yaml(path)


def test_needs_rng_and_replace():
    base = Recipe("custom", fprop=PassConfig(OperandConfig("mxfp8"), OperandConfig("mxfp8")))
    assert base.quantized and not base.needs_rng
    sr = base.replace(dgrad=PassConfig(OperandConfig("mxfp4", "stochastic"), OperandConfig("mxfp4")))
    assert sr.needs_rng and not base.needs_rng
    rht = base.replace(wgrad=PassConfig(hadamard_block=32))
    assert rht.needs_rng
    with pytest.raises(ValueError, match="backend"):
        base.replace(backend="gpu")


def test_recipes_dir_holds_the_yaml_files():
    assert {p.stem for p in recipes_dir().glob("*.yaml")} >= set(SHIPPED)
