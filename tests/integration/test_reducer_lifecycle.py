"""GradientReducer and DistributedOptimizer lifecycle in one process (COMM_WORLD of size 1):
close() is idempotent, both are context managers, a dropped one is collected with its
thread and communicator, running out of communicators is a clear error, a checkpoint is
loaded atomically, and ErrorFeedback residuals saved as lists load with their dtype.

The many-rank leak test (2,000 reducers under mpiexec) is tests/test_reducer_leaks.py.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import ErrorFeedback, TopK  # noqa: E402
from sparcomm.reducer import GradientReducer, _Duplicates  # noqa: E402


def _reducer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sparcomm-reducer"]


def _join_reducer_threads(timeout: float = 10.0) -> None:
    for thread in _reducer_threads():
        thread.join(timeout)


@pytest.fixture
def parent():
    """A communicator of the test's own, so the reducer counts are this test's only."""
    comm = MPI.COMM_WORLD.Dup()
    yield comm
    comm.Free()


def test_close_is_idempotent_and_a_closed_reducer_refuses_work(parent):
    reducer = GradientReducer(comm=parent)
    reducer.reduce([np.ones(3)])
    reducer.close()
    reducer.close()  # nothing left to do: no error
    assert reducer.closed and not _reducer_threads()
    for call in (
        lambda: reducer.reduce([np.ones(3)]),
        lambda: reducer.submit(0, np.ones(3)),
        reducer.wait,
        reducer.state_dict,
    ):
        with pytest.raises(ValueError, match=r"called on a closed GradientReducer; build a new"):
            call()
    assert _Duplicates.of(parent).open == 0


def test_context_manager_closes_and_an_exception_abandons(parent):
    with GradientReducer(comm=parent) as reducer:
        out = reducer.reduce({"w": np.full(4, 2.0)})
    np.testing.assert_array_equal(out["w"], np.full(4, 2.0))
    assert reducer.closed and not _reducer_threads()
    duplicates = _Duplicates.of(parent)
    assert duplicates.open == 0 and not duplicates.parked

    with pytest.raises(ZeroDivisionError):
        with GradientReducer(comm=parent) as reducer:
            reducer.setup([("a", (3,), np.float64), ("b", (3,), np.float64)])
            reducer.submit("a", np.ones(3))  # a step in flight, its thread waiting for "b"
            raise ZeroDivisionError
    # Left without waiting: the step is cancelled, the thread ends, and the communicator
    # waits, parked, for the next collective point to be freed.
    _join_reducer_threads()
    assert reducer.closed and not _reducer_threads()
    assert duplicates.open == 0 and len(duplicates.parked) == 1
    GradientReducer(comm=parent).close()  # the next construction frees it
    assert not duplicates.parked


@pytest.mark.parametrize("overlap", [True, False])
def test_a_dropped_reducer_is_collected_with_its_thread_and_communicator(parent, overlap):
    duplicates = _Duplicates.of(parent)
    reducer = GradientReducer(comm=parent, overlap=overlap)
    reducer.reduce([np.ones(5)])
    reducer.submit(0, np.ones(5))  # even with a step in flight
    alive = weakref.ref(reducer)
    del reducer
    assert alive() is None  # the progress thread holds no reference to it
    _join_reducer_threads()
    assert not _reducer_threads()
    assert duplicates.open == 0 and len(duplicates.parked) == 1
    assert duplicates.free_parked(parent) == 1 and not duplicates.parked


def test_running_out_of_communicators_is_a_clear_error(parent):
    open_reducers = [GradientReducer(comm=parent) for _ in range(3)]
    held = []
    try:
        with pytest.raises(MPI.Exception):
            for _ in range(100_000):
                held.append(parent.Dup())
        with pytest.raises(
            RuntimeError,
            match=r"MPI could not create a communicator for a new GradientReducer \(.+\): 3 "
            r"GradientReducer\(s\) on this communicator are open and 0 dropped one\(s\) wait "
            r"to be freed;.*Call close\(\) on the reducers",
        ):
            GradientReducer(comm=parent)
    finally:
        for comm in held:
            comm.Free()
        for reducer in open_reducers:
            reducer.close()
    GradientReducer(comm=parent).close()  # communicators again once they are freed


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match=r"comm must be an mpi4py.MPI.Comm, got str 'x'; pass"):
        GradientReducer(comm="x")


def test_reducer_state_is_checked_whole_before_loading(parent):
    with GradientReducer(ErrorFeedback(TopK(k=1)), comm=parent, dense_below=0) as reducer:
        reducer.reduce({"w": np.arange(4, dtype=np.float32)})
        state = reducer.state_dict()
        reducer.reduce({"w": np.ones(4, dtype=np.float32)})
        before = reducer.state_dict()
        broken = {**state, "codec_state": {**state["codec_state"], "residuals": {"w": "x"}}}
        with pytest.raises(TypeError, match="residual for key 'w' must be a numpy.ndarray"):
            reducer.load_state_dict(broken)
        with pytest.raises(ValueError, match=r"state\['step'\] must be >= 0, got -1"):
            reducer.load_state_dict({**state, "step": -1})
        with pytest.raises(ValueError, match=r"lacks \['rank'\]"):
            reducer.load_state_dict({k: v for k, v in state.items() if k != "rank"})
        with pytest.raises(TypeError, match="state must be a dict from GradientReducer"):
            reducer.load_state_dict([state])
        after = reducer.state_dict()  # nothing of the refused states was loaded
        assert after["step"] == before["step"] == 2
        np.testing.assert_array_equal(
            after["codec_state"]["residuals"]["w"], before["codec_state"]["residuals"]["w"]
        )
        reducer.load_state_dict(state)
        assert reducer.step == 1


# ---------------------------------------------------------------- ErrorFeedback residuals


def test_residuals_saved_as_lists_load_with_their_dtype():
    """A state stored as JSON (lists) used to load as float64: every later float32 encode
    then failed.  The saved dtypes convert it back; without them it is refused."""
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(50).astype(np.float32) for _ in range(3)]
    original = ErrorFeedback(TopK(k=5))
    original.encode(xs[0], key="w")
    state = original.state_dict()
    assert state["dtypes"] == {"w": "float32"}
    as_lists = {**state, "residuals": {"w": state["residuals"]["w"].tolist()}}
    loaded = ErrorFeedback(TopK(k=5))
    loaded.load_state_dict(as_lists)
    assert loaded.residual("w").dtype == np.float32
    for x in xs[1:]:  # encodes work and resume bit for bit
        expected, got = original.encode(x, key="w"), loaded.encode(x, key="w")
        np.testing.assert_array_equal(expected.to_bytes(), got.to_bytes())

    no_dtypes = {"codec": state["codec"], "residuals": as_lists["residuals"]}
    with pytest.raises(TypeError, match=r"residual for key 'w' is a list and the state has no"):
        ErrorFeedback(TopK(k=5)).load_state_dict(no_dtypes)
    with pytest.raises(ValueError, match=r"is float64, saved as float32"):
        ErrorFeedback(TopK(k=5)).load_state_dict(
            {**state, "residuals": {"w": state["residuals"]["w"].astype(np.float64)}}
        )
    with pytest.raises(ValueError, match=r"must be float32 or float64, got dtype\('int32'\)"):
        ErrorFeedback(TopK(k=5)).load_state_dict({**as_lists, "dtypes": {"w": "int32"}})
    with pytest.raises(ValueError, match=r"residual for key 'w' is not a list of numbers"):
        ErrorFeedback(TopK(k=5)).load_state_dict({**as_lists, "residuals": {"w": ["a"]}})
    with pytest.raises(TypeError, match=r"state\['residuals'\] must be a dict keyed by tensor"):
        ErrorFeedback(TopK(k=5)).load_state_dict({**state, "residuals": [1.0]})
    with pytest.raises(TypeError, match="state must be a dict from ErrorFeedback.state_dict"):
        ErrorFeedback(TopK(k=5)).load_state_dict([state])
    # a refused state leaves the memory as it was
    kept = loaded.residual("w").copy()
    with pytest.raises(TypeError):
        loaded.load_state_dict(no_dtypes)
    np.testing.assert_array_equal(loaded.residual("w"), kept)


# ---------------------------------------------------------------- DistributedOptimizer


def _model():
    torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _train_step(model, optimizer):
    import torch

    optimizer.zero_grad()
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()


def test_a_dropped_optimizer_is_collected_while_its_model_lives():
    torch = pytest.importorskip("torch")
    from sparcomm.torch import DistributedOptimizer

    model = _model()
    before = threading.active_count()
    for _ in range(10):
        optimizer = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
        )
        _train_step(model, optimizer)
        alive = weakref.ref(optimizer)
        del optimizer
        assert alive() is None  # the parameters' hooks do not keep it
    _join_reducer_threads()
    assert threading.active_count() == before
    # its hooks left the parameters: a new optimizer gets each gradient once
    with DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
    ) as optimizer:
        _train_step(model, optimizer)
        _train_step(model, optimizer)
    assert optimizer.reducer.closed
    optimizer.close()  # idempotent


def test_optimizer_checkpoint_is_loaded_atomically():
    torch = pytest.importorskip("torch")
    from sparcomm.torch import DistributedOptimizer

    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with DistributedOptimizer(
        sgd, model.named_parameters(), codec=ErrorFeedback(TopK(k=2)), dense_below=0
    ) as optimizer:
        _train_step(model, optimizer)
        state = optimizer.state_dict()
        _train_step(model, optimizer)
        momentum = [b.clone() for b in _momenta(optimizer)]

        bad_sparcomm = {**state, "sparcomm": {**state["sparcomm"], "rank": 5, "size": 6}}
        with pytest.raises(ValueError, match="saved by rank 5 of 6"):
            optimizer.load_state_dict(bad_sparcomm)
        for kept, now in zip(momentum, _momenta(optimizer), strict=True):
            torch.testing.assert_close(now, kept)  # torch's part was not loaded either

        bad_torch = {**state, "param_groups": state["param_groups"] * 2}
        with pytest.raises(ValueError):
            optimizer.load_state_dict(bad_torch)
        assert optimizer.reducer.step == 2  # sparcomm's part was not loaded either

        optimizer.load_state_dict(state)
        assert optimizer.reducer.step == 1


def _momenta(optimizer):
    return [optimizer.state[p]["momentum_buffer"] for p in optimizer.param_groups[0]["params"]]
