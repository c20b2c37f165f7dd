"""Agreed layouts (sparcomm.comm._call.agreed_layout): after a layout's first full
signature check, its calls exchange no signature row, yet a failure on one rank is
still an error on every rank, and a changed k makes every rank redo the call.
Every body works at any number of ranks.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import QSGD, ErrorFeedback, NoCompression, TopK  # noqa: E402
from sparcomm.comm import (  # noqa: E402
    AllreduceStats,
    _call,  # noqa: E402
    allreduce,
    sparse_allreduce,
)
from sparcomm.comm._call import agreed_layout  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD


@pytest.fixture
def signature_rows(monkeypatch):
    """Counts this rank's signature checks (each an Allgather of its row)."""
    calls = []
    original = _call.check_signature

    def counting(channel, row, *args):
        calls.append(row.size)
        return original(channel, row, *args)

    monkeypatch.setattr(_call, "check_signature", counting)
    return calls


def _dense_sum(x: np.ndarray) -> np.ndarray:
    total = np.empty_like(x)
    COMM.Allreduce(x, total, op=MPI.SUM)
    return total


@pytest.mark.parametrize(
    "codec", [TopK(density=0.1), QSGD(bits=4), None], ids=["topk", "qsgd", "dense"]
)
def test_only_the_first_call_of_a_layout_checks(codec, signature_rows):
    comm = COMM.Dup()
    rng = np.random.default_rng(7 + COMM.Get_rank())
    results = []
    for step in range(4):
        x = rng.standard_normal(1000)
        with agreed_layout(("test", 0)):
            results.append(allreduce(x, codec=codec, comm=comm, key="w", step=step))
    assert len(signature_rows) == 1
    root = COMM.bcast(results if COMM.Get_rank() == 0 else None, root=0)
    for mine, theirs in zip(results, root, strict=True):
        assert np.array_equal(mine, theirs)
    comm.Free()


@pytest.mark.parametrize(
    "algorithm", ["auto", "allgather", "recursive_doubling", "split_allgather", "dsar", "dense"]
)
def test_steady_result_equals_checked_result(algorithm):
    comm = COMM.Dup()
    codec = TopK(density=0.05)
    x = np.random.default_rng(3 + COMM.Get_rank()).standard_normal(2000)
    checked = allreduce(x, codec=codec, comm=comm, algorithm=algorithm)
    with agreed_layout(("equal", 0)):
        allreduce(x, codec=codec, comm=comm, algorithm=algorithm)
        stats = AllreduceStats()
        steady = allreduce(x, codec=codec, comm=comm, stats=stats, algorithm=algorithm)
    assert np.array_equal(checked, steady)
    assert "check" in stats.phases  # the status wait, reported as the check
    comm.Free()


@pytest.mark.parametrize(
    "codec",
    [ErrorFeedback(TopK(density=0.1)), QSGD(bits=4), NoCompression()],
    ids=["topk-ef", "qsgd", "dense"],
)
def test_failure_in_steady_state_raises_on_every_rank(codec):
    comm = COMM.Dup()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    rng = np.random.default_rng(11 + rank)
    bad = size - 1
    for step in range(4):
        x = rng.standard_normal(500)
        if step == 2 and rank == bad:
            x[7] = np.nan
        with agreed_layout(("fail", 0)):
            if step == 2:
                with pytest.raises(ValueError) as info:
                    allreduce(x, codec=codec, comm=comm, key="w", step=step)
                if rank != bad:
                    assert f"rank {bad}" in str(info.value)
                else:
                    assert "non-finite" in str(info.value)
            else:  # before and after the failure: no hang, the same sum on every rank
                result = allreduce(x, codec=codec, comm=comm, key="w", step=step)
                root = COMM.bcast(result if rank == 0 else None, root=0)
                assert np.array_equal(result, root)
    comm.Free()


def test_changed_layout_in_steady_state_raises_on_every_rank():
    comm = COMM.Dup()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    for step in range(3):
        dtype = np.float32 if (step == 1 and rank == size - 1) else np.float64
        x = np.ones(300, dtype=dtype)
        with agreed_layout(("changed", 0)):
            if step == 1:
                with pytest.raises(ValueError, match="differs from the layout|rejected"):
                    allreduce(x, codec=TopK(k=10), comm=comm)
            else:
                allreduce(x, codec=TopK(k=10), comm=comm)
    comm.Free()


def test_a_changed_k_redoes_the_call_with_a_full_check(signature_rows):
    comm = COMM.Dup()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    n = 100
    for step in range(4):
        # The last rank sends more entries at step 2: every rank must redo that call.
        k = 5 + (3 if (step == 2 and rank == size - 1) else 0)
        indices = np.arange(rank, rank + k, dtype=np.int64) % n
        values = np.full(k, float(rank + step + 1))
        with agreed_layout(("k", 0)):
            result = sparse_allreduce(indices, values, n, comm=comm)
        dense = np.zeros(n)
        np.add.at(dense, indices, values)
        assert np.array_equal(result, _dense_sum(dense))
    # step 0: the first check; step 2: the redo; step 3: full checks from then on.
    assert len(signature_rows) == 3
    comm.Free()


