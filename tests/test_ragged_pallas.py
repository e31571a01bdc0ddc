"""lowbit.dot.ragged_dot(impl="pallas"): quantized grouped GEMMs on lowbit.kernels.grouped_pallas.

Pallas runs in interpret mode on the CPU (grouped_matmul's interpret=None picks it off a GPU).
Two kinds of check: impl="pallas" against impl="xla" (the same quantized operands, bit for bit:
same keys, same code; only the float32 summation order and where the tensor scales are applied
differ), and against float64 products of operands quantized by tests/reference_np.py.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lowbit.dot import ragged_dot
from lowbit.model.config import ModelConfig
from lowbit.model.moe import MoeBlock
from tests.reference_np import ref_dequantize, ref_quantize, ref_ragged_dot

T, K, N, E = 64, 64, 64, 4  # mxfp4's Hadamard block 64 runs along N (dgrad) and padded tokens (wgrad)
RECIPES = ("fp8", "mxfp8", "nvfp4", "mxfp4")
GROUPINGS = {
    # uneven, an empty group, a group smaller than a 16/32-row quantization block, sum 56 < T
    "uneven_empty_short": (20, 0, 29, 7),
    "all_rows": (33, 16, 1, 14),
    "sum_exceeds_rows": (40, 30, 0, 10),  # 80 > T: group 1 keeps rows 40..63 only (lax.ragged_dot)
}
# float32 summation of n products: |error| <= n·2^-24·Σ|a·b| (Higham's γ_n); with Gaussian
# operands Σ|a·b| stays below ~√K = 8 times max|y| of the same row, and n <= K = 64 (wgrad: <= T = 64
# rows, against the same expert's max|dW|). Per row / expert, not the global max: x's rows span 2^-12..
# 2^12 in magnitude, so a global atol would check the small rows to ~10% only.
# Applying the tensor scales after the sum instead of to each operand adds two roundings (2^-24).
F32_SUM_ATOL = 64 * 8 * 2.0**-24  # times max|reference| of the row (expert for dW): 3.1e-5
F32_RTOL = 4 * 2.0**-24  # the scale roundings, relative to each output


def _data(seed: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    # rows spread over 2^-6..2^6 so the per-tensor and per-block scales differ between rows
    x = jax.random.normal(keys[0], (T, K)) * jnp.exp2(jax.random.randint(keys[0], (T, 1), -6, 7))
    w = jax.random.normal(keys[1], (E, K, N))
    dy = jax.random.normal(keys[2], (T, N))
    return tuple(a.astype(dtype) for a in (x, w, dy))


@functools.cache
def _passes(recipe: str, impl: str):
    """jit(x, w, dy, group_sizes, key) -> (y, dx, dw); group sizes traced, so one compile per recipe."""

    @jax.jit
    def run(x, w, dy, group_sizes, key):
        y, vjp = jax.vjp(lambda a, b: ragged_dot(a, b, group_sizes, recipe, key=key, impl=impl), x, w)
        return (y, *vjp(dy))

    return run


def _owned_rows(sizes) -> int:
    return min(sum(sizes), T)


@pytest.mark.parametrize("recipe", RECIPES)
def test_pallas_matches_xla_on_the_same_quantized_operands(recipe):
    x, w, dy = _data(seed=len(recipe))
    key = jax.random.key(7)  # SR and RHT keys: both impls derive the same per-pass keys from it
    for name, sizes in GROUPINGS.items():
        group_sizes = jnp.asarray(sizes, jnp.int32)
        want = _passes(recipe, "xla")(x, w, dy, group_sizes, key)
        got = _passes(recipe, "pallas")(x, w, dy, group_sizes, key)
        for what, g, r in zip(("y", "dx", "dw"), got, want, strict=True):
            assert g.dtype == r.dtype == jnp.float32 and g.shape == r.shape
            g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
            row_max = np.abs(r).max(axis=(1, 2) if what == "dw" else 1, keepdims=True)
            bound = F32_RTOL * np.abs(r) + F32_SUM_ATOL * row_max + 1e-30  # rows both zero: equal
            np.testing.assert_array_less(np.abs(g - r), bound, err_msg=f"{recipe} {name} {what}")
            assert np.abs(r).max() > 0, f"{recipe} {name} {what}: the reference is all zeros"
        y, dx, dw = (np.asarray(a) for a in got)
        owned = _owned_rows(sizes)
        assert not np.any(y[owned:]) and not np.any(dx[owned:]), "rows no group owns stay exactly zero"
        if 0 in sizes:
            assert not np.any(dw[sizes.index(0)]), "an empty group's weight gradient is exactly zero"


def test_non_finite_input_gives_nan_where_xla_does_and_zeros_past_the_groups():
    """An Inf in a row no group owns still enters fp8's per-tensor amax (NaN tensor scale), so every
    owned output is NaN, as impl="xla"; the unowned rows stay 0 (lax.ragged_dot's contract)."""
    x, w, dy = _data(seed=9)
    sizes = GROUPINGS["uneven_empty_short"]
    x = x.at[T - 1, 3].set(jnp.inf)
    args = (x, w, dy, jnp.asarray(sizes, jnp.int32), jax.random.key(0))
    y_xla, y_pallas = (np.asarray(_passes("fp8", impl)(*args)[0]) for impl in ("xla", "pallas"))
    owned = _owned_rows(sizes)
    np.testing.assert_array_equal(np.isnan(y_pallas), np.isnan(y_xla))
    assert np.all(np.isnan(y_pallas[:owned])) and not np.any(y_pallas[owned:])


def test_bfloat16_operands_round_the_same_float32_sums_once():
    """bf16 in, bf16 out: each output is one rounding of float32 sums that agree to F32 tolerance,
    so the two impls differ by at most one bfloat16 ulp (2^-8 relative) where a sum sits near a tie."""
    x, w, dy = _data(seed=11, dtype=jnp.bfloat16)
    sizes = jnp.asarray(GROUPINGS["uneven_empty_short"], jnp.int32)
    key = jax.random.key(3)
    want = _passes("nvfp4", "xla")(x, w, dy, sizes, key)
    got = _passes("nvfp4", "pallas")(x, w, dy, sizes, key)
    for what, g, r in zip(("y", "dx", "dw"), got, want, strict=True):
        assert g.dtype == r.dtype == jnp.bfloat16
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        np.testing.assert_allclose(g, r, rtol=2.0**-8, atol=F32_SUM_ATOL * np.abs(r).max(), err_msg=what)


def _ref_qdq(a, fmt: str, axis, scale_mode: str = "floor") -> np.ndarray:
    """float64 values of `a` quantized by the NumPy reference (pad=True: partial blocks as zeros)."""
    if fmt.startswith("fp8"):  # per tensor: no blocks to pad
        return ref_dequantize(ref_quantize(np.asarray(a, np.float32), fmt), dtype=np.float64)
    rq = ref_quantize(np.asarray(a, np.float32), fmt, axis=axis, scale_mode=scale_mode, pad=True)
    return ref_dequantize(rq, axis=axis, dtype=np.float64)


# recipe -> operand -> (reference format, its blocks' axis) with the recipe's MX scale mode; x and
# dy [T, *], w [E, K, N]; wgrad axes 0 are tokens. Only RNE passes (nvfp4's dY uses SR).
REFERENCE_RECIPES = {
    "fp8": ("floor", {"x": ("fp8", -1), "w": ("fp8", 1), "dy": ("fp8_e5m2", -1), "w_dgrad": ("fp8", 2),
                      "x_wgrad": ("fp8", 0), "dy_wgrad": ("fp8_e5m2", 0)}),
    "mxfp8": ("rceil", {"x": ("mxfp8", -1), "w": ("mxfp8", 1), "dy": ("mxfp8", -1), "w_dgrad": ("mxfp8", 2),
                        "x_wgrad": ("mxfp8", 0), "dy_wgrad": ("mxfp8", 0)}),
    # NVFP4 weights in 16x16 tiles over (K, N) with one tensor scale over all experts
    "nvfp4": ("floor", {"x": ("nvfp4", -1), "w": ("nvfp4", (1, 2))}),
}


@pytest.mark.parametrize("recipe", list(REFERENCE_RECIPES))
def test_pallas_matches_float64_reference_on_reference_quantized_operands(recipe):
    """y = Q(x)·Q(w[g]); dX = Q(dy)·Q(w[g])ᵀ with W blocked along N; dW[e] = Q(x_e)ᵀ·Q(dy_e) with
    blocks along each group's own tokens (per-tensor FP8: one scale over the rows groups own).
    Operands quantized by tests/reference_np.py, products and sums in float64."""
    mode, fmts = REFERENCE_RECIPES[recipe]
    sizes = GROUPINGS["uneven_empty_short"]
    x, w, dy = (np.asarray(a) for a in _data(seed=5))
    y, dx, dw = (np.asarray(a, np.float64) for a in _passes(recipe, "pallas")(
        x, w, dy, jnp.asarray(sizes, jnp.int32), jax.random.key(1)))

    def q(a, operand):
        return _ref_qdq(a, *fmts[operand], mode)

    pairs = [("y", y, q(x, "x"), q(w, "w"))]
    if "dy" in fmts:
        pairs.append(("dx", dx, q(dy, "dy"), np.swapaxes(q(w, "w_dgrad"), 1, 2)))
    for name, got, a, b in pairs:
        want = ref_ragged_dot(a, b, sizes)
        bound = 1e-5 * ref_ragged_dot(np.abs(a), np.abs(b), sizes)  # γ_64 ≈ 3.8e-6 plus scale roundings
        np.testing.assert_array_less(np.abs(got - want), bound + 1e-30, err_msg=name)
    if "x_wgrad" not in fmts:
        return
    owned = _owned_rows(sizes)
    per_tensor = fmts["x_wgrad"][0].startswith("fp8")
    x_all, dy_all = q(x[:owned], "x_wgrad"), q(dy[:owned], "dy_wgrad")  # used by per-tensor FP8
    for e, (s0, n) in enumerate(zip(np.cumsum(sizes) - np.asarray(sizes), sizes, strict=True)):
        rows = slice(s0, s0 + n)
        a = x_all[rows] if per_tensor or not n else q(x[rows], "x_wgrad")
        b = dy_all[rows] if per_tensor or not n else q(dy[rows], "dy_wgrad")
        bound = 1e-5 * np.abs(a).T @ np.abs(b)
        np.testing.assert_array_less(np.abs(dw[e] - a.T @ b), bound + 1e-30, err_msg=f"dw[{e}]")


def test_unquantized_recipe_runs_the_kernel_and_matches_float64():
    x, w, _ = (np.asarray(a) for a in _data(seed=2))
    sizes = GROUPINGS["uneven_empty_short"]
    got = np.asarray(ragged_dot(x, w, jnp.asarray(sizes, jnp.int32), "bf16", impl="pallas"), np.float64)
    want = ref_ragged_dot(x, w, sizes)
    bound = 1e-5 * ref_ragged_dot(np.abs(x), np.abs(w), sizes)  # float32 sums of K = 64 exact products
    np.testing.assert_array_less(np.abs(got - want), bound + 1e-30)


def test_fp8_data_reaches_the_kernel_k_major(monkeypatch):
    """Per-tensor FP8 operands go in as e4m3/e5m2 bytes (no dequantize); fprop's W as [E, N, K]."""
    import lowbit.kernels.grouped_pallas as gp

    seen = []
    original = gp.grouped_matmul

    def spy(lhs, rhs, group_sizes, **kwargs):
        seen.append((lhs.dtype, rhs.dtype, rhs.shape, kwargs.get("rhs_layout")))
        return original(lhs, rhs, group_sizes, **kwargs)

    monkeypatch.setattr(gp, "grouped_matmul", spy)
    x, w, dy = _data(seed=4)
    sizes = jnp.asarray((8, 8, 8, 8), jnp.int32)

    def fprop_dgrad(x, w, dy):  # traced once: the spy sees each kernel call's operands
        y, vjp = jax.vjp(lambda a, b: ragged_dot(a, b, sizes, "fp8", impl="pallas"), x, w)
        return y, vjp(dy)

    jax.eval_shape(fprop_dgrad, x, w[:, :, :32], dy[:, :32])
    e4m3, e5m2 = jnp.dtype(ml_dtypes.float8_e4m3fn), jnp.dtype(ml_dtypes.float8_e5m2)
    assert seen == [(e4m3, e4m3, (E, 32, K), "enk"),  # fprop: contraction K last in both
                    (e5m2, e4m3, (E, K, 32), "enk")]  # dgrad: W [E, K, N] contracts N, last


@pytest.mark.parametrize("recipe", RECIPES)
def test_three_gemms_lower_to_triton_for_a_gpu_without_one(recipe, monkeypatch):
    """fprop, dgrad and wgrad each become one Triton kernel (Pallas -> Triton IR runs on the CPU;
    PTX needs the GPU): each recipe's operand dtypes, rows and N not multiples of their blocks."""
    pytest.importorskip("jax.experimental.pallas.triton")
    import lowbit.kernels.grouped_pallas as gp

    for name in ("grouped_matmul", "grouped_wgrad"):  # compiled, not interpret mode, off a GPU
        monkeypatch.setattr(gp, name, functools.partial(getattr(gp, name), interpret=False))

    def fprop_dgrad_wgrad(x, w, group_sizes, dy, key):
        y, vjp = jax.vjp(lambda a, b: ragged_dot(a, b, group_sizes, recipe, key=key, impl="pallas"), x, w)
        return y, vjp(dy)

    rows, k, n, experts = 1000, 192, 320, 8  # mxfp4's Hadamard block 64 divides k and n
    bf16 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    args = (bf16((rows, k)), bf16((experts, k, n)), jax.ShapeDtypeStruct((experts,), jnp.int32),
            bf16((rows, n)), jax.random.key(0))
    hlo = jax.jit(fprop_dgrad_wgrad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("xla.gpu.triton") == 3


def test_bad_impl_is_a_value_error_naming_the_choices():
    x, w, _ = _data(seed=0)
    with pytest.raises(ValueError, match=r"\('xla', 'pallas'\).*'triton'"):
        ragged_dot(x, w, jnp.asarray(GROUPINGS["all_rows"], jnp.int32), "mxfp8", impl="triton")


# ----------------------------------------------------------------------------- model wiring
class _RecordingHook(nnx.Module):
    """Stands in for quantize_model's QuantRaggedDot: records the keyword arguments it gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, lhs, rhs, group_sizes, **kwargs):
        self.calls.append(dict(kwargs))
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _moe_block(moe_impl: str) -> MoeBlock:
    cfg = ModelConfig(dtype="float32", emb_dim=16, moe_mlp_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_impl=moe_impl)
    return MoeBlock(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("moe_impl, want", [("pallas", [{"impl": "pallas"}] * 3), ("dropless", [{}] * 3)])
def test_moe_block_passes_impl_pallas_to_a_swapped_in_hook(moe_impl, want):
    block = _moe_block(moe_impl)
    hook = _RecordingHook()
    block.experts.ragged_dot = nnx.data(hook)  # as quantize_model sets it
    block(jnp.ones((1, 5, 16)))
    assert hook.calls == want  # wi_0, wi_1, wo


def test_quantized_pallas_model_runs_the_grouped_kernel(monkeypatch):
    """End to end: quantize_model's hook forwards impl="pallas" to lowbit.dot.ragged_dot."""
    from lowbit.nn.quant_modules import QuantRaggedDot

    assert "impl" in inspect.signature(QuantRaggedDot.__call__).parameters  # a failure, not a skip
    import lowbit
    import lowbit.kernels.grouped_pallas as gp

    calls = []
    original = gp.grouped_matmul
    monkeypatch.setattr(gp, "grouped_matmul", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    block = lowbit.quantize_model(_moe_block("pallas"), "mxfp8")
    y, _ = block(jnp.ones((1, 5, 16)))
    assert len(calls) == 3 and np.all(np.isfinite(np.asarray(y)))
