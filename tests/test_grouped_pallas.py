"""lowbit.kernels.grouped_pallas: one-launch grouped GEMM (Pallas interpret mode on the CPU).

References are per-group float64 NumPy matmuls on the same (already rounded) operand values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from lowbit.kernels.grouped_pallas import grouped_matmul, grouped_wgrad, tile_schedule
from tests.reference_np import ref_ragged_dot

M, K, N, E = 96, 32, 48, 4
TILE = (16, 16, 16)
BM = TILE[0]
# (name, group sizes).
GROUPINGS = [
    # empty group, group < one tile (7), exact tile multiple (32), sum 59 < M: trailing rows zero.
    ("uneven", (20, 0, 32, 7)),
    ("all_rows_assigned", (33, 16, 1, 46)),
    ("one_expert_takes_all", (0, 0, 96, 0)),
    ("nothing_assigned", (0, 0, 0, 0)),
    # sum 140 > M = 96: group 1 keeps rows [50, 96) (not [16, 96)), group 3 gets none (ragged_dot).
    ("sum_exceeds_rows", (50, 80, 0, 10)),
]


def _operands(dtype_lhs=np.float32, dtype_rhs=np.float32, seed=0, k=K, n=N, layout="ekn"):
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((M, k)).astype(dtype_lhs)
    rhs = rng.standard_normal((E, k, n)).astype(dtype_rhs)
    return lhs, (rhs if layout == "ekn" else np.swapaxes(rhs, 1, 2).copy())


def _abs_bound(lhs, rhs_ekn, sizes) -> np.ndarray:
    """|lhs| @ |rhs| per group: the scale of float32 accumulation error for each output."""
    return ref_ragged_dot(np.abs(np.asarray(lhs, np.float64)), np.abs(np.asarray(rhs_ekn, np.float64)), sizes)


@pytest.mark.parametrize("name, sizes", GROUPINGS, ids=[g[0] for g in GROUPINGS])
def test_tile_schedule_covers_every_row_once_and_never_straddles_groups(name, sizes):
    schedule = jax.tree.map(np.asarray, tile_schedule(jnp.asarray(sizes, jnp.int32), M, BM, 3))
    assert schedule.expert.shape == (-(-M // BM) + E,)  # static bound ceil(M / bm) + E
    # group e owns rows [c_e - g_e, c_e) of the cumulative sums c, cut at M (lax.ragged_dot's rule)
    ends = np.minimum(np.cumsum(sizes), M)
    starts = np.minimum(np.cumsum(sizes) - np.asarray(sizes), M)
    covered = np.zeros(M, int)
    for expert, first, rows, k_steps in zip(*schedule, strict=True):
        covered[first:first + rows] += 1
        if k_steps:  # a real tile: all its rows inside its expert's group
            assert k_steps == 3 and 1 <= rows <= BM
            assert starts[expert] <= first and first + rows <= ends[expert]
        else:  # zero tile or idle: only rows no group owns
            assert rows == 0 or first >= ends[-1]
    np.testing.assert_array_equal(covered, np.ones(M, int))
    real_tiles = int(np.sum(schedule.k_steps > 0))
    assert real_tiles == sum(-(-s // BM) for s in ends - starts)  # ceil(g_e / bm) tiles per group


@pytest.mark.parametrize("name, sizes", GROUPINGS, ids=[g[0] for g in GROUPINGS])
def test_forward_f32_matches_float64ref_ragged_dot(name, sizes):
    lhs, rhs = _operands(seed=len(name))
    run = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, tile=TILE))  # group sizes traced
    out = np.asarray(run(lhs, rhs, jnp.asarray(sizes, jnp.int32)))
    assert out.dtype == np.float32
    reference = ref_ragged_dot(lhs, rhs, sizes)
    # float32 accumulation of K=32 products: error <= ~K * 2^-24 * (|x| @ |w|).
    np.testing.assert_array_less(np.abs(out - reference), 1e-5 * _abs_bound(lhs, rhs, sizes) + 1e-30)
    assert not np.any(out[sum(sizes):]), "rows past sum(group_sizes) must be exactly zero"


def test_forward_enk_layout_and_ragged_tiles():
    """rhs [E, N, K]; K=40, N=24 not multiples of the 16-wide blocks (masked tails); another launch order."""
    sizes = (20, 0, 32, 7)
    lhs, rhs_enk = _operands(seed=3, k=40, n=24, layout="enk")
    out = np.asarray(grouped_matmul(lhs, rhs_enk, np.asarray(sizes, np.int32), tile=TILE, rhs_layout="enk",
                                    group_m=3))  # launch order: 10 row tiles in groups of 3
    rhs_ekn = np.swapaxes(rhs_enk, 1, 2)
    reference = ref_ragged_dot(lhs, rhs_ekn, sizes)
    np.testing.assert_array_less(np.abs(out - reference), 1e-5 * _abs_bound(lhs, rhs_ekn, sizes) + 1e-30)
    assert not np.any(out[sum(sizes):])


def test_forward_bf16_rounds_float32_accumulation_once():
    sizes = (20, 0, 32, 7)
    lhs, rhs = _operands(ml_dtypes.bfloat16, ml_dtypes.bfloat16, seed=4)
    out = grouped_matmul(lhs, rhs, np.asarray(sizes, np.int32), tile=TILE)
    assert out.dtype == jnp.bfloat16  # bf16 in -> bf16 out, as lax.ragged_dot
    out = np.asarray(out, np.float64)
    reference = ref_ragged_dot(lhs, rhs, sizes)
    # One final rounding to bfloat16 (8 significant bits: <= 2^-8 relative) after float32 accumulation.
    bound = 2.0**-8 * np.abs(reference) + 1e-5 * _abs_bound(lhs, rhs, sizes) + 1e-30
    np.testing.assert_array_less(np.abs(out - reference), bound)
    assert not np.any(out[sum(sizes):])


@pytest.mark.parametrize("rhs_dtype, out_dtype", [(ml_dtypes.float8_e4m3fn, jnp.float32),
                                                  (ml_dtypes.float8_e5m2, jnp.bfloat16)])
def test_forward_fp8_operands(rhs_dtype, out_dtype):
    sizes = (20, 0, 32, 7)
    lhs, rhs = _operands(ml_dtypes.float8_e4m3fn, rhs_dtype, seed=5)
    out = grouped_matmul(lhs, rhs, np.asarray(sizes, np.int32), tile=TILE, preferred_element_type=out_dtype)
    assert out.dtype == out_dtype
    out = np.asarray(out, np.float64)
    reference = ref_ragged_dot(lhs, rhs, sizes)  # on the same fp8 values
    final_rounding = 2.0**-8 if out_dtype == jnp.bfloat16 else 2.0**-24
    bound = final_rounding * np.abs(reference) + 1e-6 * _abs_bound(lhs, rhs, sizes) + 1e-30
    np.testing.assert_array_less(np.abs(out - reference), bound)


def test_matches_lax_ragged_dot_f32():
    sizes = jnp.asarray((20, 0, 32, 7), jnp.int32)
    lhs, rhs = _operands(seed=6)
    ours = np.asarray(grouped_matmul(lhs, rhs, sizes, tile=TILE))
    theirs = np.asarray(lax.ragged_dot(lhs, rhs, sizes, precision=lax.Precision.HIGHEST))
    # Same math, possibly another summation order: a few float32 ulps of |x| @ |w|.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.max(_abs_bound(lhs, rhs, (20, 0, 32, 7))))
    np.testing.assert_array_equal(ours[59:], theirs[59:])


# wgrad_tile None: WGRAD_TILE shrunk to the shape, unlike the forward's TILE; (32, 16, 16): rows a step
# larger than some groups (7) and not a multiple of others (20), dW blocks smaller than K and N.
@pytest.mark.parametrize("layout, sizes, wgrad_tile", [
    ("ekn", (20, 0, 32, 7), None), ("enk", (20, 0, 32, 7), None), ("ekn", (50, 80, 0, 10), None),
    ("ekn", (20, 0, 32, 7), (32, 16, 16))])
def test_gradients_match_float64ref_ragged_dot(layout, sizes, wgrad_tile):
    lhs, rhs = _operands(seed=7, layout=layout)
    cot = np.random.default_rng(8).standard_normal((M, N)).astype(np.float32)

    def loss(x, w):  # sum(cot * out): dX = cot @ W_eᵀ per group, dW_e = X_eᵀ cot_e
        out = grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), tile=TILE, rhs_layout=layout,
                             wgrad_tile=wgrad_tile)
        return jnp.sum(cot * out)

    dlhs, drhs = jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs, rhs)
    rhs_ekn = rhs if layout == "ekn" else np.swapaxes(rhs, 1, 2)
    ref_dlhs = ref_ragged_dot(cot, np.swapaxes(rhs_ekn, 1, 2), sizes)
    ref_drhs = np.zeros((E, K, N))
    start = 0
    for e, size in enumerate(sizes):
        ref_drhs[e] = lhs[start:start + size].T.astype(np.float64) @ cot[start:start + size]
        start += size
    drhs_ekn = np.asarray(drhs if layout == "ekn" else np.swapaxes(drhs, 1, 2))
    abs_dlhs = ref_ragged_dot(np.abs(cot), np.abs(np.swapaxes(rhs_ekn, 1, 2)), sizes)
    np.testing.assert_array_less(np.abs(np.asarray(dlhs) - ref_dlhs), 1e-5 * abs_dlhs + 1e-30)
    abs_drhs = np.stack([np.abs(lhs[s:s + n]).T.astype(np.float64) @ np.abs(cot[s:s + n])
                         for s, n in zip(np.cumsum(sizes) - sizes, sizes, strict=True)])
    np.testing.assert_array_less(np.abs(drhs_ekn - ref_drhs), 1e-5 * abs_drhs + 1e-30)
    assert not np.any(np.asarray(dlhs)[sum(sizes):]), "rows no group owns get no gradient"
    empty = [e for e, rows in enumerate(np.minimum(np.cumsum(sizes), M) - np.minimum(
        np.cumsum(sizes) - np.asarray(sizes), M)) if rows == 0]
    assert empty and not np.any(drhs_ekn[empty]), "an empty group's weight gradient is zero"


@pytest.mark.parametrize("args, kwargs, error, match", [
    (((M, K), (E, K, N), (E + 1,)), {}, ValueError, "one size per rhs expert"),
    (((M, K), (E, K + 1, N), (E,)), {}, ValueError, "contracting sizes differ"),
    (((M, K), (E, N, K), (E,)), {}, ValueError, "rhs_layout='enk'"),
    (((M, K), (E, K, N), (E,)), {"tile": (16, 24, 16)}, ValueError, "powers of two"),
    (((0, K), (E, K, N), (E,)), {"tile": (16, 24, 16)}, ValueError, "powers of two"),  # empty: still checked
    (((M, K), (E, K, N), (E,)), {"wgrad_tile": (16, 16, 8)}, ValueError, "wgrad_tile must be.*powers"),
    (((0, K), (E, K, N), (E,)), {"wgrad_tile": (16, 16, 8)}, ValueError, "wgrad_tile must be"),  # empty too
    (((M, K), (E, K, N), (E,)), {"rhs_layout": "kn"}, ValueError, "rhs_layout must be"),
])
def test_bad_shapes_raise_value_error_naming_the_fix(args, kwargs, error, match):
    lhs_shape, rhs_shape, sizes_shape = args
    with pytest.raises(error, match=match):
        grouped_matmul(jnp.zeros(lhs_shape), jnp.zeros(rhs_shape), jnp.zeros(sizes_shape, jnp.int32),
                       **kwargs)


@pytest.mark.parametrize("name, sizes", [GROUPINGS[0], GROUPINGS[4]], ids=["uneven", "sum_exceeds_rows"])
def test_grouped_wgrad_matches_float64_per_group_products(name, sizes):
    """out[e] = a[rows of e]ᵀ · b[rows of e], rows cut at M as lax.ragged_dot_general; empty groups 0."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((M, N)).astype(np.float32)
    got = np.asarray(grouped_wgrad(a, b, jnp.asarray(sizes, jnp.int32), tile=(32, 16, 32)))
    assert got.shape == (E, K, N) and got.dtype == np.float32
    starts = np.minimum(np.cumsum(sizes) - np.asarray(sizes), M)
    ends = np.minimum(np.cumsum(sizes), M)
    for e in range(E):
        rows = slice(starts[e], ends[e])
        want = a[rows].T.astype(np.float64) @ b[rows]
        bound = 1e-5 * np.abs(a[rows]).T.astype(np.float64) @ np.abs(b[rows])  # float32 sums of <= M
        np.testing.assert_array_less(np.abs(got[e] - want), bound + 1e-30, err_msg=f"{name} group {e}")
        if ends[e] == starts[e]:
            assert not np.any(got[e]), "a group without rows gives exact zeros"


