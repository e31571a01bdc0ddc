"""lowbit.hadamard against float64 NumPy references (Sylvester H[i, j] = (-1)^popcount(i & j) / sqrt(n))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.hadamard import (
    hadamard,
    hadamard_matrix,
    inverse_hadamard,
    inverse_random_hadamard,
    inverse_signed_hadamard,
    random_hadamard,
    random_signs,
    signed_hadamard,
)

U32 = 2.0**-24  # unit roundoff of float32
BLOCKS = [2, 4, 8, 16, 32, 64, 128, 256]
METHODS = ["fwht", "matmul"]


def sylvester_np(n: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard matrix in float64 from the closed form (-1)^popcount(i & j) / sqrt(n)."""
    i = np.arange(n)
    parity = np.vectorize(lambda v: bin(v).count("1") & 1)(i[:, None] & i[None, :])
    return (1.0 - 2.0 * parity) / np.sqrt(n)


def block_transform_np(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """float64 reference: every block of len(matrix) elements along `axis` -> x_blk @ matrix."""
    b = matrix.shape[0]
    xm = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    y = (xm.reshape(*xm.shape[:-1], -1, b) @ matrix).reshape(xm.shape)
    return np.moveaxis(y, -1, axis)


def f32_sum_bound(x: np.ndarray, block: int, axis: int, ref: np.ndarray) -> np.ndarray:
    """Elementwise error bound for a float32 block transform.

    Each output is (sum of b exactly-signed inputs) * f32(1/sqrt(b)): any summation order errs by at
    most (b-1) u sum|x_i| (Higham, Accuracy and Stability, eq. 4.3, first order), the constant and the
    final product add at most 2 u |y|. 1.01 covers the second-order terms.
    """
    xm = np.abs(np.moveaxis(np.asarray(x, np.float64), axis, -1))
    l1 = xm.reshape(*xm.shape[:-1], -1, block).sum(-1, keepdims=True)
    l1 = np.broadcast_to(l1, (*xm.shape[:-1], xm.shape[-1] // block, block)).reshape(xm.shape)
    l1 = np.moveaxis(l1, -1, axis)
    return 1.01 * U32 * ((block - 1) * l1 / np.sqrt(block) + 2 * np.abs(ref)) + 1e-30


def crest(x: np.ndarray, block: int) -> np.ndarray:
    """max|x| / rms(x) of every block along the last axis (at most sqrt(block))."""
    xb = np.asarray(x, np.float64).reshape(-1, block)
    return np.abs(xb).max(-1) / np.sqrt((xb**2).mean(-1))


# ----------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("n", BLOCKS)
def test_matrix_is_sylvester_and_orthonormal(n):
    h = np.asarray(hadamard_matrix(n), np.float64)
    ref = sylvester_np(n)
    np.testing.assert_allclose(h, ref, rtol=U32, atol=0)
    # entries are +-f32(1/sqrt(n)) = +-(1 + d)/sqrt(n), |d| <= u: diagonal (1 + d)^2, off-diagonal exactly 0.
    np.testing.assert_allclose(h @ h.T, np.eye(n), rtol=0, atol=3 * U32)
    np.testing.assert_array_equal(h, h.T)


def test_matrix_dtype_and_bad_sizes():
    assert hadamard_matrix(16, jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(hadamard_matrix(16, jnp.bfloat16), np.float64), sylvester_np(16))
    for bad in (1, 3, 12, 512, 2.0, True, "16"):
        with pytest.raises(ValueError, match=r"power of two in \(2, 4, 8, 16, 32, 64, 128, 256\)"):
            hadamard_matrix(bad)


# ----------------------------------------------------------------------------- against NumPy
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", BLOCKS)
def test_hadamard_matches_float64_reference(block, method):
    x = np.asarray(jax.random.normal(jax.random.key(block), (3, 512)), np.float32)
    y = np.asarray(hadamard(x, axis=-1, block=block, method=method), np.float64)
    ref = block_transform_np(x, sylvester_np(block), axis=-1)
    assert np.all(np.abs(y - ref) <= f32_sum_bound(x, block, -1, ref))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,axis", [((64,), 0), ((32, 3, 5), 0), ((2, 64, 3), 1), ((2, 64, 3), -2),
                                        ((2, 3, 4, 32), 3)])
def test_any_rank_any_axis(shape, axis, method):
    block = 16
    x = np.asarray(jax.random.normal(jax.random.key(7), shape), np.float32)
    y = np.asarray(hadamard(x, axis=axis, block=block, method=method), np.float64)
    ref = block_transform_np(x, sylvester_np(block), axis=axis)
    assert y.shape == x.shape
    assert np.all(np.abs(y - ref) <= f32_sum_bound(x, block, axis, ref))


@pytest.mark.parametrize("block", [16, 64])
def test_signed_transform_order(block):
    """signed_hadamard = x diag(s) H; its inverse = y H diag(s) (the transpose), checked in float64."""
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 2 * block)), np.float32)
    s = np.asarray(random_signs(jax.random.key(11), block), np.float64)
    h = sylvester_np(block)
    for method in METHODS:
        y = np.asarray(signed_hadamard(x, s, block=block, method=method), np.float64)
        ref = block_transform_np(x, np.diag(s) @ h, axis=-1)
        assert np.all(np.abs(y - ref) <= f32_sum_bound(x, block, -1, ref))
        back = np.asarray(inverse_signed_hadamard(x, s, block=block, method=method), np.float64)
        ref_back = block_transform_np(x, h @ np.diag(s), axis=-1)
        assert np.all(np.abs(back - ref_back) <= f32_sum_bound(x, block, -1, ref_back))


