"""``sparcomm run -np N [-H host:slots,... | --hostfile FILE] -- python train.py ...``.

Like ``horovodrun``: start N ranks through the ``mpiexec`` that matches the MPI library
mpi4py loads, on this machine or on several, and return the job's exit status.

* **Which mpiexec.**  A launcher only starts ranks that can talk to it when it belongs
  to the same MPI: MPICH's hydra cannot start Open MPI ranks (each rank would come up
  as a job of its own, ``size() == 1``).  :func:`detect_mpi_library` asks mpi4py, in a
  child process with the ranks' environment, which library it loads
  (``MPI.Get_library_version()``, the file it was loaded from, ``mpi4py.get_config()``);
  :func:`find_mpiexec` then takes the first launcher of that family among
  ``$SPARCOMM_MPIEXEC``, the library's own installation, ``PATH``, and the one next to
  the Python interpreter (the ``mpich`` wheel's), each identified by its ``--version``
  (hydra prints ``HYDRA``, Open MPI ``Open MPI``/``OpenRTE``).  So the venv's bundled
  hydra is used when mpi4py loads the bundled MPICH and never when it loads a site MPI;
  where no candidate matches, the error names both and the fix.
* **Hosts.**  ``-H a:4,b:4`` and ``--hostfile`` (``host``, ``host:4`` as hydra writes
  them, ``host slots=4`` as Open MPI does, ``#`` comments) become the launcher's own
  ``-hosts`` / ``--host`` arguments.  Without ``-np`` a host list runs one rank per slot.
* **Threads per rank.**  A Python program starts through the bootstrap
  :mod:`sparcomm._launch_child`, which sets ``NUMBA_NUM_THREADS`` and
  ``OMP_NUM_THREADS`` on each host to that host's cores divided by its ranks
  (:func:`sparcomm._threads.set_thread_environment`, the function the collectives use
  too), and aborts the whole job (``MPI_Abort``) if a rank raises, so the other ranks do
  not hang in a collective.  ``--threads-per-rank T`` or the variables set by the user
  win.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sparcomm._threads import set_thread_environment
from sparcomm.cli import arguments, command

logger = logging.getLogger(__name__)

# Interpreter options that take no argument / one argument: kept before the bootstrap.
_PYTHON_FLAGS = set("bBdEhiIOqsSuvx") | {"OO", "bb"}
_PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X"}
_THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
_VERSION_TIMEOUT_SECONDS = 20

#: Launcher families, and which of them start ranks of each MPI library (by vendor).
HYDRA, INTEL_HYDRA, OPEN_MPI = "hydra", "intel-hydra", "openmpi"
COMPATIBLE_LAUNCHERS = {
    "mpich": (HYDRA,),
    "mvapich": (HYDRA,),
    "intel": (INTEL_HYDRA, HYDRA),
    "openmpi": (OPEN_MPI,),
}


# -- the MPI library and its launcher ---------------------------------------------------


@dataclass(frozen=True)
class MPILibrary:
    """The MPI library mpi4py loads: ``vendor`` (``mpich``, ``openmpi``, ``intel``,
    ``mvapich``, ``cray-mpich`` or ``unknown``), the first line of
    ``MPI.Get_library_version()``, the shared library's path and ``mpicc`` from
    ``mpi4py.get_config()`` (a source build), where known."""

    vendor: str
    version: str
    path: str | None = None
    mpicc: str | None = None

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.version}{where}"


def library_vendor(version: str) -> str:
    """The vendor named in an ``MPI_Get_library_version`` string."""
    if "Open MPI" in version:
        return "openmpi"
    if "Intel(R) MPI" in version:
        return "intel"
    if "MVAPICH" in version:
        return "mvapich"
    if "CRAY MPICH" in version.upper():
        return "cray-mpich"
    if "MPICH" in version:
        return "mpich"
    return "unknown"


_DETECT_SOURCE = r"""
import json, os, re, mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI
path = None
try:
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6:
                name = os.path.basename(parts[5].strip())
                if re.match(r"lib(mpi|mpich)(_[a-z0-9_]+)?\.so", name) and not re.search(
                    r"(cxx|fort|f90|f77|usempi|mpifh)", name
                ):
                    path = parts[5].strip()
                    break
except OSError:
    pass