def test_grouped_wgrad_checks_its_tile_even_without_rows():
    with pytest.raises(ValueError, match=r"tile must be \(bm, bp, bq\)"):
        grouped_wgrad(jnp.zeros((0, K)), jnp.zeros((0, N)), jnp.zeros((E,), jnp.int32), tile=(16, 16, 8))
    out = grouped_wgrad(jnp.zeros((0, K)), jnp.zeros((0, N)), jnp.zeros((E,), jnp.int32))
    assert out.shape == (E, K, N) and not np.any(np.asarray(out))


def test_bad_dtypes_raise_type_error_naming_the_fix():
    with pytest.raises(TypeError, match="astype"):
        grouped_matmul(jnp.zeros((M, K)), jnp.zeros((E, K, N)), jnp.zeros((E,), jnp.float32))
    with pytest.raises(TypeError, match="lax.ragged_dot"):
        grouped_matmul(jnp.zeros((M, K), jnp.int8), jnp.zeros((E, K, N), jnp.int8),
                       jnp.zeros((E,), jnp.int32))


@pytest.mark.parametrize("lhs_dtype, rhs_dtype, out_dtype, layout", [
    (jnp.bfloat16, jnp.bfloat16, None, "ekn"), (jnp.float8_e4m3fn, jnp.float8_e4m3fn, jnp.bfloat16, "enk"),
    (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float32, "ekn")])
