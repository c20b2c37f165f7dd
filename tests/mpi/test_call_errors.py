"""Argument errors of the collectives: the right class on every rank, and a message with
the expected value, the actual one and the fix.  The last rank makes the mistake where
one rank does (rank 0 at P = 1); every body works at any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import QSGD, NoCompression, TopK  # noqa: E402
from sparcomm.comm import AllreduceStats, allreduce, sparse_allreduce  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
LAST = SIZE - 1


def _raises_everywhere(cls, call, *, here: str, elsewhere: str = "rejected its input"):
    """``call()`` raises ``cls`` on every rank: the rank at fault says ``here``, the
    others ``elsewhere``; then a collective still works (nothing left in flight)."""
    with pytest.raises(cls) as caught:
        call()
    assert type(caught.value) is cls
    assert (here if RANK == LAST else elsewhere) in str(caught.value)
    np.testing.assert_array_equal(allreduce(np.ones(2), comm=COMM), np.full(2, float(SIZE)))


def _on_last(bad, good):
    return bad if RANK == LAST else good


def test_topk_on_one_rank_and_qsgd_on_another_names_both_codecs():
    if SIZE == 1:
        pytest.skip("needs two ranks")
    codec = _on_last(QSGD(bits=4), TopK(k=3))
    with pytest.raises(ValueError) as caught:
        allreduce(np.ones(20), codec=codec, comm=COMM)
    message = str(caught.value)
    assert "ranks disagree on codec" in message
    assert "rank 0 has TopK(density=None, k=3)" in message
    assert f"rank {LAST} has QSGD(bits=4" in message
    assert "every rank must call with the same codec" in message


@pytest.mark.parametrize(
    "codec", [None, NoCompression(), TopK(k=2), QSGD(bits=4)], ids=lambda c: repr(c)
)
def test_a_list_on_one_rank_is_a_type_error(codec):
    x = _on_last([1.0, 2.0, 3.0], np.ones(3))
    _raises_everywhere(
        TypeError,
        lambda: allreduce(x, codec=codec, comm=COMM),
        here="x must be a numpy.ndarray or cupy.ndarray, got builtins.list; convert it",
    )


@pytest.mark.parametrize(
    "codec", [None, NoCompression(), TopK(k=2), QSGD(bits=4)], ids=lambda c: repr(c)
)
def test_none_on_one_rank_is_a_type_error(codec):
    x = _on_last(None, np.ones(3))
    _raises_everywhere(
        TypeError,
        lambda: allreduce(x, codec=codec, comm=COMM),
        here="x must be a numpy.ndarray or cupy.ndarray, got builtins.NoneType",
    )


@pytest.mark.parametrize(
    "codec",
    [None, NoCompression(), TopK(k=2), TopK(density=0.5), QSGD(bits=4)],
    ids=lambda c: repr(c),
)
def test_empty_and_0d_arrays_are_value_errors(codec):
    for bad, here in (
        (np.zeros(0), "x is empty (shape (0,)); expected at least one element: there is"),
        (np.zeros((3, 0)), "x is empty (shape (3, 0)); expected at least one element"),
        (np.array(2.0), "x must have at least one dimension, got a 0-d array; pass x.reshape(1)"),
    ):
        x = _on_last(bad, np.ones(4))
        _raises_everywhere(ValueError, lambda x=x: allreduce(x, codec=codec, comm=COMM), here=here)


def test_comm_that_is_not_a_communicator_is_a_type_error():
    for bad in ("x", 0, object()):
        with pytest.raises(TypeError, match=r"comm must be an mpi4py.MPI.Comm \(None: MPI"):
            allreduce(np.ones(3), comm=bad)
        with pytest.raises(TypeError, match="pass MPI.COMM_WORLD or a communicator"):
            sparse_allreduce(np.array([0]), np.ones(1), 4, comm=bad)


@pytest.mark.parametrize("codec", [None, TopK(k=2), QSGD(bits=4)], ids=lambda c: repr(c))
def test_stats_that_are_not_allreduce_stats_on_one_rank(codec):
    stats = _on_last(1, AllreduceStats())
    _raises_everywhere(
        TypeError,
        lambda: allreduce(np.ones(5), codec=codec, comm=COMM, stats=stats),
        here="stats must be a sparcomm.comm.AllreduceStats or None, got int 1; pass stats=",
    )


@pytest.mark.parametrize("codec", [None, TopK(k=2), QSGD(bits=4)], ids=lambda c: repr(c))
def test_negative_step_on_one_rank(codec):
    step = _on_last(-1, 0)
    _raises_everywhere(
        ValueError,
        lambda: allreduce(np.ones(5), codec=codec, comm=COMM, step=step),
        here="step must be in [0, inf], got -1; steps count from 0",
        # The quantized family encodes after the agreement: its status words report it.
        elsewhere="failed to encode its part" if isinstance(codec, QSGD) else "rejected its",
    )


def test_dgc_options_that_differ_between_ranks_are_named():
    # DGC's options change what each rank sends (momentum, masking): the agreement sees
    # them, not only the TopK inside.
    if SIZE == 1:
        pytest.skip("needs two ranks")
    from sparcomm import DGC

    codec = _on_last(DGC(TopK(k=3), momentum=0.5), DGC(TopK(k=3), momentum=0.9))
    with pytest.raises(ValueError) as caught:
        allreduce(np.ones(20), codec=codec, comm=COMM, key="dgc-mismatch")
    message = str(caught.value)
    assert "ranks disagree on codec" in message
    assert "momentum=0.9" in message and "momentum=0.5" in message
