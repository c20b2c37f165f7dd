"""The quantized allreduce under MPI: every algorithm equals a local reference built from
the codec itself (bitwise), identical on every rank; QSGD and TernGrad sums are unbiased;
error feedback conserves mass across the worker and owner levels; TernGrad's shared scale
gives the exact integer sum; measured bytes equal the cost model; a failing rank raises
everywhere instead of hanging.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at P = 2, 3, 4, 5.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import FP16, QSGD, ErrorFeedback, OneBit, TernGrad  # noqa: E402
from sparcomm.comm import AllreduceStats, allreduce  # noqa: E402
from sparcomm.comm._cost import QUANTIZED_ALGORITHMS, predict_quantized  # noqa: E402
from sparcomm.comm._protocol import STATUS_BYTES  # noqa: E402
from sparcomm.comm._quantized_layout import (  # noqa: E402
    SHARED_SCALE_ALIGNMENT,
    chunk_alignment,
    chunk_bounds,
    owner_key,
)

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
N = 2003  # prime: no bucket, byte or rank count divides it


def _codecs():
    return [
        QSGD(bits=4, bucket_size=64),
        QSGD(bits=2, bucket_size=7, norm="max"),
        TernGrad(),
        TernGrad(bucket_size=50, clip=2.5),
        OneBit(bucket_size=32, error_feedback=False),
        FP16(),
    ]


def _algorithms(codec):
    return [a for a in QUANTIZED_ALGORITHMS if a != "shared_scale" or isinstance(codec, TernGrad)]


CASES = [(c, a) for c in _codecs() for a in _algorithms(c)]
IDS = [f"{c!r}-{a}" for c, a in CASES]


def _input(rank: int, n: int = N, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, rank]).standard_normal(n).astype(dtype)


def _digest_everywhere(array: np.ndarray) -> None:
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    digests = COMM.allgather(digest)
    assert len(set(digests)) == 1, f"results differ between ranks: {digests}"


def _reference(codec, algorithm, inputs, key, step):
    """What the algorithm must return, computed locally from the codec alone."""
    dtype = inputs[0].dtype
    n = inputs[0].size
    payloads = [codec.encode(x, key=key, step=step, rank=r) for r, x in enumerate(inputs)]
    if algorithm == "allgather":
        total = codec.decode(payloads[0]).reshape(-1)
        for p in payloads[1:]:
            total = total + codec.decode(p).reshape(-1)
        if type(codec) is FP16:  # plain FP16 rounds its sum once, as its owners do
            return total.astype(np.float16).astype(dtype)
        return total
    if algorithm == "reduce_scatter_allgather":
        bounds = chunk_bounds(n, len(inputs), chunk_alignment(codec))
        out = np.empty(n, dtype)
        for j in range(len(inputs)):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if b == a:
                continue
            parts = [codec.decode(codec.slice_payload(p, a, b)) for p in payloads]
            chunk = parts[0]
            for part in parts[1:]:
                chunk = chunk + part
            again = codec.encode(chunk, key=owner_key(key), step=step, rank=j)
            out[a:b] = codec.decode(again)
        return out
    # shared_scale: S_b times the exact integer sum of every rank's ternary values
    scale = np.max([codec.local_scales(x) for x in inputs], axis=0)
    codes = [codec.encode(x, key=key, step=step, rank=r, scale=scale) for r, x in enumerate(inputs)]
    ternary = sum(
        np.rint(codec.decode(p) / np.repeat(scale, codec.bucket_for(n))[:n]).astype(np.int64)
        for p in codes
    )
    return ternary.astype(dtype) * np.repeat(scale, codec.bucket_for(n))[:n].astype(dtype)


@pytest.mark.parametrize(("codec", "algorithm"), CASES, ids=IDS)
def test_equals_local_reference_and_identical_everywhere(codec, algorithm):
    inputs = [_input(r) for r in range(SIZE)]
    stats = AllreduceStats()
    result = allreduce(
        inputs[RANK], codec=codec, comm=COMM, algorithm=algorithm, key="w", step=3, stats=stats
    )
    _digest_everywhere(result)
    np.testing.assert_array_equal(result, _reference(codec, algorithm, inputs, "w", 3))
    assert stats.algorithm == algorithm and stats.size == SIZE and stats.n == N
    assert (stats.bytes_sent, stats.bytes_received) == stats.predicted_bytes


@pytest.mark.parametrize("algorithm", ["allgather", "reduce_scatter_allgather"])
@pytest.mark.parametrize("make", [lambda: QSGD(bits=4), lambda: OneBit(error_feedback=False)])
def test_fused_host_sums_equal_the_local_reference(make, algorithm):
    # Large enough that the gathered payloads (and at up to 4 ranks each owner's chunk)
    # are summed by the codec's fused kernel (_sums.FUSED_SUM_MIN), odd so the last group of
    # 8 and the last bucket are partial.
    codec, n = make(), 300_007
    inputs = [_input(r, n) for r in range(SIZE)]
    result = allreduce(inputs[RANK], codec=codec, comm=COMM, algorithm=algorithm, key="w", step=1)
    _digest_everywhere(result)
    np.testing.assert_array_equal(result, _reference(codec, algorithm, inputs, "w", 1))


def _ternary_sum(codec, inputs, scale, per_element, key):
    """Every rank's ternary values in {-1, 0, 1}, summed exactly in int64 by the test."""
    return sum(
        np.rint(
            codec.decode(codec.encode(x, key=key, step=0, rank=r, scale=scale)) / per_element
        ).astype(np.int64)
        for r, x in enumerate(inputs)
    )