print(json.dumps({
    "version": MPI.Get_library_version(),
    "path": path,
    "mpicc": (mpi4py.get_config() or {}).get("mpicc"),
}))
"""


def detect_mpi_library(env: dict[str, str] | None = None) -> MPILibrary:
    """Ask mpi4py, in a child process with environment ``env``, which MPI it loads.

    Raises
    ------
    RuntimeError
        If mpi4py cannot be imported or cannot load an MPI library.
    """
    result = subprocess.run(
        [sys.executable, "-c", _DETECT_SOURCE],
        env=dict(os.environ) if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(
            "mpi4py cannot load an MPI library in this environment:\n"
            f"{result.stderr.strip()[-2000:]}\n"
            "install one (pip install mpich) or build mpi4py against the site MPI "
            "(docs/cluster.md)"
        )
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    version = str(facts["version"]).strip()
    first = version.splitlines()[0].strip() if version else "unknown MPI"
    return MPILibrary(library_vendor(version), first, facts.get("path"), facts.get("mpicc"))


def launcher_family(mpiexec: str) -> str | None:
    """``hydra``, ``intel-hydra`` or ``openmpi`` from ``mpiexec --version``; None when
    the output names none of them (or the program does not run)."""
    try:
        result = subprocess.run(
            [mpiexec, "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout + result.stderr
    if "Intel(R) MPI" in text:
        return INTEL_HYDRA
    if "HYDRA" in text:
        return HYDRA
    if "Open MPI" in text or "OpenRTE" in text or "Open RTE" in text:
        return OPEN_MPI
    return None


_LAUNCHER_NAMES = ("mpiexec", "mpirun", "mpiexec.hydra", "mpiexec.mpich", "mpiexec.openmpi")


def _candidates(library: MPILibrary | None, env: dict[str, str]) -> list[tuple[str, str]]:
    """(path, where it came from) of every launcher worth trying, best first."""
    found: list[tuple[str, str]] = []

    def add(candidate: str | Path, origin: str) -> None:
        path = str(candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            if all(os.path.realpath(path) != os.path.realpath(p) for p, _ in found):
                found.append((path, origin))

    if library is not None:
        if library.path:  # <prefix>/lib[/<multiarch>]/libmpi.so -> <prefix>/bin/mpiexec
            libdir = Path(library.path).resolve().parent
            for prefix in (libdir.parent, libdir.parent.parent):
                for name in _LAUNCHER_NAMES:
                    add(prefix / "bin" / name, "the MPI library's installation")
        if library.mpicc:
            bindir = Path(shutil.which(library.mpicc) or library.mpicc).parent
            for name in _LAUNCHER_NAMES:
                add(bindir / name, "the MPI mpi4py was built with (mpi4py.get_config())")
    for directory in env.get("PATH", "").split(os.pathsep):
        for name in _LAUNCHER_NAMES:
            add(Path(directory or ".") / name, "PATH")
    add(Path(sys.executable).parent / "mpiexec", "next to the Python interpreter")
    return found


def select_launcher(env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """The ``mpiexec`` that starts ranks of mpi4py's MPI library, and its family.

    ``$SPARCOMM_MPIEXEC`` if set, else the first launcher of the library's family among
    the library's own installation, ``PATH``, and the one next to the Python
    interpreter.  The library is detected with ``env`` (default: this environment), the
    environment the ranks will have.

    Raises
    ------
    FileNotFoundError
        If no ``mpiexec`` is found at all.
    RuntimeError
        If the launchers found (or ``$SPARCOMM_MPIEXEC``) belong to another MPI than
        the one mpi4py loads: a job would start N single-rank copies.
    """
    env = dict(os.environ) if env is None else env
    library: MPILibrary | None = None
    try:
        library = detect_mpi_library(env)
    except RuntimeError as error:
        # The ranks will fail the same way; the launcher's own error will show it.
        logger.warning("sparcomm run: %s", error)
    compatible = COMPATIBLE_LAUNCHERS.get(library.vendor) if library is not None else None
    override = env.get("SPARCOMM_MPIEXEC")
    if override:
        family = launcher_family(override)
        if library is not None and compatible and family is not None and family not in compatible:
            raise RuntimeError(
                f"SPARCOMM_MPIEXEC={override} is a {family} launcher, but mpi4py loads "
                f"{library.describe()}, which needs {' or '.join(compatible)}; point "
                "SPARCOMM_MPIEXEC at that MPI's mpiexec (or unset it)"
            )
        return override, family
    candidates = _candidates(library, env)
    if not candidates:
        raise FileNotFoundError(
            "no mpiexec found next to the Python interpreter or on PATH; install the MPI "
            "wheel (pip install mpich) or set SPARCOMM_MPIEXEC=/path/to/mpiexec"
        )
    if library is None or not compatible:
        if library is not None:
            logger.warning(
                "sparcomm run: cannot tell which launcher starts ranks of %s; using %s "
                "(set SPARCOMM_MPIEXEC to choose)",
                library.describe(),
                candidates[0][0],
            )
        return candidates[0][0], launcher_family(candidates[0][0])
    seen = []
    for path, origin in candidates:
        family = launcher_family(path)
        if family in compatible:
            return path, family
        seen.append(f"{path} ({family or 'not recognised'}, from {origin})")
    raise RuntimeError(
        f"mpi4py loads {library.describe()}, which needs a {' or '.join(compatible)} "
        f"launcher, but every mpiexec found belongs to another MPI: {'; '.join(seen)}. "
        "Fix: put that MPI's bin directory first on PATH or set "
        "SPARCOMM_MPIEXEC=/path/to/its/mpiexec; or, if mpi4py should use another MPI, "
        "rebuild mpi4py against it (docs/cluster.md) or point MPI4PY_LIBMPI / "
        "LD_LIBRARY_PATH at its libmpi"
    )


def find_mpiexec(env: dict[str, str] | None = None) -> str:
    """Path of the ``mpiexec`` that starts ranks of mpi4py's MPI library
    (:func:`select_launcher`)."""
    return select_launcher(env)[0]


# -- hosts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One machine of the job and the number of ranks it takes (its slots)."""

    name: str
    slots: int = 1


