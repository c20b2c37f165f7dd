"""The emulated cluster: links, rate, MPI through the namespaces, and clean-up whatever happens.

The tests that build namespaces need root, ``ip`` and ``tc``; elsewhere they skip and say
which is missing.  Each leaves no namespace and no process behind, which they check.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sparcomm import _emulate
from sparcomm._emulate import EmulatedCluster, Link, check_requirements, parse_link


def _missing() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


needs_root = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _ours() -> list[str]:
    """Namespaces this test process owns (their names carry its pid)."""
    prefix = f"{_emulate.PREFIX}{os.getpid()}x"
    return [name for name in _emulate._namespaces() if name.startswith(prefix)]


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().split()[2] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


# -- parsing and errors: no privileges needed ---------------------------------------------


def test_parse_link():
    assert parse_link("1gbit") == Link(1e9)
    assert parse_link("250mbit,2ms") == Link(250e6, 2e-3)
    assert parse_link("10G") == Link(1e10)
    assert parse_link("unshaped") == Link(None)
    assert parse_link("1gbit,300us").delay_s == pytest.approx(3e-4)
    assert str(parse_link("2.5gbit")) == "2.5 Gbit/s"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fast", "link rate must look like '1gbit'"),
        ("1gbit,soon", "link delay must look like '1ms'"),
        ("10kbit", "at least 100kbit"),
    ],
)
def test_parse_link_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_link(text)


def test_without_root_the_error_names_the_privilege(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root .* uid 1000"):
        check_requirements(Link(1e9))


def test_without_tc_the_error_names_the_tool(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else real(tool))
    with pytest.raises(FileNotFoundError, match="needs `tc` \\(iproute2\\)"):
        check_requirements(Link(1e9))


def test_wrapper_refuses_to_run_outside_mpiexec():
    env = {
        k: v for k, v in os.environ.items() if k not in ("PMI_RANK", "SPARCOMM_EMULATE_NAMESPACES")
    }
    result = subprocess.run(
        [sys.executable, "-m", "sparcomm._emulate", "exec", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "PMI_RANK and SPARCOMM_EMULATE_NAMESPACES must be set" in result.stderr


# -- the cluster itself ------------------------------------------------------------------------


@needs_root
def test_shaped_rate_is_measured_and_everything_is_removed():
    with EmulatedCluster(2, "200mbit") as cluster:
        assert set(_ours()) == {cluster.bridge_namespace, *cluster.namespaces}
        rate = cluster.measure_rate(seconds=0.5)
        # TCP goodput through tbf: a little under the shaped rate, never above it.
        assert 0.8 * 200e6 < rate < 1.02 * 200e6
        qdiscs = subprocess.run(
            ["tc", "-n", cluster.namespaces[1], "qdisc", "show", "dev", "sc0"],
            capture_output=True,
            text=True,
        ).stdout
        assert "tbf" in qdiscs and "200Mbit" in qdiscs
    assert _ours() == []


@needs_root
def test_a_delay_needs_netem_and_says_so():
    if _emulate.netem_available():
        with EmulatedCluster(2, "1gbit,1ms") as cluster:
            assert (
                "netem"
                in subprocess.run(
                    ["tc", "-n", cluster.namespaces[0], "qdisc", "show"],
                    capture_output=True,
                    text=True,
                ).stdout
            )
    else:
        with pytest.raises(NotImplementedError, match="sch_netem"):
            EmulatedCluster(2, "1gbit,1ms").open()
    assert _ours() == []


_RANK_SCRIPT = textwrap.dedent(
    """
    import os, socket, sys, time
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    # Each rank sees only its own link, with its own address.
    address = os.popen("ip -4 -o addr show sc0").read().split()[3].split("/")[0]
    # Rank 0 prints every rank's line: two ranks printing at once can interleave their
    # bytes in the launcher's forwarded stdout.
    rows = comm.gather(f"{comm.rank} {address} {comm.allgather(address)}")
    if comm.rank == 0:
        print(chr(10).join(rows), flush=True)
    if len(sys.argv) > 1:  # keep communicating until killed
        while True:
            comm.Barrier()
            time.sleep(0.05)
    """
)


@needs_root
def test_mpi_ranks_run_in_their_namespaces(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    from sparcomm._launch import find_mpiexec

    with EmulatedCluster(2, "500mbit") as cluster:
        result = subprocess.run(
            [find_mpiexec(), "-n", "2", *cluster.wrap([sys.executable, str(script)])],
            env={**os.environ, **cluster.env()},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        lines = sorted(result.stdout.split("\n"))[-2:]
        assert lines[0].startswith(f"0 {cluster.addresses[0]} ")
        assert lines[1].startswith(f"1 {cluster.addresses[1]} ")
    assert _ours() == []


@needs_root
def test_killing_a_rank_leaves_no_namespace_and_no_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    from sparcomm._launch import find_mpiexec

    with EmulatedCluster(2, "500mbit") as cluster:
        job = subprocess.Popen(
            [find_mpiexec(), "-n", "2", *cluster.wrap([sys.executable, str(script), "forever"])],
            env={**os.environ, **cluster.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                per_rank = [_emulate._namespace_pids(ns) for ns in cluster.namespaces]
                if all(per_rank):
                    break
                time.sleep(0.1)
            assert all(per_rank), "the ranks did not start"
            seen = cluster.pids()
            time.sleep(0.5)  # both ranks inside their barrier loop
            os.kill(per_rank[1][0], signal.SIGKILL)
            # MPICH ends the job when a rank dies; the cluster cleans whatever is left.
            job.wait(timeout=30)
            assert job.returncode != 0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    assert _ours() == []
    assert _alive(seen) == []


_OWNER = textwrap.dedent(
    """
    import os, signal, sys, time
    from sparcomm._emulate import EmulatedCluster
    cluster = EmulatedCluster(2, "100mbit").__enter__()
    print(cluster.namespaces[0], flush=True)
    if sys.argv[1] == "hang":
        time.sleep(60)
    """
)


@needs_root
@pytest.mark.parametrize("how", ["sigterm", "sigint", "exit", "sigkill"])
def test_the_owner_dying_removes_its_namespaces(how):
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, "exit" if how == "exit" else "hang"],
        stdout=subprocess.PIPE,
        text=True,
        # A job started in the background (CI) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the owner a terminal user's Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert owner.stdout is not None
    name = owner.stdout.readline().strip()
    prefix = name[: name.rindex("r")]
    if how != "exit":
        owner.send_signal(
            {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}[how]
        )
    owner.wait(timeout=60)
    if how == "sigkill":
        # Nothing ran in the owner: the next cluster removes what it left.
        assert any(n.startswith(prefix) for n in _emulate._namespaces())
        assert any(n.startswith(prefix) for n in _emulate.remove_stale())
    assert not any(n.startswith(prefix) for n in _emulate._namespaces())
