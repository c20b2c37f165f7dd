"""GradientReducer bad input and lifecycle errors (one process, COMM_WORLD of size 1)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

pytest.importorskip("mpi4py.MPI")

from sparcomm import NoCompression  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402


@pytest.fixture
def reducer():
    r = GradientReducer(NoCompression())
    yield r
    r.close()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"op": "max"}, ValueError, r"op must be one of \('sum', 'mean'\), got 'max'"),
        ({"compression": "tensor"}, ValueError, "compression must be one of"),
        ({"fusion_threshold_bytes": -1}, ValueError, "fusion_threshold_bytes must be >= 0, got -1"),
        ({"dense_below": 1.5}, TypeError, "dense_below must be an int, got float"),
        ({"warmup_steps": True}, TypeError, "warmup_steps must be an int"),
        ({"codec": "topk"}, TypeError, "codec must be a sparcomm codec"),
    ],
)
def test_bad_options_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        GradientReducer(**options)


def test_bad_gradients_are_refused(reducer):
    with pytest.raises(TypeError, match="dtype int64"):
        reducer.setup([("w", (3,), np.int64)])
    with pytest.raises(TypeError, match="names must be str or int"):
        GradientReducer().setup([(("a", 1), (3,), np.float32)])
    with pytest.raises(ValueError, match="registered twice"):
        GradientReducer().setup([("w", (3,), np.float32), ("w", (3,), np.float32)])
    with pytest.raises(ValueError, match="is empty"):
        GradientReducer().setup([("w", (0, 3), np.float32)])
    with pytest.raises(ValueError, match="no gradients"):
        GradientReducer().setup([])
    with pytest.raises(TypeError, match="grads must be a dict or a list"):
        reducer.reduce(np.ones(3))
    with pytest.raises(TypeError, match="expected a numpy.ndarray or cupy.ndarray"):
        reducer.reduce([[1.0, 2.0]])


def test_submission_errors_name_the_gradient(reducer):
    with pytest.raises(
        ValueError, match=r"submit\(\) called before the gradients were registered: call setup"
    ):
        reducer.submit("w", np.ones(3, np.float32))
    reducer.setup([("w", (3,), np.float32), ("b", (2,), np.float32)])
    with pytest.raises(
        TypeError, match="expected a numpy.ndarray or cupy.ndarray, got builtins.list"
    ):
        reducer.submit("w", [1.0, 2.0, 3.0])
    with pytest.raises(
        ValueError,
        match=r"'v' was not registered in setup\(\); the registered names are \['w', 'b'\]",
    ):
        reducer.submit("v", np.ones(3, np.float32))
    assert not reducer.in_flight  # a refused gradient starts no step
    with pytest.raises(ValueError, match=r"'w' has shape \(4,\), registered as \(3,\)"):
        reducer.submit("w", np.ones(4, np.float32))
    with pytest.raises(TypeError, match="'w' has dtype float64, registered as float32"):
        reducer.submit("w", np.ones(3, np.float64))
    reducer.submit("w", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="'w' submitted twice"):
        reducer.submit("w", np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"missing \['b'\] \(1 of 2\); submit every"):
        reducer.wait()  # cancels the step instead of hanging
    with pytest.raises(ValueError, match="no step in flight: submit"):
        reducer.wait()
    with pytest.raises(
        ValueError, match=r"already called \(with 2 gradients\).*new GradientReducer"
    ):
        reducer.setup([("w", (3,), np.float32)])


def test_state_errors(reducer):
    reducer.reduce({"w": np.ones(3, np.float32)})
    state = reducer.state_dict()
    with pytest.raises(ValueError, match="not a GradientReducer state"):
        reducer.load_state_dict({"format": 99})
    other = GradientReducer(__import__("sparcomm").TopK(k=1))
    try:
        with pytest.raises(ValueError, match="saved with codec NoCompression"):
            other.load_state_dict(state)
    finally:
        other.close()
    with pytest.raises(ValueError, match="saved by rank 3 of 4"):
        reducer.load_state_dict({**state, "rank": 3, "size": 4})
    reducer.submit("w", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="step in flight; call wait"):
        reducer.state_dict()
    with pytest.raises(ValueError, match="step in flight; call wait"):
        reducer.load_state_dict(state)
    reducer.wait()


def test_reduce_keeps_structure_and_returns_independent_arrays(reducer):
    grads = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    first = reducer.reduce(grads)
    assert list(first) == ["a", "b"] and first["a"].shape == (2, 3)
    np.testing.assert_array_equal(first["a"], grads["a"])  # the mean over one rank
    kept = first["a"].copy()
    reducer.reduce({"a": grads["a"] * 7, "b": grads["b"]})
    np.testing.assert_array_equal(first["a"], kept)  # a later step does not overwrite it


def test_insufficient_thread_level_falls_back_with_a_warning(monkeypatch, caplog):
    reducer_module = sys.modules["sparcomm.reducer"]
    monkeypatch.setattr(reducer_module, "thread_support_ok", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sparcomm.reducer"):
        r = GradientReducer()
    try:
        assert r.overlap is False
        assert "below MPI_THREAD_MULTIPLE" in caplog.text and "without overlap" in caplog.text
        np.testing.assert_array_equal(r.reduce([np.ones(3)])[0], np.ones(3))
    finally:
        r.close()


def test_importing_sparcomm_does_not_import_torch():
    import subprocess

    code = "import sparcomm, sparcomm.reducer, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_overlap_reduces_a_full_bucket_before_the_others_arrive():
    """With overlap, the progress thread reduces bucket 0 as soon as it is complete,
    while later gradients are still to come (the backward pass would still be running)."""
    import time

    r = GradientReducer(NoCompression(), fusion_threshold_bytes=0)
    try:
        assert r.overlap
        r.setup([("last", (8,), np.float32), ("first", (8,), np.float32)])
        r.submit("last", np.full(8, 2.0, np.float32))
        deadline = time.monotonic() + 30
        while "last" not in r._run.outputs:  # reduced in the background
            assert time.monotonic() < deadline, "bucket 0 was not reduced before wait()"
            time.sleep(0.001)
        r.submit("first", np.ones(8, np.float32))
        out = r.wait()
        np.testing.assert_array_equal(out["last"], np.full(8, 2.0, np.float32))
        np.testing.assert_array_equal(out["first"], np.ones(8, np.float32))
    finally:
        r.close()


def test_switching_from_warmup_plan_reduces_only_each_buckets_own_elements():
    """The warm-up plan fuses everything; afterwards the small tensors form a smaller
    dense bucket at the same index: it must not reuse the warm-up's larger buffer."""
    from sparcomm import ErrorFeedback, TopK

    r = GradientReducer(
        ErrorFeedback(TopK(density=0.1)), warmup_steps=1, dense_below=100, compression="bucket"
    )
    grads = {"b": np.ones(10), "c": np.ones(12), "w": np.ones((300, 10))}
    try:
        r.reduce(grads)
        assert r.last_stats.elements == 3022 and r.last_stats.buckets == 1
        out = r.reduce(grads)
        assert r.last_stats.buckets == 2 and r.last_stats.compressed_buckets == 1
        assert r.last_stats.elements == 3022  # 22 dense + 3000 compressed, nothing more
        np.testing.assert_array_equal(out["b"], np.ones(10))
        assert np.count_nonzero(out["w"]) == 300  # top 10 % of the (compensated) ones
    finally:
        r.close()
