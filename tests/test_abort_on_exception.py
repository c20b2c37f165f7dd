"""A rank that dies of an uncaught exception ends the whole job within seconds, with its
traceback, under plain ``mpiexec`` and under ``sparcomm run``: in the main thread, in the
reducer's progress thread, and in a thread of the user's.  Plus the hook's own rules
(one rank, opt-out, ``SystemExit`` in a thread), in process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import _mpiexec
import pytest

from sparcomm import _abort

ROOT = Path(__file__).resolve().parent.parent
#: The job must end within this (issue 14); without the hook it hangs until killed.
DEADLINE_SECONDS = 10
#: The test's own guard: a hang fails the test instead of blocking the suite.
KILL_AFTER_SECONDS = 60

SCRIPT = """
import queue, sys, threading
import numpy as np
from mpi4py import MPI
import sparcomm.comm
from sparcomm.reducer import GradientReducer

comm = MPI.COMM_WORLD
case = sys.argv[1]
sparcomm.comm.allreduce(np.ones(4))  # sparcomm's collectives are in use from here
if case == "main":
    if comm.Get_rank() == 1:
        raise ValueError("rank one failed on purpose")
    comm.Barrier()  # rank 0 waits here forever without the abort
elif case == "progress-thread":
    if comm.Get_rank() == 1:
        def failing(*args, **kwargs):
            raise RuntimeError("injected failure in the progress thread")
        sparcomm.comm.allreduce = failing
    reducer = GradientReducer()
    reducer.reduce([np.ones(8)])  # rank 0 waits in the bucket's collective forever
elif case == "user-thread":
    if comm.Get_rank() == 1:
        results = queue.Queue()
        def work():
            raise KeyError("a worker thread of the user failed")
            results.put("never")
        threading.Thread(target=work, name="user-worker").start()
        results.get()  # waits for the worker forever: only the thread's hook ends the job
    comm.Barrier()
print("unreachable: the job went on", flush=True)
"""

EXPECTED = {
    "main": "ValueError: rank one failed on purpose",
    "progress-thread": "RuntimeError: injected failure in the progress thread",
    "user-thread": "KeyError: 'a worker thread of the user failed'",
}


def _launch(launcher: str, case: str, script: Path) -> tuple[subprocess.CompletedProcess, float]:
    if launcher == "mpiexec":
        command = [_mpiexec.mpiexec(), "-n", "2", sys.executable, str(script), case]
    else:
        command = [sys.executable, "-m", "sparcomm", "run", "-np", "2", "--"]
        command += [sys.executable, str(script), case]
    env = dict(
        os.environ,
        NUMBA_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        MPIEXEC_TIMEOUT=str(KILL_AFTER_SECONDS),
    )
    env.pop("SPARCOMM_ABORT_ON_EXCEPTION", None)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    start = time.perf_counter()
    try:
        stdout, stderr = process.communicate(timeout=KILL_AFTER_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{launcher} {case}: the job hung\n{stdout[-3000:]}\n{stderr[-3000:]}")
    elapsed = time.perf_counter() - start
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), elapsed


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpiexec", "sparcomm run"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_an_uncaught_exception_on_one_rank_ends_the_job(tmp_path, launcher, case):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result, elapsed = _launch(launcher, case, script)
    output = f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    assert result.returncode != 0, output
    assert EXPECTED[case] in result.stderr, output  # the traceback got out
    assert "unreachable" not in result.stdout, output
    assert elapsed < DEADLINE_SECONDS, f"the job took {elapsed:.1f} s to end\n{output}"


# ------------------------------------------------------------- the hook's rules, in process


class _FakeWorld:
    def __init__(self, size: int) -> None:
        self.size = size
        self.aborted: list[int] = []

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's names
        return self.size

    def Get_rank(self) -> int:  # noqa: N802
        return 1

    def Abort(self, code: int) -> None:  # noqa: N802
        self.aborted.append(code)


class _FakeMPI:
    def __init__(self, size: int) -> None:
        self.COMM_WORLD = _FakeWorld(size)

    @staticmethod
    def Is_initialized() -> bool:  # noqa: N802
        return True

    @staticmethod
    def Is_finalized() -> bool:  # noqa: N802
        return False


@pytest.fixture
def fresh_hook(monkeypatch):
    """The module's state as in a new process, with a fake MPI; restored afterwards."""
    monkeypatch.setattr(_abort, "_installed", False)
    monkeypatch.setattr(_abort, "_enabled", None)
    monkeypatch.setattr(_abort, "_FORWARD_SECONDS", 0.0)
    # Python's own hooks, as in a new process (an earlier test of this session may have
    # installed sparcomm's through a collective).
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.delenv(_abort.ENVIRONMENT_VARIABLE, raising=False)

    def with_world(size: int) -> _FakeWorld:
        fake = _FakeMPI(size)
        monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake)
        return fake.COMM_WORLD

    return with_world


