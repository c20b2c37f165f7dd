"""Q-DSAR under MPI: DSAR with a quantized dense phase is identical on every rank,
quantizes exactly the owners' dense sums, is unbiased for QSGD, moves the bytes the cost
model predicts, and refuses codecs it cannot run on every rank alike.

Every body works at any number of ranks; tests/test_mpi_ranks.py runs this directory
under ``mpiexec`` at P = 2, 3, 4, 5.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import FP16, QSGD, ErrorFeedback, OneBit, TopK  # noqa: E402
from sparcomm.comm import AllreduceStats, allreduce  # noqa: E402
from sparcomm.comm._quantized_dsar import dense_phase_key  # noqa: E402
from sparcomm.comm._sparse import split_bounds  # noqa: E402

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
N = 5003


def _input(n: int = N, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng([seed, RANK]).standard_normal(n).astype(dtype)


def _same_everywhere(array: np.ndarray) -> None:
    digest = hashlib.sha256(array.tobytes()).hexdigest()
    assert len(set(COMM.allgather(digest))) == 1, "results differ between ranks"


@pytest.mark.parametrize("dense_phase", [QSGD(bits=8), QSGD(bits=4, norm="max"), FP16()], ids=repr)
def test_dense_ranges_are_the_quantized_dsar_sums(dense_phase):
    """Density 1: every owner's range is dense, and each equals the quantization (owner's
    rank, its own key) of the DSAR sum of that range."""
    x = _input()
    exact = allreduce(x, codec=TopK(density=1.0), comm=COMM, algorithm="dsar")
    stats = AllreduceStats()
    result = allreduce(
        x, codec=TopK(density=1.0), comm=COMM, dense_phase=dense_phase, key="q", step=2, stats=stats
    )
    _same_everywhere(result)
    assert stats.algorithm == "dsar" and stats.dense_ranges == SIZE
    bounds = split_bounds(N, SIZE)
    for j in range(SIZE):
        part = exact[bounds[j] : bounds[j + 1]]
        again = dense_phase.encode(part, key=dense_phase_key("q"), step=2, rank=j)
        np.testing.assert_array_equal(result[bounds[j] : bounds[j + 1]], dense_phase.decode(again))
    assert (stats.bytes_sent, stats.bytes_received) == stats.predicted_bytes


def test_sparse_ranges_stay_exact():
    """Very sparse sums stay sparse: nothing is quantized, the result is DSAR's."""
    x = _input()
    codec = TopK(k=3)
    exact = allreduce(x, codec=codec, comm=COMM, algorithm="dsar")
    stats = AllreduceStats()
    result = allreduce(x, codec=codec, comm=COMM, dense_phase=QSGD(bits=8), stats=stats)
    np.testing.assert_array_equal(result, exact)
    assert stats.dense_ranges == 0


@pytest.mark.parametrize("density", [0.02, 0.3])
def test_mixed_ranges_identical_and_bytes_within_five_percent(density):
    """Random supports: the cost model's expected fill puts the bytes within 5%."""
    x = _input(n=1 << 16, seed=3)
    stats = AllreduceStats()
    result = allreduce(
        x,
        codec=ErrorFeedback(TopK(density=density)),
        comm=COMM,
        dense_phase=QSGD(bits=8),
        op="mean",
        key="m",
        stats=stats,
    )
    _same_everywhere(result)
    for measured, predicted in zip(
        (stats.bytes_sent, stats.bytes_received), stats.predicted_bytes, strict=True
    ):
        assert abs(measured - predicted) <= 0.05 * max(predicted, 1)
    plain = AllreduceStats()
    allreduce(x, codec=TopK(density=density), comm=COMM, algorithm="dsar", stats=plain)
    if stats.dense_ranges and SIZE > 1:
        assert stats.bytes_sent < plain.bytes_sent


def test_qsgd_dense_phase_is_unbiased():
    """The mean over 200 steps approaches DSAR's exact sum (pooled statistic: see
    tests/mpi/test_quantized.py::_bias_ratio)."""
    from test_quantized import _bias_ratio

    x = _input(n=64, seed=9, dtype=np.float64)
    codec = TopK(density=0.5)
    exact = allreduce(x, codec=codec, comm=COMM, algorithm="dsar")
    samples = np.stack(
        [
            allreduce(
                x, codec=codec, comm=COMM, dense_phase=QSGD(bits=3, bucket_size=16), key="b", step=t
            )
            for t in range(200)
        ]
    )
    ratio, threshold = _bias_ratio(samples, exact)
    assert threshold < 3.0 and ratio < threshold


def test_unsupported_combinations_raise_on_every_rank():
    x = _input()
    with pytest.raises(NotImplementedError, match="needs codec=TopK"):
        allreduce(x, codec=QSGD(), comm=COMM, dense_phase=QSGD(bits=8))
    with pytest.raises(NotImplementedError, match="dense_phase must be"):
        allreduce(x, codec=TopK(k=5), comm=COMM, dense_phase=OneBit())
    with pytest.raises(ValueError, match="algorithm must be one of"):
        allreduce(x, codec=TopK(k=5), comm=COMM, dense_phase=QSGD(), algorithm="allgather")
    if SIZE > 1:
        with pytest.raises(ValueError, match="disagree on codec"):
            allreduce(
                x,
                codec=TopK(k=5),
                comm=COMM,
                algorithm="dsar",
                dense_phase=QSGD() if RANK == 0 else None,
            )
