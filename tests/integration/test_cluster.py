"""Two emulated hosts: ``sparcomm run --hostfile`` across two network namespaces.

Each "host" is a network namespace with one end of a veth pair (private addresses
``10.232.0.1`` and ``10.232.0.2``, which exist only inside the namespaces made here).
hydra reaches a host through ``-launcher-exec``: a small script that stands in for
``ssh host command`` and runs the command with ``ip netns exec <namespace of host>``.
The job, two ranks per host, must see four ranks, two per node, each host's threads per
rank, and an allreduce whose messages crossed the link (the veth's byte counters).

Needs root, Linux and iproute2 (skipped with the reason elsewhere).  The namespaces are
removed after the test, on failure too, with every process left in them; those of a
test process that died without cleaning up (their name carries its pid) are removed by
the next run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparcomm._launch import HYDRA, select_launcher
from sparcomm._threads import _whole_node, threads_per_rank

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sparcomm-t"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[ab]$")
ADDRESSES = ("10.232.0.1", "10.232.0.2")
IFACE = "veth0"
TIMEOUT_SECONDS = 120

pytestmark = pytest.mark.mpi

RANK_SCRIPT = """
import os, sys
import numpy as np
from mpi4py import MPI
import sparcomm

sparcomm.init()
comm = MPI.COMM_WORLD
x = np.full(1 << 17, comm.Get_rank() + 1.0)  # 1 MiB: the sum must cross the link
y = sparcomm.allreduce(x, codec=sparcomm.NoCompression(), comm=comm, op="sum")
z = sparcomm.allreduce(x, codec=sparcomm.TopK(density=0.01), comm=comm, op="sum")
netns = os.stat("/proc/self/ns/net").st_ino
sys.stdout.write(
    f"<rank {comm.Get_rank()} size {comm.Get_size()} local {sparcomm.local_rank()} "
    f"of {sparcomm.local_size()} netns {netns} threads {os.environ.get('NUMBA_NUM_THREADS')} "
    f"sum {y[0]:g} {float(z.sum()):g}>\\n"
)
"""

# hydra calls ``LAUNCHER [-x] HOST COMMAND...`` as it would call ssh.
LAUNCHER_SCRIPT = """#!/bin/sh
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
  {a}) namespace={na} ;;
  {b}) namespace={nb} ;;
  *) echo "launcher: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$namespace" sh -c "$*"
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(names: list[str]) -> None:
    """Kill every process inside the namespaces ``names`` and delete them."""
    for name in names:
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        for pid in pids:
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for name in names:
        _ip("netns", "del", name, check=False)


def _remove_stale() -> None:
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in listing if line.strip()]
    stale = [n for n in names if (m := _NAME.match(n)) and not _pid_alive(int(m.group(1)))]
    _remove(stale)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair; removed afterwards whatever happens."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"emulated hosts need Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        pytest.skip(f"emulated hosts need root to create network namespaces (uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("emulated hosts need `ip` (iproute2) on PATH")
    _remove_stale()
    names = [f"{PREFIX}{os.getpid()}-a", f"{PREFIX}{os.getpid()}-b"]
    created: list[str] = []
    try:
        for name in names:
            result = _ip("netns", "add", name, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
            created.append(name)
        a, b = names
        _ip("link", "add", IFACE, "netns", a, "type", "veth", "peer", "name", IFACE, "netns", b)
        for name, address in zip(names, ADDRESSES, strict=True):
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", IFACE)
            _ip("-n", name, "link", "set", IFACE, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield a, b
    finally:
        _remove(created)


def _rx_bytes(namespace: str) -> int:
    out = _ip("-n", namespace, "-s", "-j", "link", "show", IFACE).stdout
    match = re.search(r'"rx":\{"bytes":(\d+)', out)
    assert match, out
    return int(match.group(1))


def test_two_hosts_two_ranks_each_through_a_hostfile(two_hosts, tmp_path):
    _, family = select_launcher()
    if family != HYDRA:
        pytest.skip(
            f"the emulated hosts are reached through hydra's -launcher-exec; "
            f"mpi4py's MPI is started by {family or 'an unrecognised launcher'}"
        )
    a, b = two_hosts
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(LAUNCHER_SCRIPT.format(a=ADDRESSES[0], b=ADDRESSES[1], na=a, nb=b))
    launcher.chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{ADDRESSES[0]}:2\n{ADDRESSES[1]} slots=2\n")  # both dialects
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "SPARCOMM_MPIEXEC")
    }
    # MPICH between hosts: libfabric's tcp provider on the veth (docs/cluster.md).
    env.update(MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp", FI_TCP_IFACE=IFACE)
    env["MPIEXEC_TIMEOUT"] = str(TIMEOUT_SECONDS)
    run = "import sys; from sparcomm.cli import main; sys.exit(main())"
    command = [
        "ip", "netns", "exec", a, sys.executable, "-c", run, "run", "--hostfile", str(hostfile),
        "--mpiexec-arg=-launcher", "--mpiexec-arg=ssh",
        "--mpiexec-arg=-launcher-exec", f"--mpiexec-arg={launcher}",
        "--mpiexec-arg=-localhost", f"--mpiexec-arg={ADDRESSES[0]}",
        "--", sys.executable, str(script),
    ]  # fmt: skip
    received_before = [_rx_bytes(a), _rx_bytes(b)]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=TIMEOUT_SECONDS + 30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the two-host job hung\n{out[-3000:]}\n{err[-3000:]}")
    assert process.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    received = [_rx_bytes(a) - received_before[0], _rx_bytes(b) - received_before[1]]

    rows = re.findall(
        r"<rank (\d+) size (\d+) local (\d+) of (\d+) netns (\d+) threads (\w+) "
        r"sum (\S+) (\S+)>",
        out,
    )
    assert sorted(int(row[0]) for row in rows) == [0, 1, 2, 3], out + err
    inode = {os.stat(f"/run/netns/{name}").st_ino: name for name in two_hosts}
    placed = {int(rank): inode.get(int(netns)) for rank, _, _, _, netns, *_ in rows}
    assert placed == {0: a, 1: a, 2: b, 3: b}  # the hostfile's order, two slots each
    # Each host: its usable cores / its 2 ranks (left to the first collective where this
    # process is bound to some cores only).
    share = str(threads_per_rank(2)) if _whole_node() else "None"
    dense = 1.0 + 2.0 + 3.0 + 4.0
    for rank, size, local, local_size, _, threads, first, _ in rows:
        assert (size, local_size, threads) == ("4", "2", share)
        assert int(local) == int(rank) % 2
        assert float(first) == dense
    # Every rank got the same TopK sum, and 1 MiB per rank crossed the link each way.
    assert len({row[7] for row in rows}) == 1
    assert min(received) > 1 << 20, received
