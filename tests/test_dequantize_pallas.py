"""The block-values kernel (lowbit.kernels.dequantize_pallas, Pallas interpret mode on the CPU) held bit for
bit to lowbit.backends.emulate.split_scales of lowbit.quantize's QArrays: edge inputs (zeros, signed zeros,
NaN/Inf blocks, subnormal elements, 2^±126 scales), batched and 2-D-tiled layouts, bf16 and f32 outputs; and
the calls it cannot take refused with the fix named, or (dispatch.block_values) handed back unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit.backends.emulate import split_scales
from lowbit.kernels import dispatch
from lowbit.kernels.dequantize_pallas import block_values_available, block_values_fused
from lowbit.quantize import BlockValues
from tests.test_quantize_pallas import _WHY_NOT, _bits, _edge_input

if _WHY_NOT is not None:
    pytest.skip(_WHY_NOT, allow_module_level=True)

# (format, lowbit.quantize kwargs, input dtype, shape the 64 x 256 edge input is viewed as)
CASES = [
    ("mxfp8", {}, np.float32, (64, 256)),
    ("mxfp8", {"scale_mode": "rceil", "prescale": 0.75}, jnp.bfloat16, (2, 32, 256)),
    ("mxfp8_e5m2", {}, jnp.bfloat16, (64, 256)),
    ("mxfp4", {}, np.float32, (64, 256)),
    ("mxfp4", {"scale_mode": "rceil"}, jnp.bfloat16, (4, 16, 256)),
    ("nvfp4", {}, np.float32, (64, 256)),
    ("nvfp4", {"axis": (0, 1)}, jnp.bfloat16, (64, 256)),
    ("nvfp4", {"axis": (1, 2)}, np.float32, (4, 16, 256)),
]


def _id(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={w}" for k, w in v.items()) or "-"
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return v if isinstance(v, str) else np.dtype(v).name


@pytest.mark.parametrize(("name", "kw", "dtype", "shape"), CASES, ids=_id)
@pytest.mark.parametrize("values_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_block_values_match_split_scales(name, kw, dtype, shape, values_dtype):
    x = _edge_input(np.float32)
    x[13, :32] = 2.0**-126  # the smallest normal amax: scale 2^-128 (MX), subnormal products
    x = jnp.asarray(x.astype(dtype)).reshape(shape)
    q = lowbit.quantize(x, name, **kw)
    assert block_values_available(q)
    got = block_values_fused(q, values_dtype, interpret=True)
    want, want_outer = split_scales(q, values_dtype)
    assert isinstance(got, BlockValues) and got.values.dtype == want.dtype and got.shape == x.shape
    assert got.axis == q.axis and got.prescale == q.prescale and got.fmt == q.fmt
    assert np.isnan(np.asarray(want, np.float32)).any() and (np.asarray(want, np.float32) == 0).any()
    np.testing.assert_array_equal(_bits(got.values), _bits(want))
    _, got_outer = split_scales(got, values_dtype)
    np.testing.assert_array_equal(np.float32(got_outer), np.float32(want_outer))


def test_calls_the_kernel_cannot_take():
    x = jnp.ones((64, 64), jnp.float32)
    for q in (lowbit.quantize(x, "fp8"),  # per-tensor: no block scales
              lowbit.quantize(x, "mxfp6_e2m3"),  # FP6 in an FP8 container
              lowbit.quantize(x, "mxfp8", axis=0),  # blocks along rows
              lowbit.quantize(jnp.ones((8, 48)), "mxfp8", pad=True)):  # a partial block
        assert not block_values_available(q)
        with pytest.raises(ValueError, match=r"q.dequantize\(\) or lowbit.backends.emulate.split_scales"):
            block_values_fused(q, interpret=True)
        with dispatch.quantize_impl("fused"):
            assert dispatch.block_values(q) is q  # handed back: split_scales dequantizes it the same


def test_dispatch_follows_the_switch(monkeypatch):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 64)), jnp.float32)
    q = lowbit.quantize(x, "mxfp4")
    assert dispatch.block_values(x) is x  # not quantized: nothing to do
    with dispatch.quantize_impl("xla"):
        assert dispatch.block_values(q) is q
    if jax.default_backend() != "gpu":
        with dispatch.quantize_impl("auto"):
            assert dispatch.block_values(q) is q  # the compiled kernel needs a GPU
    with dispatch.quantize_impl("fused"):
        got = dispatch.block_values(q)
        assert isinstance(got, BlockValues)
        np.testing.assert_array_equal(_bits(got.values), _bits(split_scales(q, jnp.bfloat16)[0]))
        monkeypatch.setenv(dispatch.VALUES_ENV_VAR, "0")
        assert dispatch.block_values(q) is q


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn, "float64"])
def test_values_dtype_must_be_a_gemm_float(dtype):
    """An integer, 8-bit or float64 values dtype is refused by both kernels, naming the dtypes they write."""
    from lowbit.kernels import quantize_fused

    x = jnp.ones((32, 64), jnp.float32)
    choices = r"cannot hold block values; use one of \('bfloat16', 'float16', 'float32'\)"
    with pytest.raises(ValueError, match=choices):
        quantize_fused(x, "mxfp8", interpret=True, values_dtype=dtype)
    with pytest.raises(ValueError, match="cannot hold block values"):
        block_values_fused(lowbit.quantize(x, "mxfp8"), dtype, interpret=True)