def _raise_into_hook(hook, error: BaseException) -> None:
    try:
        raise error
    except BaseException as caught:
        hook(type(caught), caught, caught.__traceback__)


def test_the_hook_prints_the_traceback_then_aborts(fresh_hook, capsys):
    world = fresh_hook(2)
    _abort.install_abort_hook()
    assert sys.excepthook is _abort._excepthook
    _raise_into_hook(sys.excepthook, ValueError("boom"))
    assert world.aborted == [1]
    err = capsys.readouterr().err
    assert "ValueError: boom" in err and "rank 1 of 2 raised; aborting the MPI job" in err
    assert "SPARCOMM_ABORT_ON_EXCEPTION=0" in err


def test_a_thread_aborts_but_systemexit_in_a_thread_does_not(fresh_hook, monkeypatch, capsys):
    world = fresh_hook(2)
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))
    _abort.install_abort_hook()
    for error in (SystemExit(0), OSError("disk gone")):
        thread = threading.Thread(target=lambda e=error: (_ for _ in ()).throw(e), name="w")
        thread.start()
        thread.join()
    assert seen == [SystemExit, OSError]  # the previous hook still sees both
    assert world.aborted == [1]  # the OSError only
    assert "raised in thread 'w'; aborting" in capsys.readouterr().err


def test_one_rank_never_aborts(fresh_hook):
    world = fresh_hook(1)
    _abort.install_abort_hook()
    _raise_into_hook(sys.excepthook, ValueError("alone"))
    assert world.aborted == []


def test_opt_out_by_environment_and_by_function(fresh_hook, monkeypatch):
    world = fresh_hook(2)
    hook = sys.excepthook
    monkeypatch.setenv(_abort.ENVIRONMENT_VARIABLE, "0")
    _abort.install_abort_hook()
    assert sys.excepthook is hook  # not installed
    monkeypatch.delenv(_abort.ENVIRONMENT_VARIABLE)
    _abort.install_abort_hook()
    assert sys.excepthook is _abort._excepthook
    _abort.abort_on_exception(False)  # after installation: the hook stands down
    _raise_into_hook(sys.excepthook, ValueError("quiet"))
    assert world.aborted == []
    _abort.abort_on_exception(True)
    _raise_into_hook(sys.excepthook, ValueError("loud"))
    assert world.aborted == [1]
    with pytest.raises(TypeError, match=r"enabled must be a bool, got str 'no'"):
        _abort.abort_on_exception("no")  # type: ignore[arg-type]


def test_installing_again_after_a_reset_never_chains_to_itself(fresh_hook, capsys):
    # The hook is in place, but the module's state says it is not (a reload, a reset):
    # installing again must keep the real previous hook, not chain to itself.
    world = fresh_hook(2)
    _abort.install_abort_hook()
    _abort._installed = False
    _abort.install_abort_hook()
    _raise_into_hook(sys.excepthook, ValueError("twice"))
    assert world.aborted == [1]
    assert "ValueError: twice" in capsys.readouterr().err