def test_larger_fwht_block_beyond_the_dense_sizes():
    x = np.asarray(jax.random.normal(jax.random.key(5), (2, 1024)), np.float32)
    y = np.asarray(hadamard(x, block=512, method="fwht"), np.float64)
    ref = block_transform_np(x, sylvester_np(512), axis=-1)
    assert np.all(np.abs(y - ref) <= f32_sum_bound(x, 512, -1, ref))
    np.testing.assert_allclose(np.asarray(hadamard(x, block=512)), y, rtol=0, atol=1e-5)  # auto -> fwht


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_16bit_input_keeps_dtype_and_computes_in_f32(dtype, method):
    x = jax.random.normal(jax.random.key(2), (8, 128)).astype(dtype)
    y = hadamard(x, block=32, method=method)
    assert y.dtype == dtype
    ref = block_transform_np(np.asarray(x, np.float64), sylvester_np(32), axis=-1)
    # f32 compute then one rounding to the 16-bit type: within one 16-bit ulp of the exact value.
    ulp = np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= ulp)


# ----------------------------------------------------------------------------- inverses and energy
@pytest.mark.parametrize("method", METHODS)
def test_inverse_round_trips(method):
    x = jax.random.normal(jax.random.key(4), (16, 256))
    key = jax.random.key(9)
    for block in (16, 256):
        back = inverse_hadamard(hadamard(x, block=block, method=method), block=block, method=method)
        np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=0, atol=2e-6 * np.sqrt(block))
        rht = random_hadamard(x, key, block=block, method=method)
        back = inverse_random_hadamard(rht, key, block=block, method=method)
        np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=0, atol=2e-6 * np.sqrt(block))
    # The RHT is not an involution: applying it twice does not give x back (the order matters).
    twice = random_hadamard(random_hadamard(x, key, block=16), key, block=16)
    assert np.abs(np.asarray(twice) - np.asarray(x)).max() > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_energy_is_preserved(method):
    x = jnp.asarray(np.random.default_rng(6).standard_t(3.0, (32, 512)), jnp.float32)
    x64 = np.asarray(x, np.float64)
    for block, y in ((64, hadamard(x, block=64, method=method)),
                     (128, random_hadamard(x, jax.random.key(1), block=128, method=method))):
        y64 = np.asarray(y, np.float64).reshape(-1, block)
        # per block: |x_blk|_2 = |x_blk Q|_2 (Q orthonormal), to f32 rounding.
        np.testing.assert_allclose(np.linalg.norm(y64, axis=-1),
                                   np.linalg.norm(x64.reshape(-1, block), axis=-1), rtol=4 * block * U32)


# ----------------------------------------------------------------------------- random signs and the RHT
def test_random_signs():
    s = random_signs(jax.random.key(0), 4096)
    assert s.dtype == jnp.float32 and s.shape == (4096,)
    assert set(np.unique(np.asarray(s))) == {-1.0, 1.0}
    assert abs(float(s.sum())) < 4 * np.sqrt(4096)  # fair coin, 4 sigma
    np.testing.assert_array_equal(s, random_signs(jax.random.key(0), 4096))  # same key, same signs
    assert np.any(np.asarray(s) != np.asarray(random_signs(jax.random.key(1), 4096)))
    legacy = random_signs(jax.random.PRNGKey(0), 16)  # raw uint32 keys work too
    assert set(np.unique(np.asarray(legacy))) <= {-1.0, 1.0}


