"""Per-communicator state (a private duplicate, the cost model) and byte-counted MPI calls.

The collectives never send on the user's communicator: the first call duplicates it once
(``MPI_Comm_dup``, collective) and caches the duplicate, with the calibrated cost model,
as an MPI attribute of the user's communicator, so user messages and ours can never
match each other and the state goes away with the communicator.

The byte counts are what this rank hands to MPI and gets back: the variable-size
exchanges (``allgatherv``, ``alltoallv``) are direct point-to-point messages and are
counted exactly (an allgather of blocks ``b_0 .. b_{P-1}``: rank ``r`` sends
``(P - 1) b_r`` and receives the others' blocks); the small fixed-size ``Allgather`` of
the signature as a ring moves it (``(P - 1)`` rows each way); a dense ``Allreduce`` of
``m`` bytes as a ring reduce-scatter plus allgather, ``2 m (P - 1) / P`` each way.
The cost model in :mod:`sparcomm.comm._cost` uses the same conventions, and a test
holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from sparcomm._abort import install_abort_hook
from sparcomm._threads import adopt_rank_threads, set_rank_threads
from sparcomm.comm._device import DeviceStaging
from sparcomm.comm._stats import AllreduceStats
from sparcomm.comm._waiting import waitall

if TYPE_CHECKING:
    from sparcomm.comm._cost import CostModel

_KEYVAL: int | None = None
_SCRATCH_LIMIT_BYTES = 64 << 20  # larger temporaries are allocated per call
# Tags of the direct exchanges (point-to-point on the private communicator).
_TAG_ALLGATHERV = 1 << 10
_TAG_ALLTOALLV = 2 << 10


@dataclass
class _CommState:
    comm: MPI.Comm  # private duplicate of the user's communicator
    model: CostModel | None = None
    scratch: dict = field(default_factory=dict)  # (name, dtype) -> reusable buffer
    choices: dict = field(default_factory=dict)  # auto's choice per (model, n, k_all, ...)
    # sparcomm.comm._call.agreed_layout: layout -> (agreed row, agreed table), and the
    # layouts whose k changed (full checks from then on).
    agreed: dict = field(default_factory=dict)
    unsteady: set = field(default_factory=set)
    # sparcomm.comm._lowrank: layout -> (P, Q) buffer sizes, for a rank that sends
    # placeholders in steady state.
    factor_sizes: dict = field(default_factory=dict)
    staging: DeviceStaging = field(default_factory=DeviceStaging)  # pinned, for CuPy inputs
    tuner: Any = None  # auto's measured choices (sparcomm.comm._tune.tuner_of)

    def buffer(self, name: str, size: int, dtype: np.dtype) -> np.ndarray:
        """A reusable scratch buffer of ``size`` elements (contents undefined).

        Large temporaries live here so that steady-state calls do not page-fault a fresh
        buffer each time; never returned to the caller.
        """
        key = (name, np.dtype(dtype))
        if size * key[1].itemsize > _SCRATCH_LIMIT_BYTES:
            return np.empty(size, dtype=dtype)  # not worth pinning that much memory
        array = self.scratch.get(key)
        if array is None or array.size < size:
            array = np.empty(size, dtype=dtype)
            self.scratch[key] = array
        return array[:size]


def _free_duplicate(comm: MPI.Comm, keyval: int, state: Any) -> None:
    """Freeing a communicator frees its private duplicate too (else each leaked one)."""
    if isinstance(state, _CommState) and not MPI.Is_finalized():
        state.comm.Free()


def comm_state(comm: MPI.Comm) -> _CommState:
    """The cached state of ``comm`` (collective on the first call: duplicates ``comm``)."""
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_free_duplicate)
    state = comm.Get_attr(_KEYVAL)
    if not isinstance(state, _CommState):
        install_abort_hook()  # sparcomm._abort: from now on a rank that raises ends the job
        state = _CommState(comm=comm.Dup())
        comm.Set_attr(_KEYVAL, state)
        set_rank_threads(state.comm)  # collective like the Dup: each rank's kernel threads
    adopt_rank_threads()  # Numba's thread count is per thread: the same in this one
    return state


def ring_allgather_bytes(blocks: list[int] | np.ndarray, rank: int) -> tuple[int, int]:
    """(sent, received) bytes of rank ``rank`` in a ring allgather of ``blocks`` bytes."""
    size = len(blocks)
    if size == 1:
        return 0, 0
    total = int(np.sum(blocks))
    return total - int(blocks[(rank + 1) % size]), total - int(blocks[rank])


def ring_allreduce_bytes(nbytes: int, size: int) -> int:
    """Bytes each rank sends (and receives) in a ring allreduce of ``nbytes``."""
    return (2 * nbytes * (size - 1)) // size


class Channel:
    """MPI calls on the private communicator that add their bytes to ``stats``."""

    def __init__(self, comm: MPI.Comm, stats: AllreduceStats):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.stats = stats

    def allgather_array(self, row: np.ndarray) -> np.ndarray:
        """Allgather one small fixed-size row from every rank: a ``(size, len)`` array."""
        table = np.empty((self.size, row.size), dtype=row.dtype)
        self.comm.Allgather(row, table)
        self.stats._add_bytes(*ring_allgather_bytes([row.nbytes] * self.size, self.rank))
        return table

    def allgatherv(
        self, send: np.ndarray, counts: np.ndarray, tag: int = _TAG_ALLGATHERV
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gather variable-length blocks (``counts`` elements each) in rank order.

        A direct exchange (every rank sends its block to every other, all messages in
        flight at once) rather than ``MPI_Allgatherv``: MPICH's ring/pipelined
        ``Allgatherv`` waits on each neighbour in turn and is one to two orders of
        magnitude slower when ranks share cores (measured in docs/collectives.md).
        Empty blocks are not sent (every rank knows ``counts``).  Returns the
        concatenation and the ``size + 1`` block offsets.
        """
        return self.allgatherv_many([send], [counts], tag)[0]

    def allgatherv_many(
        self,
        sends: list[np.ndarray],
        counts: list[np.ndarray],
        tag: int = _TAG_ALLGATHERV,
        recvs: list[np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several :meth:`allgatherv` at once (for example indices and values): one
        synchronisation instead of one per array.  ``recvs`` optionally gives the
        receive buffers (exact sizes)."""
        results, groups = [], []
        for number, (send, count) in enumerate(zip(sends, counts, strict=True)):
            count = np.asarray(count, dtype=np.int64)
            offsets = np.zeros(self.size + 1, dtype=np.int64)
            np.cumsum(count, out=offsets[1:])
            recv = np.empty(int(offsets[-1]), send.dtype) if recvs is None else recvs[number]
            blocks_recv = [recv[offsets[j] : offsets[j + 1]] for j in range(self.size)]
            groups.append(([send] * self.size, blocks_recv, tag + number))
            results.append((recv, offsets))
        self._exchange(groups)
        return results

    def alltoall_counts(self, counts: np.ndarray) -> np.ndarray:
        """Exchange one int64 per pair of ranks (the sizes of the next ``Alltoallv``)."""
        recv = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(counts, recv)
        self.stats._add_bytes(8 * (self.size - 1), 8 * (self.size - 1))
        return recv

    def alltoallv(
        self,
        send: np.ndarray,
        send_counts: np.ndarray,
        send_offsets: np.ndarray,
        recv_counts: np.ndarray,
        tag: int = _TAG_ALLTOALLV,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Personalised exchange; returns the received blocks in rank order and offsets.

        Implemented as a direct exchange of nonblocking messages, for the reason given
        in :meth:`allgatherv`.
        """
        return self.alltoallv_many([(send, send_counts, send_offsets, recv_counts)], tag)[0]

    def alltoallv_many(
        self,
        items: list[tuple],
        tag: int = _TAG_ALLTOALLV,
        recvs: list[np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several :meth:`alltoallv` ``(send, send_counts, send_offsets, recv_counts)``
        at once, with one synchronisation; ``recvs`` optionally gives the buffers."""
        results, groups = [], []
        for number, (send, send_counts, send_offsets, recv_counts) in enumerate(items):
            recv_offsets = np.zeros(self.size + 1, dtype=np.int64)
            np.cumsum(recv_counts, out=recv_offsets[1:])
            total = int(recv_offsets[-1])
            recv = np.empty(total, dtype=send.dtype) if recvs is None else recvs[number]
            blocks_send = [
                send[int(send_offsets[j]) : int(send_offsets[j]) + int(send_counts[j])]
                for j in range(self.size)
            ]
            blocks_recv = [recv[recv_offsets[j] : recv_offsets[j + 1]] for j in range(self.size)]
            groups.append((blocks_send, blocks_recv, tag + number))
            results.append((recv, recv_offsets))
        self._exchange(groups)
        return results

    def _exchange(self, groups: list[tuple[list, list, int]]) -> None:
        """For each group ``(blocks_send, blocks_recv, tag)``: send ``blocks_send[j]`` to
        rank ``j`` and receive ``blocks_recv[j]`` from it; all messages of all groups in
        flight at once, one wait.  This rank's own blocks are copied; zero-length blocks
        are skipped (both sides know the lengths)."""
        rank, size = self.rank, self.size
        requests = []
        sent = received = 0
        for _, blocks_recv, tag in groups:
            for offset in range(1, size):
                source = (rank - offset) % size
                block = blocks_recv[source]
                if block.size:
                    requests.append(self.comm.Irecv([block, _mpi_type(block.dtype)], source, tag))
                    received += block.nbytes
        for blocks_send, _, tag in groups:
            for offset in range(1, size):
                dest = (rank + offset) % size
                block = blocks_send[dest]
                if block.size:
                    requests.append(self.comm.Isend([block, _mpi_type(block.dtype)], dest, tag))
                    sent += block.nbytes
        for blocks_send, blocks_recv, _ in groups:
            blocks_recv[rank][...] = blocks_send[rank]
        waitall(requests)
        self.stats._add_bytes(sent, received)

    def transfer(self, sends: list, recvs: list) -> list[int]:
        """Point-to-point: post every receive ``(array, source, tag)`` and every send
        ``(array, dest, tag)`` at once, then wait for all of them.

        A receive buffer may be larger than the message (an upper bound); returns the
        number of elements each receive actually got."""
        requests = [
            self.comm.Irecv([array, _mpi_type(array.dtype)], source, tag)
            for array, source, tag in recvs
        ]
        requests += [
            self.comm.Isend([array, _mpi_type(array.dtype)], dest, tag)
            for array, dest, tag in sends
        ]
        statuses = [MPI.Status() for _ in requests]
        waitall(requests, statuses=statuses)
        counts = [
            statuses[j].Get_count(_mpi_type(array.dtype)) for j, (array, _, _) in enumerate(recvs)
        ]
        received = sum(
            c * array.dtype.itemsize for c, (array, _, _) in zip(counts, recvs, strict=True)
        )
        self.stats._add_bytes(sum(array.nbytes for array, _, _ in sends), received)
        return counts

    def allreduce_dense(self, send: Any, recv: Any) -> None:
        """MPI's own ``Allreduce`` (sum) of a dense buffer."""
        if self.size == 1:
            if send is not MPI.IN_PLACE:
                recv[...] = send
            return
        self.comm.Allreduce(send, recv, op=MPI.SUM)
        nbytes = ring_allreduce_bytes(recv.nbytes, self.size)
        self.stats._add_bytes(nbytes, nbytes)


_MPI_TYPES = {
    np.dtype(np.int32): MPI.INT32_T,
    np.dtype(np.int64): MPI.INT64_T,
    np.dtype(np.float32): MPI.FLOAT,
    np.dtype(np.float64): MPI.DOUBLE,
    np.dtype(np.uint8): MPI.BYTE,
}


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    return _MPI_TYPES[np.dtype(dtype)]