def test_lowers_to_triton_for_a_gpu_without_one(lhs_dtype, rhs_dtype, out_dtype, layout):
    """The Pallas -> Triton IR step (power-of-two blocks, masked dynamic loads, scalar schedule reads,
    dynamic-trip-count loops) runs on the CPU; compiling that IR to PTX needs the GPU."""
    pytest.importorskip("jax.experimental.pallas.triton")
    rows, k, n = 1000, 200, 136  # no dim a multiple of its block: masked tails on every axis
    lhs = jax.ShapeDtypeStruct((rows, k), lhs_dtype)
    rhs = jax.ShapeDtypeStruct((8, k, n) if layout == "ekn" else (8, n, k), rhs_dtype)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)
    cot = jax.ShapeDtypeStruct((rows, n), out_dtype or jnp.bfloat16)

    def forward(x, w, g):
        return grouped_matmul(x, w, g, preferred_element_type=out_dtype, rhs_layout=layout, interpret=False)

    def forward_backward(x, w, g, dy):  # fprop, dgrad and wgrad kernels
        return jax.vjp(lambda a, b: forward(a, b, g), x, w)[1](dy)

    fn, args, kernels = ((forward, (lhs, rhs, sizes), 1) if lhs_dtype != jnp.bfloat16 else
                         (forward_backward, (lhs, rhs, sizes, cot), 3))
    hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("xla.gpu.triton") == kernels
