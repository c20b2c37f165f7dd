"""The quantized section of ``sparcomm bench allreduce`` (``--codecs``).

The codecs are the presets of the quantized family in the codec registry
(``sparcomm.codecs.CODECS.presets(family="quantized")``), chosen by label; those tagged
``"allreduce"`` are the default.  For every vector length n and codec, each of ``P``
ranks holds n standard-normal values; measured in the same run, on the same data,
interleaved within each repeat so drifting load hits all alike:

* every algorithm of the quantized family that can run the codec, and ``auto``;
* MPI's own ``Allreduce`` of the dense buffers (the peer every figure is a ratio to).

A figure is the median over repeats of the slowest rank's time per call, timed as the
sparse section times it (:func:`time_rounds`).  Bytes are what the
collectives count (``AllreduceStats.bytes_sent``, mean over ranks); the dense reference
is a bandwidth-optimal allreduce, ``2 n itemsize (P - 1) / P`` per rank (what MPICH's
reduce-scatter + allgather moves for large buffers).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sparcomm.codecs import CODECS as _REGISTRY

#: ``--codecs`` names and the codec each builds (fresh per benchmark point): the
#: quantized family's presets in the codec registry.
CODECS: dict[str, Callable[[], Any]] = {
    p.label: p.make for p in _REGISTRY.presets(family="quantized")
}
#: The default of ``--codecs``: the presets tagged ``"allreduce"``.
DEFAULT_CODECS = tuple(p.label for p in _REGISTRY.presets("allreduce", family="quantized"))


#: A timed repeat runs back-to-back calls for about this long (as the OSU micro-benchmarks
#: loop): one slow scheduling event then shifts a figure by a fraction, not a multiple.
MIN_REPEAT_SECONDS = 0.03
#: Repeats are added to a cell (beyond ``--repeats``) until its timed rounds add up to
#: ``--cell-seconds``, but never past this many.
MAX_REPEATS = 25


def timed(comm, function: Callable[[], Any], iterations: int = 1) -> float:
    """Seconds per call of ``iterations`` back-to-back calls, on the slowest rank (after
    a barrier); the same figure on every rank."""
    from mpi4py import MPI

    comm.Barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / iterations


def iterations_for(seconds: float) -> int:
    """Calls per timed repeat so that a repeat lasts about :data:`MIN_REPEAT_SECONDS`."""
    return max(1, min(50, math.ceil(MIN_REPEAT_SECONDS / max(seconds, 1e-6))))


def time_rounds(
    comm, functions: dict[str, Callable[[], Any]], repeats: int, cell_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Time every contender of one cell, interleaved: each round times every function
    once (``iterations_for`` back-to-back calls, sized from one warm call), so that
    drifting load hits all alike, starting one contender further along each round (so
    that none always follows the same one); returns every round's seconds per call, by
    name.

    At least ``repeats`` rounds, and more (up to :data:`MAX_REPEATS`) until the rounds'
    timed calls add up to ``cell_seconds``: a cell of cheap calls (a few ms, where one
    descheduled call moves a 30 ms repeat by tens of per cent) gets the samples a cell
    of 100 ms calls gets from five rounds.  Every decision is taken on the slowest
    rank's figures, which every rank has, so the ranks stay in step.
    """
    iterations = {name: iterations_for(timed(comm, f)) for name, f in functions.items()}
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    spent = 0.0
    while True:
        # Round r starts at the r-th contender: each takes every place in the order
        # equally often.  In one fixed order, a contender timed right after a heavy one
        # paid for it: in the allreduce grid's TopK cell at 2^24, density 0.1,
        # ``split_allgather`` (after ``recursive_doubling``) was timed 1.16-1.20x slower
        # than ``dsar``, which sends the same messages there; they tie when the order
        # alternates (docs/benchmarks.md, issue 11, session 14).
        first = len(times[names[0]]) % len(names)
        for name in names[first:] + names[:first]:
            function = functions[name]
            seconds = timed(comm, function, iterations[name])
            times[name].append(seconds)
            spent += seconds * iterations[name]
        rounds = len(times[next(iter(times))])
        if rounds >= repeats and (spent >= cell_seconds or rounds >= MAX_REPEATS):
            return times


def settle_auto(function: Callable[[], Any], stats: Any, limit: int = 64) -> int:
    """Call ``auto`` until its tuner (:mod:`sparcomm.comm._tune`) has measured its
    choice, as a training loop's first steps do; returns the calls made (the same on
    every rank: the tuner decides on agreed figures)."""
    calls = 0
    while calls < limit:
        function()
        calls += 1
        if stats.tuning == "measured" or (stats.tuning == "model" and calls >= 2):
            break  # measured, or nothing to measure (one candidate, tuning off)
    return calls


