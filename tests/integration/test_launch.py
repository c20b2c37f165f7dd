"""``sparcomm run``: command lines, host lists, the launcher matched to mpi4py's MPI, threads
per rank, exit codes, and a failing rank ending the job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sparcomm import _launch
from sparcomm._launch import (
    COMPATIBLE_LAUNCHERS,
    HYDRA,
    OPEN_MPI,
    Host,
    MPILibrary,
    _bootstrap,
    build_command,
    detect_mpi_library,
    launch,
    library_vendor,
    parse_hostfile,
    parse_hosts,
    ranks_per_host,
    select_launcher,
)
from sparcomm._threads import _whole_node, threads_per_rank
from sparcomm.cli import main


def test_python_programs_get_the_bootstrap_after_interpreter_options():
    assert _bootstrap(["python", "train.py", "--lr", "0.1"]) == [
        "python",
        "-m",
        "sparcomm._launch_child",
        "train.py",
        "--lr",
        "0.1",
    ]
    assert _bootstrap(["python3", "-u", "-W", "ignore", "-m", "pkg.train", "-x"]) == [
        "python3",
        "-u",
        "-W",
        "ignore",
        "-m",
        "sparcomm._launch_child",
        "-m",
        "pkg.train",
        "-x",
    ]
    assert _bootstrap(["./train.sh", "a"]) == ["./train.sh", "a"]  # not Python: as is


def test_build_command_uses_mpiexec_with_the_rank_count():
    command = build_command(3, ["python", "t.py"], mpiexec="/x/mpiexec", extra=["-v"])
    assert command == [
        "/x/mpiexec",
        "-n",
        "3",
        "-v",
        "python",
        "-m",
        "sparcomm._launch_child",
        "t.py",
    ]


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="after '--'"):
        launch(2, [])
    with pytest.raises(ValueError, match="int >= 1, got 0"):
        launch(0, ["python", "t.py"])
    assert main(["run", "-np", "2"]) == 2


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _sparcomm_run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from sparcomm.cli import main; sys.exit(main())",
            "run",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_exit_status_and_arguments_are_forwarded(tmp_path):
    script = _script(
        tmp_path,
        """
        import sys
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        sys.stdout.write(f"rank {comm.Get_rank()} of {comm.Get_size()} {sys.argv[1:]}\\n")
        """,
    )
    result = _sparcomm_run("-np", "2", "--", sys.executable, script, "--flag", "7")
    assert result.returncode == 0, result.stderr
    assert "rank 0 of 2 ['--flag', '7']" in result.stdout
    assert "rank 1 of 2 ['--flag', '7']" in result.stdout


def test_non_zero_exit_is_forwarded(tmp_path):
    script = _script(
        tmp_path,
        """
        import sys
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()
        sys.exit(3)
        """,
    )
    result = _sparcomm_run("-np", "2", "--", sys.executable, script)
    assert result.returncode == 3
    assert "exited with status 3" in result.stderr


def test_a_rank_that_raises_brings_the_job_down_within_seconds(tmp_path):
    script = _script(
        tmp_path,
        """
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.Get_rank() == 1:
            raise ValueError("rank one failed on purpose")
        comm.Barrier()  # rank 0 would wait here forever without the abort
        """,
    )
    start = time.perf_counter()
    result = _sparcomm_run("-np", "2", "--", sys.executable, script, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert "ValueError: rank one failed on purpose" in result.stderr
    assert "rank 1 raised" in result.stderr
    assert "_launch_child" not in result.stderr.split("Traceback")[1]  # bootstrap frames cut
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end"


# -- hosts --------------------------------------------------------------------------------


def test_host_lists_in_hydra_and_open_mpi_forms(tmp_path):
    assert parse_hosts("node1:4,node2:4") == [Host("node1", 4), Host("node2", 4)]
    assert parse_hosts("a,b,a") == [Host("a", 2), Host("b", 1)]  # no slots: one each, summed
    hostfile = tmp_path / "hosts"
    hostfile.write_text(
        "# hydra and Open MPI lines mixed\n"
        "10.0.0.1:2\n"
        "10.0.0.2 slots=3 max_slots=8  # trailing comment\n"
        "\n"
        "node3\n"
    )
    assert parse_hostfile(hostfile) == [Host("10.0.0.1", 2), Host("10.0.0.2", 3), Host("node3", 1)]


def test_bad_host_lists_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"slots of host 'a' must be an integer >= 1, got '0'"):
        parse_hosts("a:0,b:2")
    with pytest.raises(ValueError, match="empty host"):
        parse_hosts("a:2,,b:2")
    with pytest.raises(TypeError, match="got list"):
        parse_hosts(["a:2"])  # type: ignore[arg-type]
    bad = tmp_path / "hosts"
    bad.write_text("a slots=2 ifhn=eth0\n")
    with pytest.raises(ValueError, match=r"unsupported hostfile entry 'ifhn=eth0' in .*line 1"):
        parse_hostfile(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no host"):
        parse_hostfile(bad)
    with pytest.raises(ValueError, match="cannot read the hostfile"):
        parse_hostfile(tmp_path / "missing")
    assert main(["run", "-H", "a:x", "--", "python", "t.py"]) == 2


def test_ranks_fill_hosts_in_order_and_wrap_around():
    hosts = [Host("a", 2), Host("b", 3)]
    assert ranks_per_host(hosts, 4) == {"a": 2, "b": 2}
    assert ranks_per_host(hosts, 5) == {"a": 2, "b": 3}
    assert ranks_per_host(hosts, 7) == {"a": 4, "b": 3}  # hydra starts over


def test_host_arguments_in_each_launcher_dialect():
    hosts = [Host("a", 4), Host("b", 4)]
    hydra = build_command(8, ["python", "t.py"], "/x/mpiexec", hosts=hosts, family=HYDRA)
    assert hydra[:5] == ["/x/mpiexec", "-n", "8", "-hosts", "a:4,b:4"]
    ompi = build_command(
        8, ["./t.sh"], "/o/mpirun", hosts=hosts, family=OPEN_MPI, forward=("NUMBA_NUM_THREADS",)
    )
    # Open MPI passes no environment to remote ranks unless asked (-x).
    assert ompi == [
        "/o/mpirun",
        "-n",
        "8",
        "--host",
        "a:4,b:4",
        "-x",
        "NUMBA_NUM_THREADS",
        "./t.sh",
    ]


# -- which mpiexec ------------------------------------------------------------------------


def test_library_vendors_from_their_version_strings():
    assert library_vendor("MPICH Version:      4.2.0\nMPICH Release date: ...") == "mpich"
    assert library_vendor("Open MPI v4.1.5, package: Open MPI builder Distribution") == "openmpi"
    assert library_vendor("Intel(R) MPI Library 2021.10 for Linux* OS") == "intel"
    assert library_vendor("MVAPICH2 Version      :\t2.3.7") == "mvapich"
    assert library_vendor("MPI VERSION    : CRAY MPICH version 8.1.25.17") == "cray-mpich"
    assert library_vendor("Something else 1.0") == "unknown"


def test_the_mpi_mpi4py_loads_here_is_detected():
    library = detect_mpi_library()
    assert library.vendor in COMPATIBLE_LAUNCHERS or library.vendor in ("cray-mpich", "unknown")
    assert library.version
    path, family = select_launcher()
    if library.vendor in COMPATIBLE_LAUNCHERS:
        assert family in COMPATIBLE_LAUNCHERS[library.vendor], (library, path)


def _fake_launcher(path, banner: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{banner}'\n")
    path.chmod(0o755)
    return str(path)


HYDRA_BANNER = "HYDRA build details:"
OMPI_BANNER = "mpirun (Open MPI) 5.0.3"


@pytest.fixture
def fake_library(monkeypatch):
    """Pretend mpi4py loads the given library (the real detection runs a child Python)."""

    def use(vendor: str, version: str, path: str | None) -> None:
        monkeypatch.setattr(
            _launch, "detect_mpi_library", lambda env=None: MPILibrary(vendor, version, path)
        )

    monkeypatch.delenv("SPARCOMM_MPIEXEC", raising=False)
    return use


def test_a_site_mpich_gets_its_own_mpiexec_not_the_wheels(tmp_path, monkeypatch, fake_library):
    site = _fake_launcher(tmp_path / "site" / "bin" / "mpiexec", HYDRA_BANNER)
    fake_library("mpich", "MPICH Version: 4.1", str(tmp_path / "site" / "lib" / "libmpi.so.12"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}/usr/bin")
    assert select_launcher() == (site, HYDRA)


def test_a_site_open_mpi_is_never_started_by_the_wheels_hydra(tmp_path, monkeypatch, fake_library):
    # The venv's hydra comes first on PATH, as after `source .venv/bin/activate`.
    mpirun = _fake_launcher(tmp_path / "ompi" / "bin" / "mpirun", OMPI_BANNER)
    fake_library("openmpi", "Open MPI v5.0.3", str(tmp_path / "ompi" / "lib" / "libmpi.so.40"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert select_launcher() == (mpirun, OPEN_MPI)


def test_a_launcher_of_another_mpi_is_an_error_naming_both(tmp_path, monkeypatch, fake_library):
    hydra = _fake_launcher(tmp_path / "bin" / "mpiexec", HYDRA_BANNER)
    fake_library("openmpi", "Open MPI v5.0.3", None)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError) as error:
        select_launcher()
    message = str(error.value)
    assert "mpi4py loads Open MPI v5.0.3" in message and "needs a openmpi launcher" in message
    assert f"{hydra} (hydra, from PATH)" in message and "SPARCOMM_MPIEXEC" in message
    monkeypatch.setenv("SPARCOMM_MPIEXEC", hydra)
    with pytest.raises(RuntimeError, match=r"SPARCOMM_MPIEXEC=.* is a hydra launcher, but"):
        select_launcher()
    script = tmp_path / "t.py"
    script.write_text("")
    assert main(["run", "-np", "2", "--", "python", str(script)]) == 2  # reported, not raised


def test_sparcomm_mpiexec_wins_when_it_matches(tmp_path, monkeypatch, fake_library):
    mine = _fake_launcher(tmp_path / "mine" / "mpiexec", HYDRA_BANNER)
    fake_library("mpich", "MPICH Version: 4.1", None)
    monkeypatch.setenv("SPARCOMM_MPIEXEC", mine)
    assert select_launcher() == (mine, HYDRA)


# -- threads per rank ---------------------------------------------------------------------

THREADS_SCRIPT = """
import os, sys
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
sys.stdout.write(f"<rank {rank} NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')} "
                 f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}>\\n")
