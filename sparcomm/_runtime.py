"""Horovod-style process queries: ``init``, ``rank``, ``size``, ``local_rank``, ``local_size``.

``sparcomm.init()`` is collective (every rank calls it, as ``hvd.init()``): it fixes the
communicator these functions describe (``MPI.COMM_WORLD`` by default) and splits it by
node with ``Split_type(MPI.COMM_TYPE_SHARED)``, once; the split is cached, so
``local_rank()`` and ``local_size()`` are plain lookups afterwards and may be called on
some ranks only.  ``rank()`` and ``size()`` need no ``init()`` (they are never
collective and default to ``COMM_WORLD``).

Typical use: one GPU per local rank, ``torch.cuda.set_device(sparcomm.local_rank())``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI


@dataclass(frozen=True)
class _Layout:
    comm: MPI.Comm
    local_rank: int
    local_size: int


_layout: _Layout | None = None


def init(comm: MPI.Comm | None = None) -> None:
    """Initialise sparcomm's view of the job on ``comm`` (collective on ``comm``).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator whose ranks :func:`rank`, :func:`size`, :func:`local_rank` and
        :func:`local_size` describe; ``MPI.COMM_WORLD`` by default.  Calling ``init``
        again with the same communicator does nothing; with another, splits that one.

    Raises
    ------
    TypeError
        If ``comm`` is not an ``mpi4py.MPI.Comm``.
    """
    global _layout
    from mpi4py import MPI

    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(
            f"comm must be an mpi4py.MPI.Comm (for example MPI.COMM_WORLD), "
            f"got {type(comm).__name__}"
        )
    if _layout is not None and _layout.comm == comm:
        return
    if comm.Get_size() == 1:
        _layout = _Layout(comm, 0, 1)
        return
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        _layout = _Layout(comm, shared.Get_rank(), shared.Get_size())
    finally:
        shared.Free()


def _initialised(name: str) -> _Layout:
    if _layout is None:
        raise RuntimeError(
            f"sparcomm.{name}() needs sparcomm.init() first: call sparcomm.init() on every "
            "rank at start-up (it is collective: it splits the communicator by node)"
        )
    return _layout


def _comm() -> MPI.Comm:
    if _layout is not None:
        return _layout.comm
    from mpi4py import MPI

    return MPI.COMM_WORLD


def is_initialized() -> bool:
    """Whether :func:`init` has been called in this process."""
    return _layout is not None


def rank() -> int:
    """This process's rank in the communicator given to :func:`init` (default
    ``MPI.COMM_WORLD``, also before ``init``)."""
    return _comm().Get_rank()


def size() -> int:
    """The number of ranks in the communicator given to :func:`init` (default
    ``MPI.COMM_WORLD``, also before ``init``)."""
    return _comm().Get_size()


def local_rank() -> int:
    """This process's rank among the ranks on its node (0 .. :func:`local_size` - 1).

    Raises
    ------
    RuntimeError
        Before :func:`init`.
    """
    return _initialised("local_rank").local_rank


def local_size() -> int:
    """The number of ranks on this process's node (a shared-memory split, see :func:`init`).

    Raises
    ------
    RuntimeError
        Before :func:`init`.
    """
    return _initialised("local_size").local_size
