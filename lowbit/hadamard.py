"""Block Walsh-Hadamard transforms and the random Hadamard transform (RHT) on one axis of an array.

H_b = Sylvester Walsh-Hadamard matrix of size b (entries +-1, H_2b = [[H_b, H_b], [H_b, -H_b]]) / sqrt(b),
symmetric and orthonormal. The RHT multiplies every block of b consecutive elements along an axis by
diag(s) H_b (row-vector form y = x diag(s) H_b; Tseng et al., arXiv 2502.20586; NVIDIA's NVFP4
recipe, arXiv 2509.25149, with b = 16 on the wgrad operands). With Q = I_{K/b} (x) diag(s) H_b along
a GEMM's contraction axis k, (A Q)(Q^T B) = A B: transform both operands along k with the SAME
signs (the same `key`, or the same `signs` vector) and the product is unchanged in real arithmetic.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METHODS = ("auto", "fwht", "matmul")
MATRIX_SIZES = tuple(2**k for k in range(1, 9))  # sizes hadamard_matrix builds: 2 .. 256
# "auto" uses the dense per-block GEMM up to this block size and the butterfly above it. Chosen from
# `python -m lowbit.bench hadamard` (docs/benchmarks.md): the GEMM maps onto tensor cores / vector
# units, the butterfly's log2(b) passes win only once the dense b x b matrix costs O(b) per element.
AUTO_MATMUL_MAX_BLOCK = 256  # H100: matmul 3.9-6.1x faster than fwht at every block 16..256


# ----------------------------------------------------------------------------- matrices and signs
def _sylvester_pm1(n: int) -> np.ndarray:
    """Unnormalized Sylvester Hadamard matrix of size n (entries +-1): H[i, j] = (-1)^popcount(i & j)."""
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_matrix(n: int, dtype: Any = jnp.float32) -> jax.Array:
    """Orthonormal Sylvester Walsh-Hadamard matrix H_n / sqrt(n), n a power of two in 2..256.

    H_{2n} = [[H_n, H_n], [H_n, -H_n]], H_1 = [1]; symmetric with H Hᵀ = I.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in MATRIX_SIZES:
        raise ValueError(f"hadamard_matrix size must be a power of two in {MATRIX_SIZES}, got {n!r}")
    n = int(n)
    return jnp.asarray(_sylvester_pm1(n) / np.sqrt(n), dtype=dtype)


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """n independent uniform random signs s_i in {-1, +1} (float32), drawn from `key`.

    The diagonal of the RHT's diag(s); the same key always gives the same signs, so passing one key
    for both operands of a GEMM transforms both with the same Q.
    """
    if key is None:
        raise ValueError("random_signs needs a PRNG key (jax.random.key(...)); got None")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"random_signs needs a positive int length, got {n!r}")
    return jax.random.rademacher(key, (int(n),), dtype=jnp.float32)


# ----------------------------------------------------------------------------- argument checks
def _check_block(block: Any) -> int:
    is_int = isinstance(block, (int, np.integer)) and not isinstance(block, bool)
    if not is_int or block < 2 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two >= 2 (e.g. 16, 32, 64), got {block!r}")
    return int(block)


def _check_method(method: str, block: int) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown Hadamard method {method!r}; choose one of {METHODS}")
    if method == "auto":
        method = "matmul" if block <= AUTO_MATMUL_MAX_BLOCK else "fwht"
    if method == "matmul" and block not in MATRIX_SIZES:
        raise ValueError(f"method='matmul' builds a dense H_b and supports blocks {MATRIX_SIZES}, "
                         f"got {block}; use method='fwht' for larger blocks")
    return method


def _check_input(x: Any, axis: int, block: int) -> tuple[jax.Array, int]:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"Hadamard transforms take floating-point arrays, got dtype {x.dtype}; "
                        f"cast with x.astype(jnp.float32) first")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {x.ndim} (shape {x.shape})")
    axis = int(axis) % x.ndim
    if x.shape[axis] % block:
        raise ValueError(f"axis {axis} has size {x.shape[axis]}, not a multiple of the Hadamard block "
                         f"{block}; pad that axis to a multiple of {block} or pick a block that divides it")
    return x, axis


