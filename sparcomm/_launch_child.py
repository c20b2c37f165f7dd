"""Rank bootstrap used by ``sparcomm run``: ``python -m sparcomm._launch_child script.py args``.

Sets ``NUMBA_NUM_THREADS`` and ``OMP_NUM_THREADS`` to this host's usable cores divided
by the ranks the launcher placed on it, unless they are set
(:func:`sparcomm._threads.set_thread_environment`).  Then runs the script (or
``-m module`` / ``-c code``) as ``__main__``.  If it raises, or exits with a non-zero
status, the traceback is printed with the rank's number and the whole job is aborted
with ``MPI_Abort``: the other ranks, possibly blocked in a collective, are killed within
seconds instead of hanging (what ``python -m mpi4py`` does, plus the rank prefix).
"""

from __future__ import annotations

import os
import runpy
import sys
import time
import traceback

from sparcomm._threads import set_thread_environment

_FORWARD_SECONDS = 0.5


def _rank() -> str:
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if variable in os.environ:
            return os.environ[variable]
    return "?"


def _abort(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # mpiexec forwards each rank's output through its proxy, which the abort tears down:
    # give it a moment to pass the traceback on first.
    time.sleep(_FORWARD_SECONDS)
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


def main(argv: list[str]) -> None:
    if not argv:
        print(
            "usage: python -m sparcomm._launch_child script.py [args] | -m module | -c code",
            file=sys.stderr,
        )
        raise SystemExit(2)
    # Before the program imports Numba (its pool size is read once, at import) or an
    # OpenMP runtime: this host's cores divided among this host's ranks.
    set_thread_environment()
    try:
        if argv[0] == "-m" and len(argv) > 1:
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c" and len(argv) > 1:
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if code is None or code == 0:
            raise
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        print(
            f"sparcomm run: rank {_rank()} exited with status {code}; aborting the job",
            file=sys.stderr,
        )
        _abort(code)
    except BaseException:
        sys.stderr.write(f"sparcomm run: rank {_rank()} raised; aborting the job\n")
        kind, error, tb = sys.exc_info()
        # Drop the bootstrap's own frames (this module, runpy) from the traceback.
        while tb is not None and (
            tb.tb_frame.f_code.co_filename == __file__
            or tb.tb_frame.f_globals.get("__name__") == "runpy"
            or tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")
        ):
            tb = tb.tb_next
        traceback.print_exception(kind, error, tb)
        _abort(1)


if __name__ == "__main__":
    main(sys.argv[1:])
