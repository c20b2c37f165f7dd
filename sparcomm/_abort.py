"""End the whole MPI job when one rank dies of an uncaught exception.

Without this, a rank that raises leaves the others blocked in their next collective
until someone kills the job: plain ``mpiexec`` only ends a job when a process exits, and
the ranks still waiting never exit.  Once sparcomm's collectives are in use (the first
call on a communicator, or a :class:`~sparcomm.reducer.GradientReducer` built), an
uncaught exception, in the main thread (``sys.excepthook``) or in any other thread
(``threading.excepthook``), prints its traceback as usual, then the rank calls
``MPI_Abort`` on ``COMM_WORLD``: every rank ends within seconds, whichever launcher
started the job (``sparcomm run`` does the same for the main thread through its
bootstrap, :mod:`sparcomm._launch_child`).

Nothing happens at one rank (nobody can hang), in an interactive interpreter, or once
MPI is finalised; ``SystemExit`` in a thread is ignored, as Python's own hook ignores
it.  Opt out with the environment variable ``SPARCOMM_ABORT_ON_EXCEPTION=0`` or
:func:`abort_on_exception` ``(False)``.  This module never imports mpi4py itself: it looks
MPI up in ``sys.modules`` when an exception arrives.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import TracebackType
from typing import Any

#: The environment variable that turns the hook off ("0", "false", "no", "off").
ENVIRONMENT_VARIABLE = "SPARCOMM_ABORT_ON_EXCEPTION"
_OFF_VALUES = ("0", "false", "no", "off")
#: mpiexec forwards each rank's output through its proxy, which the abort tears down:
#: the time given to the traceback to get through first.
_FORWARD_SECONDS = 0.5

_lock = threading.Lock()
_installed = False
_enabled: bool | None = None  # None: the environment variable decides
_previous_excepthook: Any = None
_previous_thread_excepthook: Any = None


def _is_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() not in _OFF_VALUES


def abort_on_exception(enabled: bool = True) -> None:
    """Turn the abort-on-uncaught-exception hook on or off for this process.

    Overrides ``SPARCOMM_ABORT_ON_EXCEPTION``.  ``True`` installs the hook now (it is
    otherwise installed at the first use of sparcomm's collectives); ``False`` leaves
    uncaught exceptions to Python's default handling: the rank exits and the others may
    wait in a collective until the job is killed.

    Parameters
    ----------
    enabled : bool
        Whether an uncaught exception on a rank aborts the MPI job.

    Raises
    ------
    TypeError
        If ``enabled`` is not a bool.
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(
            f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}; "
            "call abort_on_exception(False) to turn the hook off"
        )
    _enabled = enabled
    if enabled:
        install_abort_hook()


def install_abort_hook() -> None:
    """Install the hooks once (idempotent, thread-safe); a no-op when turned off.

    Called by sparcomm where its collectives start; the previous hooks (Python's, or the
    user's) still run first and print the traceback.
    """
    global _installed, _previous_excepthook, _previous_thread_excepthook
    if _installed or not _is_enabled():
        return
    with _lock:
        if _installed:
            return
        # Never chain to ourselves (a second install after the module state was reset
        # would otherwise recurse forever when an exception arrives).
        if sys.excepthook is not _excepthook:
            _previous_excepthook = sys.excepthook
            sys.excepthook = _excepthook
        if threading.excepthook is not _thread_excepthook:
            _previous_thread_excepthook = threading.excepthook
            threading.excepthook = _thread_excepthook
        _installed = True


def _excepthook(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    _previous_excepthook(kind, error, traceback)
    _abort_job("raised")


def _thread_excepthook(args: Any) -> None:
    _previous_thread_excepthook(args)
    if args.exc_type is not SystemExit:
        name = args.thread.name if args.thread is not None else "a thread"
        _abort_job(f"raised in thread {name!r}")


def _abort_job(what: str) -> None:
    """``MPI_Abort`` on ``COMM_WORLD`` where that is what stops a hang."""
    if not _is_enabled() or hasattr(sys, "ps1") or sys.flags.interactive:
        return
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    world = mpi.COMM_WORLD
    if world.Get_size() == 1:
        return
    sys.stderr.write(
        f"sparcomm: rank {world.Get_rank()} of {world.Get_size()} {what}; aborting the MPI "
        "job (MPI_Abort) so that the other ranks do not wait forever in a collective (set "
        f"{ENVIRONMENT_VARIABLE}=0 to turn this off)\n"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(_FORWARD_SECONDS)
    world.Abort(1)
