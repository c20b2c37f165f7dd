"""``std``: the Numba kernel against the NumPy reference, bit for bit (contract order).

The contract fixes the summation order (blocks of 2**14, 8-lane ``lane_sum``, sequential
combine), so the CPU kernel, the GPU kernel and the reference return the same float64;
``np.std`` sums in another order and is only a sanity check here.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from sparcomm.kernels import cpu, reference

BLOCK = reference.STD_BLOCK
SIZES = (1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 40 * BLOCK + 3)
DTYPES = (np.float32, np.float64)


def same_float(a: float, b: float) -> bool:
    """Equal bits, or both NaN (NaN payloads are not part of the contract)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return np.float64(a).view(np.uint64) == np.float64(b).view(np.uint64)


def gradient_like(n: int, dtype, seed: int = 0) -> np.ndarray:
    # An offset mean makes pass 2 depend on the exact mean of pass 1.
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 0.03 + 0.01).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_cpu_equals_reference(dtype, n):
    x = gradient_like(n, dtype, seed=n)
    got = cpu.std(x)
    assert isinstance(got, float)
    assert same_float(got, reference.std(x))


def test_reference_follows_the_definition_on_a_small_case():
    # The definition written out with Python floats, for 2 full blocks and a short one.
    x = np.arange(2 * BLOCK + 3, dtype=np.float64) % 97 * 0.37 - 5.0
    values = x.tolist()
    mean = _blocks_in_order(values) / x.size
    squares = [(v - mean) * (v - mean) for v in values]
    expected = math.sqrt(_blocks_in_order(squares) / x.size)
    assert same_float(reference.std(x), expected)
    assert same_float(cpu.std(x), expected)


def _blocks_in_order(terms: list[float]) -> float:
    total = 0.0
    for b in range(0, len(terms), BLOCK):
        total += _lane_sum_by_hand(terms[b : b + BLOCK])
    return total


def _lane_sum_by_hand(block: list[float]) -> float:
    lanes = [0.0] * 8
    for i, v in enumerate(block):
        lanes[i % 8] += v
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + (
        (lanes[4] + lanes[5]) + (lanes[6] + lanes[7])
    )


def test_cpu_is_independent_of_the_thread_count():
    x = gradient_like(9 * BLOCK + 11, np.float32, seed=5)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            results.append(cpu.std(x))
    finally:
        numba.set_num_threads(before)
    assert all(same_float(r, results[0]) for r in results)


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_numpy_std(dtype):
    # Sanity check against np.std's pairwise order.  Each float64 addition rounds with
    # relative error <= eps; the longest chain here is a lane (2**11 terms) plus the
    # block combine, so for non-negative terms (pass 2) both orders lie within
    # (2**11 + nb) * eps of the exact variance, and std within half that.
    x = gradient_like(37 * BLOCK + 5, dtype, seed=2)
    nb = -(-x.size // BLOCK)
    expected = float(np.std(x, dtype=np.float64))
    assert math.isclose(cpu.std(x), expected, rel_tol=(2**11 + nb) * np.finfo(np.float64).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_and_constants_give_zero(dtype):
    assert cpu.std(np.array([3.5], dtype)) == 0.0
    zeros = np.zeros(BLOCK + 9, dtype)
    zeros[::2] = -0.0
    assert same_float(cpu.std(zeros), 0.0)
    assert same_float(reference.std(zeros), 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormals_are_kept(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    rng = np.random.default_rng(7)
    x = (rng.integers(-1000, 1000, 2 * BLOCK + 13) * tiny).astype(dtype)
    got = cpu.std(x)
    assert same_float(got, reference.std(x))
    if dtype == np.float32:  # in float64 these are normal numbers: a non-zero spread
        assert got > 0.0
        assert math.isclose(got, float(np.std(x, dtype=np.float64)), rel_tol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, BLOCK + 4, -1])  # first block, later block, tail
def test_non_finite_propagates(dtype, bad, where):
    x = gradient_like(2 * BLOCK + 5, dtype)
    x[where] = bad
    assert math.isnan(cpu.std(x))
    assert math.isnan(reference.std(x))


def test_overflowing_squares_give_inf():
    x = np.array([1e200, -1e200, 3.0], dtype=np.float64)
    assert cpu.std(x) == math.inf
    assert reference.std(x) == math.inf


@pytest.mark.parametrize("implementation", [cpu.std, reference.std])
def test_empty_raises(implementation):
    with pytest.raises(ValueError, match=r"std of an empty array is undefined \(n = 0\)"):
        implementation(np.zeros(0, np.float32))


def test_cpu_rejects_bad_arrays():
    with pytest.raises(TypeError, match="x must be a float32 or float64 numpy array, got int64"):
        cpu.std(np.arange(5))
    with pytest.raises(TypeError, match="got list"):
        cpu.std([1.0, 2.0])
    with pytest.raises(ValueError, match=r"1-D and C-contiguous, got shape \(2, 3\)"):
        cpu.std(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"1-D and C-contiguous, got shape \(5,\)"):
        cpu.std(np.zeros(10, np.float32)[::2])
