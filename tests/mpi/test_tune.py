"""auto's measured choice under MPI (sparcomm.comm._tune): every rank chooses alike,
a slow algorithm is measured as slow and left, and plain FP16 gives the same bits
whichever of its algorithms runs (so auto may choose any).  Every body works at any
number of ranks."""

from __future__ import annotations

import time

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import FP16, QSGD, TopK  # noqa: E402
from sparcomm._errors import NonFiniteError  # noqa: E402
from sparcomm.comm import (  # noqa: E402
    AllreduceStats,
    _quantized,
    _sparse,
    _tune,
    allreduce,
    set_tuning,
)
from sparcomm.comm._context import comm_state  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
HALF_ALGORITHMS = ("allgather", "reduce_scatter_allgather", "pipelined")


@pytest.fixture
def comm():
    """A fresh duplicate: its own cost model state and tuner."""
    duplicate = COMM.Dup()
    yield duplicate
    duplicate.Free()


def _slowed(table, name, monkeypatch, seconds=0.03):
    """Make ``table[name]`` slower on rank 0 only: the agreed time is the slowest
    rank's, so every rank must see it as slow."""
    original = table[name]

    def slow(*args, **kwargs):
        if RANK == 0:
            time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setitem(table, name, slow)


@pytest.mark.parametrize("family", ["sparse", "quantized"])
def test_a_slowed_algorithm_is_measured_and_left_on_every_rank(family, comm, monkeypatch):
    if SIZE == 1:
        pytest.skip("one rank runs every algorithm as a local copy: nothing to choose")
    monkeypatch.setattr(_tune, "EXPLORE_WITHIN", float("inf"))  # every algorithm a candidate
    n = 1 << 14
    x = np.random.default_rng([3, RANK]).standard_normal(n).astype(np.float32)
    codec = TopK(density=0.01) if family == "sparse" else QSGD(bits=4)
    table = _sparse.ALGORITHMS if family == "sparse" else _quantized.ALGORITHMS
    first = AllreduceStats()
    allreduce(x, codec=codec, comm=comm, stats=first)
    assert first.tuning == "model"
    _slowed(table, first.algorithm, monkeypatch)  # the model's choice becomes the slowest
    candidates = min(_tune.MAX_CANDIDATES, len(first.predicted))
    stats = AllreduceStats()
    seen = []
    limit = candidates * _tune.CHEAP_FACTOR * _tune.TRIALS + 1  # cheap calls race longer
    while stats.tuning != "measured" and len(seen) < limit:
        allreduce(x, codec=codec, comm=comm, stats=stats)
        seen.append((stats.algorithm, stats.tuning))
    assert all(mode == "explore" for _, mode in seen[:-1]), seen
    assert len({name for name, _ in seen[:-1]}) == candidates, seen  # every one raced
    assert seen[-1][1] == "measured" and seen[-1][0] != first.algorithm, seen
    assert set(stats.measured) == {name for name, _ in seen[:-1]}  # the race's medians
    assert stats.measured[first.algorithm] > stats.measured[stats.algorithm]
    choices = _tune.tuner_of(comm_state(comm)).choices()
    assert len(choices) == 1 and next(iter(choices.values())) == seen[-1][0]
    assert COMM.allgather(seen) == [seen] * SIZE  # the same decisions on every rank


def test_a_shape_seen_once_is_never_timed(comm):
    stats = AllreduceStats()
    for n in range(1000, 1010):  # ten shapes, one call each
        x = np.ones(n, dtype=np.float32)
        allreduce(x, codec=TopK(density=0.1), comm=comm, stats=stats)
        assert stats.tuning == "model" and "tune" not in stats.phases


@pytest.mark.parametrize("n", [1, 3, 1000, 1 << 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_every_algorithm_gives_the_same_bits(n, dtype, comm):
    x = (np.random.default_rng([n, RANK]).standard_normal(n) * 100).astype(dtype)
    halves = COMM.allgather(x.astype(np.float16))
    total = halves[0].astype(dtype)
    for half in halves[1:]:
        total += half.astype(dtype)
    expected = total.astype(np.float16).astype(dtype)  # rank-order sum, rounded once
    for algorithm in HALF_ALGORITHMS:
        result = allreduce(x, codec=FP16(), comm=comm, algorithm=algorithm)
        np.testing.assert_array_equal(result, expected, err_msg=algorithm)
    stats = AllreduceStats()
    for _ in range(2 + _tune.MAX_CANDIDATES * _tune.TRIALS):  # every algorithm runs in the race
        np.testing.assert_array_equal(allreduce(x, codec=FP16(), comm=comm, stats=stats), expected)
        assert stats.algorithm in HALF_ALGORITHMS or SIZE == 1


def test_fp16_allgather_sum_overflow_raises_on_every_rank(comm):
    if SIZE == 1:
        pytest.skip("a single rank's sum is its own float16 values: it cannot overflow")
    x = np.full(8, 60000.0, dtype=np.float32)  # finite in float16; the sum is not
    with pytest.raises(NonFiniteError, match="beyond float16's range"):
        allreduce(x, codec=FP16(), comm=comm, algorithm="allgather")
    # The communicator still works afterwards on every rank.
    result = allreduce(np.ones(8, np.float32), codec=FP16(), comm=comm, algorithm="allgather")
    assert np.all(result == SIZE)


def test_set_tuning_is_agreed_and_keeps_the_models_choice(comm):
    x = np.random.default_rng([4, RANK]).standard_normal(1 << 12).astype(np.float32)
    set_tuning(comm, False)
    stats = AllreduceStats()
    for _ in range(4):
        allreduce(x, codec=TopK(density=0.01), comm=comm, stats=stats)
        assert stats.tuning == "model" and "tune" not in stats.phases
    if SIZE > 1:  # (one rank always agrees with itself)
        with pytest.raises(ValueError, match="ranks disagree on enabled"):
            set_tuning(comm, RANK == 0)  # True on rank 0 only: every rank raises
    with pytest.raises(TypeError, match="enabled must be True or False"):
        set_tuning(comm, "no" if RANK == 0 else False)  # every rank raises
    set_tuning(comm, True)
    allreduce(x, codec=TopK(density=0.01), comm=comm, stats=stats)
    assert stats.tuning in ("explore", "model")  # tuning again (model: one candidate)
