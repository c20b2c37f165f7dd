"""Dense and FP16 allreduce against gloo's, in the emulated cluster (issue 11).

Times one allreduce of the training benchmark's bucket sizes (the 10.5 M-parameter MLP
fused into 25 MiB buckets) by every contender, interleaved round by round in one job
(rotating order), on the network of ``sparcomm bench train --emulate`` (the same
:class:`sparcomm._emulate.EmulatedCluster`: one namespace per rank, ``tc tbf`` links,
MPICH over libfabric's tcp provider, gloo on the same interface)::

    python bench/dense_vs_gloo.py -np 4 --emulate 1gbit --rounds 7
    python bench/dense_vs_gloo.py -np 4 --emulate 1gbit \
        --variant rsag:MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM=reduce_scatter_allgather

Every ``--variant NAME:VAR=VALUE[,VAR=VALUE]`` is one more job in the same cluster with
those environment variables (MPICH CVARs, libfabric settings); each job times gloo too,
so its figures compare as ratios to gloo measured beside them.

Contenders (``--contenders`` picks some):

* ``mpi``: ``MPI_Allreduce`` in place of the float32 buffer (what ``NoCompression`` ran
  before issue 11);
* ``gloo``: ``torch.distributed.all_reduce`` of the same float32 tensor (DDP's bucket);
* ``gloo16``: the same of a float16 tensor (what ``fp16_compress_hook`` sends);
* ``hook16``: ``fp16_compress_hook``'s whole work: cast to float16 with the division,
  gloo allreduce, cast back into the float32 bucket;
* ``dense``, ``fp16``: ``sparcomm.allreduce`` with ``NoCompression()`` / ``FP16()``,
  ``out=`` a reused buffer, ``algorithm="auto"``;
* ``dense-mpi``, ``fp16-rsag``: the same forced to the algorithms they used before
  issue 11 (``"mpi"`` / ``"reduce_scatter_allgather"``);
* ``ring``, ``ring16``: :mod:`sparcomm.comm._ring` directly (float32, and float16 on
  the wire with float32 sums), default segments and waits; ``ring:128``,
  ``ring16:2048``: with that segment (KiB); ``ring:2048:100``, ``ring::100``: waiting by
  polling with 100 us sleeps (0: MPI's own wait).

Reported per size: the slowest rank's median milliseconds per contender, the ratio to
``gloo`` (float32 contenders) or ``hook16`` (float16 ones), the wire time of the bytes
a bandwidth-optimal allreduce moves at the measured link rate, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_CONTENDERS = (
    "mpi",
    "gloo",
    "dense",
    "ring",
    "gloo16",
    "hook16",
    "fp16",
    "ring16",
)
ALL_CONTENDERS = (*DEFAULT_CONTENDERS, "dense-mpi", "fp16-rsag")
FP16_REFERENCE = "hook16"


def _bucket_sizes() -> list[int]:
    """Element counts of the training benchmark's buckets, fused as the reducer fuses
    the MLP's gradients (last layer first) for ``NoCompression``."""
    import numpy as np

    from sparcomm._train_tasks import make_task
    from sparcomm.reducer import DEFAULT_FUSION_THRESHOLD_BYTES, build_plan

    shapes = make_task("mlp").parameter_shapes()
    specs = [(i, tuple(shape), np.dtype(np.float32)) for i, shape in enumerate(shapes)]
    plan = build_plan(
        specs[::-1],
        compress=False,
        fusion_threshold_bytes=DEFAULT_FUSION_THRESHOLD_BYTES,
        dense_below=1024,
        compression="layer",
    )
    return [bucket.size for bucket in plan.buckets]


# ----------------------------------------------------------------------------- ranks