_HOST_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]:%]+$")


def _host(name: str, slots: str | int, where: str) -> Host:
    if not name or not _HOST_NAME.match(name):
        raise ValueError(f"bad host name {name!r} in {where}; expected a name or an address")
    try:
        count = int(slots)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"the slots of host {name!r} must be an integer >= 1, got {slots!r} in {where}"
        )
    return Host(name, count)


def _merge(hosts: list[Host]) -> list[Host]:
    """One entry per host, slots summed, in order of first appearance."""
    slots: dict[str, int] = {}
    for host in hosts:
        slots[host.name] = slots.get(host.name, 0) + host.slots
    return [Host(name, count) for name, count in slots.items()]


def parse_hosts(spec: str) -> list[Host]:
    """``"a:4,b:4"`` (``-H``, as hydra's ``-hosts`` and Open MPI's ``--host``) to hosts;
    a host without ``:slots`` has one slot."""
    if not isinstance(spec, str):
        raise TypeError(f"hosts must be a str such as 'a:4,b:4', got {type(spec).__name__}")
    hosts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty host in {spec!r}; expected host[:slots],host[:slots],...")
        name, _, slots = item.rpartition(":") if ":" in item else (item, "", "1")
        hosts.append(_host(name, slots, f"-H {spec!r}"))
    return _merge(hosts)


def parse_hostfile(path: str | os.PathLike[str]) -> list[Host]:
    """Read a hostfile: one host per line as ``host``, ``host:N`` (hydra) or
    ``host slots=N [max_slots=M]`` (Open MPI); ``#`` starts a comment."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"cannot read the hostfile {str(path)!r}: {error.strerror}") from None
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}, line {number}"
        first, *options = line.split()
        slots: str | int = 1
        if ":" in first and not options:
            first, _, slots = first.rpartition(":")
        for option in options:
            key, _, value = option.partition("=")
            if key == "slots":
                slots = value
            elif key != "max_slots":
                raise ValueError(
                    f"unsupported hostfile entry {option!r} in {where}; expected "
                    "'host', 'host:N' or 'host slots=N'"
                )
        hosts.append(_host(first, slots, where))
    if not hosts:
        raise ValueError(f"the hostfile {str(path)!r} names no host")
    return _merge(hosts)


def ranks_per_host(hosts: list[Host], nprocs: int) -> dict[str, int]:
    """How many of ``nprocs`` ranks each host runs: hosts fill in order, each up to its
    slots, and the list starts over while ranks remain (hydra's placement)."""
    counts = {host.name: 0 for host in hosts}
    left = nprocs
    while left > 0:
        for host in hosts:
            take = min(host.slots, left)
            counts[host.name] += take
            left -= take
            if left == 0:
                break
    return counts


# -- the command line -------------------------------------------------------------------


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
    nprocs: int,
    command: list[str],
    mpiexec: str | None = None,
    extra: list[str] | None = None,
    *,
    hosts: list[Host] | None = None,
    family: str = HYDRA,
    forward: tuple[str, ...] = (),
) -> list[str]:
    """The full ``mpiexec`` command line that :func:`launch` runs.

    ``hosts`` become ``-hosts a:4,b:4`` for hydra and ``--host a:4,b:4`` for Open MPI;
    ``forward`` names environment variables that Open MPI must pass to remote ranks
    (``-x``; hydra forwards the whole environment).
    """
    line = [mpiexec or find_mpiexec(), "-n", str(nprocs)]
    if hosts:
        listed = ",".join(f"{host.name}:{host.slots}" for host in hosts)
        line += ["--host", listed] if family == OPEN_MPI else ["-hosts", listed]
    if family == OPEN_MPI:
        for variable in forward:
            line += ["-x", variable]
    return [*line, *(extra or []), *_bootstrap(command)]


