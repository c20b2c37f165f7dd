"""Threads per rank: each rank's share of its node's cores for the Numba kernels.

N ranks on one node each start a Numba thread pool as large as the node; their threads
then spin against each other (the quantized allreduce at 2^24 on 2 cores ran at
0.1-0.3x of MPI's Allreduce with 4 ranks and Numba's default, 0.8-0.9x with one thread
per rank).  As ``torchrun`` sets ``OMP_NUM_THREADS``, sparcomm gives each rank

    threads = max(1, usable cores // ranks sharing those cores)

where the usable cores are the rank's CPU affinity mask.  When every rank may run on
every core of the node (no binding, no cpuset), the ranks sharing them are all the
ranks on the node; when a launcher binds each rank to its own cores (Slurm's
``--cpus-per-task``, Open MPI's binding) or a container's cpuset holds several ranks,
they are the ranks whose masks overlap this one.  :func:`threads_per_rank` is the one
formula; two places feed it:

* ``sparcomm run`` starts Python ranks through :mod:`sparcomm._launch_child`, which
  calls :func:`set_thread_environment` before the program starts.  Where the rank may
  use every core of its host, the launcher's count of ranks on the host
  (``MPI_LOCALNRANKS`` from hydra, ``OMPI_COMM_WORLD_LOCAL_SIZE`` from Open MPI, ...)
  is the divisor, and ``NUMBA_NUM_THREADS`` / ``OMP_NUM_THREADS`` size the pools
  themselves, on every host by its own core count.  A narrower mask is left to:
* the first collective of a process under any launcher (:func:`set_rank_threads`,
  called where sparcomm first duplicates a communicator, a collective step already):
  a shared-memory split of the communicator and an allgather of the ranks' affinity
  masks give the ranks sharing this rank's cores exactly; then ``numba.set_num_threads``.
  Numba's setting belongs to the calling thread, so :func:`adopt_rank_threads` repeats
  it in another thread that runs collectives (the reducer's progress thread).

The user's own choice always wins: ``NUMBA_NUM_THREADS`` in the environment, a call of
``numba.set_num_threads`` before the first collective, or (for Numba, which otherwise
ignores it) ``OMP_NUM_THREADS``.  The decision is logged once per process on the
``sparcomm.threads`` logger.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI

logger = logging.getLogger("sparcomm.threads")

#: Environment variables that launchers set to the number of this job's ranks on the
#: node, in order of preference (hydra: MPICH, Intel MPI, MVAPICH; Open MPI; MVAPICH2;
#: HPE/Cray PALS).  Slurm's ``srun`` is read separately (:func:`_slurm_local_size`).
LOCAL_SIZE_VARIABLES = (
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
    "PALS_LOCAL_SIZE",
)

_decision: int | None = None  # the count chosen for this process, once decided
_decided = False
_applied = threading.local()  # .done: this thread has adopted the decision
_lock = threading.Lock()


def _affinity() -> set[int]:
    """The cores this process may run on (every core where affinity is not available)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """The number of cores this process may run on (its affinity mask)."""
    return len(_affinity())


def _whole_node() -> bool:
    """Whether this process may run on every core of its machine (no binding or cpuset)."""
    return usable_cpus() >= (os.cpu_count() or 1)


def ranks_sharing(masks: list[set[int]], mine: int) -> int:
    """How many of the ranks with affinity ``masks`` compete for rank ``mine``'s cores:
    the most ranks whose masks hold any one of its cores."""
    return max((sum(core in mask for mask in masks) for core in masks[mine]), default=1)