def test_shared_scale_is_the_exact_integer_sum():
    """The result is exactly ``S_b * k`` with ``k`` the integer sum of the ranks' ternary
    values (one rounding, no accumulated error); with ``S = 1`` it is ``k`` itself."""
    codec = TernGrad(bucket_size=16)
    inputs = [_input(r, dtype=np.float64) for r in range(SIZE)]
    result = allreduce(
        inputs[RANK], codec=codec, comm=COMM, algorithm="shared_scale", key=5, step=0
    )
    scale = np.max([codec.local_scales(x) for x in inputs], axis=0)
    per_element = np.repeat(scale, 16)[:N]
    integers = _ternary_sum(codec, inputs, scale, per_element, 5)
    assert np.abs(integers).max() <= SIZE and np.abs(integers).max() >= min(SIZE, 2)
    np.testing.assert_array_equal(result, integers.astype(np.float64) * per_element)

    unit = [x / np.abs(x).max() for x in inputs]  # shared scale exactly 1.0
    codec = TernGrad()
    result = allreduce(
        unit[RANK].astype(np.float32),
        codec=codec,
        comm=COMM,
        algorithm="shared_scale",
        key=6,
        step=0,
    )
    ones = np.ones(N)
    integers = _ternary_sum(
        codec, [u.astype(np.float32) for u in unit], np.ones(1, np.float32), ones, 6
    )
    np.testing.assert_array_equal(result, integers.astype(np.float32))


@pytest.mark.parametrize("n", [1, 5, 8, 64 * SIZE + 3])
@pytest.mark.parametrize("algorithm", QUANTIZED_ALGORITHMS)
def test_tiny_vectors_and_empty_chunks(n, algorithm):
    codec = TernGrad(bucket_size=64) if algorithm == "shared_scale" else QSGD(bucket_size=64)
    inputs = [_input(r, n=n, dtype=np.float64) for r in range(SIZE)]
    stats = AllreduceStats()
    result = allreduce(
        inputs[RANK].reshape(n, 1),
        codec=codec,
        comm=COMM,
        op="mean",
        algorithm=algorithm,
        key="t",
        step=1,
        stats=stats,
    )
    assert result.shape == (n, 1)
    _digest_everywhere(result)
    expected = _reference(codec, algorithm, inputs, "t", 1) / SIZE
    np.testing.assert_array_equal(result.reshape(-1), expected)
    assert (stats.bytes_sent, stats.bytes_received) == stats.predicted_bytes


