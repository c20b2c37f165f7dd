"""An emulated cluster on one machine: one network namespace per rank, shaped links.

Layout (Linux, root only)::

    namespace <name>r0 --- sc0 (veth) ==tbf==> p0 --+
    namespace <name>r1 --- sc0 (veth) ==tbf==> p1 --+-- br0 (bridge, namespace <name>br)
    ...                                             |

Each rank's namespace holds one end of a veth pair (``sc0``, a private address
``10.231.x.y/16`` that exists only inside the namespaces created here); the other end
joins a bridge in a namespace of its own, which plays the switch.  ``tc tbf`` shapes
each link in both directions: on ``sc0`` (rank to switch) and on its peer ``p<i>``
(switch to rank), so every rank has a full-duplex link of the given rate, as on a
cluster with one NIC per node behind a non-blocking switch.

MPI ranks are started by ``mpiexec`` through :func:`wrap`: a small wrapper reads
``PMI_RANK`` and execs ``ip netns exec <namespace of that rank> <command>`` (PMI
crosses namespaces through the descriptor ``mpiexec`` passes down).  :meth:`
EmulatedCluster.env` binds MPICH (libfabric's tcp provider, no shared memory) and gloo
to ``sc0``.

A delay needs ``sch_netem``; where the kernel lacks it (checked by adding one on a
scratch loopback) asking for a delay is an error that says so.

Clean-up: :class:`EmulatedCluster` is a context manager; on exit, on Ctrl-C, on
SIGTERM/SIGHUP and at interpreter exit it kills the processes left in its namespaces
(by pid, from ``ip netns pids``) and deletes the namespaces, which deletes their links.
Namespaces of a process that died without cleaning up (SIGKILL) are found by their
name, which carries the owner's pid, and removed by the next cluster.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = [
    "EmulatedCluster",
    "Link",
    "check_requirements",
    "netem_available",
    "parse_link",
    "remove_stale",
]

#: Prefix of every namespace this module creates: ``scm<owner pid>x<serial>r<rank>|br``.
PREFIX = "scm"
#: The rank's interface name inside its namespace (the same in every namespace).
IFACE = "sc0"
#: Port of torch.distributed's rendezvous on rank 0: each cluster's namespaces are fresh,
#: so no other program can hold it.
MASTER_PORT = 29500

_NAME = re.compile(rf"^{PREFIX}(\d+)x(\d+)(?:r\d+|br)$")
_SERIAL = itertools.count()
_LIVE: set[EmulatedCluster] = set()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Link:
    """A link's shape: rate in bit/s (None: unshaped) and one-way delay in seconds."""

    rate_bps: float | None
    delay_s: float = 0.0

    def __str__(self) -> str:
        rate = "unshaped" if self.rate_bps is None else format_rate(self.rate_bps)
        return rate + (f", {self.delay_s * 1e3:g} ms delay" if self.delay_s else "")


_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:bit|b|bps|bit/s)?\s*$", re.IGNORECASE)
_DELAY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$", re.IGNORECASE)


