"""The start of every collective, written once: :func:`begin_call` and :meth:`Call.agree`.

Every collective of :mod:`sparcomm.comm` runs in three steps:

1. *Prepare* locally: validate, encode with the codec, bring the data to its wire form.
   Nothing here talks to other ranks, and any exception is held back.
2. *Agree* (:meth:`Call.agree`): the signature check of :mod:`._protocol`.  A rank
   whose preparation failed raises its own error and every other rank a matching one;
   ranks that disagree raise ``ValueError``.  So a mistake on one rank is an error on
   every rank, never a hang or a wrong sum.
3. *Reduce*: the family's algorithm, then the output.

**Agreed layouts (no round trip in steady state).**  A caller that repeats the same
calls in the same order on every rank (the :class:`~sparcomm.reducer.GradientReducer`:
one layout per bucket of its plan, checked identical on all ranks at set-up) runs them
inside :func:`agreed_layout`.  The first call of a layout does the full signature check
and caches its table; later calls of that layout (in the collectives that opt in with
``agree(..., steady=True)``) check their row *locally* against the cached one and post
a nonblocking ``Iallreduce`` (maximum) of a 24-byte status (error code, failing
rank, "k changed") that travels while the data moves: :meth:`Call.settle`, before the output,
waits for it.  A rank whose preparation failed takes part in the exchange with
placeholder data of the agreed shape (:meth:`Call.placeholder`), and every rank raises
at :meth:`Call.settle`, so a failure is still an error on every rank, never a hang or a
wrong sum.  A rank whose non-zero count changed (a sparse codec whose k varies) makes
every rank redo the call with a full check, and the layout falls back to full checks
from then on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm._context import Channel, _CommState, comm_state, ring_allreduce_bytes
from sparcomm.comm._protocol import (
    ALGORITHM_NAMES,
    DTYPE_CODES,
    OP_CODES,
    SIGNATURE_COLUMNS,
    check_signature,
    error_class,
    error_code,
    signature_row,
)
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._tune import Decision
from sparcomm.comm._waiting import wait


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


_thread = threading.local()
#: False turns :func:`agreed_layout` off (every call checks in full): for benchmarks that
#: measure what the steady-state agreement saves, in one run.
STEADY_STATE = True
#: Columns that must equal the agreed row in steady state (``k`` may change: a redo).
_FIXED_COLUMNS = [
    SIGNATURE_COLUMNS[name]
    for name in ("version", "n", "dtype", "index_itemsize", "codec", "algorithm", "op")
]


@contextmanager
def agreed_layout(layout: Hashable) -> Iterator[None]:
    """Calls made on this thread inside the block belong to ``layout``.

    Every rank must make the same calls under the same layouts in the same order (the
    layout is part of the agreement); see the module docstring.
    """
    previous = getattr(_thread, "layout", None)
    _thread.layout = layout
    try:
        yield
    finally:
        _thread.layout = previous


@dataclass
class Call:
    """One collective call: the user's communicator, its cached state, the stats to
    fill and a byte-counted channel on the private duplicate."""

    comm: MPI.Comm
    state: _CommState
    stats: AllreduceStats
    channel: Channel
    layout: Hashable | None = None
    #: True on a rank whose preparation failed (or whose k changed) in steady state: it
    #: takes part with :meth:`placeholder` data, and :meth:`settle` raises or redoes.
    failed: bool = False
    error: BaseException | None = None
    table: np.ndarray | None = None
    _row: np.ndarray | None = None
    _request: Any = None
    _status: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    _what: str = "allreduce"
    _codec_text: str = ""
    #: ``auto``'s decision when the tuner times this call (sparcomm.comm._tune): the
    #: collective records it once the call has succeeded on every rank.
    tuning: Decision | None = None
    #: ``time.perf_counter()`` when the call began (the tuner times whole calls).
    started: float = field(default_factory=time.perf_counter)
    #: An argument error found by :func:`begin_call` (``stats=1``): raised by
    #: :meth:`agree` in place of ``prepare``'s result, so it reaches every rank.
    pending: BaseException | None = None

    def agree(
        self,
        prepare: Callable[[], Local],
        *,
        codec_text: str,
        algorithm: int,
        op: Any,
        what: str = "allreduce",
        model_fingerprint: int = 0,
        steady: bool = False,
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
        steady : bool
            The collective can run on an agreed layout without a round trip: it uses
            :meth:`placeholder` data when :attr:`failed` and calls :meth:`settle` (or
            :meth:`drain` on an exception) before its output.

        Returns
        -------
        numpy.ndarray
            The ``(P, fields)`` table of every rank's row (every rank succeeded and
            agrees); raises the same class of error on every rank otherwise.
        """
        error: BaseException | None = self.pending
        local = Local()
        try:
            if error is None:
                local = prepare()
        except Exception as caught:  # held back until every rank has heard of it
            error = caught
        self._what, self._codec_text = what, codec_text
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
        self._row = row
        agreed = self.state.agreed
        if steady and self.layout is not None and self.layout in agreed:
            return self._agree_locally(row, error)
        table = check_signature(self.channel, row, error, codec_text, what)
        if steady and self.layout is not None and self.layout not in self.state.unsteady:
            agreed[self.layout] = (row.copy(), table)
        self.table = table
        return table

    def _agree_locally(self, row: np.ndarray, error: BaseException | None) -> np.ndarray:
        """Steady state: compare with the agreed row, post the status, no waiting."""
        agreed_row, table = self.state.agreed[self.layout]
        changed = False
        if error is None and not np.array_equal(row[_FIXED_COLUMNS], agreed_row[_FIXED_COLUMNS]):
            differ = [
                name
                for name, column in SIGNATURE_COLUMNS.items()
                if column in _FIXED_COLUMNS and row[column] != agreed_row[column]
            ]
            error = ValueError(
                f"{self._what}: this call differs from the layout agreed by every rank in "
                f"{differ}; a GradientReducer's buckets must keep their size, dtype, codec "
                "and op between steps"
            )
        elif error is None:
            changed = bool(row[SIGNATURE_COLUMNS["k"]] != agreed_row[SIGNATURE_COLUMNS["k"]])
        self.error, self.failed, self.table = error, error is not None or changed, table
        status = np.array(
            [error_code(error), self.channel.rank if error is not None else -1, int(changed)],
            dtype=np.int64,
        )
        self._request = self.channel.comm.Iallreduce(status, self._status, op=MPI.MAX)
        moved = ring_allreduce_bytes(status.nbytes, self.channel.size)
        self.stats._add_bytes(moved, moved)
        return table

    @property
    def in_steady_state(self) -> bool:
        """True after :meth:`agree` checked locally (an agreed layout): the status is in
        flight until :meth:`settle`."""
        return self._request is not None

    def agreed(self) -> tuple[int, np.dtype, str, str]:
        """The agreed ``(n, dtype, algorithm, op)`` of the call (after :meth:`agree`)."""
        assert self.table is not None
        first = self.table[0]
        dtypes = {value: dtype for dtype, value in DTYPE_CODES.items()}
        ops = {value: op for op, value in OP_CODES.items()}
        return (
            int(first[SIGNATURE_COLUMNS["n"]]),
            dtypes[int(first[SIGNATURE_COLUMNS["dtype"]])],
            ALGORITHM_NAMES[int(first[SIGNATURE_COLUMNS["algorithm"]])],
            ops[int(first[SIGNATURE_COLUMNS["op"]])],
        )

    def placeholder(self, xp: Any = np) -> Any:
        """Zeros of the agreed size and dtype: what a failed rank sends in steady state."""
        n, dtype, _, _ = self.agreed()
        return xp.zeros(n, dtype=dtype)

    def settle(self) -> bool:
        """Finish the steady-state agreement (nothing to do after a full check).

        Returns True when every rank must redo the call with a full check (a rank's
        ``k`` changed); raises on every rank when a rank's preparation failed.
        """
        request, self._request = self._request, None
        if request is None:
            return False
        with self.stats._phase("check"):
            wait(request)
        value, rank, changed = (int(v) for v in self._status)
        if value:
            if self.error is not None:
                raise self.error
            cls = error_class(value)
            raise cls(
                f"{self._what}: rank {rank} rejected its input ({cls.__name__}); its own "
                "message says why; the result was discarded on every rank"
            )
        if changed:
            self.state.agreed.pop(self.layout, None)
            self.state.unsteady.add(self.layout)
            return True
        return False

    def drain(self) -> None:
        """Complete a pending status exchange without raising (the call failed anyway)."""
        request, self._request = self._request, None
        if request is not None:
            request.Wait()

    def recheck(self) -> np.ndarray:
        """The full signature check of the row already prepared (a redo after
        :meth:`settle` returned True)."""
        assert self._row is not None
        self.failed, self.error = False, None
        self.table = check_signature(self.channel, self._row, None, self._codec_text, self._what)
        return self.table


def begin_call(comm: MPI.Comm | None, stats: AllreduceStats | None) -> Call:
    """What every collective starts with: the communicator (``COMM_WORLD`` by default),
    its cached state, the (reset) stats to fill and a channel on the private duplicate."""
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Comm):  # not a communicator: no rank can be told
        raise TypeError(
            f"comm must be an mpi4py.MPI.Comm (None: MPI.COMM_WORLD), got "
            f"{type(comm).__module__}.{type(comm).__qualname__} {comm!r}; pass "
            "MPI.COMM_WORLD or a communicator split or duplicated from it"
        )
    state = comm_state(comm)
    pending = None
    if stats is not None and not isinstance(stats, AllreduceStats):
        pending = TypeError(
            f"stats must be a sparcomm.comm.AllreduceStats or None, got "
            f"{type(stats).__qualname__} {stats!r}; pass stats=AllreduceStats() and read "
            "it after the call"
        )
        stats = None
    stats = AllreduceStats() if stats is None else stats
    stats.reset()
    layout = getattr(_thread, "layout", None) if STEADY_STATE else None
    call = Call(comm, state, stats, Channel(state.comm, stats), layout)
    call.pending = pending
    return call
