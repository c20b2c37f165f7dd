"""``sparcomm run``: command-line building, exit codes, and a failing rank ending the job."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from sparcomm._launch import _bootstrap, build_command, launch
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