def format_rate(bps: float) -> str:
    """``1.0e9`` -> ``"1 Gbit/s"``."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def parse_link(text: str) -> Link:
    """Parse ``RATE[,DELAY]``: ``"1gbit"``, ``"100mbit,2ms"``, ``"unshaped"``.

    Rates take k/m/g/t prefixes (powers of ten, bits per second as in ``tc``); delays
    ``us``, ``ms`` or ``s`` (default ms).
    """
    if not isinstance(text, str):
        raise TypeError(
            f"link must be a str like '1gbit' or '1gbit,1ms', got {type(text).__name__}"
        )
    rate_text, _, delay_text = text.partition(",")
    if rate_text.strip().lower() in ("unshaped", "none", "off"):
        rate = None
    else:
        match = _RATE.match(rate_text)
        if match is None:
            raise ValueError(
                f"link rate must look like '1gbit', '500mbit' or 'unshaped', got {rate_text!r}"
            )
        rate = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if rate < 1e5:
            raise ValueError(f"link rate must be at least 100kbit, got {rate_text!r}")
    delay = 0.0
    if delay_text.strip():
        match = _DELAY.match(delay_text)
        if match is None:
            raise ValueError(f"link delay must look like '1ms' or '200us', got {delay_text!r}")
        unit = (match.group(2) or "ms").lower()
        delay = float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    return Link(rate, delay)


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"emulated cluster: `{' '.join(command)}` failed (exit {result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def check_requirements(link: Link | None = None) -> None:
    """Raise PermissionError/FileNotFoundError/NotImplementedError naming what is missing.

    Needs root (network namespaces and qdiscs), ``ip`` and ``tc`` (iproute2), and
    ``sch_netem`` in the kernel when ``link`` asks for a delay.
    """
    if sys.platform != "linux":
        raise NotImplementedError(
            f"the emulated cluster needs Linux network namespaces; this is {sys.platform}"
        )
    if os.geteuid() != 0:
        raise PermissionError(
            "the emulated cluster (--emulate) needs root to create network namespaces and "
            f"shape links with tc; this process runs as uid {os.geteuid()}: run it as root "
            "(sudo), or leave --emulate out to use the network the ranks already have"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"the emulated cluster needs `{tool}` (iproute2) on PATH; install iproute2"
            )
    if link is not None and link.delay_s > 0 and not netem_available():
        raise NotImplementedError(
            f"a link delay ({link.delay_s * 1e3:g} ms) needs the sch_netem qdisc, which this "
            "kernel does not have (`tc qdisc add ... netem` answers 'unknown qdisc'); "
            "give the rate alone, e.g. --emulate 1gbit"
        )


_NETEM: bool | None = None


def netem_available() -> bool:
    """Whether ``tc`` can add a ``netem`` qdisc (tried in a scratch namespace)."""
    global _NETEM
    if _NETEM is None:
        name = f"{PREFIX}{os.getpid()}x{next(_SERIAL)}br"
        _run("ip", "netns", "add", name)
        try:
            _run("ip", "-n", name, "link", "set", "lo", "up")
            probe = _run(
                "tc",
                "-n",
                name,
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
                check=False,
            )
            _NETEM = probe.returncode == 0
        finally:
            _run("ip", "netns", "del", name, check=False)
    return _NETEM


def _namespaces() -> list[str]:
    listing = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(name: str) -> list[int]:
    out = _run("ip", "netns", "pids", name, check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def _kill_and_delete(names: Sequence[str], grace: float = 2.0) -> None:
    """Kill the processes inside ``names`` (TERM, then KILL after ``grace``); delete them."""
    pids = {pid for name in names for pid in _namespace_pids(name)}
    pids.discard(os.getpid())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if _pid_alive(pid)}
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in names:
        _run("ip", "netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces of clusters whose owner process has died; return their names."""
    stale = []
    for name in _namespaces():
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            stale.append(name)
    if stale:
        _kill_and_delete(stale)
    return stale


