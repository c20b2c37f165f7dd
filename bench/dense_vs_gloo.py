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
  polling with 100 us sleeps (0: MPI's own wait);
* float16 schedules (:func:`half_schedule`, same bits as ``ring16``, same ``:KiB:us``
  suffixes): ``ring16w<W>`` direct scatter with at most W sends in flight (0: no limit)
  and a ring allgather, in one polling loop; ``ring16d<W>`` the same loop with the direct
  gather (``ring16d0`` is what ``ring16`` runs now); ``ring16r<W>`` the direct gather one
  send at a time; ``ring16l`` lockstep shifted rounds (one flow in and one out per rank).
* both float16 buckets of a step (the two bucket sizes, whatever ``--sizes``), B started
  ``:D`` ms after A (default 0), timed until both are done: ``pair-hook16``, A's and B's
  ``fp16_compress_hook`` work issued as DDP issues them (gloo's asynchronous allreduce:
  its process group runs two at once on its two worker threads); ``pair-hook16-seq``, B's
  allreduce after A's; ``pair-fp16``, ``FP16`` ``pipelined`` for A, then for B (as the
  reducer's one progress thread runs them); ``pair-fp16-threads``, A and B in two threads
  on two duplicates of the communicator (two collectives in flight at once); and in
  float32, ``pair-gloo``, ``pair-gloo-seq`` (DDP's allreduce of both buckets, at once /
  one after the other), ``pair-dense``, ``pair-dense-threads`` (``NoCompression``,
  ``auto``: the ring).

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
PAIRS = (
    "pair-hook16",
    "pair-hook16-seq",
    "pair-fp16",
    "pair-fp16-threads",
    "pair-gloo",
    "pair-gloo-seq",
    "pair-dense",
    "pair-dense-threads",
)
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


# ------------------------------------------------- float16 schedules tried (issue 11)
#
# Alternatives to ``_ring.half_allreduce``'s direct reduce-scatter + allgather as it was
# before them (waiting on one segment at a time), measured in docs/benchmarks.md ("Float16
# schedules"): "looped" (``ring16d0``) is what ``half_allreduce`` now does; the others were
# not adopted.  Every one returns the same bits (owners sum in float32 in rank order and
# round once).


def half_schedule(
    comm: Any,
    x: Any,
    out: Any,
    *,
    schedule: str,
    segment_bytes: int | None = None,
    window: int = 0,
    pause_s: float | None = None,
) -> tuple[int, int, int, int]:
    """``_ring.half_allreduce`` with ``schedule`` ``"paired"`` (ring gather),
    ``"looped"`` (direct gather, polling loop), ``"rounds"`` (direct gather, one send
    in flight) or ``"lockstep"``; ``window``: scatter sends in flight (0: no limit)."""
    import numpy as np

    from sparcomm.comm import _ring

    size = comm.Get_size()
    if size == 1 or x.size == 0:
        return _ring.half_allreduce(comm, x, out, segment_bytes=segment_bytes, pause_s=pause_s)

    def scratch(name: str, count: int, dtype: Any) -> Any:
        return np.empty(count, dtype=dtype)

    bounds = _ring.chunk_bounds(x.size, size)
    if segment_bytes is None:
        segment_bytes = _ring.default_segment_bytes(2 * int(bounds[1]), 2)
    segment = _ring._segment_elements(segment_bytes, 2)
    if schedule == "lockstep":
        return _half_lockstep(comm, x, out, segment, scratch, pause_s)
    gather = "ring" if schedule == "paired" else "direct"
    gather_window = 1 if schedule == "rounds" else 1 << 30
    return _half_paired(
        comm, x, out, segment, window or 1 << 30, gather, gather_window, scratch, pause_s
    )


def _half_paired(
    comm: Any,
    x: Any,
    out: Any,
    segment: int,
    window: int,
    gather: str,
    gather_window: int,
    scratch: Any,
    pause_s: float | None,
) -> tuple[int, int, int, int]:
    """Float16 allreduce, bits of ``half_allreduce``: the direct scatter (at most
    ``window`` sends in flight), the gather ``"ring"`` (forwarded to the right neighbour)
    or ``"direct"`` (at most ``gather_window`` sends in flight), in one polling loop that
    keeps MPI progressing between the sums and decodes every arrival into ``out``."""
    import numpy as np
    from mpi4py import MPI

    from sparcomm._backend import kernels_for
    from sparcomm.comm._ring import (
        _TAG_HALF_GATHER,
        _TAG_HALF_SCATTER,
        PAUSE_GROWTH,
        _waitall,
        half_buffers,
        sum_owned_piece,
    )

    size, rank = comm.Get_size(), comm.Get_rank()
    kernels = kernels_for(np)
    encoded, sums, incoming, total, bounds, pieces = half_buffers(x, size, rank, segment, scratch)
    bits, sum_bits, incoming_bits = (b.view(np.uint16) for b in (encoded, sums, incoming))
    own_a = int(bounds[rank])
    mine = pieces[rank]
    datatype = MPI.UINT16_T
    right, left = (rank + 1) % size, (rank - 1) % size
    depth = max(len(p) for p in pieces)
    sent = received = 0

    # Scatter: piece i of every chunk, the owners in shifted rounds (round s to rank
    # r + s while rank r - s sends here); my own piece last (encoded, not sent).
    scatter_plan = [
        ((rank + offset) % size, i, *pieces[(rank + offset) % size][i])
        for i in range(depth)
        for offset in range(1, size + 1)
        if i < len(pieces[(rank + offset) % size])
        and pieces[(rank + offset) % size][i][1] > pieces[(rank + offset) % size][i][0]
    ]
    scatter_recvs: list[list[Any]] = [[] for _ in mine]
    for i, (a, b) in enumerate(mine):
        for offset in range(1, size):
            source = (rank - offset) % size
            if b > a:
                view = incoming_bits[source, a - own_a : b - own_a]
                scatter_recvs[i].append(comm.Irecv([view, datatype], source, _TAG_HALF_SCATTER))
                received += 2 * (b - a)

    # Gather, a ring: in step t of piece i a rank sends the sums of owner r - t (its
    # own at t = 0, then what came from the left at step t - 1) to the right.  Sends
    # and receives follow one fixed order per link, so one tag matches them.
    def nonempty(owner: int, i: int) -> bool:
        return i < len(pieces[owner]) and pieces[owner][i][1] > pieces[owner][i][0]

    if gather == "ring":
        gather_plan = [
            (i, (rank - t) % size, right)
            for i in range(depth)
            for t in range(size - 1)
            if nonempty((rank - t) % size, i)
        ]
        gather_keys = [
            (i, (rank - 1 - t) % size, left)
            for i in range(depth)
            for t in range(size - 1)
            if nonempty((rank - 1 - t) % size, i)
        ]
    else:  # direct: each owner sends its sums to every rank
        gather_plan = [
            (i, rank, (rank + t) % size)
            for i in range(depth)
            for t in range(1, size)
            if nonempty(rank, i)
        ]
        gather_keys = [
            (i, (rank - t) % size, (rank - t) % size)
            for i in range(depth)
            for t in range(1, size)
            if nonempty((rank - t) % size, i)
        ]
    arrived = {key[:2]: index for index, key in enumerate(gather_keys)}
    gather_recvs = []
    for i, owner, source in gather_keys:
        a, b = pieces[owner][i]
        gather_recvs.append(comm.Irecv([sum_bits[a:b], datatype], source, _TAG_HALF_GATHER))
        received += 2 * (b - a)
    own_encoded = [b == a for a, b in mine]  # an empty piece needs no encode
    in_flight: list[Any] = []
    gather_sends: list[Any] = []
    status = np.array([-1], dtype=np.int64)
    failed = np.full(1, -1, dtype=np.int64)
    reduction: Any = None
    bad = 0
    next_send = next_gather_send = gathered = 0
    summed = 0
    delay = pause_s or 0.0
    while True:
        progressed = False
        # Scatter sends, at most `window` in flight (encoded just before they leave).
        while in_flight and in_flight[0].Test():
            in_flight.pop(0)
        while next_send < len(scatter_plan) and len(in_flight) < window:
            dest, i, a, b = scatter_plan[next_send]
            bad += kernels.fp16_encode(x[a:b], encoded[a:b])
            if dest == rank:
                own_encoded[i] = True
            else:
                in_flight.append(comm.Isend([bits[a:b], datatype], dest, _TAG_HALF_SCATTER))
                sent += 2 * (b - a)
            next_send += 1
            progressed = True
        # Gather receives, in their order: decode each into the output as it lands
        # (every rank's encode of that region preceded the owner's sum, so ``out`` may
        # be ``x``).
        while gathered < len(gather_recvs) and gather_recvs[gathered].Test():
            i, owner, _ = gather_keys[gathered]
            a, b = pieces[owner][i]
            kernels.fp16_decode(sums[a:b], out[a:b], 0)
            gathered += 1
            progressed = True
        # Sum my next piece once every rank's values are here: rank order, one rounding.
        if (
            summed < len(mine)
            and own_encoded[summed]
            and MPI.Request.Testall(scatter_recvs[summed])
        ):
            a, b = mine[summed]
            if b > a:
                bad += sum_owned_piece(kernels, encoded, incoming, total, sums, rank, own_a, a, b)
                kernels.fp16_decode(sums[a:b], out[a:b], 0)
            summed += 1
            progressed = True
        # Gather sends whose sums are here (mine summed, or received from the left).
        while gather_sends and gather_sends[0].Test():
            gather_sends.pop(0)
        while next_gather_send < len(gather_plan) and len(gather_sends) < gather_window:
            i, owner, dest = gather_plan[next_gather_send]
            ready = i < summed if owner == rank else arrived[(i, owner)] < gathered
            if not ready:
                break
            a, b = pieces[owner][i]
            gather_sends.append(comm.Isend([sum_bits[a:b], datatype], dest, _TAG_HALF_GATHER))
            sent += 2 * (b - a)
            next_gather_send += 1
            progressed = True
        if reduction is None and next_send == len(scatter_plan) and summed == len(mine):
            # Every rank learns which rank (the highest) met a non-finite value, its
            # input's or an owned sum's, while the gather completes.
            status[0] = rank if bad else -1
            reduction = comm.Iallreduce(status, failed, op=MPI.MAX)
            progressed = True
        if (
            reduction is not None
            and gathered == len(gather_recvs)
            and next_gather_send == len(gather_plan)
        ):
            break
        if progressed:
            delay = pause_s or 0.0
        elif pause_s is not None:
            time.sleep(delay)
            delay = min(2 * delay, PAUSE_GROWTH * pause_s)
    _waitall(in_flight + gather_sends + [reduction], pause_s)
    return sent, received, int(bad), int(failed[0])


def _half_lockstep(
    comm: Any,
    x: Any,
    out: Any,
    segment: int,
    scratch: Any,
    pause_s: float | None,
) -> tuple[int, int, int, int]:
    """Float16 allreduce, bits of ``half_allreduce``, in shifted rounds: in round ``s``
    of step ``k`` rank ``r`` sends rank ``r + s`` its values of that rank's piece ``k``
    and its own sums of piece ``k - 1``, receives the same from ``r - s``, and waits
    for all four messages: one flow in and one out per rank at any time."""
    import numpy as np
    from mpi4py import MPI

    from sparcomm._backend import kernels_for
    from sparcomm.comm._ring import (
        _TAG_HALF_GATHER,
        _TAG_HALF_SCATTER,
        _wait,
        _waitall,
        half_buffers,
        sum_owned_piece,
    )

    size, rank = comm.Get_size(), comm.Get_rank()
    kernels = kernels_for(np)
    encoded, sums, incoming, total, bounds, pieces = half_buffers(x, size, rank, segment, scratch)
    bits, sum_bits, incoming_bits = (b.view(np.uint16) for b in (encoded, sums, incoming))
    own_a = int(bounds[rank])
    datatype = MPI.UINT16_T
    depth = max(len(p) for p in pieces)
    sent = received = 0
    bad = 0

    def piece(owner: int, i: int) -> tuple[int, int] | None:
        if 0 <= i < len(pieces[owner]) and pieces[owner][i][1] > pieces[owner][i][0]:
            return pieces[owner][i]
        return None

    status = np.array([-1], dtype=np.int64)
    failed = np.full(1, -1, dtype=np.int64)
    reduction: Any = None
    for k in range(depth + 1):
        own = piece(rank, k)
        if own is not None:
            a, b = own
            bad += kernels.fp16_encode(x[a:b], encoded[a:b])
        for s in range(1, size):
            dest, source = (rank + s) % size, (rank - s) % size
            requests = []
            region = piece(dest, k)
            if region is not None:  # scatter: my values of dest's piece k
                a, b = region
                bad += kernels.fp16_encode(x[a:b], encoded[a:b])
                requests.append(comm.Isend([bits[a:b], datatype], dest, _TAG_HALF_SCATTER))
                sent += 2 * (b - a)
            region = piece(rank, k)
            if region is not None:
                a, b = region
                view = incoming_bits[source, a - own_a : b - own_a]
                requests.append(comm.Irecv([view, datatype], source, _TAG_HALF_SCATTER))
                received += 2 * (b - a)
            done = piece(rank, k - 1)
            if s == 1 and done is not None:  # every rank's values of my piece k-1 are here
                a, b = done
                bad += sum_owned_piece(kernels, encoded, incoming, total, sums, rank, own_a, a, b)
                kernels.fp16_decode(sums[a:b], out[a:b], 0)
            if s == 1 and k == depth:
                status[0] = rank if bad else -1
                reduction = comm.Iallreduce(status, failed, op=MPI.MAX)
            if done is not None:  # gather: my sums of piece k-1
                a, b = done
                requests.append(comm.Isend([sum_bits[a:b], datatype], dest, _TAG_HALF_GATHER))
                sent += 2 * (b - a)
            theirs = piece(source, k - 1)
            if theirs is not None:
                a, b = theirs
                view = sum_bits[a:b]
                requests.append(comm.Irecv([view, datatype], source, _TAG_HALF_GATHER))
                received += 2 * (b - a)
            _waitall(requests, pause_s)
            if theirs is not None:
                a, b = theirs
                kernels.fp16_decode(sums[a:b], out[a:b], 0)
    _wait(reduction, pause_s)
    return sent, received, int(bad), int(failed[0])


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

    def ring16(
        kib: int | None, pause: float | None, schedule: str = "direct", window: int = 0
    ) -> Any:
        segment = None if kib is None else kib << 10

        def run() -> None:
            if schedule == "direct":
                _ring.half_allreduce(private, base, out, segment_bytes=segment, pause_s=pause)
            else:
                half_schedule(
                    private, base, out, schedule=schedule, segment_bytes=segment,
                    window=window, pause_s=pause,
                )  # fmt: skip

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
    pairs = [name for name in names if name.partition(":")[0] in PAIRS]
    if pairs:
        table.update(_pair_contenders(pairs, comm))
    for name in names:  # "ring", "ring16", with a segment size "ring:128" (KiB), and a
        # pause between polls "ring:128:100" (microseconds; 0: MPI's own wait)
        kind, _, rest = name.partition(":")
        kib, _, micros = rest.partition(":")
        pause = (float(micros) * 1e-6 or None) if micros else _ring.DEFAULT_PAUSE_S
        if kind in ("ring", "ring16"):
            table[name] = (ring if kind == "ring" else ring16)(int(kib) if kib else None, pause)
        elif kind == "ring16l":
            table[name] = ring16(int(kib) if kib else None, pause, "lockstep")
        elif kind[:7] in ("ring16w", "ring16d", "ring16r"):  # window W (0: none)
            window = int(kind[len("ring16w") :] or 0)
            schedule = {"w": "paired", "d": "looped", "r": "rounds"}[kind[6]]
            table[name] = ring16(int(kib) if kib else None, pause, schedule, window)
    return {name: table[name] for name in names}


def _pair_contenders(names: list[str], comm: Any) -> dict[str, Any]:
    """Both float16 buckets of a training step (see the module docstring)."""
    import threading

    import numpy as np
    import torch
    import torch.distributed as dist

    import sparcomm

    size = comm.Get_size()
    sizes = _bucket_sizes()
    rng = np.random.default_rng(comm.Get_rank())
    bases = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    outs = [np.empty_like(base) for base in bases]
    tensors = [torch.from_numpy(base.copy()) for base in bases]
    lanes = [comm.Dup() for _ in sizes]  # one communicator per bucket (threads)

    def hook(tensor: Any) -> Any:
        compressed = tensor.to(torch.float16).div_(size)
        return compressed, dist.all_reduce(compressed, async_op=True)

    def fp16(i: int, lane: Any) -> None:
        sparcomm.allreduce(
            bases[i], codec=sparcomm.FP16(), comm=lane, algorithm="pipelined", out=outs[i]
        )

    def dense(i: int, lane: Any) -> None:
        sparcomm.allreduce(bases[i], codec=sparcomm.NoCompression(), comm=lane, out=outs[i])

    def make(kind: str, delay: float) -> Any:
        def run() -> None:
            start = time.perf_counter()

            def until_b() -> None:
                time.sleep(max(0.0, start + delay - time.perf_counter()))

            if kind in ("pair-hook16", "pair-hook16-seq"):
                a, work_a = hook(tensors[0])
                if kind == "pair-hook16-seq":
                    work_a.wait()
                until_b()
                b, work_b = hook(tensors[1])
                work_a.wait()
                tensors[0].copy_(a)
                work_b.wait()
                tensors[1].copy_(b)
            elif kind in ("pair-gloo", "pair-gloo-seq"):
                work_a = dist.all_reduce(tensors[0], async_op=True)
                if kind == "pair-gloo-seq":
                    work_a.wait()
                until_b()
                work_b = dist.all_reduce(tensors[1], async_op=True)
                work_a.wait()
                work_b.wait()
            elif kind in ("pair-fp16", "pair-dense"):
                reduce = fp16 if kind == "pair-fp16" else dense
                reduce(0, lanes[0])
                until_b()
                reduce(1, lanes[0])
            else:
                reduce = fp16 if kind == "pair-fp16-threads" else dense
                thread = threading.Thread(target=reduce, args=(0, lanes[0]))
                thread.start()
                until_b()
                reduce(1, lanes[1])
                thread.join()

        return run

    table = {}
    for name in names:
        kind, _, millis = name.partition(":")
        table[name] = make(kind, float(millis or 0) * 1e-3)
    return table


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
                + (
                    f"{wire32 * 1e3:.0f} ms (fp16 {wire16 * 1e3:.0f} ms)"
                    if wire32 and wire16
                    else "n/a"
                )
            )
            for name, seconds in medians.items():
                if name.startswith("pair"):
                    half = "16" in name.partition(":")[0]
                    reference = "pair-hook16" if half else "pair-gloo"
                    ratio = (
                        f"{seconds / medians[reference]:.2f}x {reference}"
                        if reference in medians
                        else ""
                    )
                    print(f"    {name:10s} {seconds * 1e3:8.1f} ms  {ratio}")
                    continue
                half = name.startswith("ring16") or name.partition(":")[0] in (
                    "gloo16",
                    "hook16",
                    "fp16",
                    "fp16-rsag",
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
            name.partition(":")[0] in PAIRS and name.partition(":")[2].isdigit() | (":" not in name)
        )
        and not (
            (
                name.partition(":")[0] in ("ring", "ring16", "ring16l")
                or name.partition(":")[0][len("ring16w") :].isdigit()
                and name[:7] in ("ring16w", "ring16d", "ring16r")
            )
            and name.partition(":")[2].replace(":", "").isdigit() | (":" not in name)
        )
    )
    if unknown:
        parser.error(
            f"unknown contenders {unknown}; choose from {list(ALL_CONTENDERS)}, or "
            "ring, ring16, ring16l, ring16w<W>, ring16d<W>, ring16r<W> with :KiB[:us], "
            f"or {', '.join(PAIRS)} with :ms"
        )
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
