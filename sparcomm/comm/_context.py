"""Per-communicator state (a private duplicate, the cost model) and byte-counted MPI calls.

The collectives never send on the user's communicator: the first call duplicates it once
(``MPI_Comm_dup``, collective) and caches the duplicate, with the calibrated cost model,
as an MPI attribute of the user's communicator, so user messages and ours can never
match each other and the state goes away with the communicator.

The byte counts follow the schedule described in ``docs/collectives.md``: point-to-point
and ``Alltoallv`` traffic is counted exactly; an ``Allgather(v)`` of blocks ``b_0 ..
b_{P-1}`` is counted as a ring moves it (rank ``r`` sends every block but its successor's
and receives every block but its own); a dense ``Allreduce`` of ``m`` bytes as a ring
reduce-scatter plus allgather, ``2 m (P - 1) / P`` each way.  The cost model in
:mod:`sparcomm.comm._cost` uses the same conventions, and a test holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from sparcomm.comm._stats import AllreduceStats

if TYPE_CHECKING:
    from sparcomm.comm._cost import CostModel

_KEYVAL: int | None = None

#: The int64 row every rank contributes before the data phase (see ``_allreduce``).
SIGNATURE_FIELDS = (
    "version",
    "n",
    "dtype",
    "index_itemsize",
    "codec",
    "algorithm",
    "op",
    "cost_model",
    "k",
    "error",
)


@dataclass
class _CommState:
    comm: MPI.Comm  # private duplicate of the user's communicator
    model: CostModel | None = None


def comm_state(comm: MPI.Comm) -> _CommState:
    """The cached state of ``comm`` (collective on the first call: duplicates ``comm``)."""
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval()
    state = comm.Get_attr(_KEYVAL)
    if state is None:
        state = _CommState(comm=comm.Dup())
        comm.Set_attr(_KEYVAL, state)
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

    def allgatherv(self, send: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather variable-length blocks (``counts`` elements each) in rank order.

        Returns the concatenation and the ``size + 1`` block offsets.
        """
        offsets = np.zeros(self.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        recv = np.empty(int(offsets[-1]), dtype=send.dtype)
        if self.size == 1:
            recv[:] = send
        else:
            self.comm.Allgatherv(send, [recv, (counts, offsets[:-1]), _mpi_type(send.dtype)])
            self.stats._add_bytes(
                *ring_allgather_bytes(np.asarray(counts) * send.dtype.itemsize, self.rank)
            )
        return recv, offsets

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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Personalised exchange; returns the received blocks in rank order and offsets."""
        recv_offsets = np.zeros(self.size + 1, dtype=np.int64)
        np.cumsum(recv_counts, out=recv_offsets[1:])
        recv = np.empty(int(recv_offsets[-1]), dtype=send.dtype)
        mpi_type = _mpi_type(send.dtype)
        self.comm.Alltoallv(
            [send, (send_counts, send_offsets), mpi_type],
            [recv, (recv_counts, recv_offsets[:-1]), mpi_type],
        )
        item = send.dtype.itemsize
        own = self.rank
        self.stats._add_bytes(
            item * (int(np.sum(send_counts)) - int(send_counts[own])),
            item * (int(np.sum(recv_counts)) - int(recv_counts[own])),
        )
        return recv, recv_offsets

    def isend(self, array: np.ndarray, dest: int, tag: int) -> MPI.Request:
        self.stats._add_bytes(array.nbytes, 0)
        return self.comm.Isend([array, _mpi_type(array.dtype)], dest=dest, tag=tag)

    def probe(self, source: int) -> tuple[int, int]:
        """Wait for the next message from ``source``; return its (tag, byte count)."""
        status = MPI.Status()
        self.comm.Probe(source=source, tag=MPI.ANY_TAG, status=status)
        return status.Get_tag(), status.Get_count(MPI.BYTE)

    def recv(self, dtype: np.dtype, nbytes: int, source: int, tag: int) -> np.ndarray:
        array = np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
        self.comm.Recv([array, _mpi_type(array.dtype)], source=source, tag=tag)
        self.stats._add_bytes(0, array.nbytes)
        return array

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
