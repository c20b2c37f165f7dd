"""``sparcomm bench allreduce -np 4``: the sparse allreduce family against MPI's Allreduce.

For every vector length n and density d, measured in the same run, on the same data:

* ``--input dense`` (the default, the path users call): each of ``P`` ranks holds a dense
  n-element float32 (or float64) vector of normal values, and every figure is the whole
  user call ``allreduce(x, codec=TopK(density=d), algorithm=name, out=out)``: encode
  (top-k selection), agreement, exchange, merge and the dense n-element output.  The
  kept positions are uniformly random and independent across ranks (the fill the cost
  model assumes, and the least favourable to sparse algorithms);
* ``--input sparse``: each rank holds ``k = ceil(d n)`` entries at such positions and
  calls ``sparse_allreduce(..., algorithm=name, dense_output=None)`` (the sum in the form
  the algorithm ends in, no encode), ``auto`` also with ``dense_output=True``;
* ``auto`` (the cost model's choice) beside every algorithm;
* MPI's own ``Allreduce`` of the dense n-element buffers.

A figure is the median over repeats of the slowest rank's time per call; a repeat
starts after a barrier and times enough back-to-back calls to last about 30 ms (as the
OSU micro-benchmarks loop), and algorithms are interleaved within a repeat so drifting
load hits all of them alike.  A cell gets at least ``--repeats`` repeats, and more (up
to 25) until its timed calls add up to ``--cell-seconds``: cells of cheap calls get as
many samples' worth of time as cells of slow ones.  Reported: times, MPI time / time
(speedup), auto / fastest, bytes sent per rank (mean over ranks), and auto's choice.

When started outside ``mpiexec`` with ``-np`` > 1, the command relaunches itself under
the installed ``mpiexec`` (see :func:`sparcomm._launch.find_mpiexec`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from typing import Any

import numpy as np

from sparcomm._cli_bench_quantized import CODECS, DEFAULT_CODECS, settle_auto, time_rounds
from sparcomm.cli import arguments, command

DEFAULT_SIZES = (16, 20, 24)
DEFAULT_DENSITIES = (1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
_CHILD_ENV = "SPARCOMM_BENCH_ALLREDUCE_CHILD"
_YIELD_ENV = "MPIR_CVAR_ENABLE_HEAVY_YIELD"  # MPICH: yield the core while waiting
# Environment variables set by MPI launchers (MPICH/Hydra, Open MPI, PMIx, Slurm).
_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_PROCID")


def _under_launcher() -> bool:
    return os.environ.get(_CHILD_ENV) == "1" or any(name in os.environ for name in _LAUNCHER_ENV)


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["bench", "allreduce", "-np", str(args.np)]
    argv += ["--sizes", *map(str, args.sizes), "--densities", *map(str, args.densities)]
    argv += ["--repeats", str(args.repeats), "--cell-seconds", str(args.cell_seconds)]
    argv += ["--dtype", args.dtype, "--seed", str(args.seed)]
    argv += ["--input", args.input]
    if args.algorithms:
        argv += ["--algorithms", *args.algorithms]
    argv += ["--codecs", *args.codecs]  # issue 4: quantized section
    if args.json:
        argv.append("--json")
    if args.output:
        argv += ["--output", os.path.abspath(args.output)]
    if args.plot:
        argv += ["--plot", os.path.abspath(args.plot)]
    if not args.progress:
        argv.append("--no-progress")
    argv += ["--yield", args.yield_cpu]
    return argv


def _relaunch(args: argparse.Namespace) -> int:
    from sparcomm._launch import find_mpiexec

    env = dict(os.environ)
    env[_CHILD_ENV] = "1"
    # One process per core already: keep Numba from starting a thread pool per rank.
    env.setdefault("NUMBA_NUM_THREADS", "1")
    oversubscribed = args.np > (os.cpu_count() or 1)
    if args.yield_cpu == "on" or (args.yield_cpu == "auto" and oversubscribed):
        # More ranks than cores: MPICH's busy polling would hand a waiting rank's time
        # slice to nobody.  Yielding lets the rank that has work run; it applies to every
        # measured collective alike, MPI's Allreduce included.
        env.setdefault(_YIELD_ENV, "1")
    # Not ``python -m sparcomm.cli``: that would run the CLI module as ``__main__``, a
    # second copy beside the ``sparcomm.cli`` that the subcommands register with.
    entry = "import sys; from sparcomm.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [find_mpiexec(), "-n", str(args.np), sys.executable, "-c", entry]
    return subprocess.call(command + _child_argv(args), env=env)


def _inputs(n: int, k: int, dtype: np.dtype, seed: int, rank: int):
    rng = np.random.default_rng([seed, rank, n, k])
    indices = np.sort(rng.choice(n, k, replace=False)).astype(np.int32 if n < 2**31 else np.int64)
    values = rng.standard_normal(k).astype(dtype)
    dense = np.zeros(n, dtype)
    dense[indices] = values
    return indices, values, dense


def bench_point(
    comm,
    n: int,
    density: float,
    dtype: np.dtype,
    algorithms,
    repeats,
    seed,
    source="dense",
    cell_seconds: float = 0.0,
):
    """Measure one (n, density) point on every rank; returns the row (on every rank).

    ``source="dense"``: the user call, dense vector in, TopK encode, dense sum out;
    ``"sparse"``: ``sparse_allreduce`` of ready (indices, values) streams.
    """
    from sparcomm.codecs import TopK
    from sparcomm.comm import AllreduceStats, allreduce, sparse_allreduce

    rank, size = comm.Get_rank(), comm.Get_size()
    k = min(n, math.ceil(density * n))
    indices, values, dense = _inputs(n, k, dtype, seed, rank)
    if source == "dense":  # every entry non-zero: the encode selects k of them
        dense = np.random.default_rng([seed, rank, n]).standard_normal(n).astype(dtype)
    reduced = np.empty_like(dense)
    # Dense results go to a reused buffer, as a training loop reuses its gradient buffer
    # (and as MPI's Allreduce below writes into `reduced`): no page faults in either.
    out = np.zeros_like(dense)
    names = (*algorithms, "auto") if source == "dense" else (*algorithms, "auto", "auto_dense")
    stats = {name: AllreduceStats() for name in names}
    codec = TopK(density=density)

    def call(name: str):
        algorithm = "auto" if name.startswith("auto") else name
        if source == "dense":
            return lambda: allreduce(
                dense, codec=codec, comm=comm, algorithm=algorithm, out=out, stats=stats[name]
            )
        output = True if name == "auto_dense" else None
        return lambda: sparse_allreduce(
            indices,
            values,
            n,
            comm,
            algorithm=algorithm,
            dense_output=output,
            out=out,
            stats=stats[name],
        )

    functions = {name: call(name) for name in stats}
    functions["mpi_allreduce"] = lambda: comm.Allreduce(dense, reduced)
    for function in functions.values():
        function()  # warm-up: compilation, first touch of buffers, calibration
    # auto's exploration (its first calls of a shape), counted and left out of the timing
    tuning_calls = {
        name: settle_auto(functions[name], stats[name]) for name in stats if name.startswith("auto")
    }
    times = time_rounds(comm, functions, repeats, cell_seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    sent = {name: comm.allreduce(stats[name].bytes_sent) / size for name in stats}
    if source == "dense":  # the user call's output is always dense
        median["auto_dense"] = median["auto"]
    row: dict[str, Any] = {
        "n": n,
        "density": density,
        "k": k,
        "input": source,
        "repeats": len(times["auto"]),
        "mpi_allreduce_s": median["mpi_allreduce"],
        "algorithms": {
            name: {
                "median_s": median[name],
                # every round's seconds per call (slowest rank), in round order: the
                # rounds interleave the contenders, so they pair (bench/auto_vs_best.py)
                "rounds_s": times[name],
                "speedup_vs_mpi": median["mpi_allreduce"] / median[name],
                "bytes_sent_per_rank": sent[name],
                "predicted_s": stats["auto"].predicted.get(name),
                # this rank's split of its last call (encode, check, exchange, ...)
                "phases_s": stats[name].by_category(),
            }
            for name in algorithms
        },
        "auto": {
            "choice": stats["auto"].algorithm,
            "median_s": median["auto"],
            "rounds_s": times["auto"],
            "dense_output_median_s": median["auto_dense"],
            "bytes_sent_per_rank": sent["auto"],
            "fill": stats["auto"].fill,
            "phases_s": stats["auto"].by_category(),
            "tuning": stats["auto"].tuning,
            "tuning_calls": tuning_calls["auto"],
            "measured_s": stats["auto"].measured,
        },
    }
    fastest = min(algorithms, key=lambda name: median[name])
    row["fastest"] = fastest
    row["auto"]["speedup_vs_mpi"] = median["mpi_allreduce"] / median["auto"]
    row["auto"]["dense_output_speedup_vs_mpi"] = median["mpi_allreduce"] / median["auto_dense"]
    row["auto"]["over_fastest"] = median["auto"] / median[fastest]
    # The same choice judged on the chosen algorithm's own figure (auto's run is a second
    # sample of the same work): separates the quality of the choice from timing noise.
    choice = stats["auto"].algorithm
    if choice in median:
        row["auto"]["choice_over_fastest"] = median[choice] / median[fastest]
    return row


def format_table(result: dict[str, Any]) -> str:
    """The terminal tables: times (ms) with ratios, then bytes sent per rank."""
    algorithms = result["algorithms"]
    short = {
        "allgather": "allgather",
        "recursive_doubling": "rec.doubl",
        "split_allgather": "split",
        "dsar": "dsar",
        "dense": "dense",
    }
    head = ["n", "density", "MPI ms"] + [short.get(a, a) for a in algorithms]
    head += ["auto", "choice", "MPI/auto", "auto/best", "choice/best", "auto+dense"]
    lines = [head]
    for row in result["rows"]:
        line = [f"2^{int(math.log2(row['n']))}", f"{row['density']:g}"]
        line.append(f"{1e3 * row['mpi_allreduce_s']:.3f}")
        line += [f"{1e3 * row['algorithms'][a]['median_s']:.3f}" for a in algorithms]
        auto = row["auto"]
        line += [
            f"{1e3 * auto['median_s']:.3f}",
            short.get(auto["choice"], auto["choice"]),
            f"{auto['speedup_vs_mpi']:.1f}x",
            f"{auto['over_fastest']:.2f}",
            f"{auto.get('choice_over_fastest', float('nan')):.2f}",
            f"{1e3 * auto['dense_output_median_s']:.3f}",
        ]
        lines.append(line)
    bytes_head = ["n", "density"] + [short.get(a, a) for a in algorithms] + ["MPI (ring)"]
    bytes_lines = [bytes_head]
    for row in result["rows"]:
        line = [f"2^{int(math.log2(row['n']))}", f"{row['density']:g}"]
        line += [f"{row['algorithms'][a]['bytes_sent_per_rank'] / 2**20:.3f}" for a in algorithms]
        ring = 2 * row["n"] * result["itemsize"] * (result["ranks"] - 1) / result["ranks"]
        line.append(f"{ring / 2**20:.3f}")
        bytes_lines.append(line)

    def render(table: list[list[str]]) -> str:
        widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
        return "\n".join(
            "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in table
        )

    what = (
        "allreduce(x, codec=TopK(density)): dense in, encode, dense out"
        if result.get("input", "sparse") == "dense"
        else "sparse_allreduce of ready streams (no encode)"
    )
    machine = result.get("machine", {})
    counts = sorted({row.get("repeats", result["repeats"]) for row in result["rows"]}) or [
        result["repeats"]
    ]
    repeats = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    load = ""
    if "loadavg_start" in machine:
        load = (
            f"; load {machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f} "
            f"(1-min avg) on {machine.get('cpus', '?')} cores"
        )
    return (
        f"{result['ranks']} ranks, {result['dtype']}, {what}, median of {repeats} repeats "
        f"(slowest rank per repeat), times in ms{load}\n{render(lines)}\n\n"
        f"MiB sent per rank (mean over ranks)\n{render(bytes_lines)}"
    )


def plot(result: dict[str, Any], path: str) -> None:
    """Time vs density, one line per algorithm, one panel per n (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError(
            "--plot needs matplotlib; install the [plot] extra: pip install 'sparcomm[plot]'"
        ) from error
    sizes = sorted({row["n"] for row in result["rows"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        rows = [row for row in result["rows"] if row["n"] == n]
        densities = [row["density"] for row in rows]
        for name in result["algorithms"]:
            ax.plot(
                densities,
                [1e3 * r["algorithms"][name]["median_s"] for r in rows],
                marker="o",
                label=name,
            )
        ax.plot(
            densities, [1e3 * r["auto"]["median_s"] for r in rows], "k--", marker="x", label="auto"
        )
        ax.plot(
            densities,
            [1e3 * r["mpi_allreduce_s"] for r in rows],
            "r:",
            linewidth=2,
            label="MPI Allreduce",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density k/n per rank")
        ax.set_ylabel("time (ms, median, slowest rank)")
        ax.set_title(f"n = 2^{int(math.log2(n))}, P = {result['ranks']}, {result['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_allreduce(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the grid on every rank of ``MPI.COMM_WORLD``; the result on rank 0."""
    from mpi4py import MPI

    from sparcomm.comm import ALL_ALGORITHMS, calibrate

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    algorithms = list(args.algorithms or ALL_ALGORITHMS)
    dtype = np.dtype(args.dtype)
    load_start = os.getloadavg()
    model = calibrate(comm)
    points = [(1 << s, d) for s in args.sizes for d in args.densities]
    bar = None
    if rank == 0 and args.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(points), desc="bench allreduce", file=sys.stderr)
    rows = []
    for n, density in points:
        if bar is not None:
            bar.set_postfix_str(f"n=2^{int(math.log2(n))} d={density:g}")
        rows.append(
            bench_point(
                comm,
                n,
                density,
                dtype,
                algorithms,
                args.repeats,
                args.seed,
                args.input,
                args.cell_seconds,
            )
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    # Quantized codecs: sparcomm._cli_bench_quantized
    from sparcomm._cli_bench_quantized import bench_quantized

    quantized = bench_quantized(
        comm, args.sizes, args.codecs, dtype, args.repeats, args.seed, None, args.cell_seconds
    )
    if rank != 0:
        return None
    return {
        "command": "sparcomm bench allreduce " + " ".join(_child_argv(args)[2:]),
        "ranks": comm.Get_size(),
        "input": args.input,
        "dtype": dtype.name,
        "itemsize": dtype.itemsize,
        "repeats": args.repeats,
        "cell_seconds": args.cell_seconds,
        "algorithms": algorithms,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "env": {
                name: os.environ[name]
                for name in (_YIELD_ENV, "NUMBA_NUM_THREADS")
                if name in os.environ
            },
        },
        "cost_model": {
            "alpha": model.alpha,
            "beta": model.beta,
            "beta_allreduce": model.beta_allreduce,
            "merge": model.merge,
            "dense": model.dense,
            "alpha_pair": model.pair_latency,
            "beta_pair": model.pair_byte_time,
            "calibration_seconds": model.calibration_seconds,
        },
        "rows": rows,
        "codecs": list(args.codecs),
        "quantized": quantized,
    }


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-np",
        "--np",
        type=int,
        default=4,
        metavar="P",
        help="ranks to launch under mpiexec when not already under MPI",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="LOG2N",
        help="log2 of the vector lengths (default 16 20 24)",
    )
    parser.add_argument(
        "--densities",
        type=float,
        nargs="*",
        default=list(DEFAULT_DENSITIES),
        metavar="D",
        help="non-zeros per rank / n, in (0, 1]",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per figure (at least)"
    )
    parser.add_argument(
        "--cell-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="add repeats to a cell (up to 25) until its timed calls add up to S seconds, "
        "so that cells of cheap calls are sampled as well as slow ones (0: --repeats only)",
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        metavar="NAME",
        help="subset of allgather recursive_doubling split_allgather dsar dense",
    )
    parser.add_argument(
        "--codecs",
        nargs="*",
        default=list(DEFAULT_CODECS),
        metavar="NAME",
        help=f"quantized codecs to measure: {' '.join(CODECS)} (none: --codecs alone)",
    )
    parser.add_argument(
        "--input",
        choices=["dense", "sparse"],
        default="dense",
        help="dense: the user call allreduce(x, codec=TopK(density=d)), dense vector in and "
        "out, encode included (default); sparse: sparse_allreduce of ready index/value "
        "streams, no encode",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    parser.add_argument("--plot", metavar="PNG", help="plot time vs density to PNG (matplotlib)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    parser.add_argument(
        "--yield",
        dest="yield_cpu",
        choices=["auto", "on", "off"],
        default="auto",
        help="set MPIR_CVAR_ENABLE_HEAVY_YIELD=1 in the launched ranks (auto: when there "
        "are more ranks than cores)",
    )


def _check(args: argparse.Namespace) -> None:
    from sparcomm.comm import ALL_ALGORITHMS

    if args.np < 1:
        raise ValueError(f"-np must be at least 1, got {args.np}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if not args.cell_seconds >= 0.0:  # also rejects NaN
        raise ValueError(f"--cell-seconds must be at least 0, got {args.cell_seconds}")
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"--densities must lie in (0, 1], got {d}")
    for s in args.sizes:
        if not 1 <= s <= 30:
            raise ValueError(f"--sizes are log2(n) in [1, 30], got {s}")
    for name in args.algorithms or ():
        if name not in ALL_ALGORITHMS:
            raise ValueError(f"--algorithms must be among {ALL_ALGORITHMS}, got {name!r}")
    for name in args.codecs:
        if name not in CODECS:
            raise ValueError(f"--codecs must be among {tuple(CODECS)}, got {name!r}")


@command("bench", "allreduce", help="sparse allreduce algorithms vs MPI Allreduce (launches ranks)")
@arguments(_configure)
def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
    except ValueError as error:
        print(f"sparcomm bench allreduce: {error}", file=sys.stderr)
        return 2
    if args.np > 1 and not _under_launcher():
        return _relaunch(args)
    result = bench_allreduce(args)
    if result is None:  # ranks other than 0
        return 0
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    if args.plot and result["rows"]:  # the plot shows the sparse grid
        plot(result, args.plot)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        if result["rows"]:
            print(format_table(result))
        if result["quantized"]:
            from sparcomm._cli_bench_quantized import format_quantized

            print(format_quantized(result["quantized"], result["ranks"]))
    return 0
