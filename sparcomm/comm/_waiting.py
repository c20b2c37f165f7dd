"""Waiting for MPI requests without taking the core from ranks that work.

MPICH's ``Wait``/``Waitall`` poll its progress engine without sleeping; with
``MPIR_CVAR_ENABLE_HEAVY_YIELD=1`` they call ``sched_yield`` between polls, which on
Linux's scheduler still gives the waiting rank the core again within a tick.  Where
ranks share cores (more ranks than cores: the emulated cluster, the test harness, a
laptop) a waiting rank then takes CPU from the ranks it waits for, and from the
kernel's TCP work that would complete its own messages.  :func:`wait` and
:func:`waitall` poll with ``Test`` and sleep in between instead.  With a core per
rank (``MPIR_CVAR_ENABLE_HEAVY_YIELD`` unset), they wait inside MPI, which answers
sooner.
"""

from __future__ import annotations

import os
import time
from typing import Any

from mpi4py import MPI

#: Seconds a waiting rank sleeps between polls (doubling up to ``PAUSE_GROWTH`` times
#: this), or ``None``: wait inside MPI, which polls without sleeping.  Measured where
#: ranks share cores (docs/benchmarks.md, issue 11): 50 us brought the float16 pipeline
#: from 1.19-1.39x DDP's fp16 hook to 1.13-1.25x at the same segments.
DEFAULT_PAUSE_S: float | None = (
    50e-6 if os.environ.get("MPIR_CVAR_ENABLE_HEAVY_YIELD", "0") not in ("", "0") else None
)
PAUSE_GROWTH = 4


def wait(request: Any, pause: float | None = DEFAULT_PAUSE_S, status: Any = None) -> None:
    """``request.Wait(status)``, or poll it with sleeps in between (``pause`` seconds,
    growing to ``PAUSE_GROWTH * pause``) so that a rank that waits leaves the core to
    ranks that work."""
    if pause is None:
        request.Wait(status)
        return
    delay = pause
    while not request.Test(status):
        time.sleep(delay)
        delay = min(2 * delay, PAUSE_GROWTH * pause)


def waitall(
    requests: list[Any], pause: float | None = DEFAULT_PAUSE_S, statuses: list[Any] | None = None
) -> None:
    """:func:`wait` for every request (``MPI.Request.Waitall`` when ``pause`` is None);
    ``statuses``, when given, receives each request's status."""
    if pause is None:
        if statuses is None:
            MPI.Request.Waitall(requests)
        else:
            MPI.Request.Waitall(requests, statuses)
        return
    for number, request in enumerate(requests):
        wait(request, pause, None if statuses is None else statuses[number])