def launch(
    nprocs: int | None,
    command: list[str],
    *,
    threads_per_rank: int | None = None,
    extra: list[str] | None = None,
    timeout: float | None = None,
    hosts: list[Host] | None = None,
) -> int:
    """Run ``command`` on ``nprocs`` ranks (here, or on ``hosts``); return the exit status.

    ``nprocs`` None means one rank per slot of ``hosts`` (one rank without hosts).
    ``threads_per_rank`` sets ``OMP_NUM_THREADS`` and ``NUMBA_NUM_THREADS`` for every
    rank; by default each Python rank gets its host's usable cores divided by the ranks
    on that host (see :mod:`sparcomm._threads`), unless those variables are set.
    """
    if nprocs is None:
        nprocs = sum(host.slots for host in hosts) if hosts else 1
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"the number of processes must be an int >= 1, got {nprocs!r}")
    if not command:
        raise ValueError(
            "no program to run; put it after '--': sparcomm run -np 4 -- python train.py"
        )
    if threads_per_rank is not None and (
        isinstance(threads_per_rank, bool)
        or not isinstance(threads_per_rank, int)
        or threads_per_rank < 1
    ):
        raise ValueError(f"threads per rank must be an int >= 1, got {threads_per_rank!r}")
    env = dict(os.environ)
    if threads_per_rank is not None:
        for variable in _THREAD_VARIABLES:
            env[variable] = str(threads_per_rank)
    elif hosts is None and _bootstrap(command) == command:
        # Not a Python program, so no bootstrap sets the threads where the rank runs:
        # on this machine alone, every rank shares these cores.
        set_thread_environment(env, ranks_on_node=nprocs)
    mpiexec, found_family = select_launcher(env)
    family = found_family or HYDRA
    if hosts:
        slots = sum(host.slots for host in hosts)
        if family == OPEN_MPI and nprocs > slots:
            raise ValueError(
                f"-np {nprocs} needs more ranks than the {slots} slots of the hosts, which "
                "Open MPI refuses; lower -np, add slots (-H host:slots), or pass "
                "--mpiexec-arg=--oversubscribe"
            )
        placement = ranks_per_host(hosts, nprocs)
        logger.info(
            "sparcomm run: ranks per host %s",
            ", ".join(f"{name}: {count}" for name, count in placement.items() if count),
        )
    forward = tuple(v for v in _THREAD_VARIABLES if v in env)
    full = build_command(
        nprocs, command, mpiexec, extra, hosts=hosts, family=family, forward=forward
    )
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
        default=None,
        metavar="N",
        help="number of ranks (default: one per host slot with -H/--hostfile, else 1)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-H",
        "--hosts",
        "--host",
        "-hosts",
        dest="hosts",
        default=None,
        metavar="HOST:SLOTS,...",
        help="hosts and their slots, e.g. -H node1:4,node2:4 (default: this machine)",
    )
    where.add_argument(
        "--hostfile",
        "-hostfile",
        "-f",
        dest="hostfile",
        default=None,
        metavar="FILE",
        help="file of hosts, one per line: 'host', 'host:4' or 'host slots=4'",
    )
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        metavar="T",
        help="OMP_NUM_THREADS / NUMBA_NUM_THREADS per rank (default: each host's "
        "cores / its ranks)",
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


@command("run", help="run a program on N ranks, here or on several hosts (like horovodrun)")
@arguments(_configure)
def run(args: argparse.Namespace) -> int:
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    try:
        hosts = None
        if args.hosts is not None:
            hosts = parse_hosts(args.hosts)
        elif args.hostfile is not None:
            hosts = parse_hostfile(args.hostfile)
        return launch(
            args.nprocs,
            program,
            threads_per_rank=args.threads_per_rank,
            extra=args.mpiexec_arg,
            hosts=hosts,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"sparcomm run: {error}", file=sys.stderr)
        return 2