"""


def _thread_settings(stdout: str) -> set[tuple[str, str]]:
    found = re.findall(r"<rank (\d+) NUMBA_NUM_THREADS=(\w+) OMP_NUM_THREADS=(\w+)>", stdout)
    assert sorted(rank for rank, _, _ in found) == ["0", "1"], stdout
    return {(numba, omp) for _, numba, omp in found}


def test_each_rank_gets_its_share_of_the_cores_unless_the_user_chose(tmp_path, monkeypatch):
    script = _script(tmp_path, THREADS_SCRIPT)
    for variable in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    # This machine's usable cores / 2 ranks; where this process is bound to some cores
    # only, the first collective decides instead (test_cluster_threads.py).
    share = str(threads_per_rank(2)) if _whole_node() else "None"
    result = _sparcomm_run("-np", "2", "--", sys.executable, script)
    assert result.returncode == 0, result.stderr
    assert _thread_settings(result.stdout) == {(share, share)}
    result = _sparcomm_run("-np", "2", "--threads-per-rank", "3", "--", sys.executable, script)
    assert _thread_settings(result.stdout) == {("3", "3")}
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's count sizes Numba's pool too
    result = _sparcomm_run("-np", "2", "--", sys.executable, script)
    assert _thread_settings(result.stdout) == {("5", "5")}
    monkeypatch.setenv("NUMBA_NUM_THREADS", "7")
    result = _sparcomm_run("-np", "2", "--", sys.executable, script)
    assert _thread_settings(result.stdout) == {("7", "5")}