def _contenders(names: list[str], n: int, comm: Any) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.distributed as dist

    import sparcomm
    from sparcomm.comm import _ring
    from sparcomm.comm._context import comm_state

    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(rank)
    base = rng.standard_normal(n).astype(np.float32)
    work = base.copy()
    out = np.empty_like(base)
    tensor = torch.from_numpy(work)
    half = torch.from_numpy(base.astype(np.float16))
    private = comm_state(comm).comm
    from mpi4py import MPI

    def mpi() -> None:
        private.Allreduce(MPI.IN_PLACE, work)

    def gloo() -> None:
        dist.all_reduce(tensor)

    def gloo16() -> None:
        dist.all_reduce(half)

    def hook16() -> None:  # torch's fp16_compress_hook, without the future
        compressed = tensor.to(torch.float16).div_(size)
        dist.all_reduce(compressed)
        tensor.copy_(compressed)

    def call(codec: Any, algorithm: str) -> Any:
        def run() -> None:
            sparcomm.allreduce(base, codec=codec, comm=comm, op="sum", algorithm=algorithm, out=out)

        return run

    def ring(kib: int | None, pause: float | None) -> Any:
        segment = None if kib is None else kib << 10

        def run() -> None:
            _ring.ring_allreduce(private, base, out, segment_bytes=segment, pause_s=pause)

        return run

    def ring16(kib: int | None, pause: float | None) -> Any:
        segment = None if kib is None else kib << 10

        def run() -> None:
            _ring.half_allreduce(private, base, out, segment_bytes=segment, pause_s=pause)

        return run

    table = {
        "mpi": mpi,
        "gloo": gloo,
        "gloo16": gloo16,
        "hook16": hook16,
        "dense": call(sparcomm.NoCompression(), "auto"),
        "dense-mpi": call(sparcomm.NoCompression(), "mpi"),
        "fp16": call(sparcomm.FP16(), "auto"),
        "fp16-rsag": call(sparcomm.FP16(), "reduce_scatter_allgather"),
    }
    for name in names:  # "ring", "ring16", with a segment size "ring:128" (KiB), and a
        # pause between polls "ring:128:100" (microseconds; 0: MPI's own wait)
        kind, _, rest = name.partition(":")
        kib, _, micros = rest.partition(":")
        pause = (float(micros) * 1e-6 or None) if micros else _ring.DEFAULT_PAUSE_S
        if kind in ("ring", "ring16"):
            table[name] = (ring if kind == "ring" else ring16)(int(kib) if kib else None, pause)
    return {name: table[name] for name in names}


def _rank_main(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from sparcomm._cli_bench_train import _init_gloo

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    _init_gloo(comm)
    results: dict[str, Any] = {"sizes": {}, "loads": []}
    for n in args.sizes:
        runs = _contenders(args.contenders, n, comm)
        names = list(runs)
        for name in names:  # warm-up: connections, calibration, compilation
            runs[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                comm.Barrier()
                start = time.perf_counter()
                runs[name]()
                elapsed = time.perf_counter() - start
                times[name].append(comm.allreduce(elapsed, op=MPI.MAX))
            results["loads"].append(os.getloadavg()[0])
        results["sizes"][str(n)] = {name: statistics.median(t) for name, t in times.items()}
        results["sizes"][str(n) + ":all"] = times
        del runs
    del np
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))


# --------------------------------------------------------------------------- launcher


