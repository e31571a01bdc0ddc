"""Dropless grouped GEMM (MoE) as one Pallas kernel launch over expert-sorted rows: GPU megablox `gmm`.

out[t] = lhs[t] · rhs[g(t)] with rows sorted by group, zeros past sum(group_sizes): `lax.ragged_dot`'s
contract. XLA's ragged_dot does E times the useful FLOPs; lowbit.grouped loops over experts in XLA.
Here one launch covers everything: a tile schedule built from group_sizes (jnp, under jit) gives
each row tile one expert, and no tile straddles two groups, so the math has no cross-group masks.

Tile schedule (static length ceil(M / bm) + E, an upper bound: sum_e ceil(g_e / bm) <= M / bm + E):
  1. real tiles: group e gets ceil(g_e / bm) tiles of bm rows starting at its first row (g_e: its
     rows within [0, M), see group_bounds); its last tile may hold fewer valid rows (the rest of
     the tile is masked on load and store);
  2. zero tiles: rows [sum(g), M) in bm steps are written as zeros (no K loop). They always fit in
     the spare slots, since ceil(M/bm) + E - sum_e ceil(g_e/bm) >= (M - sum(g) + E) / bm;
  3. idle tiles: zero valid rows, nothing loaded or stored.
So every output row is stored exactly once and the output needs no memset.

The kernel (1-D grid over tiles x N blocks, grouped ordering for L2 reuse as in Triton's matmul
tutorial) loads its bm rows of lhs (masked), loops over K in bk steps loading rhs[expert, k:k+bk,
n:n+bn] from the whole rhs array by dynamic index, accumulates Triton dots in float32, stores with
the row mask. Backward (jax.custom_vjp): dgrad dX = dY · rhs[g]ᵀ is the same kernel contracting
rhs's other dim (no transpose copy); wgrad dW[e] = X_eᵀ · dY_e is a second Pallas kernel over
(expert, K block, N block) that loops over the expert's rows in bm steps (float32 accumulation).

Runs compiled through the Triton backend on a GPU and in Pallas interpret mode elsewhere. FP8 dots keep
f32 promotion every 128 K (lowbit.kernels.triton_fp8_acc; jax's own default: after every WGMMA).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

RHS_LAYOUTS = ("ekn", "enk")  # rhs [E, K, N] (ragged_dot's) | [E, N, K] (contracting dim last)
# Launch settings tuned on an H100 (tools/grouped_tiles.py, docs/benchmarks.md): (bm, bk, bn), warps,
# stages. fprop and dgrad run one kernel; wgrad's tile is (bm rows a step, bp, bq) of dW's blocks.
DEFAULT_TILE, DEFAULT_WARPS, DEFAULT_STAGES = (128, 64, 256), 8, 3
WGRAD_TILE, WGRAD_WARPS, WGRAD_STAGES = (64, 128, 256), 8, 3
DEFAULT_GROUP_M = 8  # row tiles per L2 group of the launch order
_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), *_FP8)
_MIN_TILE = 16  # Triton's dot needs every block dim >= 16 (and powers of two for loads)


class _Plan(NamedTuple):
    """Static settings of one grouped GEMM (hashable: a nondiff argument of the custom VJP)."""

    contract: int  # rhs dim contracted with lhs dim 1: 1 for rhs [E, K, N], 2 for rhs [E, N, K]
    tile: tuple[int, int, int]  # (bm, bk, bn)
    out_dtype: Any
    interpret: bool
    group_m: int
    num_warps: int | None
    num_stages: int | None
    wgrad: tuple[tuple[int, int, int], int | None, int | None] | None  # backward's; None: no backward


class _Schedule(NamedTuple):
    """Per row tile (int32 [num_tiles] each): which expert, first row, valid rows, K steps to run."""

    expert: jax.Array
    first_row: jax.Array
    rows: jax.Array
    k_steps: jax.Array


# ----------------------------------------------------------------------------- schedule (XLA)
def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(first row, size) per group: group e owns rows [c_e - g_e, c_e) ∩ [0, num_rows), c = cumsum(g).

    Clipping start and end separately keeps each group's own first row when sum(g) > num_rows
    (lax.ragged_dot's rule: rows past the end are dropped, earlier groups keep theirs).
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    cumulative = jnp.cumsum(sizes)
    starts = jnp.minimum(cumulative - sizes, num_rows)
    ends = jnp.minimum(cumulative, num_rows)
    return starts, ends - starts


def tile_schedule(group_sizes: jax.Array, num_rows: int, bm: int, k_steps: int) -> _Schedule:
    """Row tiles of ≤ bm rows inside one group each, then zero tiles over the unassigned rows.

    Length ceil(num_rows / bm) + E (static); see the module docstring for why it always suffices.
    """
    experts = group_sizes.shape[0]
    num_tiles = -(-num_rows // bm) + experts
    starts, sizes = group_bounds(group_sizes, num_rows)
    tiles_per_group = (sizes + bm - 1) // bm
    tile_ends = jnp.cumsum(tiles_per_group)
    real_tiles = tile_ends[-1]
    assigned_rows = starts[-1] + sizes[-1]
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(tile_ends, t, side="right"), 0, experts - 1).astype(jnp.int32)
    local = t - (tile_ends[group] - tiles_per_group[group])
    is_real = t < real_tiles
    zero_first = assigned_rows + (t - real_tiles) * bm
    first_row = jnp.where(is_real, starts[group] + local * bm, zero_first)
    rows = jnp.where(is_real, sizes[group] - local * bm, num_rows - zero_first)
    return _Schedule(
        expert=jnp.where(is_real, group, 0),
        first_row=jnp.clip(first_row, 0, num_rows - 1),  # idle tiles: keep the base in range
        rows=jnp.clip(rows, 0, bm),
        k_steps=jnp.where(is_real, k_steps, 0).astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- kernels
def _compute_dtype(a: Any, b: Any) -> Any:
    """One operand dtype for the in-kernel dot (Triton's dot takes equal types); exact widening."""
    a, b = jnp.dtype(a), jnp.dtype(b)
    if a == b:
        return a
    wide = [d for d in (a, b) if d not in _FP8]
    if not wide:  # e4m3 x e5m2: both exact in bfloat16
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(functools.reduce(jnp.promote_types, wide))


def _grouped_launch_order(pid: jax.Array, num_tiles: int, n_blocks: int, group_m: int):
    """Program id -> (row tile, N block), group_m row tiles sweep all N blocks together (L2 reuse).

    Triton's matmul tutorial ordering; lax.div/rem (non-negative) instead of // which Triton rejects.
    """
    per_group = group_m * n_blocks
    first_tile = lax.div(pid, per_group) * group_m
    tiles_here = jnp.minimum(num_tiles - first_tile, group_m)
    within = lax.rem(pid, per_group)
    return first_tile + lax.rem(within, tiles_here), lax.div(within, tiles_here)


def _mask(*parts):
    """AND of the non-None 2-D masks (None if all are None: an unmasked load)."""
    parts = [p for p in parts if p is not None]
    return functools.reduce(jnp.logical_and, parts) if parts else None


def _dot(a, b, **transpose):
    """Triton-backend dot (jax.experimental.pallas.triton.dot; pl.dot is its deprecated alias)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.dot(a, b, **transpose)


def _load(ref, mask, dtype):
    """ref[...] as dtype; masked-off elements read as a zero of ref's own type (FP8 Triton lowering)."""
    from jax.experimental.pallas import triton as plgpu

    if mask is None:
        return ref[...].astype(dtype)
    return plgpu.load(ref, mask=mask, other=jnp.zeros((), ref.dtype)).astype(dtype)


def _gmm_kernel(expert_ref, first_row_ref, rows_ref, k_steps_ref, lhs_ref, rhs_ref, out_ref, *,
                plan: _Plan, num_tiles: int, k_size: int, n_size: int, compute_dtype: Any):
    """out[rows of tile, n block] = lhs[rows, :] · rhs[expert] (tile rows masked), f32 accumulation."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bm, bk, bn = plan.tile
    n_blocks = -(-n_size // bn)
    tile, n_block = _grouped_launch_order(pl.program_id(0), num_tiles, n_blocks, plan.group_m)
    expert, first_row = expert_ref[tile], first_row_ref[tile]
    row_ok = (jnp.arange(bm) < rows_ref[tile])[:, None]
    n0 = n_block * bn
    col_ok = (n0 + jnp.arange(bn) < n_size)[None, :] if n_size % bn else None

    def k_step(step, acc):
        k0 = step * bk
        k_ok = (k0 + jnp.arange(bk) < k_size) if k_size % bk else None
        x = _load(lhs_ref.at[pl.ds(first_row, bm), pl.ds(k0, bk)],
                  _mask(row_ok, None if k_ok is None else k_ok[None, :]), compute_dtype)
        if plan.contract == 1:  # rhs [E, K, N]
            w = _load(rhs_ref.at[expert, pl.ds(k0, bk), pl.ds(n0, bn)],
                      _mask(None if k_ok is None else k_ok[:, None], col_ok), compute_dtype)
            return acc + _dot(x, w)
        w = _load(rhs_ref.at[expert, pl.ds(n0, bn), pl.ds(k0, bk)],  # rhs [E, N, K]
                  _mask(None if col_ok is None else col_ok.T, None if k_ok is None else k_ok[None, :]),
                  compute_dtype)
        return acc + _dot(x, w, trans_b=True)

    acc = lax.fori_loop(0, k_steps_ref[tile], k_step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(first_row, bm), pl.ds(n0, bn)], acc.astype(out_ref.dtype),
                mask=_mask(row_ok, col_ok))


def _wgrad_kernel(start_ref, size_ref, a_ref, b_ref, out_ref, *, plan: _Plan, p_size: int,
                  q_size: int, compute_dtype: Any):
    """out[e, p block, q block] = Σ_{rows t of group e} a[t, p block]ᵀ b[t, q block], bm rows a step."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bm, bp, bq = plan.tile
    p_blocks, q_blocks = -(-p_size // bp), -(-q_size // bq)
    pid = pl.program_id(0)
    expert = lax.div(pid, p_blocks * q_blocks)
    p_block = lax.div(lax.rem(pid, p_blocks * q_blocks), q_blocks)
    q_block = lax.rem(pid, q_blocks)
    start, size = start_ref[expert], size_ref[expert]
    p0, q0 = p_block * bp, q_block * bq
    p_ok = (p0 + jnp.arange(bp) < p_size) if p_size % bp else None
    q_ok = (q0 + jnp.arange(bq) < q_size) if q_size % bq else None

    def row_step(step, acc):
        row_ok = (jnp.arange(bm) < size - step * bm)[:, None]  # the group's last step is partial
        rows = pl.ds(start + step * bm, bm)
        a = _load(a_ref.at[rows, pl.ds(p0, bp)], _mask(row_ok, None if p_ok is None else p_ok[None, :]),
                  compute_dtype)
        b = _load(b_ref.at[rows, pl.ds(q0, bq)], _mask(row_ok, None if q_ok is None else q_ok[None, :]),
                  compute_dtype)
        return acc + _dot(a, b, trans_a=True)

    steps = lax.div(size + bm - 1, bm)
    acc = lax.fori_loop(0, steps, row_step, jnp.zeros((bp, bq), jnp.float32))
    plgpu.store(out_ref.at[expert, pl.ds(p0, bp), pl.ds(q0, bq)], acc.astype(out_ref.dtype),
                mask=_mask(None if p_ok is None else p_ok[:, None], None if q_ok is None else q_ok[None, :]))


def _compiler_params(plan: _Plan):
    """Triton launch settings (warps, pipeline stages); none in interpret mode."""
    if plan.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    from lowbit.kernels import triton_fp8_acc

    triton_fp8_acc.ensure_env_setting()  # $LOWBIT_FP8_MAX_IMPRECISE_ACC or 128; acts when the jit lowers

    return plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


# ----------------------------------------------------------------------------- pallas calls
def _grouped_product(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, plan: _Plan) -> jax.Array:
    """out[t] = lhs[t] · rhs[g(t)] contracting lhs dim 1 with rhs dim plan.contract; 0 past the groups."""
    from jax.experimental import pallas as pl

    num_rows, k_size = lhs.shape
    n_size = rhs.shape[3 - plan.contract]
    bm, bk, bn = plan.tile
    schedule = tile_schedule(group_sizes, num_rows, bm, -(-k_size // bk))
    num_tiles = schedule.expert.shape[0]
    kernel = functools.partial(_gmm_kernel, plan=plan, num_tiles=num_tiles, k_size=k_size, n_size=n_size,
                               compute_dtype=_compute_dtype(lhs.dtype, rhs.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_size), plan.out_dtype),
        grid=(num_tiles * -(-n_size // bn),),
        interpret=plan.interpret,
        compiler_params=_compiler_params(plan),
        name="lowbit_grouped_matmul",
    )(*schedule, lhs, rhs)


def _grouped_wgrad(a: jax.Array, b: jax.Array, group_sizes: jax.Array, plan: _Plan,
                   out_dtype: Any) -> jax.Array:
    """out[e] = a[rows of e]ᵀ · b[rows of e]: [E, P, Q] from a [M, P], b [M, Q]; zeros for empty groups."""
    from jax.experimental import pallas as pl

    p_size, q_size = a.shape[1], b.shape[1]
    bm, bp, bq = plan.tile
    experts = group_sizes.shape[0]
    starts, sizes = group_bounds(group_sizes, a.shape[0])
    kernel = functools.partial(_wgrad_kernel, plan=plan, p_size=p_size, q_size=q_size,
                               compute_dtype=_compute_dtype(a.dtype, b.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((experts, p_size, q_size), out_dtype),
        grid=(experts * -(-p_size // bp) * -(-q_size // bq),),
        interpret=plan.interpret,
        compiler_params=_compiler_params(plan),
        name="lowbit_grouped_wgrad",
    )(starts, sizes, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, plan: _Plan) -> jax.Array:
    return _grouped_product(lhs, rhs, group_sizes, plan)


def _grouped_fwd(lhs, rhs, group_sizes, plan: _Plan):
    return _grouped_product(lhs, rhs, group_sizes, plan), (lhs, rhs, group_sizes)


def _grouped_bwd(plan: _Plan, residuals, dout):
    lhs, rhs, group_sizes = residuals
    # dgrad dX[t] = dY[t] · rhs[g(t)]ᵀ: the same kernel contracting rhs's free dim (no transpose copy).
    dgrad_plan = plan._replace(contract=3 - plan.contract, out_dtype=lhs.dtype)
    dlhs = _grouped_product(dout, rhs, group_sizes, dgrad_plan)
    # wgrad dW[e] = X_eᵀ dY_e ([E, K, N]) or dY_eᵀ X_e ([E, N, K]).
    a, b = (lhs, dout) if plan.contract == 1 else (dout, lhs)
    wgrad_tile, wgrad_warps, wgrad_stages = plan.wgrad
    wgrad_plan = plan._replace(tile=wgrad_tile, num_warps=wgrad_warps, num_stages=wgrad_stages)
    drhs = _grouped_wgrad(a, b, group_sizes, wgrad_plan, rhs.dtype)
    return dlhs, drhs, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


# ----------------------------------------------------------------------------- public
def _check_tile(tile: Any, name: str = "tile", dims_named: str = "(bm, bk, bn)") -> tuple[int, int, int]:
    try:
        dims = tuple(int(d) for d in tile)
    except TypeError:
        dims = ()
    if len(dims) != 3 or any(d < _MIN_TILE or d & (d - 1) for d in dims):
        raise ValueError(f"{name} must be {dims_named}, powers of two >= {_MIN_TILE} (Triton's block and dot "
                         f"limits), got {tile!r}; e.g. {name}=(128, 64, 128)")
    return dims  # type: ignore[return-value]


def _default_tile(num_rows: int, k_size: int, n_size: int,
                  tuned: tuple[int, int, int] = DEFAULT_TILE) -> tuple[int, int, int]:
    """A tuned tile shrunk to the next power of two of each dim (>= 16) for small problems."""
    def fit(limit: int, size: int) -> int:
        return max(_MIN_TILE, min(limit, 1 << max(size - 1, 0).bit_length()))
    return fit(tuned[0], num_rows), fit(tuned[1], k_size), fit(tuned[2], n_size)


def _check_operands(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, contract: int) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"grouped_matmul expects lhs [M, K], rhs [E, K, N] (or [E, N, K] with "
                         f"rhs_layout='enk') and group_sizes [E] (one size per rhs expert); got lhs "
                         f"{lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[contract]:
        hint = "rhs_layout='enk'" if contract == 1 else "rhs_layout='ekn'"
        raise ValueError(f"contracting sizes differ: lhs {lhs.shape} has K={lhs.shape[1]} but rhs "
                         f"{rhs.shape} has {rhs.shape[contract]} on dim {contract}; transpose rhs or pass "
                         f"{hint} if its other dim is K")
    _check_dtypes(lhs, rhs, group_sizes)


def _check_dtypes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be integers (rows per expert), got {group_sizes.dtype}; "
                        "pass group_sizes.astype(jnp.int32)")
    for name, arr in (("lhs", lhs), ("rhs", rhs)):
        if arr.dtype not in _FLOATS:
            raise TypeError(f"grouped_matmul takes float32, bfloat16, float16 or FP8 (e4m3fn/e5m2) "
                            f"operands, got {name} {arr.dtype}; cast it, or use lax.ragged_dot for "
                            "integer GEMMs")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type: Any = None, tile: tuple[int, int, int] | None = None,
                   rhs_layout: str = "ekn", interpret: bool | None = None,
                   group_m: int = DEFAULT_GROUP_M, num_warps: int | None = DEFAULT_WARPS,
                   num_stages: int | None = DEFAULT_STAGES, wgrad_tile: tuple[int, int, int] | None = None,
                   wgrad_warps: int | None = WGRAD_WARPS, wgrad_stages: int | None = WGRAD_STAGES,
                   ) -> jax.Array:
    """Dropless grouped GEMM out[t] = lhs[t] · rhs[g(t)] in one Pallas launch, equal to `lax.ragged_dot`.

    lhs [M, K] with rows sorted by group; rhs [E, K, N] (or [E, N, K] with rhs_layout="enk");
    group_sizes int[E]: rows past sum(group_sizes) give zeros; a sum over M drops the rows past M
    (group e owns rows [c_e - g_e, c_e) ∩ [0, M), c = cumsum), as lax.ragged_dot. Output dtype as
    lax.ragged_dot's (or preferred_element_type), accumulated in float32; FP8 e4m3fn/e5m2 supported.
    tile=(bm, bk, bn): powers of two >= 16 (default DEFAULT_TILE, shrunk for small shapes), also used
    by dgrad (bk over N, bn over K), with num_warps/num_stages; wgrad_tile=(bm rows a step, bp, bq: the
    dW [E, P, Q] block; P = K, Q = N for "ekn", P = N, Q = K for "enk") defaults to WGRAD_TILE, shrunk
    likewise, with wgrad_warps/wgrad_stages.
    interpret=None: compiled (Triton) on a GPU backend, Pallas interpret mode elsewhere.
    Differentiable in lhs and rhs (custom VJP: dgrad by this kernel, wgrad by a Pallas kernel).
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    if rhs_layout not in RHS_LAYOUTS:
        raise ValueError(f"rhs_layout must be 'ekn' (rhs [E, K, N]) or 'enk' (rhs [E, N, K]), "
                         f"got {rhs_layout!r}")
    contract = 1 if rhs_layout == "ekn" else 2
    _check_operands(lhs, rhs, group_sizes, contract)
    rhs_ekn = jax.ShapeDtypeStruct((rhs.shape[0], lhs.shape[1], rhs.shape[3 - contract]), rhs.dtype)
    ragged_dot = functools.partial(lax.ragged_dot, preferred_element_type=preferred_element_type)
    out_dtype = jax.eval_shape(ragged_dot, lhs, rhs_ekn, group_sizes).dtype  # ragged_dot's dtype rule
    num_rows, k_size, n_size = lhs.shape[0], lhs.shape[1], rhs_ekn.shape[2]
    if group_m < 1:
        raise ValueError(f"group_m must be a positive number of row tiles, got {group_m}")
    tile = _default_tile(num_rows, k_size, n_size) if tile is None else _check_tile(tile)
    p_size, q_size = (k_size, n_size) if contract == 1 else (n_size, k_size)  # dW = [E, P, Q]
    wgrad_tile = (_default_tile(num_rows, p_size, q_size, WGRAD_TILE) if wgrad_tile is None
                  else _check_tile(wgrad_tile, "wgrad_tile", "(bm, bp, bq)"))
    if 0 in (num_rows, k_size, n_size):  # nothing to launch: empty output or a sum over nothing
        return jnp.zeros((num_rows, n_size), out_dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    plan = _Plan(contract, tile, jnp.dtype(out_dtype), bool(interpret), int(group_m), num_warps, num_stages,
                 (wgrad_tile, wgrad_warps, wgrad_stages))
    return _grouped(lhs, rhs, group_sizes, plan)


def grouped_wgrad(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                  preferred_element_type: Any = None, tile: tuple[int, int, int] | None = None,
                  interpret: bool | None = None, num_warps: int | None = WGRAD_WARPS,
                  num_stages: int | None = WGRAD_STAGES) -> jax.Array:
    """Per-group transposed product out[e] = lhs[rows of e]ᵀ · rhs[rows of e] (the wgrad GEMM) in one launch.

    lhs [M, P], rhs [M, Q], group_sizes int[E] -> [E, P, Q]: `lax.ragged_dot_general` with lhs
    ragged dim 0 contracted (group e owns rows [c_e - g_e, c_e) ∩ [0, M), c = cumsum; empty groups
    give zeros). The kernel grouped_matmul's backward pass uses, accumulated in float32; operands
    float32, bfloat16, float16 or FP8. tile=(bm, bp, bq): bm rows a step, out blocks bp x bq
    (default WGRAD_TILE, shrunk for small shapes).
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    if lhs.ndim != 2 or rhs.ndim != 2 or group_sizes.ndim != 1 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"grouped_wgrad expects lhs [M, P] and rhs [M, Q] with the same rows M and "
                         f"group_sizes [E]; got lhs {lhs.shape}, rhs {rhs.shape}, group_sizes "
                         f"{group_sizes.shape}")
    _check_dtypes(lhs, rhs, group_sizes)
    dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                         lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    ragged = functools.partial(lax.ragged_dot_general, ragged_dot_dimension_numbers=dims,
                               preferred_element_type=preferred_element_type)
    out_dtype = jax.eval_shape(ragged, lhs, rhs, group_sizes).dtype  # ragged_dot_general's dtype rule
    num_rows, p_size, q_size = lhs.shape[0], lhs.shape[1], rhs.shape[1]
    tile = (_default_tile(num_rows, p_size, q_size, WGRAD_TILE) if tile is None
            else _check_tile(tile, "tile", "(bm, bp, bq)"))
    if 0 in (num_rows, p_size, q_size):  # no rows: every group's sum is empty
        return jnp.zeros((group_sizes.shape[0], p_size, q_size), out_dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    plan = _Plan(1, tile, jnp.dtype(out_dtype), bool(interpret), DEFAULT_GROUP_M, num_warps, num_stages,
                 None)
    return _grouped_wgrad(lhs, rhs, group_sizes, plan, plan.out_dtype)


__all__ = ["DEFAULT_TILE", "RHS_LAYOUTS", "WGRAD_TILE", "group_bounds", "grouped_matmul", "grouped_wgrad",
           "tile_schedule"]
