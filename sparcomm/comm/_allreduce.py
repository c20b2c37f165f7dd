"""The public entry point :func:`allreduce`: a dense buffer in, through a codec, the
reduced buffer out, identical on every rank.

It only dispatches: the codec's family picks the collective (:mod:`._dispatch`), and
``dense_phase=`` picks Q-DSAR (:mod:`._quantized_dsar`).  Every collective starts the
same way (:mod:`._call`: prepare locally, agree, reduce), so a mistake on one rank is
an error on every rank, never a hang.

A call that fails loses no gradient mass: in steady state the other ranks have encoded
(moved mass out of their error-feedback residuals) before they learn of the failure, so
the entry point takes a per-key snapshot of the codec's state before the call and puts
it back on every rank before the error propagates (:func:`_state_holder`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm._dispatch import lookup, register_collective, register_family
from sparcomm.comm._quantized_dsar import qdsar_allreduce
from sparcomm.comm._quantized_layout import owner_key
from sparcomm.comm._sparse_allreduce import sparse_allreduce
from sparcomm.comm._stats import AllreduceStats
from sparcomm.feedback import unwrap

__all__ = ["allreduce", "register_collective", "register_family", "sparse_allreduce"]


def allreduce(
    x: np.ndarray,
    codec: Any = None,
    comm: MPI.Comm | None = None,
    *,
    op: str = "sum",
    algorithm: str = "auto",
    key: Any = None,
    step: int | None = None,
    stats: AllreduceStats | None = None,
    out: Any = None,
    dense_phase: Any = None,
) -> np.ndarray:
    """Allreduce a dense buffer through a codec: the result is the same on every rank.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        This rank's buffer (any shape; the same size and dtype on every rank).
    codec : codec, optional
        The codec's family chooses the collective (:mod:`sparcomm.comm._dispatch`),
        plain or under ``ErrorFeedback``.  ``"sparse"`` (``TopK``): each rank's top-k
        entries are summed with the sparse family (SparCML).  ``"dense"``
        (``NoCompression``) or ``None``: MPI's dense ``Allreduce``.  ``"quantized"``
        (``QSGD``, ``TernGrad``, ``OneBit``, ``FP16``): the quantized collectives of
        :mod:`sparcomm.comm._quantized` (docs/quantized.md).  Codecs defined outside
        sparcomm run by their family too; a family without a collective raises
        ``NotImplementedError`` (see :func:`register_family`).
    comm : mpi4py.MPI.Comm, optional
        Communicator, ``MPI.COMM_WORLD`` by default.
    op : {"sum", "mean"}
        ``mean`` divides by the number of ranks.
    algorithm : str
        ``auto`` (cost model) or one of ``allgather``, ``recursive_doubling``,
        ``split_allgather``, ``dsar``, ``dense``.  The dense path accepts ``auto`` and
        ``dense``; quantized codecs ``auto``, ``allgather``, ``reduce_scatter_allgather``
        and, for TernGrad, ``shared_scale``.
    key, step :
        Passed to ``codec.encode`` (the error-feedback residual's key, the RNG step).
    stats : AllreduceStats, optional
        Filled in place.
    out : numpy.ndarray, optional
        Output buffer with ``x``'s size and dtype (``out=x`` reduces in place).
    dense_phase : QSGD, TernGrad or FP16, optional
        With a sparse codec (``TopK``): SparCML's Q-DSAR, DSAR whose dense gather phase
        is quantized with this codec (``dense_phase_capable``; see
        :mod:`sparcomm.comm._quantized_dsar`).

    Returns
    -------
    numpy.ndarray
        The reduced array, shaped like ``x``, bitwise identical on every rank.

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        On every rank, when any rank's input is invalid or ranks disagree on size,
        dtype, codec, op or algorithm.  The codec's state for ``key`` (error-feedback
        residuals, worker- and owner-side; DGC's velocities; PowerSGD's residual and
        warm-start ``Q``) is then, on every rank, what it was before the call.
    """
    holder = _state_holder(codec)
    # By reference for the built-in codecs: a dict lookup per key, no copy.
    saved = None if holder is None else holder.snapshot((key, owner_key(key)))
    if dense_phase is not None:  # Q-DSAR: sparcomm.comm._quantized_dsar
        collective: Any = functools.partial(qdsar_allreduce, dense_phase=dense_phase)
    else:
        collective = lookup(codec)
    try:
        return collective(
            x,
            codec,
            comm=comm,
            op=op,
            algorithm=algorithm,
            key=key,
            step=step,
            stats=stats,
            out=out,
        )
    except BaseException:
        if saved is not None:
            holder.restore(saved)  # a failure here keeps the call's error as __context__
        raise


def _state_holder(codec: Any) -> Any:
    """The object whose ``snapshot(keys)`` / ``restore()`` cover ``codec``'s state (its
    error-feedback memory, or the codec itself: PowerSGD), or None for a stateless codec.

    The keys a call touches are its ``key`` and the owner-side key of
    ``reduce_scatter_allgather`` (:func:`~sparcomm.comm._quantized_layout.owner_key`).
    """
    memory = unwrap(codec)[1]
    if memory is not None:
        return memory
    if callable(getattr(codec, "snapshot", None)) and callable(getattr(codec, "restore", None)):
        return codec
    return None
