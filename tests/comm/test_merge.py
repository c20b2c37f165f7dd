"""The merge kernels of kernels/cpu/merge.py against their NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sparcomm.kernels.cpu import merge

DTYPES = [(np.int32, np.float32), (np.int64, np.float64), (np.int32, np.float64)]


def _streams(rng, count, n, max_k, index_dtype, value_dtype):
    parts = []
    for _ in range(count):
        k = int(rng.integers(0, max_k + 1))
        parts.append(np.sort(rng.choice(n, min(k, n), replace=False)).astype(index_dtype))
    offsets = np.zeros(count + 1, np.int64)
    offsets[1:] = np.cumsum([p.size for p in parts])
    indices = np.concatenate(parts) if parts else np.zeros(0, index_dtype)
    values = rng.standard_normal(indices.size).astype(value_dtype)
    return indices, values, offsets


def _run_merge(indices, values, offsets):
    total = indices.size
    out_i, work_i = np.empty(total, indices.dtype), np.empty(total, indices.dtype)
    out_v, work_v = np.empty(total, values.dtype), np.empty(total, values.dtype)
    count = merge.merge_sum_streams(indices, values, offsets, out_i, out_v, work_i, work_v)
    return out_i[:count], out_v[:count]


@pytest.mark.parametrize(("index_dtype", "value_dtype"), DTYPES)
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 7, 8, 13])
def test_merge_sum_streams_equals_reference_bitwise(count, index_dtype, value_dtype):
    rng = np.random.default_rng(count)
    indices, values, offsets = _streams(rng, count, 500, 200, index_dtype, value_dtype)
    got_i, got_v = _run_merge(indices, values, offsets)
    ref_i, ref_v = merge.merge_sum_streams_reference(indices, values, offsets)
    assert np.array_equal(got_i, ref_i)
    assert got_v.tobytes() == ref_v.tobytes()  # same tree, same bits
    dense = np.zeros(500)
    np.add.at(dense, indices.astype(np.int64), values.astype(np.float64))
    np.testing.assert_allclose(dense[got_i], got_v, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got_i, np.unique(indices))


def test_merge_keeps_negative_zero_of_a_single_operand():
    indices = np.array([1, 2], np.int32)
    values = np.array([-0.0, 3.0], np.float32)
    got_i, got_v = _run_merge(indices, values, np.array([0, 1, 2]))
    assert np.signbit(got_v[0]) and got_v[1] == 3.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 60), max_size=30, unique=True), max_size=9),
    st.integers(0, 2**31 - 1),
)
def test_merge_property_union_and_sum(lists, seed):
    parts = [np.array(sorted(p), np.int64) for p in lists]
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum([p.size for p in parts])
    indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    values = np.random.default_rng(seed).integers(-50, 50, indices.size).astype(np.float64)
    got_i, got_v = _run_merge(indices, values, offsets)
    dense = np.zeros(61)
    np.add.at(dense, indices, values)
    assert np.array_equal(got_i, np.unique(indices))
    assert np.array_equal(got_v, dense[got_i])  # integers: exact in any order


def test_merge_sum_two_equals_reference():
    rng = np.random.default_rng(3)
    a = np.sort(rng.choice(1000, 300, replace=False)).astype(np.int32)
    b = np.sort(rng.choice(1000, 400, replace=False)).astype(np.int32)
    av, bv = rng.standard_normal(300), rng.standard_normal(400)
    out_i, out_v = np.empty(700, np.int32), np.empty(700)
    count = merge.merge_sum_two(a, av, b, bv, out_i, out_v)
    ref_i, ref_v = merge.merge_sum_streams_reference(
        np.concatenate([a, b]), np.concatenate([av, bv]), np.array([0, 300, 700])
    )
    assert np.array_equal(out_i[:count], ref_i) and np.array_equal(out_v[:count], ref_v)


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 16])
def test_range_offsets_equals_searchsorted(parts):
    rng = np.random.default_rng(parts)
    n = 1009
    indices = np.sort(rng.choice(n, 300, replace=False)).astype(np.int32)
    bounds = (np.arange(parts + 1, dtype=np.int64) * n) // parts
    out = np.empty(parts + 1, np.int64)
    merge.range_offsets(indices, bounds, out)
    assert np.array_equal(out, merge.range_offsets_reference(indices, bounds))
    merge.range_offsets(indices[:0], bounds, out)
    assert not out.any()


@pytest.mark.parametrize(("index_dtype", "value_dtype"), DTYPES)
def test_scatter_kernels_equal_references(index_dtype, value_dtype):
    rng = np.random.default_rng(0)
    unique = np.sort(rng.choice(400, 100, replace=False)).astype(index_dtype) + 100
    values = rng.standard_normal(100).astype(value_dtype)
    got, ref = np.zeros(400, value_dtype), np.zeros(400, value_dtype)
    merge.scatter_assign(unique, values, 100, got)
    merge.scatter_assign_reference(unique, values, 100, ref)
    assert np.array_equal(got, ref)
    repeated = rng.integers(100, 500, 300).astype(index_dtype)
    values = rng.standard_normal(300).astype(value_dtype)
    got, ref = np.ones(400, value_dtype), np.ones(400, value_dtype)
    merge.scatter_accumulate(repeated, values, 100, got)
    merge.scatter_accumulate_reference(repeated, values, 100, ref)
    assert got.tobytes() == ref.tobytes()


def test_gather_nonzero_equals_reference():
    dense = np.zeros(50, np.float32)
    dense[[3, 7, 49]] = [1.0, -2.0, 0.5]
    out_i, out_v = np.empty(50, np.int32), np.empty(50, np.float32)
    count = merge.gather_nonzero(dense, 1000, out_i, out_v)
    ref_i, ref_v = merge.gather_nonzero_reference(dense, 1000)
    assert np.array_equal(out_i[:count], ref_i) and np.array_equal(out_v[:count], ref_v)


@pytest.mark.parametrize(
    ("indices", "expected"),
    [([], 0), ([0, 3, 9], 0), ([3, 3], 1), ([5, 2], 1), ([0, 10], 2), ([-1, 2], 2)],
)
def test_check_stream_equals_reference(indices, expected):
    array = np.array(indices, np.int64)
    assert merge.check_stream(array, 10) == expected
    assert merge.check_stream_reference(array, 10) == expected


def test_coalesce_sorted_equals_reference():
    rng = np.random.default_rng(1)
    indices = np.sort(rng.integers(0, 40, 200))
    values = rng.standard_normal(200)
    out_i, out_v = np.empty(200, np.int64), np.empty(200)
    count = merge.coalesce_sorted(indices, values, out_i, out_v)
    ref_i, ref_v = merge.coalesce_sorted_reference(indices, values)
    assert np.array_equal(out_i[:count], ref_i)
    assert out_v[:count].tobytes() == ref_v.tobytes()