def test_rht_spreads_an_outlier():
    block = 32
    x = np.array(jax.random.normal(jax.random.key(1), (256, 4 * block)), np.float32)
    x[:, 5::block] *= 50.0  # one outlier per block
    before = crest(x, block)
    after = crest(np.asarray(random_hadamard(jnp.asarray(x), jax.random.key(2), block=block)), block)
    assert np.median(before) > 5.0  # close to sqrt(32) = 5.66: the outlier holds almost all the energy
    assert np.median(after) < 2.5 and after.max() < 4.0  # spread over the block (Gaussian-like crest)


def test_random_signs_stop_structured_inputs_from_concentrating():
    """A constant block is row 0 of H: the plain transform concentrates it (crest sqrt(b)); the RHT not."""
    block = 64
    x = jnp.ones((1, block))
    assert crest(np.asarray(hadamard(x, block=block)), block)[0] == pytest.approx(np.sqrt(block), rel=1e-5)
    crests = [crest(np.asarray(random_hadamard(x, jax.random.key(k), block=block)), block)[0]
              for k in range(20)]
    assert np.median(crests) < 4.0


@pytest.mark.parametrize("method", METHODS)
def test_gemm_invariance_with_the_same_key(method):
    """(A Q)(Qᵀ B) = A B: transform A along its last axis and B along its first with one key."""
    key_a, key_b, key_s = jax.random.split(jax.random.key(8), 3)
    a = jax.random.normal(key_a, (2, 24, 256))
    b = jax.random.normal(key_b, (256, 40))
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    a_r = random_hadamard(a, key_s, axis=-1, block=32, method=method)
    b_r = random_hadamard(b, key_s, axis=0, block=32, method=method)
    got = np.asarray(a_r, np.float64) @ np.asarray(b_r, np.float64)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-4 * np.abs(exact).max())
    # with different signs on the two operands the product is not preserved
    b_other = random_hadamard(b, jax.random.key(99), axis=0, block=32, method=method)
    wrong = np.asarray(a_r, np.float64) @ np.asarray(b_other, np.float64)
    assert np.abs(wrong - exact).max() > 0.1 * np.abs(exact).max()


# ----------------------------------------------------------------------------- transformations
def test_jit_vmap_and_grad():
    x = jax.random.normal(jax.random.key(3), (4, 64, 3))
    key = jax.random.key(5)
    eager = random_hadamard(x, key, axis=1, block=16)
    jitted = jax.jit(lambda x, k: random_hadamard(x, k, axis=1, block=16))(x, key)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    mapped = jax.vmap(lambda row: random_hadamard(row, key, axis=0, block=16))(x)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(eager), rtol=0, atol=1e-6)
    # linear and symmetric: d/dx <hadamard(x), c> = hadamard(c)
    c = jax.random.normal(jax.random.key(4), x.shape)
    grad = jax.grad(lambda x: jnp.sum(hadamard(x, axis=1, block=16) * c))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(hadamard(c, axis=1, block=16)), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, 1, 3, 24, 2.0, True])
def test_bad_block(bad):
    with pytest.raises(ValueError, match="power of two >= 2"):
        hadamard(jnp.ones((4, 96)), block=bad)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match=r"axis 1 has size 48, not a multiple of the Hadamard block 32"):
        hadamard(jnp.ones((4, 48)), block=32)
    with pytest.raises(ValueError, match=r"axis 0 has size 4.*block 32"):
        random_hadamard(jnp.ones((4, 64)), jax.random.key(0), axis=0, block=32)
    with pytest.raises(ValueError, match="out of range for an array of rank 2"):
        hadamard(jnp.ones((4, 64)), axis=2, block=32)
    with pytest.raises(ValueError, match=r"unknown Hadamard method 'bogus'.*fwht"):
        hadamard(jnp.ones((4, 64)), block=32, method="bogus")
    with pytest.raises(ValueError, match="use method='fwht'"):
        hadamard(jnp.ones((4, 1024)), block=512, method="matmul")
    with pytest.raises(TypeError, match="int32"):
        hadamard(jnp.ones((4, 64), jnp.int32), block=32)
    with pytest.raises(ValueError, match=r"signs must have shape \(32,\)"):
        signed_hadamard(jnp.ones((4, 64)), jnp.ones(16), block=32)
    with pytest.raises(ValueError, match="same key for both operands"):
        random_hadamard(jnp.ones((4, 64)), None, block=32)
