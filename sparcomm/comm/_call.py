"""The start of every collective, written once: :func:`begin_call` and :meth:`Call.agree`.

Every collective of :mod:`sparcomm.comm` runs in three steps:

1. *Prepare* locally: validate, encode with the codec, bring the data to its wire form.
   Nothing here talks to other ranks, and any exception is held back.
2. *Agree* (:meth:`Call.agree`): the signature check of :mod:`._protocol`.  A rank
   whose preparation failed raises its own error and every other rank a matching one;
   ranks that disagree raise ``ValueError``.  So a mistake on one rank is an error on
   every rank, never a hang or a wrong sum.
3. *Reduce*: the family's algorithm, then the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm._context import Channel, _CommState, comm_state
from sparcomm.comm._protocol import check_signature, signature_row
from sparcomm.comm._stats import AllreduceStats


@dataclass
class Local:
    """What preparation found on this rank, for the signature row.

    ``n = -1`` (and the defaults) on a rank whose preparation failed: its error code
    is what the other ranks read.
    """

    n: int = -1
    dtype: Any = None
    index_itemsize: int = 0
    k: int = 0


@dataclass
class Call:
    """One collective call: the user's communicator, its cached state, the stats to
    fill and a byte-counted channel on the private duplicate."""

    comm: MPI.Comm
    state: _CommState
    stats: AllreduceStats
    channel: Channel

    def agree(
        self,
        prepare: Callable[[], Local],
        *,
        codec_text: str,
        algorithm: int,
        op: Any,
        what: str = "allreduce",
        model_fingerprint: int = 0,
    ) -> np.ndarray:
        """Run ``prepare`` with its exceptions held back, then the signature check.

        Parameters
        ----------
        prepare : callable
            This rank's local work; returns the :class:`Local` facts of the row.
        codec_text : str
            :func:`~._protocol.describe_codec` of the codec (fingerprinted).
        algorithm : int
            The requested algorithm's code in its family's table (-1 if invalid).
        op : str
            The requested reduction (an invalid one travels as -1).
        what : str
            The user's function, for messages.
        model_fingerprint : int
            The cost model's fingerprint where ``auto`` consults it, else 0.

        Returns
        -------
        numpy.ndarray
            The ``(P, fields)`` table of every rank's row (every rank succeeded and
            agrees); raises the same class of error on every rank otherwise.
        """
        error: BaseException | None = None
        local = Local()
        try:
            local = prepare()
        except Exception as caught:  # held back until every rank has heard of it
            error = caught
        row = signature_row(
            local.n,
            local.dtype,
            local.index_itemsize,
            codec_text,
            algorithm,
            op,
            model_fingerprint,
            local.k,
        )
        return check_signature(self.channel, row, error, codec_text, what)


def begin_call(comm: MPI.Comm | None, stats: AllreduceStats | None) -> Call:
    """What every collective starts with: the communicator (``COMM_WORLD`` by default),
    its cached state, the (reset) stats to fill and a channel on the private duplicate."""
    comm = MPI.COMM_WORLD if comm is None else comm
    state = comm_state(comm)
    stats = AllreduceStats() if stats is None else stats
    stats.reset()
    return Call(comm, state, stats, Channel(state.comm, stats))
