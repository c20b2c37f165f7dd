"""The pipelined collectives of sparcomm.comm._ring under MPI (issue 11): the dense ring
(``NoCompression``'s ``"ring"``) and the float16 pipeline (``FP16``'s ``"pipelined"``).

The ring equals MPI's ``Allreduce`` exactly on integer-valued sums, follows its
documented summation order bit for bit on random floats, and gives every rank the same
bits; the float16 pipeline equals ``reduce_scatter_allgather`` bit for bit; non-finite
inputs and owner overflows raise on every rank; measured bytes equal the cost model.
Segments are shrunk so that the pipelines run many segments on small inputs.  Every
body works at any number of ranks (tests/test_mpi_ranks.py runs P = 2 .. 5).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import FP16, QSGD, ErrorFeedback, NoCompression  # noqa: E402
from sparcomm.codecs import NonFiniteError  # noqa: E402
from sparcomm.comm import (  # noqa: E402
    AllreduceStats,
    _ring,
    allreduce,
)
from sparcomm.comm._dense import RING_MIN_BYTES, choose_dense  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
SIZES = [1, 2, SIZE, SIZE + 1, 7, 1000, 4099]
SEGMENTS = [8, 64, 1 << 20]  # bytes: many segments per chunk, a few, one


def _same_everywhere(array: np.ndarray) -> bool:
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return len(set(COMM.allgather(digest))) == 1


@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ring_equals_mpi_on_integer_sums(n, segment, dtype):
    rng = np.random.default_rng(1000 * RANK + n)
    x = rng.integers(-1000, 1000, n).astype(dtype)
    expected = np.empty_like(x)
    COMM.Allreduce(x, expected)
    buffer = x.copy()
    _ring.ring_allreduce_inplace(COMM, buffer, segment_bytes=segment)
    assert np.array_equal(buffer, expected)
    assert _same_everywhere(buffer)


@pytest.mark.parametrize("pause", [None, 1e-5])
@pytest.mark.parametrize("n", SIZES)
def test_ring_into_another_buffer_leaves_x_alone(n, pause):
    x = np.random.default_rng(RANK).integers(-9, 9, n).astype(np.float32)
    kept = x.copy()
    out = np.full_like(x, np.nan)
    expected = np.empty_like(x)
    COMM.Allreduce(x, expected)
    _ring.ring_allreduce(COMM, x, out, segment_bytes=64, pause_s=pause)
    assert np.array_equal(out, expected) and np.array_equal(x, kept)


@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("n", SIZES)
def test_ring_summation_order_is_the_documented_fold(n, segment):
    """Chunk c sums ((x_c + x_{c+1}) + ...) + x_{c-1}, ranks in ring order from c."""
    x = np.random.default_rng(RANK).standard_normal(n).astype(np.float32)
    inputs = COMM.allgather(x)
    bounds = _ring.chunk_bounds(n, SIZE)
    expected = np.empty(n, dtype=np.float32)
    for c in range(SIZE):
        a, b = bounds[c], bounds[c + 1]
        total = inputs[c][a:b].copy()
        for step in range(1, SIZE):
            total += inputs[(c + step) % SIZE][a:b]
        expected[a:b] = total
    buffer = x.copy()
    _ring.ring_allreduce_inplace(COMM, buffer, segment_bytes=segment)
    assert np.array_equal(buffer, expected)


@pytest.mark.parametrize("op", ["sum", "mean"])
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "dense", "auto"])
def test_dense_algorithms_through_allreduce(algorithm, op):
    x = np.arange(1001, dtype=np.float32) + RANK
    expected = np.arange(1001, dtype=np.float32) * SIZE + SIZE * (SIZE - 1) / 2
    if op == "mean":
        expected = expected / np.float32(SIZE)
    stats = AllreduceStats()
    result = allreduce(x, codec=NoCompression(), op=op, algorithm=algorithm, stats=stats)
    assert np.array_equal(result, expected)
    assert stats.algorithm == "dense" and stats.requested == algorithm
    assert (stats.bytes_sent, stats.bytes_received) == stats.predicted_bytes
    if SIZE > 1:  # which algorithm ran shows in the phases: MPI's "allreduce", the ring's
        ran = "exchange" if algorithm == "ring" else "allreduce"  # 4 KiB: auto takes MPI
        assert ran in stats.phases, stats.phases


def test_auto_takes_the_ring_for_large_host_buffers():
    assert choose_dense(RING_MIN_BYTES, 4, device=False) == "ring"
    assert choose_dense(RING_MIN_BYTES - 1, 4, device=False) == "mpi"
    assert choose_dense(RING_MIN_BYTES, 4, device=True) == "mpi"
    assert choose_dense(RING_MIN_BYTES, 1, device=False) == "mpi"
    n = RING_MIN_BYTES // 4
    x = np.full(n, float(RANK + 1), dtype=np.float32)
    stats = AllreduceStats()
    result = allreduce(x, codec=NoCompression(), out=x, stats=stats)
    assert result is x and np.all(x == SIZE * (SIZE + 1) / 2)
    if SIZE > 1:
        assert "exchange" in stats.phases and "allreduce" not in stats.phases


def test_ring_refuses_nan_on_every_rank():
    x = np.ones(100, dtype=np.float32)
    if RANK == SIZE - 1:
        x[3] = np.nan
    with pytest.raises(NonFiniteError):
        allreduce(x, codec=NoCompression(), algorithm="ring")
    assert np.all(allreduce(np.ones(3), algorithm="ring") == SIZE)


def _fp16_reference(x: np.ndarray) -> np.ndarray:
    """Every rank's float16 values summed in float32 in rank order, rounded once."""
    halves = COMM.allgather(x.astype(np.float16))
    total = halves[0].astype(x.dtype)
    for half in halves[1:]:
        total += half.astype(x.dtype)
    return total.astype(np.float16).astype(x.dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_pipelined_equals_reduce_scatter_allgather(n, dtype):
    x = np.random.default_rng(RANK + 17 * n).standard_normal(n).astype(dtype)
    stats = AllreduceStats()
    # Named, not "auto": auto times FP16's three algorithms (same bits) and may take any.
    fast = allreduce(x, codec=FP16(), algorithm="pipelined", stats=stats)
    slow = allreduce(x, codec=FP16(), algorithm="reduce_scatter_allgather")
    assert stats.algorithm == "pipelined"
    assert np.array_equal(fast, slow)
    assert np.array_equal(fast, _fp16_reference(x))
    assert _same_everywhere(fast)
    assert (stats.bytes_sent, stats.bytes_received) == stats.predicted_bytes


@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("n", SIZES)
def test_half_allreduce_segments(n, segment):
    x = np.random.default_rng(RANK).standard_normal(n).astype(np.float32)
    out = np.empty_like(x)
    pause = 1e-5 if segment == 64 else None  # polling with sleeps, on one segment size
    _, _, bad, failed = _ring.half_allreduce(COMM, x, out, segment_bytes=segment, pause_s=pause)
    assert bad == 0 and failed == -1
    assert np.array_equal(out, _fp16_reference(x))
    in_place = x.copy()
    _ring.half_allreduce(COMM, in_place, in_place, segment_bytes=segment)
    assert np.array_equal(in_place, out)


@pytest.mark.parametrize("n", [0, 1, SIZE - 1, 3 * SIZE + 1])
def test_half_allreduce_empty_chunks_and_ragged_pieces(n):
    """n < P leaves owners with empty chunks; 2-element segments give chunks of
    different lengths different numbers of pieces (the loop runs to the deepest)."""
    x = np.random.default_rng(RANK + 5).standard_normal(n).astype(np.float32)
    out = np.full_like(x, np.nan)
    sent, received, bad, failed = _ring.half_allreduce(COMM, x, out, segment_bytes=4)
    assert (bad, failed) == (0, -1)
    assert np.array_equal(out, _fp16_reference(x))
    assert COMM.allreduce(sent) == COMM.allreduce(received)


@pytest.mark.parametrize("where", ["first", "last"])
def test_half_allreduce_reports_a_bad_piece_anywhere(where):
    """A non-finite value of rank 0 in the first piece of the first chunk or the last
    piece of the last (chunks cut into many): its owner's sum is non-finite too, and
    every rank learns the highest of the two ranks."""
    x = np.ones(4099, dtype=np.float32)
    if RANK == 0:
        x[0 if where == "first" else -1] = np.nan
    owner = 0 if where == "first" else SIZE - 1
    out = np.empty_like(x)
    _, _, bad, failed = _ring.half_allreduce(COMM, x, out, segment_bytes=64)
    assert failed == owner
    assert (bad > 0) == (RANK in (0, owner))


def test_fp16_pipelined_nan_raises_on_every_rank():
    x = np.ones(1000, dtype=np.float32)
    if RANK == SIZE - 1:
        x[-1] = np.inf
    with pytest.raises(NonFiniteError) as caught:
        allreduce(x, codec=FP16(), algorithm="pipelined")
    if SIZE > 1 and RANK != SIZE - 1:
        assert f"rank {SIZE - 1}" in str(caught.value)
    assert np.all(allreduce(np.ones(10), codec=FP16(), algorithm="pipelined") == SIZE)


def test_fp16_pipelined_owner_overflow_raises_on_every_rank():
    if SIZE == 1:
        pytest.skip("a sum overflows float16 from 2 ranks on")
    x = np.full(1000, 40000.0, dtype=np.float32)  # each fits float16; their sum does not
    with pytest.raises(NonFiniteError):
        allreduce(x, codec=FP16(), algorithm="pipelined")


@pytest.mark.parametrize("codec", [ErrorFeedback(FP16()), QSGD(bits=4)], ids=repr)
def test_pipelined_refuses_other_codecs_on_every_rank(codec):
    with pytest.raises(NotImplementedError, match="'pipelined' runs plain FP16"):
        allreduce(np.ones(100, dtype=np.float32), codec=codec, algorithm="pipelined")