class EmulatedCluster:
    """``ranks`` network namespaces joined by shaped veth links through a bridge.

    Parameters
    ----------
    ranks : int
        Number of rank namespaces.
    link : Link or str
        Rate and delay of every rank's link (``"1gbit"``, ``Link(1e9)``, ``"unshaped"``).

    Examples
    --------
    ::

        with EmulatedCluster(4, "1gbit") as cluster:
            print(cluster.measure_rate())
            subprocess.run(["mpiexec", "-n", "4", *cluster.wrap(["python", "train.py"])],
                           env={**os.environ, **cluster.env()})
    """

    def __init__(self, ranks: int, link: Link | str = "unshaped") -> None:
        if isinstance(ranks, bool) or not isinstance(ranks, int):
            raise TypeError(f"ranks must be an int, got {type(ranks).__name__}")
        if not 1 <= ranks <= 4000:
            raise ValueError(f"ranks must be in [1, 4000], got {ranks}")
        self.ranks = ranks
        self.link = parse_link(link) if isinstance(link, str) else link
        if not isinstance(self.link, Link):
            raise TypeError(f"link must be a Link or a str, got {type(link).__name__}")
        base = f"{PREFIX}{os.getpid()}x{next(_SERIAL)}"
        self.bridge_namespace = base + "br"
        self.namespaces = [f"{base}r{rank}" for rank in range(ranks)]
        self.addresses = [f"10.231.{(rank + 1) // 256}.{(rank + 1) % 256}" for rank in range(ranks)]
        self._created: list[str] = []
        self._previous_handlers: dict[int, Any] = {}
        self.closed = False

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the namespaces, links, addresses and shaping (undone on any failure)."""
        check_requirements(self.link)
        remove_stale()
        with _LOCK:
            _LIVE.add(self)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        bridge = self.bridge_namespace
        self._add_namespace(bridge)
        _run("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", bridge, "link", "set", "br0", "up")
        for rank, name in enumerate(self.namespaces):
            self._add_namespace(name)
            peer = f"p{rank}"
            _run(
                "ip", "link", "add", IFACE, "netns", name, "type", "veth",
                "peer", "name", peer, "netns", bridge,
            )  # fmt: skip
            _run("ip", "-n", bridge, "link", "set", peer, "master", "br0")
            _run("ip", "-n", bridge, "link", "set", peer, "up")
            _run("ip", "-n", name, "addr", "add", f"{self.addresses[rank]}/16", "dev", IFACE)
            _run("ip", "-n", name, "link", "set", IFACE, "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
            self._shape(name, IFACE)
            self._shape(bridge, peer)

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)

    def _shape(self, namespace: str, device: str) -> None:
        rate, delay = self.link.rate_bps, self.link.delay_s
        if rate is None and not delay:
            return
        handle = ["root"]
        if delay:
            _run(
                "tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "handle", "1:",
                "netem", "delay", f"{delay * 1e6:.0f}us",
            )  # fmt: skip
            handle = ["parent", "1:1"]
        if rate is not None:
            # The bucket must hold at least one timer tick of traffic and a GSO packet
            # (veth hands tbf up to 64 KiB at once); the queue 20 ms of traffic, so TCP
            # sees a switch-like buffer rather than drops on every burst.
            burst = max(128 * 1024, int(rate / 8 * 0.002))
            limit = max(4 * burst, int(rate / 8 * 0.020))
            _run(
                "tc", "-n", namespace, "qdisc", "add", "dev", device, *handle, "tbf",
                "rate", f"{int(rate)}bit", "burst", str(burst), "limit", str(limit),
            )  # fmt: skip

    def close(self) -> None:
        """Kill every process left in the namespaces and delete them (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            _kill_and_delete(list(reversed(self._created)))
        finally:
            self._created = []
            with _LOCK:
                _LIVE.discard(self)
            self._restore_signal_handlers()

    # -- signals: turn SIGTERM/SIGHUP into an exception so `with` blocks unwind -----------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(signum)
            if previous is _raise_exit:
                continue
            self._previous_handlers[signum] = previous
            signal.signal(signum, _raise_exit)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous_handlers.items():
            if not _LIVE:
                signal.signal(signum, previous)
        self._previous_handlers = {}

    # -- using it ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for a job in the cluster: MPICH over TCP on ``sc0``, gloo on ``sc0``."""
        return {
            "SPARCOMM_EMULATE_NAMESPACES": ",".join(self.namespaces),
            "SPARCOMM_EMULATE_LINK": str(self.link),
            "SPARCOMM_IFACE": IFACE,
            # MPICH: no shared memory between ranks, libfabric's tcp provider on sc0.
            "MPIR_CVAR_NOLOCAL": "1",
            "MPIR_CVAR_CH4_NETMOD": "ofi",
            "FI_PROVIDER": "tcp",
            "FI_TCP_IFACE": IFACE,
            # More ranks than cores: MPICH's progress loop yields instead of spinning.
            "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
            "GLOO_SOCKET_IFNAME": IFACE,
            "MASTER_ADDR": self.addresses[0],
            "MASTER_PORT": str(MASTER_PORT),
        }

    @staticmethod
    def wrap(command: Sequence[str]) -> list[str]:
        """``command`` as ``mpiexec`` should start it: in the namespace of ``PMI_RANK``."""
        return [sys.executable, "-m", "sparcomm._emulate", "exec", "--", *command]

    def pids(self) -> list[int]:
        """Processes running inside the cluster's namespaces."""
        return sorted({pid for name in self._created for pid in _namespace_pids(name)})

    def measure_rate(self, seconds: float = 1.0, src: int = 0, dst: int | None = None) -> float:
        """Goodput of one TCP stream from rank ``src`` to ``dst`` in bit/s, as received.

        Timed at the receiver from the first byte to the last, so the token bucket's
        initial burst weighs ``burst / (rate * seconds)`` (0.1 % at 1 Gbit/s, 1 s).
        """
        if self.ranks < 2:
            raise ValueError("measuring a link needs at least 2 ranks")
        dst = (src + 1) % self.ranks if dst is None else dst
        port = 29400
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.namespaces[dst],
                sys.executable,
                "-c",
                _SINK,
                self.addresses[dst],
                str(port),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = server.stdout.readline() if server.stdout else ""
            if ready.strip() != "ready":
                error = server.stderr.read() if server.stderr else ""
                raise RuntimeError(f"rate probe failed to listen: {error}")
            _run(
                "ip", "netns", "exec", self.namespaces[src], sys.executable, "-c", _SOURCE,
                self.addresses[dst], str(port), str(seconds),
            )  # fmt: skip
            out, err = server.communicate(timeout=30 + seconds)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        if server.returncode != 0:
            raise RuntimeError(f"rate probe failed: {err.strip()}")
        received, elapsed = (float(v) for v in out.split())
        return 8.0 * received / elapsed


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@atexit.register
def _close_all() -> None:
    for cluster in list(_LIVE):
        cluster.close()


_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = c.recv_into(buf); start = time.perf_counter()
total = 0
while True:
    got = c.recv_into(buf)
    if not got:
        break
    total += got
print(total, time.perf_counter() - start)
"""

_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
data = bytes(1 << 20); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    c.sendall(data)
c.close()
"""


def _exec_in_namespace(command: list[str]) -> None:
    """The ``mpiexec`` side of :meth:`EmulatedCluster.wrap`: exec into our rank's namespace."""
    names = os.environ.get("SPARCOMM_EMULATE_NAMESPACES", "").split(",")
    rank_text = os.environ.get("PMI_RANK")
    if rank_text is None or not names[0]:
        sys.exit(
            "sparcomm._emulate exec: run it under mpiexec inside an EmulatedCluster "
            "(PMI_RANK and SPARCOMM_EMULATE_NAMESPACES must be set)"
        )
    rank = int(rank_text)
    if rank >= len(names):
        sys.exit(f"sparcomm._emulate exec: rank {rank} but only {len(names)} namespaces")
    ip = shutil.which("ip") or "ip"
    os.execv(ip, [ip, "netns", "exec", names[rank], *command])


def main(argv: list[str]) -> None:
    """``python -m sparcomm._emulate exec -- command...`` (used by :meth:`EmulatedCluster.wrap`)."""
    if len(argv) >= 2 and argv[0] == "exec":
        command = argv[2:] if argv[1] == "--" else argv[1:]
        _exec_in_namespace(command)
    sys.exit("usage: python -m sparcomm._emulate exec -- command [args]")


if __name__ == "__main__":
    main(sys.argv[1:])
