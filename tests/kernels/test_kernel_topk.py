"""Exact top-k: the radix-select kernel equals the stable-sort reference on every input."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sparcomm.kernels import cpu
from sparcomm.kernels import reference as ref

# The package exports the kernel ``topk``, which shadows its module of the same name.
topk_module = importlib.import_module("sparcomm.kernels.cpu.topk")

DTYPES = [np.float32, np.float64]
INDEX_DTYPES = [np.int32, np.int64]


def inputs(kind: str, n: int, dtype: type) -> np.ndarray:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    if kind == "ties":  # few distinct magnitudes: the threshold is shared by many
        x = np.round(x * 2).astype(dtype)
    elif kind == "zeros":  # mostly zeros, with -0.0: k usually reaches into the zeros
        x[rng.random(n) < 0.95] = 0.0
        x[::7] = -0.0
    elif kind == "constant":
        x[:] = -1.5
    elif kind == "nonfinite" and n >= 10:
        x[[3, 5, 8]] = [np.nan, np.inf, -np.inf]
    return x


def check(x: np.ndarray, k: int, index_dtype: type) -> None:
    got_i = np.empty(k, dtype=index_dtype)
    got_v = np.empty(k, dtype=x.dtype)
    want_i = np.empty(k, dtype=index_dtype)
    want_v = np.empty(k, dtype=x.dtype)
    bad = cpu.topk(x, k, got_i, got_v)
    assert bad == ref.topk(x, k, want_i, want_v)
    assert np.array_equal(got_i, want_i)
    assert got_v.tobytes() == want_v.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 511, 513, 300_007])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "constant", "nonfinite"])
def test_topk_matches_reference(dtype: type, index_dtype: type, n: int, kind: str) -> None:
    x = inputs(kind, n, dtype)
    for k in sorted({0, 1, max(1, n // 100), n // 3, n - 1, n}):
        check(x, k, index_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_matches_reference_large(dtype: type) -> None:
    x = inputs("normal", 2**20 + 3, dtype)
    check(x, (2**20 + 3) // 100, np.int64)


def test_topk_counts_non_finite() -> None:
    x = np.arange(100, dtype=np.float32)
    x[[10, 20, 30]] = [np.nan, np.inf, -np.inf]
    idx = np.empty(5, dtype=np.int64)
    val = np.empty(5, dtype=np.float32)
    assert cpu.topk(x, 5, idx, val) == 3
    assert cpu.topk(x, 0, idx[:0], val[:0]) == 3
    assert cpu.topk(x, 100, np.empty(100, np.int64), np.empty(100, np.float32)) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", [0.002, 0.02])
def test_topk_counts_non_finite_above_and_at_the_bound(dtype: type, share: float) -> None:
    # Past the sample's size, non-finite keys are counted among the stored candidates;
    # with more infs than k the bound is inf's key itself and the infs are ties, counted
    # beside the stored NaNs.
    n = 300_007
    rng = np.random.default_rng(11)
    x = rng.standard_normal(n).astype(dtype)
    where = rng.choice(n, size=int(n * share), replace=False)
    x[where] = np.where(np.arange(where.size) % 3 == 0, np.nan, np.inf)
    x[where[1::3]] *= -1
    for k in (n // 100, n // 1000):
        check(x, k, np.int64)
    bad = cpu.topk(x, n // 100, np.empty(n // 100, np.int64), np.empty(n // 100, dtype))
    assert bad == where.size


def test_topk_ties_go_to_lowest_indices_and_signs_are_kept() -> None:
    x = np.array([1.0, -3.0, 3.0, -0.0, 3.0, 0.0, -3.0], dtype=np.float64)
    idx = np.empty(3, dtype=np.int32)
    val = np.empty(3, dtype=np.float64)
    cpu.topk(x, 3, idx, val)
    assert idx.tolist() == [1, 2, 4] and val.tolist() == [-3.0, 3.0, 3.0]
    # -0.0 and +0.0 tie: index order decides.
    idx = np.empty(6, dtype=np.int32)
    val = np.empty(6, dtype=np.float64)
    cpu.topk(x, 6, idx, val)
    assert idx.tolist() == [0, 1, 2, 3, 4, 6]
    assert np.signbit(val[3])


def test_topk_exact_when_the_sample_bound_overshoots() -> None:
    # Large values only at the sampled (strided) positions: the sample's bound keeps
    # fewer than k keys, so the full-histogram bound must take over.
    n = 1 << 18
    stride = n // min(n, topk_module.SAMPLE)
    x = np.full(n, 0.25, dtype=np.float32)
    x[::stride] = np.linspace(1.0, 2.0, n // stride, dtype=np.float32)
    x[1::stride] = np.linspace(0.5, 0.75, n // stride, dtype=np.float32)
    k = n // 100
    bits = x.view(np.uint32)
    bound, _ = topk_module._sample_bound(bits, np.uint32(0x7FFFFFFF), n, k)
    assert np.count_nonzero(bits >= bound) < k  # the fallback path really runs
    check(x, k, np.int32)


def test_topk_exact_when_a_chunk_overflows_its_candidate_slots() -> None:
    # Sorted magnitudes: the sample sees the right share of large keys overall, but they
    # all sit in the last scan chunk, more than its slots hold: the scan must be redone.
    n = 1 << 18
    x = np.sort(np.random.default_rng(4).standard_normal(n).astype(np.float32) ** 2)
    x[::2] *= -1
    k = n // 100
    bits = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    bound, cap = topk_module._sample_bound(bits, np.uint32(0x7FFFFFFF), n, k)
    assert np.count_nonzero(bits[-topk_module.SCAN_CHUNK :] > bound) > cap
    check(x, k, np.int64)


@st.composite
def topk_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    # A small pool of values makes ties (and +-0.0) frequent.
    pool = draw(st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=6))
    x = draw(hnp.arrays(dtype, st.integers(1, 400), elements=st.sampled_from(pool + [-0.0])))
    k = draw(st.integers(0, x.size))
    return x, k


@settings(max_examples=80, deadline=None)
@given(topk_cases())
def test_topk_keeps_exactly_the_k_largest(case) -> None:
    x, k = case
    idx = np.empty(k, dtype=np.int64)
    val = np.empty(k, dtype=x.dtype)
    assert cpu.topk(x, k, idx, val) == 0
    assert np.all(np.diff(idx) > 0)  # ascending, no duplicates
    assert val.tobytes() == x[idx].tobytes()
    kept = np.zeros(x.size, dtype=bool)
    kept[idx] = True
    if 0 < k < x.size:
        smallest_kept = np.abs(x[kept]).min()
        assert smallest_kept >= np.abs(x[~kept]).max()
        # Ties at the threshold: no dropped tie has a lower index than a kept one.
        tied = np.flatnonzero(np.abs(x) == smallest_kept)
        assert np.array_equal(tied[kept[tied]], tied[: np.count_nonzero(kept[tied])])
    check(x, k, np.int32)
