"""Every collective algorithm at many ranks, on small inputs, in one MPI program.

``tests/test_mpi_many_ranks.py`` runs it under ``mpiexec -n 8`` and ``-n 16``
(oversubscribed): the folding to a power of two, the split ranges (more ranks than
elements included) and the quantized chunking meet cases that P = 2 to 5 do not.  One
program per P, not the pytest directory: sixteen interpreters on two cores must each
import only what they use.  The references are the ones the tests in tests/mpi hold
the collectives to (imported from there), on inputs small enough for 2 cores:

* sparse family (``allgather``, ``recursive_doubling``, ``split_allgather``, ``dsar``,
  ``dense``, ``auto``): equal to a dense MPI Allreduce of the inputs (exactly, for
  float64 integers), for four support patterns, densities 0 to 1, n = 1, n < P and a
  prime n, ranks with empty inputs, dense and sparse outputs, sum and mean;
* codec entry points: the dense path and TopK through every sparse algorithm;
* quantized family (``allgather``, ``reduce_scatter_allgather``, ``shared_scale``) for
  every codec of tests/mpi/test_quantized.py: bitwise the local reference;
* Q-DSAR: the owners' dense ranges are the quantized DSAR sums;
* PowerSGD: the algorithm on the gathered inputs.

Every result must be bitwise identical on all ranks.  A failure raises: sparcomm's
abort hook then ends the job with the traceback (the harness reports it).
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent / "mpi"))

import test_powersgd_collective as powersgd_tests  # noqa: E402
import test_quantized as quantized_tests  # noqa: E402
import test_sparse_allreduce as sparse_tests  # noqa: E402

from sparcomm import FP16, QSGD, NoCompression, PowerSGD, TopK  # noqa: E402
from sparcomm.codecs.powersgd import initial_q  # noqa: E402
from sparcomm.comm import ALL_ALGORITHMS, AllreduceStats, allreduce, sparse_allreduce  # noqa: E402
from sparcomm.comm._cost import QUANTIZED_ALGORITHMS  # noqa: E402
from sparcomm.comm._quantized_dsar import dense_phase_key  # noqa: E402
from sparcomm.comm._sparse import split_bounds  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
SPARSE = (*ALL_ALGORITHMS, "auto")
PATTERNS = ("identical", "disjoint", "random", "clustered")

_digests: list[tuple[str, str]] = []


def _record(what: str, array: np.ndarray) -> None:
    """Keep the result's digest; all ranks' digests are compared once, at the end."""
    _digests.append((what, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()))


def _dense_sum(x: np.ndarray) -> np.ndarray:
    total = np.empty_like(x)
    COMM.Allreduce(x, total, op=MPI.SUM)
    return total


def _sparse_input(n: int, pattern: str, density: float, dtype: type, seed: int):
    k = math.ceil(density * n)
    if pattern == "random" and density < 1 and RANK % 3 == 1:
        k = 0  # some ranks contribute nothing
    indices = sparse_tests._support(pattern, n, k, RANK, SIZE, seed)
    rng = np.random.default_rng([seed, RANK, 1])
    if dtype == np.float64:  # integers: the float64 sum is exact in any order
        values = rng.integers(-1000, 1000, indices.size).astype(np.float64)
    else:
        values = rng.standard_normal(indices.size).astype(np.float32)
    dense = np.zeros(n, dtype)
    dense[indices] = values
    return indices, values, dense


#: (n, dtype, patterns, densities): a prime n with every pattern and density, float32
#: on two of them, fewer elements than ranks, and a single element.
SPARSE_CASES = [
    (211, np.float64, PATTERNS, (0.0, 0.05, 0.3, 1.0)),
    (211, np.float32, ("random", "clustered"), (0.05, 1.0)),
    (SIZE // 2 + 1, np.float64, PATTERNS, (0.3, 1.0)),
    (SIZE // 2 + 1, np.float64, ("random",), (0.0,)),
    (1, np.float64, ("identical", "random"), (1.0,)),
]


def check_sparse_family() -> int:
    calls = 0
    for n, dtype, patterns, densities in SPARSE_CASES:
        for pattern in patterns:
            for density in densities:
                indices, values, dense = _sparse_input(n, pattern, density, dtype, calls)
                expected = _dense_sum(dense)
                for algorithm in SPARSE:
                    what = f"sparse {algorithm} n={n} {np.dtype(dtype).name} {pattern} {density}"
                    stats = AllreduceStats()
                    result = sparse_allreduce(
                        indices, values, n, COMM, algorithm=algorithm, stats=stats
                    )
                    sparse_tests._assert_close(result, expected, dtype, what)
                    assert stats.k_all == COMM.allgather(indices.size), what
                    _record(what, result)
                    calls += 1
    # Sparse outputs, the mean and a caller's buffer, once per algorithm.
    indices, values, dense = _sparse_input(97, "random", 0.2, np.float64, 99)
    expected = _dense_sum(dense)
    for algorithm in SPARSE:
        out_i, out_v = sparse_allreduce(
            indices, values, 97, COMM, algorithm=algorithm, dense_output=False
        )
        rebuilt = np.zeros(97)
        rebuilt[out_i] = out_v
        assert np.all(np.diff(out_i) > 0) and np.array_equal(rebuilt, expected), algorithm
        out = np.full(97, np.nan)
        mean = sparse_allreduce(indices, values, 97, COMM, algorithm=algorithm, op="mean", out=out)
        assert mean is out and np.array_equal(out, expected / SIZE), algorithm
        _record(f"sparse outputs {algorithm}", rebuilt)
        calls += 2
    return calls


def check_codec_entry_points() -> int:
    calls = 0
    for n in (1, 5, 37 * SIZE + 1):
        x = np.random.default_rng([2, RANK, n]).standard_normal(n)
        expected = _dense_sum(x)
        for codec in (None, NoCompression()):
            result = allreduce(x, codec=codec)
            assert np.array_equal(result, expected), f"dense n={n}"
            _record(f"dense n={n}", result)
            calls += 1
    x = np.random.default_rng([4, RANK]).standard_normal((41, 3)).astype(np.float32)
    codec = TopK(density=0.1)
    decoded = codec.decode(codec.encode(x))
    expected = _dense_sum(decoded.reshape(-1)).reshape(x.shape) / SIZE
    for algorithm in SPARSE:
        result = allreduce(x, codec=codec, op="mean", algorithm=algorithm)
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6, err_msg=algorithm)
        _record(f"topk {algorithm}", result)
        calls += 1
    return calls


def check_quantized_family() -> int:
    calls = 0
    for n in (5, 203):
        inputs = [quantized_tests._input(r, n=n) for r in range(SIZE)]
        for codec in quantized_tests._codecs():
            for algorithm in quantized_tests._algorithms(codec):
                what = f"quantized {codec!r} {algorithm} n={n}"
                stats = AllreduceStats()
                result = allreduce(
                    inputs[RANK], codec=codec, algorithm=algorithm, key="w", step=3, stats=stats
                )
                reference = quantized_tests._reference(codec, algorithm, inputs, "w", 3)
                np.testing.assert_array_equal(result, reference, err_msg=what)
                assert (stats.bytes_sent, stats.bytes_received) == stats.predicted_bytes, what
                _record(what, result)
                calls += 1
    assert set(QUANTIZED_ALGORITHMS) <= {
        a for c in quantized_tests._codecs() for a in quantized_tests._algorithms(c)
    }
    return calls


def check_quantized_dsar() -> int:
    n = 301
    x = np.random.default_rng([0, RANK]).standard_normal(n).astype(np.float32)
    exact = allreduce(x, codec=TopK(density=1.0), algorithm="dsar")
    bounds = split_bounds(n, SIZE)
    for dense_phase in (QSGD(bits=8), FP16()):
        stats = AllreduceStats()
        result = allreduce(
            x, codec=TopK(density=1.0), dense_phase=dense_phase, key="q", step=2, stats=stats
        )
        assert stats.algorithm == "dsar", stats.algorithm
        for j in range(SIZE):
            part = exact[bounds[j] : bounds[j + 1]]
            if part.size == 0:
                continue
            again = dense_phase.encode(part, key=dense_phase_key("q"), step=2, rank=j)
            np.testing.assert_array_equal(
                result[bounds[j] : bounds[j + 1]],
                dense_phase.decode(again),
                err_msg=repr(dense_phase),
            )
        _record(f"q-dsar {dense_phase!r}", result)
    return 3


def check_powersgd() -> int:
    x = np.random.default_rng(100 + RANK).standard_normal((12, 7))
    codec = PowerSGD(rank=2, error_feedback=False, warm_start=False)
    result = allreduce(x, codec=codec, op="mean", key="w")
    gathered = COMM.allgather(x)
    expected = powersgd_tests._reference_step(gathered, initial_q(0, "w", 0, 2, 7, x.dtype), 2)
    scale = np.abs(expected).max()
    assert np.abs(result - expected).max() <= 500 * np.finfo(x.dtype).eps * SIZE * scale
    _record("powersgd", result)
    return 1


def main() -> None:
    calls = (
        check_sparse_family()
        + check_codec_entry_points()
        + check_quantized_family()
        + check_quantized_dsar()
        + check_powersgd()
    )
    everyone = COMM.gather([digest for _, digest in _digests], root=0)
    if RANK == 0:
        for j, (what, digest) in enumerate(_digests):
            differing = [r for r, digests in enumerate(everyone) if digests[j] != digest]
            assert not differing, f"{what}: ranks {differing} differ from rank 0"
        print(f"ok: {calls} collective calls at P = {SIZE}, identical on every rank", flush=True)


if __name__ == "__main__":
    main()