def threads_per_rank(ranks_on_node: int, cpus: int | None = None) -> int:
    """Kernel threads for one of ``ranks_on_node`` ranks sharing ``cpus`` cores.

    ``max(1, cpus // ranks_on_node)``; ``cpus`` defaults to :func:`usable_cpus`.  The
    one formula behind ``sparcomm run`` and the collectives' own setting.
    """
    if isinstance(ranks_on_node, bool) or not isinstance(ranks_on_node, int):
        raise TypeError(f"ranks_on_node must be an int, got {type(ranks_on_node).__name__}")
    if ranks_on_node < 1:
        raise ValueError(f"ranks_on_node must be >= 1, got {ranks_on_node}")
    return max(1, (usable_cpus() if cpus is None else cpus) // ranks_on_node)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _slurm_local_size(environ: Mapping[str, str]) -> int | None:
    """Tasks of this ``srun`` step on this node: ``SLURM_STEP_TASKS_PER_NODE`` ("4(x2),3")
    indexed by ``SLURM_NODEID``."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE")
    node = _positive_int(environ.get("SLURM_NODEID", "0")) or 0
    if not spec or "SLURM_STEP_ID" not in environ:
        return None
    counts: list[int] = []
    for item in spec.split(","):
        count, _, repeat = item.partition("(x")
        value = _positive_int(count)
        times = _positive_int(repeat.rstrip(")")) if repeat else 1
        if value is None or times is None:
            return None
        counts.extend([value] * times)
    return counts[node] if node < len(counts) else None


def local_size_from_environment(environ: Mapping[str, str] | None = None) -> int | None:
    """The number of this job's ranks on this node, as the launcher's environment tells
    it, or None where no known launcher variable is set."""
    environ = os.environ if environ is None else environ
    for variable in LOCAL_SIZE_VARIABLES:
        value = _positive_int(environ.get(variable))
        if value is not None:
            return value
    return _slurm_local_size(environ)


def user_threads(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """The user's own per-process thread count and where it comes from:
    ``NUMBA_NUM_THREADS``, else ``OMP_NUM_THREADS``; None where neither is set."""
    environ = os.environ if environ is None else environ
    for variable in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        text = environ.get(variable)
        if text is not None and text.strip():
            value = _positive_int(text.strip())
            if value is None:
                raise ValueError(
                    f"{variable} must be a positive integer, got {text!r}; "
                    f"unset it or set it to the threads per rank, e.g. {variable}=1"
                )
            return value, variable
    return None


def set_thread_environment(
    environ: MutableMapping[str, str] | None = None, ranks_on_node: int | None = None
) -> int | None:
    """Before a rank's program starts (``sparcomm run``): set ``NUMBA_NUM_THREADS`` and
    ``OMP_NUM_THREADS`` to the rank's share of this node's cores.

    ``ranks_on_node`` (the ranks sharing this process's cores) defaults to the
    launcher's count of ranks on the node in ``environ``
    (:func:`local_size_from_environment`), and is used only where this process may run
    on every core of the node: a narrower mask (a binding, a cpuset) may or may not be
    shared, which the first collective finds out (:func:`set_rank_threads`).  A
    variable already set is kept (``OMP_NUM_THREADS`` alone also sizes Numba's pool).
    Returns the count set, or None where the user's setting stands or the share is left
    to the first collective.
    """
    environ = os.environ if environ is None else environ
    chosen = user_threads(environ)
    if chosen is not None:
        if chosen[1] == "OMP_NUM_THREADS":
            environ["NUMBA_NUM_THREADS"] = str(chosen[0])
        return None
    if ranks_on_node is None:
        ranks_on_node = local_size_from_environment(environ) if _whole_node() else None
    if ranks_on_node is None:
        return None
    threads = threads_per_rank(ranks_on_node)
    environ["NUMBA_NUM_THREADS"] = str(threads)
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def _sharing(comm: MPI.Comm) -> int:
    """Ranks of ``comm`` on this node whose cores overlap this rank's (collective)."""
    from mpi4py import MPI

    if comm.Get_size() == 1:
        return 1
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        masks = local.allgather(_affinity())
        return ranks_sharing(masks, local.Get_rank())
    finally:
        local.Free()


def set_rank_threads(comm: MPI.Comm) -> None:
    """Collective on ``comm``: at a process's first collective, set its Numba kernel
    threads to its share of the node's cores (see the module docstring).

    Called wherever sparcomm creates a communicator's state, which is collective on
    ``comm`` anyway (``MPI_Comm_dup``); every call does the same collective steps, so
    ranks that have decided already still take part.
    """
    global _decision, _decided
    sharing = _sharing(comm)
    with _lock:
        if _decided:
            adopt_rank_threads()
            return
        _decided = True
        import numba

        pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        user = user_threads()
        if user is not None and user[1] == "NUMBA_NUM_THREADS":
            logger.info("Numba kernels keep %d threads per rank (NUMBA_NUM_THREADS is set)", pool)
            return
        current = numba.get_num_threads()
        if current != pool:
            logger.info(
                "Numba kernels keep %d threads per rank (numba.set_num_threads was called)",
                current,
            )
            return
        if user is not None:  # OMP_NUM_THREADS: Numba's pool ignores it otherwise
            _decision = min(user[0], pool)
            logger.info(
                "Numba kernels use %d threads per rank, from OMP_NUM_THREADS=%d",
                _decision,
                user[0],
            )
        else:
            ranks = sharing
            if _whole_node():  # ranks of the job outside ``comm`` share these cores too
                ranks = max(ranks, local_size_from_environment() or 1)
            cpus = usable_cpus()
            _decision = min(threads_per_rank(ranks, cpus), pool)
            logger.info(
                "Numba kernels use %d threads per rank: %d usable cores shared by %d ranks "
                "(set NUMBA_NUM_THREADS to choose)",
                _decision,
                cpus,
                ranks,
            )
        adopt_rank_threads()


def adopt_rank_threads() -> None:
    """Apply this process's decision to the calling thread (Numba's thread count is
    per thread); cheap after the first call in a thread."""
    if getattr(_applied, "done", False) or not _decided:
        return
    _applied.done = True
    if _decision is not None:
        import numba

        numba.set_num_threads(_decision)


def _reset_for_tests() -> None:
    """Forget the decision (tests only; the calling thread's Numba setting stays)."""
    global _decision, _decided
    _decision, _decided = None, False
    _applied.done = False