def _check_signs(signs: Any, block: int) -> jax.Array:
    signs = jnp.asarray(signs)
    if signs.shape != (block,):
        raise ValueError(f"signs must have shape ({block},) (one sign per block element), got {signs.shape}")
    return signs


def _compute_dtype(dtype: Any) -> Any:
    """float32 for 16-bit (and narrower) floats, else the input's own float type (f32, f64)."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


# ----------------------------------------------------------------------------- the two kernels
def _fwht(x: jax.Array, axis: int, block: int, signs_in: jax.Array | None = None,
          signs_out: jax.Array | None = None) -> jax.Array:
    """Unnormalized x_blk @ diag(signs_in) H_pm1 diag(signs_out) by butterflies, H_b = H_2 (x) ... (x) H_2.

    The block axis is viewed as log2(b) axes of size 2 (row-major bits of the in-block index), and
    H_2 = [[1, 1], [1, -1]] is applied along each: O(n log b) adds, no matrix.
    """
    stages = block.bit_length() - 1
    shape = x.shape
    bits_shape = (2,) * stages + (1,) * (x.ndim - axis - 1)  # a sign vector in the bit-axes view
    xr = x.reshape(shape[:axis] + (shape[axis] // block,) + (2,) * stages + shape[axis + 1:])
    if signs_in is not None:
        xr = xr * signs_in.astype(x.dtype).reshape(bits_shape)
    for stage in range(stages):
        bit_axis = axis + 1 + stage
        even = lax.index_in_dim(xr, 0, axis=bit_axis, keepdims=False)
        odd = lax.index_in_dim(xr, 1, axis=bit_axis, keepdims=False)
        xr = jnp.stack([even + odd, even - odd], axis=bit_axis)
    if signs_out is not None:
        xr = xr * signs_out.astype(x.dtype).reshape(bits_shape)
    return xr.reshape(shape)


def _matmul(x: jax.Array, axis: int, matrix: jax.Array, acc_dtype: Any) -> jax.Array:
    """x_blk @ matrix for every block along `axis`: one dot_general over a [.., n/b, b, ..] view."""
    block = matrix.shape[0]
    shape = x.shape
    xr = x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
    out = lax.dot_general(xr, matrix, (((axis + 1,), (0,)), ((), ())),
                          precision=lax.Precision.HIGHEST, preferred_element_type=acc_dtype)
    # dot_general puts the transformed block last; move it back next to its block index.
    return jnp.moveaxis(out, -1, axis + 1).reshape(shape)


def _transform(x: jax.Array, axis: int, block: int, method: str, signs: jax.Array | None,
               signs_first: bool) -> jax.Array:
    """x_blk @ diag(s) H_b (signs_first) or x_blk @ H_b diag(s) (else); s = 1 when signs is None."""
    dtype = x.dtype
    acc = _compute_dtype(dtype)
    inv_sqrt_b = jnp.asarray(1.0 / np.sqrt(block), acc)
    if method == "matmul":
        # Entries +-1 are exact in every float type, so x @ (+-1 matrix) in the input's own GEMM
        # dtype with `acc` accumulation equals the `acc` computation; 1/sqrt(b) is applied once after.
        h = jnp.asarray(_sylvester_pm1(block), acc)
        if signs is not None:
            s = signs.astype(acc)
            h = s[:, None] * h if signs_first else h * s[None, :]
        gemm_dtype = dtype if jnp.finfo(dtype).bits >= 16 else acc  # no 8-bit float GEMMs here
        y = _matmul(x.astype(gemm_dtype), axis, h.astype(gemm_dtype), acc)
        return (y * inv_sqrt_b).astype(dtype)
    signs_in, signs_out = (signs, None) if signs_first else (None, signs)
    y = _fwht(x.astype(acc), axis, block, signs_in, signs_out)
    return (y * inv_sqrt_b).astype(dtype)


# ----------------------------------------------------------------------------- public transforms
@functools.partial(jax.jit, static_argnames=("axis", "block", "method", "signs_first"))
def _transform_jit(x, signs, *, axis, block, method, signs_first):
    return _transform(x, axis, block, method, signs, signs_first)


def hadamard(x: jax.Array, axis: int = -1, block: int = 32, method: str = "auto") -> jax.Array:
    """Orthonormal block Walsh-Hadamard: each block of `block` consecutive elements on `axis` -> x_blk @ H_b.

    H_b = Sylvester Hadamard / sqrt(b) (symmetric, orthonormal), so this is its own inverse.
    method: "fwht" (butterfly, log2(b) add/sub passes, O(n log b)), "matmul" (dense per-block GEMM,
    fast on tensor cores for small blocks), "auto" (matmul for block <= 256, else fwht; the threshold
    comes from `python -m lowbit.bench hadamard`). Output dtype = input dtype; 16-bit inputs are
    computed in float32.
    """
    block = _check_block(block)
    x, axis = _check_input(x, axis, block)
    method = _check_method(method, block)
    return _transform_jit(x, None, axis=axis, block=block, method=method, signs_first=True)


def inverse_hadamard(y: jax.Array, axis: int = -1, block: int = 32, method: str = "auto") -> jax.Array:
    """Inverse of `hadamard`: y_blk @ H_bᵀ = y_blk @ H_b (H_b is symmetric orthonormal, H_b H_b = I)."""
    return hadamard(y, axis=axis, block=block, method=method)


def signed_hadamard(x: jax.Array, signs: jax.Array, axis: int = -1, block: int = 32,
                    method: str = "auto") -> jax.Array:
    """RHT with explicit signs: every block along `axis` -> x_blk @ diag(signs) @ H_b (signs: shape (block,)).

    The same sign vector serves every block. Transform both operands of a GEMM along its contraction
    axis with the same `signs` and their product is unchanged: (A Q)(Qᵀ B) = A B, Q = diag(s) H_b.
    """
    return _signed_transform(x, signs, axis, block, method, signs_first=True)


def inverse_signed_hadamard(y: jax.Array, signs: jax.Array, axis: int = -1, block: int = 32,
                            method: str = "auto") -> jax.Array:
    """Inverse of `signed_hadamard`: y_blk @ (diag(s) H_b)ᵀ = y_blk @ H_b @ diag(s) (H_b symmetric)."""
    return _signed_transform(y, signs, axis, block, method, signs_first=False)


def _signed_transform(x, signs, axis: int, block: int, method: str, *, signs_first: bool) -> jax.Array:
    """Validate the arguments, then x_blk @ diag(s) @ H_b (signs_first) or x_blk @ H_b @ diag(s)."""
    block = _check_block(block)
    x, axis = _check_input(x, axis, block)
    method = _check_method(method, block)
    signs = _check_signs(signs, block)
    return _transform_jit(x, signs, axis=axis, block=block, method=method, signs_first=signs_first)


def random_hadamard(x: jax.Array, key: jax.Array, axis: int = -1, block: int = 32,
                    method: str = "auto") -> jax.Array:
    """Random Hadamard transform: each block on `axis` -> x_blk @ diag(s) @ H_b, s = random_signs(key, block).

    Tseng et al. 2025 (arXiv 2502.20586) and NVIDIA's NVFP4 recipe (arXiv 2509.25149, b = 16 on wgrad).
    For a GEMM A·B over axis k, pass the SAME key for A (along k) and B (along k): (A Q)(Qᵀ B) = A B.
    """
    if key is None:
        raise ValueError("random_hadamard needs a PRNG key; pass the same key for both operands of a GEMM "
                         "(or use hadamard() for the deterministic transform)")
    block = _check_block(block)
    return signed_hadamard(x, random_signs(key, block), axis=axis, block=block, method=method)


def inverse_random_hadamard(y: jax.Array, key: jax.Array, axis: int = -1, block: int = 32,
                            method: str = "auto") -> jax.Array:
    """Inverse of `random_hadamard` with the same key: y_blk @ H_b @ diag(s)."""
    if key is None:
        raise ValueError("inverse_random_hadamard needs the PRNG key that random_hadamard used; got None")
    block = _check_block(block)
    return inverse_signed_hadamard(y, random_signs(key, block), axis=axis, block=block, method=method)


__all__ = [
    "AUTO_MATMUL_MAX_BLOCK", "METHODS", "hadamard", "hadamard_matrix", "inverse_hadamard",
    "inverse_random_hadamard", "inverse_signed_hadamard", "random_hadamard", "random_signs",
    "signed_hadamard",
]
