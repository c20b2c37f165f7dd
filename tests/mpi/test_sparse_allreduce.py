"""The sparse allreduce family under MPI: every algorithm equals a dense MPI Allreduce of
the decoded inputs, bitwise identical on every rank, for every support pattern, density,
dtype and rank count; mismatched ranks get an error, never a hang.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at P = 2, 3, 4, 5.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm.comm import (  # noqa: E402
    ALL_ALGORITHMS,
    AllreduceStats,
    _dispatch,  # noqa: E402
    allreduce,
    calibrate,
    cost_model,
    predict,
    register_collective,
    sparse_allreduce,
)
from sparcomm.comm._tune import EXPLORE_WITHIN  # noqa: E402

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
ALGORITHMS = (*ALL_ALGORITHMS, "auto")
DENSITIES = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
PATTERNS = ("identical", "disjoint", "random", "clustered")
N = 20011  # prime: divisible by no rank count


def _support(pattern: str, n: int, k: int, rank: int, size: int, seed: int) -> np.ndarray:
    """Sorted unique indices of one rank under a support pattern."""
    rng = np.random.default_rng([seed, rank])
    if pattern == "identical":
        return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    if pattern == "disjoint":  # rank r owns the residues r mod size (as far as they go)
        own = np.arange(rank, n, size)
        return np.sort(own[:k]) if k <= own.size else np.sort(rng.choice(n, k, replace=False))
    if pattern == "random":
        return np.sort(rng.choice(n, k, replace=False))
    # clustered: one contiguous block per rank, blocks overlapping by half
    start = (rank * k // 2 + seed) % max(1, n - k + 1)
    return np.arange(start, start + k)


def _inputs(pattern, density, dtype, some_empty, seed=7):
    k = math.ceil(density * N)
    if some_empty and RANK % 2 == 1:
        k = 0
    indices = _support(pattern, N, k, RANK, SIZE, seed)
    rng = np.random.default_rng([seed, RANK, 1])
    if dtype == np.float64:  # integers: the float64 sum is exact in any order
        values = rng.integers(-1000, 1000, indices.size).astype(np.float64)
    else:
        values = rng.standard_normal(indices.size).astype(np.float32)
    dense = np.zeros(N, dtype)
    dense[indices] = values
    return indices, values, dense


def _dense_reference(dense: np.ndarray) -> np.ndarray:
    total = np.empty_like(dense)
    COMM.Allreduce(dense, total, op=MPI.SUM)
    return total


def _assert_same_on_all_ranks(array: np.ndarray, what: str) -> None:
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    digests = COMM.allgather(digest)
    assert len(set(digests)) == 1, f"{what}: results differ between ranks: {digests}"


def _assert_close(result, expected, dtype, what):
    if dtype == np.float64:
        assert np.array_equal(result, expected), what
    else:
        scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6 * scale, err_msg=what)


_CASES: list = []


def _all_cases() -> list:
    """Every (dtype, pattern, density) case with its dense reference, computed once with
    one Allreduce per dtype (collective: first called by every rank in the same test)."""
    if not _CASES:
        for dtype in (np.float32, np.float64):
            batch = []
            for pattern in PATTERNS:
                for density in DENSITIES:
                    some_empty = pattern in ("random", "clustered") and density in (1e-2, 0.5)
                    indices, values, dense = _inputs(pattern, density, dtype, some_empty)
                    label = f"{np.dtype(dtype).name} {pattern} density={density}"
                    batch.append((label, dtype, indices, values, dense))
            expected = _dense_reference(np.concatenate([case[4] for case in batch]))
            for j, (label, dtype_, indices, values, _) in enumerate(batch):
                _CASES.append((label, dtype_, indices, values, expected[j * N : (j + 1) * N]))
    return _CASES


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_equals_dense_allreduce(algorithm):
    digests = []
    for label, dtype, indices, values, expected in _all_cases():
        what = f"{algorithm} {label}"
        stats = AllreduceStats()
        result = sparse_allreduce(indices, values, N, COMM, algorithm=algorithm, stats=stats)
        assert result.dtype == dtype and result.shape == (N,)
        _assert_close(result, expected, dtype, what)
        digests.append(hashlib.sha256(result.tobytes()).hexdigest())
        if algorithm != "auto":
            assert stats.algorithm == algorithm
        assert stats.k == indices.size and len(stats.k_all) == SIZE
    everyone = COMM.allgather(digests)
    for j, (label, *_rest) in enumerate(_all_cases()):
        assert len({d[j] for d in everyone}) == 1, f"{algorithm} {label}: ranks differ"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sparse_and_natural_outputs_and_mean(algorithm):
    for density in (1e-3, 0.1, 1.0):
        indices, values, dense = _inputs("random", density, np.float64, False, seed=3)
        expected = _dense_reference(dense)
        out_i, out_v = sparse_allreduce(
            indices, values, N, COMM, algorithm=algorithm, dense_output=False
        )
        assert np.all(np.diff(out_i) > 0) and out_i.dtype == np.int32
        rebuilt = np.zeros(N)
        rebuilt[out_i] = out_v
        assert np.array_equal(rebuilt, expected)
        natural = sparse_allreduce(indices, values, N, COMM, algorithm=algorithm, dense_output=None)
        if isinstance(natural, tuple):
            rebuilt = np.zeros(N)
            rebuilt[natural[0]] = natural[1]
            natural = rebuilt
        assert np.array_equal(natural, expected)
        mean = sparse_allreduce(indices, values, N, COMM, algorithm=algorithm, op="mean")
        assert np.array_equal(mean, expected / SIZE)
        out = np.full(N, np.nan)
        returned = sparse_allreduce(indices, values, N, COMM, algorithm=algorithm, out=out)
        assert returned is out and np.array_equal(out, expected)


def test_duplicates_are_summed_in_input_order():
    rng = np.random.default_rng([11, RANK])
    indices = rng.integers(0, 50, 300)  # unsorted, many duplicates
    values = rng.integers(-9, 9, 300).astype(np.float64)
    local = np.zeros(50)
    np.add.at(local, indices, values)
    expected = _dense_reference(local)
    for algorithm in ALGORITHMS:
        result = sparse_allreduce(indices, values, 50, COMM, algorithm=algorithm)
        assert np.array_equal(result, expected), algorithm
        _assert_same_on_all_ranks(result, algorithm)


def test_stats_report_bytes_fill_and_phases():
    indices, values, dense = _inputs("random", 1e-2, np.float32, False)
    for algorithm in ALGORITHMS:
        stats = AllreduceStats()
        sparse_allreduce(indices, values, N, COMM, algorithm=algorithm, stats=stats)
        assert stats.algorithm in ALL_ALGORITHMS and stats.requested == algorithm
        assert stats.size == SIZE and stats.n == N and stats.itemsize == 4
        assert stats.k_all == COMM.allgather(indices.size)
        assert stats.nnz >= max(stats.k_all) and stats.fill >= 1.0
        assert "check" in stats.phases and stats.time > 0
        if SIZE > 1:
            assert stats.bytes_sent > 0 and stats.bytes_received > 0
        else:
            assert stats.bytes_sent == stats.bytes_received == 0
        if algorithm == "auto":
            assert set(stats.predicted) == set(ALL_ALGORITHMS)
            best = min(stats.predicted, key=stats.predicted.get)
            if stats.tuning == "model":  # this shape's first call: the model's choice
                assert stats.algorithm == best
            else:  # a timed or measured choice among the candidates the model found close
                assert stats.tuning in ("explore", "measured")
                limit = EXPLORE_WITHIN * stats.predicted[best]
                assert stats.predicted[stats.algorithm] <= limit


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
@pytest.mark.parametrize(("n", "density"), [(1 << 20, 0.01), (1 << 18, 0.4)])
def test_measured_bytes_match_cost_model(algorithm, n, density):
    # Random supports are what the model's fill assumes; k is large enough that the
    # per-range counts stay within a few percent of their expectation (hypergeometric
    # standard deviation below 2%), and the densities keep the dense-switch decisions
    # far from their thresholds, so the check is deterministic at every P.
    k = int(density * n)
    rng = np.random.default_rng([5, RANK])
    indices = np.sort(rng.choice(n, k, replace=False))
    values = rng.standard_normal(k).astype(np.float32)
    stats = AllreduceStats()
    sparse_allreduce(indices, values, n, COMM, algorithm=algorithm, stats=stats)
    sent, received = predict(algorithm, n, [k] * SIZE, 4, 4).bytes(RANK)
    assert stats.predicted_bytes == (sent, received)
    assert abs(stats.bytes_sent - sent) <= 0.05 * max(sent, 1), (stats.bytes_sent, sent)
    assert abs(stats.bytes_received - received) <= 0.05 * max(received, 1), (
        stats.bytes_received,
        received,
    )


def test_auto_prefers_sparse_when_sparse_and_values_only_when_full():
    n = 1 << 18
    for density in (1e-3, 1.0):
        k = int(density * n)
        rng = np.random.default_rng([9, RANK])
        indices = np.sort(rng.choice(n, k, replace=False))
        stats = AllreduceStats()
        sparse_allreduce(indices, np.ones(k, np.float32), n, COMM, stats=stats)
        if SIZE == 1:
            continue
        if density < 0.01:  # 0.1% of 1 MiB: the dense path moves 500x more bytes
            assert stats.algorithm != "dense", stats.predicted
        else:  # full: schedules that always send indices move twice the bytes
            assert stats.algorithm not in ("allgather", "split_allgather"), stats.predicted


def test_calibration_is_cached_and_agreed():
    # (Its duration is reported by `sparcomm bench allreduce`, not asserted: timed tests
    # fail on a loaded machine.)
    model = calibrate(COMM)
    assert model.calibration_seconds > 0
    assert cost_model(COMM) is model
    assert model.merge > 0 and model.dense > 0
    if SIZE > 1:  # one rank sends nothing: its network terms are zero
        assert model.alpha > 0 and model.beta > 0 and model.beta_allreduce > 0
    assert len(set(COMM.allgather(model.fingerprint()))) == 1
    again = calibrate(COMM)
    assert cost_model(COMM) is again
    # A duplicate over the same processes reuses the model (no new measurement), so
    # two reducers on duplicates of one communicator choose, and sum, alike.
    duplicate = COMM.Dup()
    try:
        assert cost_model(duplicate) is again
    finally:
        duplicate.Free()


# ----------------------------------------------------------------- codec entry points


def test_allreduce_dense_path_equals_mpi():
    rng = np.random.default_rng([2, RANK])
    x = rng.standard_normal((37, 5))
    expected = _dense_reference(x.reshape(-1)).reshape(x.shape)
    assert np.array_equal(allreduce(x), expected)
    from sparcomm.codecs import NoCompression

    stats = AllreduceStats()
    mean = allreduce(x, codec=NoCompression(), op="mean", stats=stats)
    assert np.array_equal(mean, expected / SIZE) and stats.algorithm == "dense"
    inplace = x.copy()
    assert allreduce(inplace, codec=NoCompression(), out=inplace) is inplace
    assert np.array_equal(inplace, expected)
    _assert_same_on_all_ranks(mean, "dense mean")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allreduce_topk_equals_dense_sum_of_decoded(algorithm):
    from sparcomm.codecs import TopK
    from sparcomm.feedback import ErrorFeedback

    rng = np.random.default_rng([4, RANK])
    x = rng.standard_normal((101, 3)).astype(np.float32)
    codec = TopK(density=0.05)
    decoded = codec.decode(codec.encode(x))
    expected = _dense_reference(decoded.reshape(-1)).reshape(x.shape) / SIZE
    result = allreduce(x, codec=codec, op="mean", algorithm=algorithm)
    assert result.shape == x.shape
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    _assert_same_on_all_ranks(result, algorithm)
    # Under error feedback the second call sends x + residual; conservation holds.
    feedback = ErrorFeedback(TopK(density=0.05))
    first = allreduce(x, codec=feedback, key="w", algorithm=algorithm)
    residual = feedback.residual("w").reshape(x.shape)
    sent_sum = _dense_reference((x - residual).reshape(-1)).reshape(x.shape)
    np.testing.assert_allclose(first, sent_sum, rtol=1e-5, atol=1e-5)


def test_registry_dispatches_by_codec_class_and_refuses_unknown():
    class Doubling:
        """A toy codec whose collective doubles a dense sum."""

    def doubled(x, codec, *, comm, op, algorithm, key, step, stats, out):
        return 2 * allreduce(x, comm=comm, op=op, stats=stats)

    register_collective(Doubling, doubled)
    try:
        x = np.full(4, float(RANK + 1))
        assert np.array_equal(allreduce(x, codec=Doubling()), np.full(4, SIZE * (SIZE + 1.0)))
    finally:
        _dispatch.CODEC_COLLECTIVES.pop(Doubling)

    class Unknown:
        pass

    with pytest.raises(NotImplementedError, match="no allreduce for codec Unknown .*; supported"):
        allreduce(x, codec=Unknown())


# ----------------------------------------------------------------- errors, no hangs


def _after_error_still_works():
    """The private communicator must hold no stale message after a refused call."""
    x = np.arange(6, dtype=np.float64) + RANK
    expected = _dense_reference(x)
    for algorithm in ALGORITHMS:
        result = sparse_allreduce(np.arange(6), x, 6, COMM, algorithm=algorithm)
        assert np.array_equal(result, expected)


def test_local_input_errors_name_the_problem():
    idx = np.array([1, 2])
    vals = np.ones(2, np.float32)
    cases = [
        (dict(indices=idx, values=vals.astype(np.int32), n=5), TypeError, "float32 or float64"),
        (dict(indices=idx.astype(float), values=vals, n=5), TypeError, "integers"),
        (dict(indices=idx, values=vals[:1], n=5), ValueError, "same length"),
        (dict(indices=np.array([1, 7]), values=vals, n=5), ValueError, r"\[0, n\) = \[0, 5\)"),
        (dict(indices=np.array([-1, 2]), values=vals, n=5), ValueError, "got min -1"),
        (dict(indices=idx, values=vals, n=0), ValueError, "n must be a positive integer"),
        (dict(indices=idx, values=vals, n=5, op="max"), ValueError, "op must be one of"),
        (dict(indices=idx, values=vals, n=5, algorithm="ring"), ValueError, "algorithm must be"),
        (dict(indices=idx, values=vals, n=5, dense_output=1), ValueError, "dense_output"),
        (dict(indices=idx, values=vals, n=5, out=np.zeros(4, np.float32)), ValueError, "5 elem"),
        (dict(indices=idx, values=vals, n=5, out=np.zeros(5)), TypeError, "dtype float32"),
        (dict(indices=list(idx), values=vals, n=5), TypeError, "indices must be"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            sparse_allreduce(comm=COMM, **kwargs)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="algorithm must be one of"):
        allreduce(np.ones(3), algorithm="dsar")
    _after_error_still_works()


def test_one_rank_with_bad_input_fails_every_rank():
    if SIZE == 1:
        return  # needs a second rank to disagree with
    bad = RANK == SIZE - 1
    indices = np.array([0, 99 if bad else 3])
    with pytest.raises(ValueError) as raised:
        sparse_allreduce(indices, np.ones(2), 10, COMM)
    if bad:
        assert "indices must lie in [0, n)" in str(raised.value)
    else:
        assert f"rank {SIZE - 1} rejected its input" in str(raised.value)
    values = np.ones(2, np.int64 if bad else np.float64)
    with pytest.raises(TypeError):
        sparse_allreduce(np.array([0, 1]), values, 10, COMM)
    _after_error_still_works()


@pytest.mark.parametrize("field", ["n", "dtype", "algorithm", "op", "codec", "size"])
def test_ranks_that_disagree_get_a_clear_error(field):
    if SIZE == 1:
        return  # needs a second rank to disagree with
    odd = RANK == SIZE - 1
    idx = np.array([0, 2])
    n = 11 if (field == "n" and odd) else 10
    dtype = np.float32 if (field == "dtype" and odd) else np.float64
    algorithm = "dsar" if (field == "algorithm" and odd) else "split_allgather"
    op = "mean" if (field == "op" and odd) else "sum"
    with pytest.raises(ValueError, match=f"ranks disagree on {field if field != 'size' else 'n'}"):
        if field in ("codec", "size"):
            from sparcomm.codecs import NoCompression, TopK

            x = np.ones(12 if (field == "size" and odd) else 10)
            codec = TopK(k=2) if (odd or field == "size") else TopK(k=3)
            if field == "codec" and RANK == 0 and SIZE > 2:
                codec = NoCompression()  # a dense rank among sparse ones
            allreduce(x, codec=codec, comm=COMM, algorithm="auto")
        else:
            sparse_allreduce(idx, np.ones(2, dtype), n, COMM, algorithm=algorithm, op=op)
    _after_error_still_works()


def test_empty_everywhere_and_tiny_n():
    for algorithm in ALGORITHMS:
        result = sparse_allreduce(np.zeros(0, np.int64), np.zeros(0), N, COMM, algorithm=algorithm)
        assert not result.any()
        # n smaller than the number of ranks: some owners hold empty ranges.
        result = sparse_allreduce(np.array([0]), np.array([1.0]), 1, COMM, algorithm=algorithm)
        assert np.array_equal(result, [float(SIZE)])