def _bias_ratio(samples: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """``D / E[D]`` and its 5-sigma threshold, ``D = sum_i (mean_i - exact_i)^2``.

    For an unbiased estimator ``E[D] = sum_i var_i / T`` (T samples); ``D / E[D]`` is a
    weighted chi-square with mean 1 and about ``dof = (sum v)^2 / sum v^2`` degrees of
    freedom, so its standard deviation is ``sqrt(2 / dof)``.  A bias ``b_i`` adds
    ``T sum b_i^2 / sum var_i`` to the ratio.  Pooling over elements keeps rare events
    (elements rounded up in a handful of the T samples) from dominating, as they would
    in a per-element t statistic.
    """
    count = samples.shape[0]
    variance = samples.var(axis=0, ddof=1)
    distance = float(np.sum((samples.mean(axis=0) - exact) ** 2))
    expected = float(variance.sum()) / count
    dof = float(variance.sum() ** 2 / np.sum(variance**2))
    return distance / expected, 1.0 + 5.0 * np.sqrt(2.0 / dof)


UNBIASED = [
    (QSGD(bits=3, bucket_size=16), "allgather"),
    (QSGD(bits=3, bucket_size=16), "reduce_scatter_allgather"),
    (TernGrad(), "allgather"),
    (TernGrad(), "reduce_scatter_allgather"),
    (TernGrad(bucket_size=16), "shared_scale"),
]


@pytest.mark.parametrize(("codec", "algorithm"), UNBIASED, ids=[f"{c!r}-{a}" for c, a in UNBIASED])
def test_unbiased_codecs_give_unbiased_sums(codec, algorithm):
    """Over T = 200 steps (independent random streams) the mean of the allreduce
    approaches the exact sum within five standard deviations of :func:`_bias_ratio`;
    a bias of 0.15 per-sample standard deviations (ratio ~ 1 + 200 * 0.0225 = 5.5) is
    detected, so the test can fail."""
    n, steps = 64, 200
    x = _input(RANK, n=n, dtype=np.float64, seed=11)
    exact = np.empty_like(x)
    COMM.Allreduce(x, exact, op=MPI.SUM)
    samples = np.stack(
        [
            allreduce(x, codec=codec, comm=COMM, algorithm=algorithm, key="u", step=t)
            for t in range(steps)
        ]
    )
    ratio, threshold = _bias_ratio(samples, exact)
    assert threshold < 3.0, "too few random elements for a meaningful test"
    assert ratio < threshold
    shifted = exact - 0.15 * samples.std(axis=0, ddof=1)
    assert _bias_ratio(samples, shifted)[0] > threshold


def _gather_residuals(memory, key, n):
    """Sum over ranks of the worker residuals and concatenation of owner residuals."""
    worker = memory.residual(key)
    owner = memory.residual(owner_key(key))
    workers = COMM.allgather(np.zeros(n) if worker is None else worker.astype(np.float64))
    owners = COMM.allgather(None if owner is None else owner.astype(np.float64))
    return np.sum(workers, axis=0), owners


EF_CASES = [
    (lambda: OneBit(bucket_size=32), "reduce_scatter_allgather"),
    (lambda: OneBit(bucket_size=32), "allgather"),
    (lambda: ErrorFeedback(QSGD(bits=2, bucket_size=16)), "reduce_scatter_allgather"),
    (lambda: ErrorFeedback(FP16()), "reduce_scatter_allgather"),
    (lambda: ErrorFeedback(TernGrad(bucket_size=32)), "shared_scale"),
]


@pytest.mark.parametrize(("make", "algorithm"), EF_CASES, ids=[f"{m()!r}-{a}" for m, a in EF_CASES])
def test_error_feedback_conserves_mass_across_both_levels(make, algorithm):
    """applied + every worker residual + every owner residual == everything that went in."""
    from sparcomm.feedback import unwrap

    codec = make()
    _, memory = unwrap(codec)
    n, steps = 301, 6
    applied = np.zeros(n)
    went_in = np.zeros(n)
    for t in range(steps):
        x = _input(RANK, n=n, dtype=np.float64, seed=100 + t)
        total = np.empty_like(x)
        COMM.Allreduce(x, total, op=MPI.SUM)
        went_in += total
        applied += allreduce(x, codec=codec, comm=COMM, algorithm=algorithm, key="g", step=t)
    workers, owners = _gather_residuals(memory, "g", n)
    held = workers.copy()
    if algorithm == "reduce_scatter_allgather":
        bounds = chunk_bounds(n, SIZE, chunk_alignment(unwrap(codec)[0]))
        for j, residual in enumerate(owners):
            a, b = int(bounds[j]), int(bounds[j + 1])
            assert (residual is None) == (a == b)
            if residual is not None:
                held[a:b] += residual
        if SIZE > 1:  # one rank's decoded payload may re-encode exactly
            assert any(r is not None and np.abs(r).max() > 0 for r in owners)
    else:
        assert all(r is None for r in owners)
    np.testing.assert_allclose(applied + held, went_in, rtol=0, atol=1e-12 * steps * SIZE * 10)


def test_owner_residuals_are_saved_and_restored():
    codec = OneBit(bucket_size=32)
    inputs = [_input(RANK, n=257, dtype=np.float64, seed=s) for s in range(4)]
    for t in range(3):
        allreduce(
            inputs[t], codec=codec, comm=COMM, algorithm="reduce_scatter_allgather", key="s", step=t
        )
    state = codec.state_dict()
    if (
        chunk_bounds(257, SIZE, chunk_alignment(OneBit(32)))[RANK + 1]
        > chunk_bounds(257, SIZE, chunk_alignment(OneBit(32)))[RANK]
    ):
        assert owner_key("s") in state["residuals"]
    expected = allreduce(
        inputs[3], codec=codec, comm=COMM, algorithm="reduce_scatter_allgather", key="s", step=3
    )
    fresh = OneBit(bucket_size=32)
    fresh.load_state_dict(state)
    again = allreduce(
        inputs[3], codec=fresh, comm=COMM, algorithm="reduce_scatter_allgather", key="s", step=3
    )
    np.testing.assert_array_equal(again, expected)
    if SIZE == 1:
        return  # one rank's decoded payload re-encodes exactly: its owner residual is ~0
    # without the owner residuals the result differs (so the check above means something)
    partial = OneBit(bucket_size=32)
    partial.load_state_dict(
        {**state, "residuals": {k: v for k, v in state["residuals"].items() if k != owner_key("s")}}
    )
    other = allreduce(
        inputs[3], codec=partial, comm=COMM, algorithm="reduce_scatter_allgather", key="s", step=3
    )
    assert COMM.allreduce(int(not np.array_equal(other, expected)), op=MPI.SUM) > 0


@pytest.mark.parametrize("algorithm", QUANTIZED_ALGORITHMS)
@pytest.mark.parametrize("n", [1000, 65536 + 17])
def test_measured_bytes_match_the_cost_model(algorithm, n):
    """Within 5% as the issue asks; in fact exact, and the allgather bytes also match
    the payload sizes directly."""
    codec = TernGrad(bucket_size=128) if algorithm == "shared_scale" else QSGD(bits=4)
    stats = AllreduceStats()
    allreduce(_input(RANK, n=n), codec=codec, comm=COMM, algorithm=algorithm, key="b", stats=stats)
    predicted = predict_quantized(algorithm, codec, n, np.float32, SIZE).bytes(RANK)
    for measured, expected in zip((stats.bytes_sent, stats.bytes_received), predicted, strict=True):
        assert abs(measured - expected) <= 0.05 * max(expected, 1)
    assert (stats.bytes_sent, stats.bytes_received) == predicted
    if algorithm == "allgather" and SIZE > 1:
        signature = stats.predicted_bytes[0] - (SIZE - 1) * (
            STATUS_BYTES + codec.encode(_input(RANK, n=n)).nbytes
        )
        assert 0 < signature <= 8 * 16 * SIZE
    if algorithm == "shared_scale":
        assert SHARED_SCALE_ALIGNMENT == 8


def test_statistics_name_algorithm_and_phases():
    stats = AllreduceStats()
    allreduce(
        _input(RANK), codec=QSGD(), comm=COMM, algorithm="reduce_scatter_allgather", stats=stats
    )
    assert stats.requested == stats.algorithm == "reduce_scatter_allgather"
    for phase in ("check", "encode", "reduce_scatter", "owner_sum", "allgather", "decode"):
        assert phase in stats.phases
    assert stats.time > 0 and stats.itemsize == 4
    auto = AllreduceStats()
    result = allreduce(_input(RANK), codec=TernGrad(), comm=COMM, stats=auto)
    _digest_everywhere(result)
    assert auto.requested == "auto" and auto.algorithm in QUANTIZED_ALGORITHMS
    assert COMM.allgather(auto.algorithm) == [auto.algorithm] * SIZE
    if SIZE > 1:
        assert set(auto.predicted) == set(QUANTIZED_ALGORITHMS)
        if auto.tuning == "model":  # this shape's first call (else a measured choice)
            assert auto.algorithm == min(auto.predicted, key=auto.predicted.get)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("algorithm", QUANTIZED_ALGORITHMS)
def test_non_finite_input_on_one_rank_raises_everywhere(algorithm):
    codec = TernGrad() if algorithm == "shared_scale" else QSGD()
    x = _input(RANK)
    if RANK == SIZE - 1:
        x[7] = np.nan
    with pytest.raises(ValueError, match="non-finite" if RANK == SIZE - 1 else "rank"):
        allreduce(x, codec=codec, comm=COMM, algorithm=algorithm, key="nan")
    # the communicator still works afterwards
    allreduce(_input(RANK), codec=codec, comm=COMM, algorithm=algorithm, key="ok")


def test_overflowing_sum_at_an_owner_raises_everywhere():
    if SIZE == 1:
        pytest.skip("a single rank's sum cannot overflow")
    x = np.full(100, 3.0e38, dtype=np.float32)
    with pytest.raises(ValueError, match="non-finite|rank"):
        allreduce(x, codec=QSGD(norm="max"), comm=COMM, algorithm="reduce_scatter_allgather")


def test_bad_requests_raise_on_every_rank():
    x = _input(RANK)
    with pytest.raises(NotImplementedError, match="TernGrad"):
        allreduce(x, codec=QSGD(), comm=COMM, algorithm="shared_scale")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        allreduce(x, codec=QSGD(), comm=COMM, algorithm="dsar")
    with pytest.raises(ValueError, match="op must be one of"):
        allreduce(x, codec=OneBit(), comm=COMM, op="max")
    with pytest.raises(ValueError, match="empty"):
        allreduce(np.zeros(0, np.float32), codec=FP16(), comm=COMM)
    with pytest.raises(TypeError, match="float32 or float64"):
        allreduce(x.astype(np.float16), codec=FP16(), comm=COMM)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        allreduce(x, codec=FP16(), comm=COMM, out=np.empty(N + 1, np.float32))


def test_ranks_that_disagree_raise_instead_of_hanging():
    if SIZE == 1:
        pytest.skip("needs two ranks")
    x = _input(RANK)
    algorithm = "allgather" if RANK == 0 else "reduce_scatter_allgather"
    with pytest.raises(
        ValueError,
        match="disagree on algorithm: rank 0 has 'allgather', "
        "rank 1 has 'reduce_scatter_allgather'",
    ):
        allreduce(x, codec=QSGD(), comm=COMM, algorithm=algorithm)
    codec = QSGD(bits=4) if RANK == 0 else QSGD(bits=8)
    with pytest.raises(ValueError, match="disagree on codec"):
        allreduce(x, codec=codec, comm=COMM, algorithm="allgather")
    failing = x if RANK else np.zeros(0, np.float32)
    with pytest.raises(ValueError):
        allreduce(failing, codec=QSGD(), comm=COMM)
