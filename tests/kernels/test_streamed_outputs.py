"""``scatter_dense`` (the sparse allreduce's dense output, written with streaming stores)
against its NumPy reference: sizes around the cache line, unaligned outputs, unsorted
and duplicate indices, signed zeros, with and without the division of a mean."""

from __future__ import annotations

import numpy as np
import pytest
from sparcomm.kernels.cpu import merge

from sparcomm.comm import _sparse


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 4097, 9001])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_scatter_dense_matches_reference(dtype, index_dtype, n, shift):
    rng = np.random.default_rng([n, shift])
    base = np.empty(n + shift + 8, dtype)
    out = base[shift : shift + n]  # shift elements past the allocation's alignment
    for density in (0.0, 0.01, 0.3, 1.0):
        k = int(density * n)
        indices = np.sort(rng.choice(n, k, replace=False)).astype(index_dtype) + 5
        values = rng.standard_normal(k).astype(dtype)
        values[::7] *= -0.0
        for divide in (False, True):
            for order in ("sorted", "shuffled", "duplicates"):
                i, v = indices, values
                if order == "shuffled":
                    p = rng.permutation(k)
                    i, v = i[p], v[p]
                elif order == "duplicates" and k:
                    i, v = np.concatenate([i, i[::-1]]), np.concatenate([v, v[::-1] + 1])
                out[:] = np.nan
                expected = np.full(n, np.nan, dtype)
                merge.scatter_dense(i, v, 5, out, divide, dtype(4))
                merge.scatter_dense_reference(i, v, 5, expected, divide, dtype(4))
                assert out.tobytes() == expected.tobytes(), (density, divide, order)


@pytest.mark.parametrize("scale", [None, 3.0])
def test_finish_dense_output_is_zero_scatter_divide(scale):
    """The output of the sparse collectives: bit for bit the zeroed, scattered and
    divided buffer of before, with sparse and dense pieces mixed."""
    rng = np.random.default_rng(7)
    n = 1000
    i1 = np.sort(rng.choice(400, 40, replace=False)).astype(np.int32)
    v1 = rng.standard_normal(40).astype(np.float32)
    dense = rng.standard_normal(600).astype(np.float32)
    for pieces in (
        [_sparse.Piece(0, n, i1, v1)],
        [_sparse.Piece(0, 400, i1, v1), _sparse.Piece(400, n, None, dense)],
    ):
        expected = np.zeros(n, np.float32)
        for p in pieces:
            if p.dense:
                expected[p.start : p.stop] = p.values
            else:
                expected[p.indices] = p.values
        if scale is not None:
            expected /= np.float32(scale)
        out = np.full(n, np.nan, np.float32)
        got = _sparse.finish(pieces, n, np.dtype(np.float32), np.dtype(np.int32), True, scale, out)
        assert got is out and out.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0, 1])
def test_large_decodes_stream_the_same_bits(dtype, shift):
    """From ``STREAM_MIN`` elements a plain decode streams its output through a buffer:
    the same bits as the reference, into an output off the cache-line alignment."""
    from sparcomm.kernels import cpu, reference
    from sparcomm.kernels.cpu._stores import STREAM_MIN

    n = STREAM_MIN + 37
    x = np.random.default_rng(shift).standard_normal(n).astype(dtype)
    base = np.empty(n + shift, dtype)
    out = base[shift:]
    scales = np.empty(-(-n // 512), dtype)
    packed = np.empty(-(-n * 4 // 8), np.uint8)
    cpu.qsgd_encode(x, 7, 4, 512, 0, 99, scales, packed)
    expected = np.empty(n, dtype)
    reference.qsgd_decode(packed, scales, 7, 4, 512, expected)
    out[:] = np.nan
    cpu.qsgd_decode(packed, scales, 7, 4, 512, out)
    assert out.tobytes() == expected.tobytes()
    means = np.empty(2 * -(-n // 512), dtype)
    bits = np.empty(-(-n // 8), np.uint8)
    cpu.onebit_encode(x, 512, bits, means)
    reference.onebit_decode(bits, means, 512, expected)
    out[:] = np.nan
    cpu.onebit_decode(bits, means, 512, out)
    assert out.tobytes() == expected.tobytes()
