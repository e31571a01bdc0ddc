"""Dropless grouped GEMM forward on Hopper's TMA + WGMMA through Pallas Mosaic GPU (FP8 and 16-bit).

out[t] = scale · lhs[t] · rhs[g(t)] with rows sorted by group and zeros past sum(group_sizes):
`lax.ragged_dot`'s contract, as lowbit.kernels.grouped_pallas (Triton) but for the FP8 forward, where
Triton reaches ~0.6x of cuBLAS (docs/benchmarks.md, target 1). Here the K loop is a TMA pipeline feeding
asynchronous WGMMAs with one float32 accumulator (cuBLAS's "fast accumulation" class for FP8), and a
persistent grid of one CTA per SM walks the tiles.

Tiles: row blocks of bm rows aligned to multiples of bm (TMA boxes start on the block), one tile per
(group, block) pair that the group touches, so a block holding rows of two groups is computed twice
and each tile stores only its group's rows (a ladder of power-of-two TMA stores). Group E is the
rows [sum(g), M) and gets zeros without a K loop. Tiles: sum_e ceil-span_e <= ceil(M / bm) + E.
FP8 WGMMA needs both operands K-major, so rhs is [E, N, K] ("enk"); 16-bit operands also take [E, K, N].
Forward only (no VJP): lowbit's MoE training uses grouped_pallas; this kernel is benchmarked against it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.kernels.grouped_pallas import group_bounds

_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
_16BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Measured on an H100 (docs/benchmarks.md, fifteenth session): warp-specialized, (bm, bn) = (128, 128) per
# WGMMA warpgroup, bk = 128 bytes of K (the 128-byte TMA swizzle), 4 stages.
DEFAULT_BM_BN = (128, 128)
DEFAULT_STAGES = 4
NUM_SMS_H100 = 132
_ROW_ALIGN = 8  # Mosaic GPU's GMEM refs need row counts that are multiples of its 8-row tiling


def group_boundaries(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """int32 [E + 2]: b_0 = 0, b_{e+1} = min(cumsum(g)_e, M), b_{E+1} = M (group E: the rows to zero).

    The group ends of grouped_pallas.group_bounds (lax.ragged_dot's clipping rule), closed by M.
    """
    starts, sizes = group_bounds(group_sizes, num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), starts + sizes, jnp.full((1,), num_rows, jnp.int32)])


def _tile_of(bounds_ref, tile: jax.Array, bm: int, groups: int):
    """Tile id -> (group, row block, first row in block, rows): group e's tiles follow group e-1's.

    Group e spans blocks [b_e // bm, ceil(b_{e+1} / bm)) when non-empty; unrolled over the E + 1
    groups with selects (no early exit in a kernel). Tiles past the last are idle (rows = 0).
    """
    zero = jnp.int32(0)
    group, block, lo, rows, first_tile = zero, zero, zero, zero, zero
    for e in range(groups + 1):
        start, end = bounds_ref[e], bounds_ref[e + 1]
        first_block = lax.div(start, jnp.int32(bm))
        span = jnp.where(end > start, lax.div(end + (bm - 1), jnp.int32(bm)) - first_block, zero)
        here = (tile >= first_tile) & (tile < first_tile + span)
        b = first_block + (tile - first_tile)
        row0 = jnp.maximum(start, b * bm)
        group = jnp.where(here, jnp.int32(e), group)
        block = jnp.where(here, b, block)
        lo = jnp.where(here, row0 - b * bm, lo)
        rows = jnp.where(here, jnp.minimum(end, b * bm + bm) - row0, rows)
        first_tile = first_tile + span
    return group, block, lo, rows


def _tile_order(lin: jax.Array, num_row_tiles: int, n_blocks: int, band: int | None):
    """Loop step -> (row tile, N block): bands of `band` N blocks, each swept over every row tile.

    band = n_blocks (None) puts the N blocks innermost: a row tile's lhs is read once, and rhs[e] once per
    row tiles in flight. A narrower band keeps its rhs[e] columns in L2 across the expert's row tiles and
    re-reads lhs n_blocks / band times. `band` must divide n_blocks.
    """
    band = n_blocks if band is None else band
    per_band = band * num_row_tiles
    first_n = lax.div(lin, jnp.int32(per_band)) * band
    within = lax.rem(lin, jnp.int32(per_band))
    return lax.div(within, jnp.int32(band)), first_n + lax.rem(within, jnp.int32(band))


def _kernel(bounds_ref, scale_ref, lhs_ref, rhs_ref, out_ref, *, groups: int, tile: tuple[int, int, int],
            stages: int, rhs_k_major: bool, num_row_tiles: int, band: int | None):
    """Persistent loop over (row tile, N block); K loop = emit_pipeline of TMA loads + WGMMA."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bm, bn, bk = tile
    k = lhs_ref.shape[1]
    n = out_ref.shape[1]
    n_blocks = n // bn

    @plgpu.nd_loop((num_row_tiles * n_blocks,), collective_axes="sm")
    def _tile_loop(info):
        (lin,) = info.index
        t, ni = _tile_order(lin, num_row_tiles, n_blocks, band)
        group, block, lo, rows = _tile_of(bounds_ref, t, bm, groups)

        def acc_scope(acc_ref):
            @pl.when((group < groups) & (rows > 0))
            def _k_loop():
                def step(_, lhs_smem, rhs_smem):
                    b = plgpu.transpose_ref(rhs_smem, (1, 0)) if rhs_k_major else rhs_smem
                    plgpu.wgmma(acc_ref, lhs_smem, b)

                rhs_spec = (plgpu.BlockSpec((bn, bk), lambda kk: (ni, kk), delay_release=1) if rhs_k_major
                            else plgpu.BlockSpec((bk, bn), lambda kk: (kk, ni), delay_release=1))
                plgpu.emit_pipeline(
                    step, grid=(k // bk,),
                    in_specs=[plgpu.BlockSpec((bm, bk), lambda kk: (block, kk), delay_release=1), rhs_spec],
                    max_concurrent_steps=stages,
                )(lhs_ref, rhs_ref.at[jnp.minimum(group, groups - 1)])

            return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32))
        if scale_ref is not None:
            acc = acc * jnp.where(group < groups, scale_ref[0], 1.0)  # zero rows stay 0 under a NaN scale

        @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), out_ref.dtype))
        def _store(out_smem):
            out_smem[...] = acc.astype(out_smem.dtype)
            plgpu.commit_smem()
            _store_rows(out_smem, out_ref, block * bm, lo, rows, pl.ds(ni * bn, bn))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _store_rows(smem, out_ref, block_row0, lo: jax.Array, rows: jax.Array, cols) -> None:
    """TMA-store smem rows [lo, lo + rows) to out rows block_row0 + the same, as powers of two (TMA boxes
    have static shapes: one conditional store per binary digit of `rows`)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    offset, size = lo, min(smem.shape[0], out_ref.shape[0])  # rows <= the block's bm and <= M
    while size > 0:
        chunk = 1 << int(math.log2(size))
        size //= 2

        @pl.when((rows & chunk) != 0)
        def _copy(offset=offset, chunk=chunk):
            plgpu.copy_smem_to_gmem(smem.at[pl.ds(offset, chunk)],
                                    out_ref.at[pl.ds(block_row0 + offset, chunk), cols])

        offset = offset + (rows & chunk)


def _kernel_ws(bounds_ref, scale_ref, lhs_ref, rhs_ref, out_ref, *, groups: int, tile: tuple[int, int, int],
               stages: int, rhs_k_major: bool, num_row_tiles: int, band: int | None, epi_n: int):
    """Warp-specialized: one TMA warpgroup feeds two WGMMA warpgroups, each bm x bn of a bm x 2bn CTA tile.

    The memory warpgroup runs ahead into the next tile while the compute warpgroups store (the persistent
    schedule of CUTLASS's Hopper GEMMs); the store goes through SMEM in bm x epi_n column chunks.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bm, bn, bk = tile
    k = lhs_ref.shape[1]
    n = out_ref.shape[1]
    n_blocks = n // (2 * bn)
    itemsize = jnp.dtype(lhs_ref.dtype).itemsize
    swizzle = plgpu.find_swizzle(bk * itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

    def pipeline(body, context, block=0, ni=0):  # TMA boxes: lhs rows of `block`, rhs rows/cols of `ni`
        lhs_spec = plgpu.BlockSpec((bm, bk), lambda kk: (block, kk), transforms=transforms,
                                   memory_space=plgpu.SMEM)
        rhs_spec = (plgpu.BlockSpec((2 * bn, bk), lambda kk: (ni, kk), transforms=transforms,
                                    memory_space=plgpu.SMEM) if rhs_k_major else
                    plgpu.BlockSpec((bk, 2 * bn), lambda kk: (kk, ni), transforms=transforms,
                                    memory_space=plgpu.SMEM))
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // bk,), memory_registers=40, in_specs=[lhs_spec, rhs_spec], wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=stages, compute_context=context)

    ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the bodies

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(lhs_ref, rhs_ref),
                       out_smem=plgpu.SMEM((2, bm, epi_n), out_ref.dtype), collective_axes="wg")
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_row_tiles * n_blocks,), collective_axes="sm")
        def _tile_loop(info):
            (lin,) = info.index
            t, ni = _tile_order(lin, num_row_tiles, n_blocks, band)
            group, block, lo, rows = _tile_of(bounds_ref, t, bm, groups)
            col0 = ni * (2 * bn) + wg * bn

            def store(acc, scaled=True):  # compute warpgroups only: this warpgroup's bm x bn f32 block
                if scale_ref is not None and scaled:
                    acc = acc * scale_ref[0]
                acc = acc.astype(out_ref.dtype)
                for c in range(bn // epi_n):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = acc[:, c * epi_n:(c + 1) * epi_n]
                    plgpu.commit_smem()
                    cols = pl.ds(col0 + c * epi_n, epi_n)
                    _store_rows(out_smem.at[wg], out_ref, block * bm, lo, rows, cols)

            def context(run):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    store(acc_ref[...])

            def mma(_, lhs_smem, rhs_smem, acc_ref):
                cols = pl.ds(wg * bn, bn)
                b = plgpu.transpose_ref(rhs_smem.at[cols, :], (1, 0)) if rhs_k_major else rhs_smem.at[:, cols]
                plgpu.wgmma(acc_ref, lhs_smem, b)
                plgpu.wgmma_wait(0)
                return acc_ref

            @pl.when((group < groups) & (rows > 0))
            def _k_loop():
                pipeline(mma, context, block, ni)(lhs_ref, rhs_ref.at[jnp.minimum(group, groups - 1)],
                                                  allocations=allocs)

            @pl.when((group == groups) & (rows > 0) & (wg < 2))
            def _zeros():
                store(jnp.zeros((bm, bn), jnp.float32), scaled=False)  # exact zeros, even for a NaN scale

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _interpret_params() -> Any:
    """Pallas's GPU interpreter (simulated SMEM, TMA and barriers on the CPU); jax-private, so tests only."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:  # jax without the GPU interpreter
        raise NotImplementedError("this jax has no Mosaic GPU interpret mode; run on a Hopper GPU") from err
    # TMA zero-fills reads past the array's end (the last row block); the interpreter would raise. Those
    # rows are never stored, so any fill gives the same output.
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


def grouped_matmul_mosaic(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                          rhs_layout: str = "enk", preferred_element_type: Any = None,
                          scale: jax.Array | float | None = None, tile: tuple[int, int, int] | None = None,
                          stages: int = DEFAULT_STAGES, warp_specialized: bool = True,
                          epi_n: int | None = None, band: int | None = None,
                          num_sms: int | None = None, interpret: bool = False) -> jax.Array:
    """Grouped GEMM out[t] = scale · lhs[t] · rhs[g(t)] (forward only) as one persistent Mosaic GPU kernel.

    lhs [M, K] rows sorted by group; rhs [E, N, K] (rhs_layout "enk"; FP8 needs it) or [E, K, N] ("ekn",
    16-bit only); group_sizes int[E] (rows past sum(g) are zeros, a sum over M drops the rows past M, as
    lax.ragged_dot). Operands share one dtype: float8_e4m3fn, float8_e5m2, bfloat16 or float16. Float32
    accumulation, times the float32 `scale` (per-tensor FP8 scales) before the cast to
    preferred_element_type (default bfloat16 for FP8, else the operand dtype). tile (bm, bn, bk), default
    (128, 128, 128 bytes of K): K % bk == 0 and N % bn == 0; M % 8 != 0 costs a padded copy of lhs and a
    sliced copy of out.
    warp_specialized: a TMA warpgroup and two WGMMA warpgroups of bm x bn each (CTA tile bm x 2bn,
    N % 2bn == 0), stored in bm x epi_n chunks (default: 128 bytes of output per row, which keeps a float32
    output inside the shared memory at 4 stages); else one warpgroup does both. band: N blocks (of bn, or
    2bn warp-specialized) swept together over all row tiles (None: all of them; see _tile_order).
    interpret=True runs Pallas's Mosaic GPU interpreter (CPU tests).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    if rhs_layout not in ("enk", "ekn"):
        raise ValueError(f"rhs_layout must be 'enk' (rhs [E, N, K]) or 'ekn' (rhs [E, K, N]), "
                         f"got {rhs_layout!r}")
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"expected lhs [M, K], rhs [E, N, K] or [E, K, N], group_sizes [E]; got lhs "
                         f"{lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if lhs.dtype != rhs.dtype or lhs.dtype not in _FP8 + _16BIT:
        raise TypeError(f"grouped_matmul_mosaic takes lhs and rhs of one dtype among float8_e4m3fn, "
                        f"float8_e5m2, bfloat16, float16; got {lhs.dtype} and {rhs.dtype} (cast them first)")
    if lhs.dtype in _FP8 and rhs_layout != "enk":
        raise ValueError("FP8 WGMMA reads both operands K-major: pass rhs as [E, N, K] with rhs_layout='enk'")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be integers, got {group_sizes.dtype}")
    groups = rhs.shape[0]
    m, k = lhs.shape
    n, k2 = (rhs.shape[1], rhs.shape[2]) if rhs_layout == "enk" else (rhs.shape[2], rhs.shape[1])
    if k != k2:
        raise ValueError(f"contracting dims differ: lhs K = {k}, rhs K = {k2}")
    bm, bn, bk = tile if tile is not None else (*DEFAULT_BM_BN, 128 // lhs.dtype.itemsize)
    n_tile = 2 * bn if warp_specialized else bn
    if k % bk or n % n_tile:
        raise ValueError(f"K = {k} and N = {n} must be multiples of bk = {bk} and {n_tile} (bn = {bn}"
                         f"{', twice for the two warpgroups' if warp_specialized else ''}): pad them or pick "
                         "a tile that divides them")
    if preferred_element_type is None:
        out_dtype = jnp.dtype(jnp.bfloat16) if lhs.dtype in _FP8 else lhs.dtype
    else:
        out_dtype = jnp.dtype(preferred_element_type)
    epi_n = min(bn, 128 // out_dtype.itemsize) if epi_n is None else epi_n
    if warp_specialized and bn % epi_n:
        raise ValueError(f"epi_n = {epi_n} must divide bn = {bn}")
    if band is not None and (band < 1 or (n // n_tile) % band):
        raise ValueError(f"band = {band} must divide the {n // n_tile} N blocks of {n_tile} columns")
    if m % _ROW_ALIGN:  # Mosaic GPU tiles GMEM rows by 8: pad lhs (zeros, never stored) and slice the result
        pad = _ROW_ALIGN - m % _ROW_ALIGN
        out = grouped_matmul_mosaic(
            jnp.pad(lhs, ((0, pad), (0, 0))), rhs, group_sizes, rhs_layout=rhs_layout,
            preferred_element_type=out_dtype, scale=scale, tile=tile, stages=stages,
            warp_specialized=warp_specialized, epi_n=epi_n, band=band, num_sms=num_sms, interpret=interpret)
        return out[:m]
    scale_arr = None if scale is None else jnp.asarray(scale, jnp.float32).reshape(1)
    num_row_tiles = -(-m // bm) + groups  # see the module docstring: sum_e span_e <= ceil(M/bm) + E
    if num_sms is None:
        num_sms = jax.devices()[0].core_count if jax.default_backend() == "gpu" else NUM_SMS_H100
    kernel, extra = (_kernel_ws, {"epi_n": epi_n}) if warp_specialized else (_kernel, {})
    body = functools.partial(kernel, groups=groups, tile=(bm, bn, bk), stages=stages,
                             rhs_k_major=rhs_layout == "enk", num_row_tiles=num_row_tiles, band=band, **extra)
    if scale_arr is None:
        body_fn = lambda b, x, w, o: body(b, None, x, w, o)  # noqa: E731
        operands = (group_boundaries(group_sizes, m), lhs, rhs)
    else:
        body_fn, operands = body, (group_boundaries(group_sizes, m), scale_arr, lhs, rhs)
    call = plgpu.kernel(
        body_fn, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(num_sms,), grid_names=("sm",),
        **({"num_threads": 3, "thread_name": "wg"} if warp_specialized else {}),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": _interpret_params()} if interpret else {}))
    return call(*operands)


__all__ = ["DEFAULT_BM_BN", "DEFAULT_STAGES", "group_boundaries", "grouped_matmul_mosaic"]