def bench_codec(
    comm, n: int, name: str, dtype: np.dtype, repeats: int, seed: int, cell_seconds: float = 0.0
) -> dict:
    """Measure one (n, codec) point on every rank; returns the row (on every rank)."""
    from sparcomm.comm import AllreduceStats, allreduce
    from sparcomm.comm._cost import candidates
    from sparcomm.comm._quantized import plain_half

    rank, size = comm.Get_rank(), comm.Get_size()
    codec = CODECS[name]()
    x = np.random.default_rng([seed, rank, n]).standard_normal(n).astype(dtype)
    reduced = np.empty_like(x)
    algorithms = list(candidates(codec, size))
    if plain_half(codec, None):
        algorithms.append("pipelined")  # FP16's own schedule, one of auto's candidates
    stats = {a: AllreduceStats() for a in (*algorithms, "auto")}
    steps = {a: 0 for a in stats}

    def call(algorithm: str):
        def run():
            steps[algorithm] += 1
            allreduce(
                x,
                codec=codec,
                comm=comm,
                algorithm=algorithm,
                key=f"bench.{algorithm}",
                step=steps[algorithm],
                stats=stats[algorithm],
                out=reduced,
            )

        return run

    functions = {a: call(a) for a in stats}
    functions["mpi_allreduce"] = lambda: comm.Allreduce(x, reduced)
    for function in functions.values():
        function()  # warm-up: compilation, buffers, calibration for auto
    # auto's exploration (its first calls of a shape), counted and left out of the timing
    tuning_calls = settle_auto(functions["auto"], stats["auto"])
    times = time_rounds(comm, functions, repeats, cell_seconds)
    median = {a: statistics.median(t) for a, t in times.items()}
    dense_bytes = 2 * n * dtype.itemsize * (size - 1) / size
    rows: dict[str, Any] = {}
    for a in stats:
        sent = comm.allreduce(stats[a].bytes_sent) / size
        rows[a] = {
            "median_s": median[a],
            "rounds_s": times[a],  # paired across contenders by round
            "speedup_vs_mpi": median["mpi_allreduce"] / median[a],
            "bytes_sent_per_rank": sent,
            "predicted_bytes_sent": stats[a].predicted_bytes[0],
            "fewer_bytes_than_dense": dense_bytes / sent if sent else None,
            "phases_s_rank0": dict(stats[a].phases),
        }
    best = min(algorithms, key=lambda a: median[a])
    return {
        "n": n,
        "codec": name,
        "codec_repr": repr(codec),
        "repeats": len(times["auto"]),
        "mpi_allreduce_s": median["mpi_allreduce"],
        "dense_bytes_per_rank": dense_bytes,
        "algorithms": {a: rows[a] for a in algorithms},
        "auto": {
            **rows["auto"],
            "choice": stats["auto"].algorithm,
            "predicted_s": stats["auto"].predicted,
            "tuning": stats["auto"].tuning,
            "tuning_calls": tuning_calls,
            "measured_s": stats["auto"].measured,
        },
        "fastest": best,
        "fewest_bytes": min(algorithms, key=lambda a: rows[a]["bytes_sent_per_rank"]),
    }


def bench_quantized(
    comm,
    sizes,
    names,
    dtype: np.dtype,
    repeats: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
    cell_seconds: float = 0.0,
) -> list[dict]:
    """Every (n, codec) point, on every rank of ``comm``."""
    rows = []
    for log2n in sizes:
        for name in names:
            if progress is not None:
                progress(f"n=2^{log2n} {name}")
            rows.append(bench_codec(comm, 1 << log2n, name, dtype, repeats, seed, cell_seconds))
    return rows


def format_quantized(rows: list[dict], ranks: int) -> str:
    """The terminal table of the quantized section."""
    short = {
        "allgather": "allgather",
        "reduce_scatter_allgather": "rs+ag",
        "shared_scale": "shared",
        "pipelined": "pipelined",
    }
    head = [
        "n",
        "codec",
        "MPI ms",
        "allgather",
        "rs+ag",
        "shared",
        "pipelined",
        "auto",
        "choice",
        "MPI/best",
        "bytes dense/best",
    ]
    table = [head]
    for row in rows:
        algorithms = row["algorithms"]
        best = row["fastest"]
        cells = [f"2^{int(np.log2(row['n']))}", row["codec"], f"{1e3 * row['mpi_allreduce_s']:.2f}"]
        for a in short:
            cells.append(f"{1e3 * algorithms[a]['median_s']:.2f}" if a in algorithms else "-")
        cells += [
            f"{1e3 * row['auto']['median_s']:.2f}",
            short.get(row["auto"]["choice"], row["auto"]["choice"]),
            f"{algorithms[best]['speedup_vs_mpi']:.2f}x",
            f"{algorithms[row['fewest_bytes']]['fewer_bytes_than_dense']:.1f}x",
        ]
        table.append(cells)
    widths = [max(len(r[c]) for r in table) for c in range(len(head))]
    body = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table)
    return (
        f"quantized codecs, {ranks} ranks, times in ms (median, slowest rank); bytes: "
        f"dense ring allreduce / fewest-bytes algorithm, per rank\n{body}"
    )
