"""Backends: automatic choice per device, clear errors, and numerics against a float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit.backends import emulate, fp8, native, select_backend
from lowbit.recipes import OperandConfig, PassConfig, Recipe, get_recipe


@pytest.mark.parametrize(
    "recipe, platform, cc, expected",
    [
        ("fp8", "gpu", 9.0, "fp8"),
        ("mxfp8", "gpu", 9.0, "emulate"),
        ("nvfp4", "gpu", 9.0, "emulate"),
        ("mxfp8", "gpu", 10.0, "native"),
        ("nvfp4", "gpu", 10.0, "native"),
        ("fp8", "gpu", 10.0, "fp8"),
        ("mxfp4", "gpu", 10.0, "emulate"),  # XLA has no cuDNN path for MXFP4 (native.NOT_NATIVE)
        ("nvfp4", "cpu", None, "emulate"),
        ("fp8", "cpu", None, "emulate"),
        ("fp8", "tpu", None, "emulate"),
        ("bf16", "gpu", 9.0, "emulate"),
        ("fp8", "gpu", 8.0, "emulate"),
    ],
)
def test_auto_selection(recipe, platform, cc, expected):
    assert select_backend(get_recipe(recipe), platform, cc) == expected


def test_override_and_recipe_backend():
    assert select_backend(get_recipe("fp8"), "gpu", 9.0, override="emulate") == "emulate"
    assert select_backend(get_recipe("fp8").replace(backend="emulate"), "gpu", 9.0) == "emulate"
    assert select_backend(get_recipe("fp8").replace(backend="fp8"), "cpu", None) == "fp8"


@pytest.mark.parametrize(
    "recipe, backend, platform, cc, match",
    [
        ("mxfp8", "native", "gpu", 9.0, "compute capability >= 10"),
        ("nvfp4", "native", "cpu", None, "compute capability >= 10"),
        ("mxfp8", "fp8", "gpu", 9.0, "per-tensor FP8 only"),
        ("fp8", "native", "gpu", 10.0, "supports"),
        ("mxfp4", "fp8", "gpu", 9.0, "per-tensor FP8 only"),
    ],
)
def test_impossible_choices_raise(recipe, backend, platform, cc, match):
    with pytest.raises(ValueError, match=match):
        select_backend(get_recipe(recipe), platform, cc, override=backend)


def test_mixed_pass_needs_emulate():
    mixed = Recipe("mixed", fprop=PassConfig(OperandConfig("fp8"), OperandConfig(None)))
    with pytest.raises(ValueError, match="both operands"):
        select_backend(mixed, "gpu", 9.0, override="fp8")
    assert select_backend(mixed, "gpu", 9.0) == "emulate"


def _operands(seed=0, b=2, m=32, n=48, k=64):
    ka, kb = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(ka, (b, m, k)) * jnp.exp2(jax.random.randint(ka, (b, m, 1), -4, 4))
    bb = jax.random.normal(kb, (b, n, k))
    return a, bb


def _ref(qa, qb):
    da = np.asarray(lowbit.dequantize(qa), np.float64)
    db = np.asarray(lowbit.dequantize(qb), np.float64)
    return np.einsum("bmk,bnk->bmn", da, db), np.einsum("bmk,bnk->bmn", np.abs(da), np.abs(db))


@pytest.mark.parametrize("fmt, axis, prescale", [("mxfp8", 2, 1.0), ("mxfp4", 2, 0.75), ("nvfp4", 2, 1.0),
                                                 ("nvfp4", (1, 2), 1.0), ("fp8", 2, 1.0)])
def test_emulate_matches_float64_reference(fmt, axis, prescale):
    a, b = _operands()
    qa = lowbit.quantize(a, fmt, axis=2, prescale=prescale)
    qb = lowbit.quantize(b, fmt, axis=axis)
    y = emulate.gemm(qa, qb, out_dtype=jnp.float32)
    ref, bound = _ref(qa, qb)
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 1e-5 * bound + 1e-30)


def test_fp8_backend_feeds_float8_into_the_dot_and_matches_emulate():
    a, b = _operands(1)
    qa, qb = lowbit.quantize(a, "fp8"), lowbit.quantize(b, "fp8_e5m2")
    jaxpr = jax.make_jaxpr(lambda qa, qb: fp8.gemm(qa, qb, out_dtype=jnp.bfloat16))(qa, qb)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert {str(v.aval.dtype) for v in dots[0].invars} == {"float8_e4m3fn", "float8_e5m2"}
    assert dots[0].params["preferred_element_type"] == jnp.bfloat16
    y = fp8.gemm(qa, qb, out_dtype=jnp.bfloat16)
    ref, bound = _ref(qa, qb)
    # bf16 output plus a bf16 scale multiply: two bf16 roundings.
    err = np.abs(np.asarray(y, np.float64) - ref)
    np.testing.assert_array_less(err, 2**-7 * (np.abs(ref) + 1e-3 * bound))
    with pytest.raises(ValueError, match="per-tensor"):
        fp8.gemm(lowbit.quantize(a, "mxfp8", axis=2), qb, out_dtype=jnp.bfloat16)


def _scaled_matmul_reference(lhs, rhs, lhs_scales, rhs_scales, preferred_element_type=jnp.float32):
    """jax.nn.scaled_matmul's documented math: scales repeated along K, then 'BMK,BNK->BMN'."""
    def scaled(data, scales):
        block = data.shape[-1] // scales.shape[-1]
        return data.astype(jnp.float32) * jnp.repeat(scales.astype(jnp.float32), block, -1)

    a, b = scaled(lhs, lhs_scales), scaled(rhs, rhs_scales)
    return jnp.einsum("BMK,BNK->BMN", a, b, precision="highest").astype(preferred_element_type)