def test_reducer_checks_each_bucket_once(signature_rows):
    rank = COMM.Get_rank()
    shapes = {"w1": (64, 32), "b1": (32,), "w2": (32, 10)}
    with GradientReducer(
        codec=ErrorFeedback(TopK(density=0.1)), fusion_threshold_bytes=1 << 20, dense_below=64
    ) as reducer:
        for step in range(3):
            if step == 1:
                signature_rows.clear()  # set-up (warm-up) and the first step check in full
            rng = np.random.default_rng(100 * step + rank)
            grads = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
            reducer.reduce(grads)
        dense = sum(not bucket.compressed for bucket in reducer._plans[True].buckets)
    assert reducer.last_stats.compressed_buckets == 1 and dense == 1
    assert signature_rows == []  # steady state: every bucket checks locally


def test_reducer_failure_in_steady_state_raises_on_every_rank_and_recovers():
    rank, size = COMM.Get_rank(), COMM.Get_size()
    shapes = {"w": (64, 32), "b1": (200,), "b2": (300,)}
    with GradientReducer(codec=ErrorFeedback(TopK(density=0.1)), dense_below=100) as reducer:
        for step in range(4):
            rng = np.random.default_rng(100 * step + rank)
            grads = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
            if step == 2 and rank == size - 1:
                grads["b2"][5] = np.inf
            if step == 2:
                with pytest.raises(ValueError):
                    reducer.reduce(grads)
                continue
            reduced = reducer.reduce(grads)
            root = COMM.bcast(reduced if rank == 0 else None, root=0)
            for name in shapes:
                assert np.array_equal(reduced[name], root[name])


# -- PowerSGD (the low-rank family): the status travels with the P factors -------------


def test_powersgd_checks_once_per_layout_and_equals_the_checked_result(signature_rows):
    from sparcomm import PowerSGD

    comm = COMM.Dup()
    rng = np.random.default_rng(3 + COMM.Get_rank())
    xs = [rng.standard_normal((30, 20)) for _ in range(4)]
    steady, checked = PowerSGD(rank=2), PowerSGD(rank=2)
    for step, x in enumerate(xs):
        with agreed_layout(("powersgd", 0)):
            got = allreduce(x, codec=steady, comm=comm, key="w")
        want = allreduce(x, codec=checked, comm=comm, key="w")  # no layout: full checks
        assert np.array_equal(got, want), step
    assert len(signature_rows) == 1 + len(xs)  # the layout's first call, and each unagreed
    comm.Free()


def test_powersgd_failure_in_steady_state_raises_on_every_rank_and_keeps_state():
    from sparcomm import PowerSGD

    comm = COMM.Dup()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    rng = np.random.default_rng(11 + rank)
    codec, twin = PowerSGD(rank=2), PowerSGD(rank=2)
    bad = size - 1
    for step in range(4):
        x = rng.standard_normal((16, 24))
        if step == 2:
            poisoned = x.copy()
            if rank == bad:
                poisoned[3, 4] = np.nan
            with agreed_layout(("powersgd-fail", 0)), pytest.raises(ValueError) as info:
                allreduce(poisoned, codec=codec, comm=comm, key="w")
            assert (f"rank {bad}" if rank != bad else "non-finite") in str(info.value)
            continue  # the twin skips this step too: the states must still match
        with agreed_layout(("powersgd-fail", 0)):
            result = allreduce(x, codec=codec, comm=comm, key="w")
        assert np.array_equal(result, allreduce(x, codec=twin, comm=comm, key="w"))
        root = COMM.bcast(result if rank == 0 else None, root=0)
        assert np.array_equal(result, root)
    comm.Free()


def test_powersgd_changed_tensors_in_steady_state_raise_on_every_rank(signature_rows):
    from sparcomm import PowerSGD
    from sparcomm.comm._lowrank import powersgd_allreduce

    comm = COMM.Dup()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    codec = PowerSGD(rank=1)
    for step in range(3):
        # The last rank renames its tensor at step 1 (same sizes: only the fingerprint).
        key = "v" if (step == 1 and rank == size - 1) else "u"
        x = np.full((8, 6), float(rank + 1))
        with agreed_layout(("powersgd-changed", 0)):
            if step == 1 and size > 1:
                with pytest.raises(ValueError, match="disagree on the tensors"):
                    powersgd_allreduce([x], codec, [key], comm)
            else:
                powersgd_allreduce([x], codec, [key], comm)
    # step 0: the first check; step 1: the redo; step 2: full checks from then on.
    assert len(signature_rows) == 3
    comm.Free()


def test_reducer_powersgd_buckets_check_once():
    from sparcomm import PowerSGD

    rank = COMM.Get_rank()
    shapes = {"w1": (64, 32), "b1": (32,), "w2": (32, 10)}
    calls = []
    original = _call.check_signature

    def counting(channel, row, *args):
        calls.append(row.size)
        return original(channel, row, *args)

    with GradientReducer(codec=PowerSGD(rank=2), fusion_threshold_bytes=1 << 20) as reducer:
        for step in range(3):
            if step == 1:
                _call.check_signature = counting
            rng = np.random.default_rng(100 * step + rank)
            reducer.reduce({name: rng.standard_normal(shape) for name, shape in shapes.items()})
    _call.check_signature = original
    # The matrices' PowerSGD bucket and the bias's dense one: no signature check.
    assert sorted(reducer.last_stats.algorithms) == ["dense", "powersgd"] and calls == []
