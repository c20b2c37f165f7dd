"""A failed plain ``sparcomm.allreduce`` call loses nothing: on every rank the codec's
state for the call's key (error-feedback residuals, worker- and owner-side; DGC's
velocities; PowerSGD's residual and warm-start Q) is what it was before the call, other
keys are untouched, and the retried calls give bit for bit the results of a run in
which the failure never happened.

The failure is a NaN in the last rank's input, after a few good calls: first checked
in full (every call agrees before any data moves), then in steady state inside an
agreed layout (the other ranks encode before they learn of the failure).  Every body
works at any number of ranks.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

# Both runs of a comparison time the same race candidates (see the fixture).
pytestmark = pytest.mark.usefixtures("untimed_race_lengths")

from _state_checks import STATEFUL_CODECS, codec_state  # noqa: E402
from _state_checks import assert_same as _assert_same  # noqa: E402

from sparcomm import (  # noqa: E402
    QSGD,
    ErrorFeedback,
    NonFiniteError,
    TopK,
)
from sparcomm.comm import allreduce  # noqa: E402
from sparcomm.comm._call import agreed_layout  # noqa: E402
from sparcomm.comm._context import comm_state  # noqa: E402
from sparcomm.comm._tune import tuner_of  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
BAD = SIZE - 1
GOOD_CALLS = 3
#: Two tensors, reduced in turn: the failure is in "w"; "other" must not move either.
SHAPES = {"other": (10, 12), "w": (24, 20)}

CODECS = STATEFUL_CODECS


def _assert_same_any_order(actual, expected, where="state"):
    """Bit for bit; a restored state may list its keys in another order."""
    _assert_same(actual, expected, where, ordered=False)


def _grad(step: int, name: str) -> np.ndarray:
    rng = np.random.default_rng([step, RANK, len(name), 7])
    return rng.standard_normal(SHAPES[name]).astype(np.float32)


def _reduce(codec, step, name, x, steady, algorithm):
    # One layout per (codec, algorithm, key): each agrees once, then checks in steady state.
    layout = agreed_layout((__name__, repr(codec), algorithm, name)) if steady else None
    with layout or contextlib.nullcontext():
        return allreduce(x, codec=codec, comm=COMM, key=name, step=step, algorithm=algorithm)


def _run(make_codec, *, fail, steady, algorithm="auto", expected=NonFiniteError):
    """Good calls on both keys, optionally a failed call on "w" (NaN on the last rank),
    then two more good rounds.  Returns the good calls' results and the final state.

    Both runs start from a fresh tuner (auto's measured choices): the failed call must
    leave no trace there either, so the two runs choose, and sum, alike."""
    tuner_of(comm_state(COMM)).reset()
    codec = make_codec()
    outputs = []
    for step in range(GOOD_CALLS):
        for name in SHAPES:
            outputs.append(_reduce(codec, step, name, _grad(step, name), steady, algorithm))
    if fail:
        before = codec_state(codec)
        x = _grad(GOOD_CALLS, "w")
        if RANK == BAD:
            x.reshape(-1)[5] = np.nan
        with pytest.raises(expected):
            _reduce(codec, GOOD_CALLS, "w", x, steady, algorithm)
        _assert_same_any_order(codec_state(codec), before, "state after the failed call")
    for step in range(GOOD_CALLS, GOOD_CALLS + 2):
        for name in SHAPES:
            outputs.append(_reduce(codec, step, name, _grad(step, name), steady, algorithm))
    return outputs, codec_state(codec)


def _assert_identical_runs(make_codec, **options):
    clean_outputs, clean_state = _run(make_codec, fail=False, **options)
    outputs, state = _run(make_codec, fail=True, **options)
    for number, (result, expected) in enumerate(zip(outputs, clean_outputs, strict=True)):
        _assert_same_any_order(result, expected, f"call {number}'s result")
    _assert_same_any_order(state, clean_state, "final state")


@pytest.mark.parametrize("steady", [False, True], ids=["checked", "steady"])
@pytest.mark.parametrize("name", list(CODECS))
def test_failed_allreduce_leaves_state_unchanged_and_retry_is_exact(name, steady):
    _assert_identical_runs(CODECS[name], steady=steady)


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [("qsgd-ef", "reduce_scatter_allgather"), ("onebit", "reduce_scatter_allgather")],
)
def test_failed_allreduce_restores_owner_side_residuals(name, algorithm):
    # Owners keep residuals of their own (sparcomm.comm._quantized_layout.owner_key).
    _assert_identical_runs(CODECS[name], steady=True, algorithm=algorithm)


def test_failed_allreduce_with_shared_scale():
    # Another rank learns of the failure from an infinite shared scale: a ValueError
    # there (NonFiniteError, a ValueError, on the bad rank).
    _assert_identical_runs(
        CODECS["terngrad-ef"], steady=True, algorithm="shared_scale", expected=ValueError
    )


def test_failed_qdsar_allreduce_restores_residuals():
    # The Q-DSAR entry (dense_phase=) goes through the same snapshot.
    codec = ErrorFeedback(TopK(density=0.5))
    rng = np.random.default_rng([RANK, 3])
    for step in range(2):
        x = rng.standard_normal(400).astype(np.float32)
        allreduce(x, codec=codec, comm=COMM, key="q", step=step, dense_phase=QSGD())
    before = codec.state_dict()
    x = rng.standard_normal(400).astype(np.float32)
    if RANK == BAD:
        x[3] = np.inf
    with pytest.raises(ValueError):
        allreduce(x, codec=codec, comm=COMM, key="q", step=2, dense_phase=QSGD())
    _assert_same_any_order(codec.state_dict(), before)
