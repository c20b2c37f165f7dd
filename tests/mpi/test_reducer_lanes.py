"""GradientReducer with two lanes (``lanes=2``): dense and FP16 buckets alternate between
the progress thread and a second thread on a second communicator.  The results are
the one-lane results bit for bit, on every rank; an error in either lane fails the step
on every rank and the next step works; nothing is left running after close().  Every
body works at any number of ranks."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import FP16, ErrorFeedback, NoCompression, TopK  # noqa: E402
from sparcomm.codecs import NonFiniteError  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
#: At a 64 KiB threshold (float32), dense: [b3, w3], [w2], [w1], [w0]; FP16: b3 dense
#: alone, then [w3], [w2], [w1], [w0] (every other bucket on the second lane).
SHAPES = {"b3": (10,), "w3": (128, 64), "w2": (128, 128), "w1": (64, 300), "w0": (300, 40)}


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([step, RANK])
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sparcomm-reducer-lane"]


@pytest.mark.parametrize("codec", [NoCompression(), FP16()], ids=["dense", "fp16"])
def test_two_lanes_give_the_one_lane_bits(codec):
    results = {}
    for lanes in (1, 2):
        reducer = GradientReducer(codec, fusion_threshold_bytes=64 << 10, lanes=lanes)
        try:
            steps = [reducer.reduce(_grads(step)) for step in range(3)]
            stats = reducer.last_stats
            assert (reducer._engine.lane_comm is not None) == (lanes == 2)
            plan = SimpleNamespace(plan=reducer._plans[True])
            assert reducer._engine._second_lane(plan) == ({1, 3} if lanes == 2 else set())
            assert stats.buckets >= 4
        finally:
            reducer.close()
        results[lanes] = steps
    for one, two in zip(results[1], results[2], strict=True):
        for name in SHAPES:
            np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    root = COMM.bcast(results[2][-1] if RANK == 0 else None, root=0)
    for name in SHAPES:
        np.testing.assert_array_equal(results[2][-1][name], root[name])
    assert not _lane_threads()  # joined at the end of every step


@pytest.mark.parametrize("bad_bucket", ["w3", "w2"])
def test_a_nan_in_either_lane_fails_the_step_on_every_rank(bad_bucket):
    """FP16's buckets: w3 runs on the second lane, w2 on the progress thread."""
    reducer = GradientReducer(FP16(), fusion_threshold_bytes=64 << 10, lanes=2)
    bad = SIZE - 1
    try:
        reducer.reduce(_grads(0))
        grads = _grads(1)
        if RANK == bad:
            grads[bad_bucket][3, 5] = np.nan
        with pytest.raises(NonFiniteError):
            reducer.reduce(grads)
        after = reducer.reduce(_grads(2))  # the next step is reduced as usual
    finally:
        reducer.close()
    with GradientReducer(FP16(), fusion_threshold_bytes=64 << 10) as one:
        one.reduce(_grads(0))
        expected = one.reduce(_grads(2))
    for name in SHAPES:
        np.testing.assert_array_equal(after[name], expected[name])


def test_compressed_buckets_with_state_stay_on_the_progress_thread():
    """TopK + error feedback keeps its buckets on one thread; one dense bucket alone
    needs no second lane (no second communicator)."""
    reducer = GradientReducer(ErrorFeedback(TopK(density=0.1)), dense_below=100, lanes=2)
    try:
        reducer.reduce(_grads(0))
        assert reducer._engine.lane_comm is None
    finally:
        reducer.close()


def test_lanes_from_the_environment_and_bad_values(monkeypatch):
    monkeypatch.setenv("SPARCOMM_LANES", "2")
    with GradientReducer(fusion_threshold_bytes=64 << 10) as reducer:
        assert reducer.lanes == 2
    monkeypatch.setenv("SPARCOMM_LANES", "two")
    with pytest.raises(ValueError, match="SPARCOMM_LANES"):
        GradientReducer()
    monkeypatch.delenv("SPARCOMM_LANES")
    with pytest.raises(ValueError, match="lanes must be 1 or 2, got 3"):
        GradientReducer(lanes=3)
    with pytest.raises(TypeError, match="lanes must be an int"):
        GradientReducer(lanes="2")


def test_ranks_that_disagree_on_lanes_fail_at_setup_on_every_rank():
    if SIZE == 1:
        pytest.skip("one rank cannot disagree with itself")
    reducer = GradientReducer(fusion_threshold_bytes=64 << 10, lanes=2 if RANK == 0 else 1)
    try:
        with pytest.raises(ValueError, match="differ between ranks"):
            reducer.reduce(_grads(0))
    finally:
        reducer.close()
