"""``sparcomm run -np N -- python train.py ...``: start ranks through the installed ``mpiexec``.

Like ``horovodrun``: the launcher finds the ``mpiexec`` that matches mpi4py's MPI library
(the ``mpich`` wheel's, next to the Python interpreter, on a fresh install), starts N
ranks, and returns the job's exit status.  A Python program is started through the
bootstrap :mod:`sparcomm._launch_child`, which prints the traceback of a rank that raises
and aborts the whole job (``MPI_Abort``) so the other ranks do not hang in a collective.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sparcomm.cli import arguments, command

logger = logging.getLogger(__name__)

# Interpreter options that take no argument / one argument: kept before the bootstrap.
_PYTHON_FLAGS = set("bBdEhiIOqsSuvx") | {"OO", "bb"}
_PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X"}


def find_mpiexec() -> str:
    """Path of the ``mpiexec`` to use: ``$SPARCOMM_MPIEXEC``, then the one installed next
    to this Python interpreter (the ``mpich`` wheel's), then the first on ``PATH``.

    Raises
    ------
    FileNotFoundError
        If none is found.
    """
    override = os.environ.get("SPARCOMM_MPIEXEC")
    if override:
        return override
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError(
            "no mpiexec found next to the Python interpreter or on PATH; install the MPI "
            "wheel (pip install mpich) or set SPARCOMM_MPIEXEC=/path/to/mpiexec"
        )
    return found


def _is_python(program: str) -> bool:
    name = Path(program).name
    return program == sys.executable or name.startswith("python") or name.startswith("pypy")


def _bootstrap(command: list[str]) -> list[str]:
    """Insert ``-m sparcomm._launch_child`` into a ``python ...`` command line."""
    if not command or not _is_python(command[0]):
        return command
    head, rest = [command[0]], command[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c", "-"):
        option = rest.pop(0)
        head.append(option)
        if option in _PYTHON_OPTIONS_WITH_VALUE and rest:
            head.append(rest.pop(0))
    if not rest:
        return command  # an interactive interpreter: nothing to wrap
    return [*head, "-m", "sparcomm._launch_child", *rest]


def build_command(
    nprocs: int, command: list[str], mpiexec: str | None = None, extra: list[str] | None = None
) -> list[str]:
    """The full ``mpiexec`` command line that :func:`launch` runs."""
    return [mpiexec or find_mpiexec(), "-n", str(nprocs), *(extra or []), *_bootstrap(command)]


def launch(
    nprocs: int,
    command: list[str],
    *,
    threads_per_rank: int | None = None,
    extra: list[str] | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``command`` on ``nprocs`` local ranks; return the job's exit status.

    ``threads_per_rank`` sets ``OMP_NUM_THREADS`` and ``NUMBA_NUM_THREADS`` for the
    ranks when the environment does not already (default: the cores divided among the
    ranks, so N ranks do not oversubscribe the machine N times over).
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"the number of processes must be an int >= 1, got {nprocs!r}")
    if not command:
        raise ValueError(
            "no program to run; put it after '--': sparcomm run -np 4 -- python train.py"
        )
    env = dict(os.environ)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nprocs)
    for variable in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(variable, str(threads))
    full = build_command(nprocs, command, extra=extra)
    logger.info("sparcomm run: %s", " ".join(full))
    try:
        return subprocess.run(full, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"sparcomm run: job exceeded {timeout} s and was killed", file=sys.stderr)
        return 124


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-np",
        "-n",
        dest="nprocs",
        type=int,
        default=1,
        metavar="N",
        help="number of ranks (default 1)",
    )
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        metavar="T",
        help="OMP_NUM_THREADS / NUMBA_NUM_THREADS per rank (default: cores / ranks)",
    )
    parser.add_argument(
        "--mpiexec-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to mpiexec before the program (repeatable)",
    )
    parser.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        help="the program and its arguments, after '--' (e.g. -- python train.py)",
    )


@command("run", help="run a program on N local ranks through mpiexec (like horovodrun)")
@arguments(_configure)
def run(args: argparse.Namespace) -> int:
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    try:
        return launch(
            args.nprocs, program, threads_per_rank=args.threads_per_rank, extra=args.mpiexec_arg
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"sparcomm run: {error}", file=sys.stderr)
        return 2