def _run_job(args: argparse.Namespace, cluster: Any, extra: dict[str, str]) -> dict[str, Any]:
    from sparcomm._launch import find_mpiexec

    with tempfile.TemporaryDirectory(prefix="sparcomm-dense-vs-gloo-") as scratch:
        os.chmod(scratch, 0o777)
        result = os.path.join(scratch, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--rank-main", "--result", result]
        command += ["--rounds", str(args.rounds), "--sizes", *map(str, args.sizes)]
        command += ["--contenders", *args.contenders]
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        if cluster is not None:
            env.update(cluster.env())
            command = cluster.wrap(command)
        env.update(extra)
        mpiexec = [find_mpiexec(), "-n", str(args.nprocs)]
        subprocess.run([*mpiexec, *command], env=env, check=True, timeout=args.timeout)
        return json.loads(Path(result).read_text())


def _wire_seconds(n: int, itemsize: int, ranks: int, rate_bps: float | None) -> float | None:
    """A bandwidth-optimal allreduce's bytes per rank, 2 (P-1)/P m, at the link rate."""
    if not rate_bps:
        return None
    return 2 * (ranks - 1) / ranks * n * itemsize * 8 / rate_bps


def _print_report(report: dict[str, Any]) -> None:
    print(f"link {report['link']} (measured {report['rate_mbps']} Mbit/s), {report['ranks']} ranks")
    print(f"load (1 min) before {report['load_before']:.1f}, after {report['load_after']:.1f}")
    for job in report["jobs"]:
        loads = job["loads"]
        print(f"\njob {job['name']} {job['env'] or ''} load {min(loads):.1f}-{max(loads):.1f}")
        for n, medians in job["sizes"].items():
            if ":" in n:
                continue
            n_int = int(n)
            wire32 = _wire_seconds(n_int, 4, report["ranks"], report["rate_bps"])
            wire16 = _wire_seconds(n_int, 2, report["ranks"], report["rate_bps"])
            print(
                f"  n = {n_int} ({n_int * 4 / 2**20:.1f} MiB float32); wire time "
                + (f"{wire32 * 1e3:.0f} ms (fp16 {wire16 * 1e3:.0f} ms)" if wire32 else "n/a")
            )
            for name, seconds in medians.items():
                half = name.partition(":")[0] in (
                    "gloo16",
                    "hook16",
                    "fp16",
                    "fp16-rsag",
                    "ring16",
                )
                reference = FP16_REFERENCE if half else "gloo"
                ratio = (
                    f"{seconds / medians[reference]:.2f}x {reference}"
                    if reference in medians
                    else ""
                )
                print(f"    {name:10s} {seconds * 1e3:8.1f} ms  {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-np", "--nprocs", type=int, default=4)
    parser.add_argument("--emulate", default="1gbit", help="link, or 'none' for no cluster")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE,...")
    parser.add_argument("--baseline", action="store_true", help="with --variant: also no env")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(
        name
        for name in args.contenders
        if name not in ALL_CONTENDERS
        and not (
            name.partition(":")[0] in ("ring", "ring16")
            and name.partition(":")[2].replace(":", "").isdigit()
        )
    )
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(ALL_CONTENDERS)}")
    if args.rank_main:
        _rank_main(args)
        return 0
    if args.sizes is None:
        args.sizes = _bucket_sizes()
    jobs: list[tuple[str, dict[str, str]]] = []
    if not args.variant or args.baseline:
        jobs.append(("default", {}))
    for text in args.variant:
        name, _, assignments = text.partition(":")
        env = dict(item.split("=", 1) for item in assignments.split(",") if item)
        jobs.append((name, env))
    from sparcomm._emulate import EmulatedCluster

    report: dict[str, Any] = {
        "command": "python bench/dense_vs_gloo.py " + " ".join(sys.argv[1:]),
        "ranks": args.nprocs,
        "sizes": args.sizes,
        "load_before": os.getloadavg()[0],
        "jobs": [],
    }
    if args.emulate == "none":
        report.update(link="the ranks' own network", rate_bps=None, rate_mbps="n/a")
        for name, env in jobs:
            report["jobs"].append({"name": name, "env": env, **_run_job(args, None, env)})
    else:
        with EmulatedCluster(args.nprocs, args.emulate) as cluster:
            rate = cluster.measure_rate()
            report.update(link=str(cluster.link), rate_bps=rate, rate_mbps=f"{rate / 1e6:.0f}")
            for name, env in jobs:
                report["jobs"].append({"name": name, "env": env, **_run_job(args, cluster, env)})
    report["load_after"] = os.getloadavg()[0]
    _print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
