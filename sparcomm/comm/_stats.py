"""Per-call statistics of a collective, and the byte/time bookkeeping that fills them.

Every collective in :mod:`sparcomm.comm` accepts ``stats=AllreduceStats()`` and fills it
in place, so a training loop can log what each call cost without the library printing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

#: The step phase of each collective phase name (:meth:`AllreduceStats.by_category`):
#: ``encode`` (local compression and staging), ``check`` (agreement and the choice of
#: algorithm), ``exchange`` (time inside MPI, waiting for the slowest rank included),
#: ``merge`` (sums and decodes of what arrived), ``write_back`` (the dense output).
PHASE_CATEGORIES: dict[str, str] = {
    "prepare": "encode",
    "encode": "encode",
    "quantize": "encode",
    "scale": "encode",
    "densify_input": "encode",
    "stage": "encode",
    "orthogonalize": "encode",
    "check": "check",
    "choose": "check",
    "tune": "check",
    "allgather": "exchange",
    "allreduce": "exchange",
    "allreduce_p": "exchange",
    "allreduce_q": "exchange",
    "exchange": "exchange",
    "reduce_scatter": "exchange",
    "scale_allreduce": "exchange",
    "merge": "merge",
    "decode": "merge",
    "integer_sum": "merge",
    "owner_sum": "merge",
    "output": "write_back",
}
#: The categories, in the order a step goes through them (``other``: a phase name not
#: in :data:`PHASE_CATEGORIES`, such as a user collective's).
CATEGORIES = ("encode", "check", "exchange", "merge", "write_back", "other")


@dataclass
class AllreduceStats:
    """What one allreduce call did, as seen by this rank.

    Attributes
    ----------
    algorithm : str
        The algorithm that ran (``auto`` resolved to its choice).
    requested : str
        The algorithm asked for (``"auto"`` or a name).
    size, n, itemsize, index_itemsize : int
        Number of ranks, elements, bytes per value, bytes per index on the wire.
    k : int
        Non-zeros this rank contributed (``n`` for the dense path).
    k_all : list of int
        Non-zeros of every rank, in rank order.
    nnz : int
        Entries of the result held in sparse form plus the length of its dense ranges
        (``K``, the fill of the sum).
    fill : float
        ``nnz / max(k_all)``: how much the sum grew over the largest input (1 for
        identical supports, up to ``size`` for disjoint ones).
    bytes_sent, bytes_received : int
        Payload and metadata bytes this rank sent and received, counted as the
        schedule in ``docs/collectives.md`` moves them.
    phases : dict of str to float
        Wall time in seconds of each phase (``check``, ``reduce_scatter``, ``merge``,
        ``allgather``, ``exchange``, ``densify`` ...), in the order they ran.
    predicted : dict of str to float
        Predicted seconds of each candidate when ``auto`` chose (empty otherwise).
    tuning : str
        How ``auto`` chose (:mod:`sparcomm.comm._tune`): ``"model"`` (the cost model's
        choice: a key's first call, a single candidate, or tuning off), ``"explore"``
        (a candidate's timed trial) or ``"measured"`` (the measured fastest); empty for
        a requested algorithm.
    measured : dict of str to float
        With ``tuning == "measured"``: each candidate's median seconds (the slowest
        rank's) in the exploration that chose it.
    predicted_bytes : tuple of int
        The cost model's (sent, received) bytes for the algorithm that ran.
    dense_ranges : int
        Index ranges (or recursive-doubling streams) that switched to dense form.
    rank : int
        This rank.
    """

    algorithm: str = ""
    requested: str = ""
    size: int = 0
    n: int = 0
    itemsize: int = 0
    index_itemsize: int = 0
    k: int = 0
    k_all: list[int] = field(default_factory=list)
    nnz: int = 0
    fill: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    tuning: str = ""
    measured: dict[str, float] = field(default_factory=dict)
    dense_ranges: int = 0
    rank: int = 0
    _predicted_bytes: tuple[int, int] | None = field(default=None, repr=False)
    # Set by the collectives that predict lazily (sparcomm.comm._cost.lazy_predicted_bytes).
    _predictor: Callable[[], tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def predicted_bytes(self) -> tuple[int, int]:
        """The cost model's (sent, received) bytes for the algorithm that ran, on this
        rank (computed on first access: the calls themselves do not pay for it)."""
        if self._predicted_bytes is None:
            if self._predictor is None:
                return (0, 0)
            self._predicted_bytes = self._predictor()
        return self._predicted_bytes

    @predicted_bytes.setter
    def predicted_bytes(self, value: tuple[int, int]) -> None:
        self._predicted_bytes = value

    @property
    def time(self) -> float:
        """Total seconds over all phases."""
        return float(sum(self.phases.values()))

    def by_category(self) -> dict[str, float]:
        """Seconds per step phase (:data:`CATEGORIES`), summed over :attr:`phases`."""
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for name, seconds in self.phases.items():
            totals[PHASE_CATEGORIES.get(name, "other")] += seconds
        return totals

    def reset(self) -> None:
        """Clear every field so the object can be reused for the next call."""
        fresh = AllreduceStats()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def _add_bytes(self, sent: int, received: int) -> None:
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