@pytest.mark.parametrize("fmt, rhs_axis", [("mxfp8", 2), ("nvfp4", 2), ("nvfp4", (1, 2))])
def test_native_backend_contract(fmt, rhs_axis, monkeypatch):
    """Shapes/dtypes our QArrays hand to jax.nn.scaled_matmul, checked with its documented math on CPU."""
    a, b = _operands(2)
    qa = lowbit.quantize(a, fmt, axis=2, prescale=0.75 if fmt == "mxfp4" else 1.0)
    qb = lowbit.quantize(b, fmt, axis=rhs_axis)
    monkeypatch.setattr(jax.nn, "scaled_matmul", _scaled_matmul_reference)
    y = native.gemm(qa, qb, out_dtype=jnp.float32)
    ref, bound = _ref(qa, qb)
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 1e-5 * bound + 1e-30)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_native_backend_lowers_to_cudnn_block_scaled_dot(fmt):
    """No GPU here: lower for CUDA and check the cuDNN block-scaled custom call is emitted."""
    a, b = _operands(3, b=1, m=128, n=128, k=128)
    qa, qb = lowbit.quantize(a, fmt, axis=2), lowbit.quantize(b, fmt, axis=2)
    lowered = jax.jit(lambda qa, qb: native.gemm(qa, qb, out_dtype=jnp.bfloat16)).trace(qa, qb).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__op$block_scaled_dot" in text
    elem = "f8E4M3FN" if fmt == "mxfp8" else "f4E2M1FN"
    assert f"tensor<1x128x128x{elem}>" in text


def test_native_refuses_mxfp4_and_says_why():
    """Compiled for sm_100, XLA turned an MXFP4 scaled_matmul into a dequantizing Triton GEMM
    (docs/bench/blackwell_aot_s7.json): the native backend must not promise FP4 tensor cores for it."""
    with pytest.raises(ValueError, match="dequantizing GEMM.*use nvfp4.*'emulate'"):
        select_backend(get_recipe("mxfp4"), "gpu", 10.0, override="native")
    a, b = _operands(4)
    with pytest.raises(ValueError, match="lhs is mxfp4 .*dequantizing"):
        native.gemm(lowbit.quantize(a, "mxfp4", axis=2), lowbit.quantize(b, "mxfp4", axis=2),
                    out_dtype=jnp.float32)


def test_native_rejects_other_formats():
    a, b = _operands(4)
    with pytest.raises(ValueError, match="native backend"):
        native.gemm(lowbit.quantize(a, "fp8"), lowbit.quantize(b, "fp8"), out_dtype=jnp.float32)


def test_device_info_reads_cuda_capability_and_tolerates_other_strings():
    from types import SimpleNamespace

    from lowbit.backends import device_info

    assert device_info(SimpleNamespace(platform="gpu", compute_capability="9.0")) == ("gpu", 9.0)
    assert device_info(SimpleNamespace(platform="gpu", compute_capability="gfx90a")) == ("gpu", None)  # ROCm
    assert device_info(SimpleNamespace(platform="cpu")) == ("cpu", None)
