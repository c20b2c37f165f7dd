"""Will compression pay on my cluster?  Predicted step time of each contender.

The model (Agarwal et al., "On the Utility of Gradient Compression in Distributed
Training Systems", MLSys 2022; SparCML's alpha-beta costs) of one data-parallel step::

    step = compute + codec + transfer + latency - overlap
    transfer = 8 * bytes_sent / bandwidth        (bytes each rank sends per step)
    latency  = rounds * alpha                    (message steps on the critical path)

``compute`` is forward + backward + optimizer update (a step with no communication);
``codec`` the time a contender adds to compress, decompress and sum (measured: encode,
decode/merge, write-back); ``bandwidth`` a rank's link rate in bit/s in each direction
(a full-duplex link per rank behind a non-blocking switch, as in the emulated cluster);
``alpha`` the latency of one synchronising message step.  ``overlap`` is the part of
``transfer + latency`` hidden behind the backward pass: with one core or fewer per rank
(as in the benchmark on a 2-core machine) nothing is idle to hide it, so the default is
0; on a machine with spare cores it is at most the backward time.

Bytes per rank per step (P ranks, n parameters, 4-byte gradients):

- dense (DDP over gloo, ring; sparcomm ``NoCompression``, MPI Allreduce):
  ``2 (P-1)/P 4 n``; ``fp16_compress_hook``: half of it;
- PowerSGD rank r (torch's hook): matrices ``a x b`` whose compression is at least 2x send
  their factors ``P (a x r)`` and ``Q (b x r)`` by allreduce, ``2 (P-1)/P 4 r (a+b)``;
  the rest dense;
- sparcomm codecs compress each tensor of at least ``dense_below`` elements on its own
  (``compression="layer"``); a payload of ``p`` bytes costs ``(P-1) p`` by allgather and
  ``2 (P-1)/P p`` by reduce-scatter + allgather (which the quantized codecs use when it is
  cheaper); sparse payloads (TopK) are taken at the allgather figure.

The crossover bandwidth of a codec against dense is where its saved transfer time equals
its added time: below it, compression wins.  ``sparcomm predict`` prints the table;
:func:`predict` is the function behind it, :func:`from_benchmark` the one behind the
predicted column of ``sparcomm bench train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sparcomm.cli import arguments, command

__all__ = [
    "StepPrediction",
    "Traffic",
    "crossover_bandwidth",
    "from_benchmark",
    "measure_codec_seconds",
    "network_outlook",
    "predict",
    "predict_step",
    "traffic",
]

#: Contender ids understood by :func:`traffic` besides ``sparcomm-<codec>``.
TORCH_CONTENDERS = ("ddp", "ddp-fp16", "ddp-powersgd1", "ddp-powersgd4")
_DDP_BUCKET_BYTES = 25 * 2**20
_POWERSGD_MIN_COMPRESSION = 2.0


@dataclass(frozen=True)
class Traffic:
    """What a contender moves per step, per rank.

    Attributes
    ----------
    bytes_sent : float
        Bytes each rank sends per step (payload, without TCP/IP headers).
    rounds : float
        Latency-bound message steps per step (each costs ``alpha``).
    codec_s : float
        Seconds of compute the contender adds per step (encode, decode, merge).
    allreduce_bytes : float
        Bytes of buffer reduced by MPI's own ``Allreduce`` (sparcomm's dense path), whose
        time a calibrated ``beta_allreduce`` gives better than the byte count: MPI's
        algorithm is a black box.
    allreduce_sent : float
        The part of ``bytes_sent`` that those allreduces send (the ring's count).
    agreement_s : float
        Measured seconds per step that ranks spend agreeing before their collectives
        (sparcomm's signature checks: mostly waiting for the slowest rank), when known.
    """

    bytes_sent: float
    rounds: float
    codec_s: float = 0.0
    allreduce_bytes: float = 0.0
    allreduce_sent: float = 0.0
    agreement_s: float = 0.0


@dataclass(frozen=True)
class StepPrediction:
    """A predicted step, in seconds, by part."""

    compute: float
    codec: float
    transfer: float
    latency: float
    hidden: float = 0.0
    agreement: float = 0.0

    @property
    def total(self) -> float:
        """Predicted seconds per step."""
        return (
            self.compute + self.codec + self.agreement + self.transfer + self.latency - self.hidden
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "compute": self.compute,
            "codec": self.codec,
            "transfer": self.transfer,
            "latency": self.latency,
            "agreement": self.agreement,
            "hidden": self.hidden,
            "total": self.total,
        }


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def predict_step(
    traffic: Traffic,
    *,
    bandwidth_bps: float,
    latency_s: float,
    compute_s: float,
    overlap_s: float = 0.0,
    beta_allreduce: float | None = None,
) -> StepPrediction:
    """The predicted step of one contender.

    Parameters
    ----------
    traffic : Traffic
    bandwidth_bps : float
        Link rate of each rank, bit/s per direction (measured goodput is best).
    latency_s : float
        Seconds per synchronising message step (alpha).
    compute_s : float
        Forward + backward + update of a step without communication.
    overlap_s : float
        At most this much of the communication hides behind computation (default 0).
    beta_allreduce : float, optional
        Seconds per byte of buffer of MPI's ``Allreduce`` (``sparcomm.comm.calibrate``);
        prices ``traffic.allreduce_bytes`` when given.
    """
    _check_positive("bandwidth_bps", bandwidth_bps)
    _check_positive("latency_s", latency_s, allow_zero=True)
    _check_positive("compute_s", compute_s, allow_zero=True)
    _check_positive("overlap_s", overlap_s, allow_zero=True)
    transfer = 8.0 * traffic.bytes_sent / bandwidth_bps
    if beta_allreduce is not None and traffic.allreduce_bytes:
        _check_positive("beta_allreduce", beta_allreduce)
        transfer += beta_allreduce * traffic.allreduce_bytes
        transfer -= 8.0 * traffic.allreduce_sent / bandwidth_bps
    latency = traffic.rounds * latency_s
    return StepPrediction(
        compute_s,
        traffic.codec_s,
        transfer,
        latency,
        min(overlap_s, transfer + latency),
        traffic.agreement_s,
    )


def crossover_bandwidth(codec: Traffic, dense: Traffic, *, latency_s: float) -> float:
    """Link rate (bit/s) below which ``codec`` steps faster than ``dense``.

    ``inf`` when the codec adds no time (it wins at every rate); 0 when it saves no
    bytes (it never wins).
    """
    saved_bits = 8.0 * (dense.bytes_sent - codec.bytes_sent)
    added = (
        (codec.codec_s - dense.codec_s)
        + (codec.agreement_s - dense.agreement_s)
        + (codec.rounds - dense.rounds) * latency_s
    )
    if saved_bits <= 0:
        return 0.0
    if added <= 0:
        return math.inf
    return saved_bits / added


def _rounds_allreduce(ranks: int, ring: bool) -> float:
    if ranks < 2:
        return 0.0
    return 2.0 * (ranks - 1) if ring else 2.0 * math.ceil(math.log2(ranks))


def _dense_bytes(elements: float, ranks: int, itemsize: int = 4) -> float:
    return 2.0 * (ranks - 1) / ranks * itemsize * elements if ranks > 1 else 0.0


def traffic(
    contender: str,
    shapes: Sequence[Sequence[int]],
    ranks: int,
    *,
    codec: Any = None,
    codec_s: float = 0.0,
    algorithms: Sequence[str] | None = None,
    dense_below: int | None = None,
    fusion_bytes: int | None = None,
) -> Traffic:
    """Bytes and message steps of ``contender`` for a model of parameter ``shapes``.

    Parameters
    ----------
    contender : str
        ``"ddp"``, ``"ddp-fp16"``, ``"ddp-powersgd<r>"``, ``"sparcomm-nocompression"`` or
        ``"sparcomm-<codec>"`` (then pass ``codec``), or ``"local"``.
    shapes : sequence of shapes
        The model's parameters.
    ranks : int
    codec : Codec or ErrorFeedback, optional
        The codec of a ``sparcomm-*`` contender.
    codec_s : float
        Its measured compute per step (carried into the result).
    algorithms : sequence of str, optional
        The algorithm of each compressed collective (as ``last_stats.algorithms`` lists
        them); default: allgather for sparse codecs, the cheaper of allgather and
        reduce-scatter + allgather for the others.
    dense_below, fusion_bytes : int, optional
        The reducer's settings (default: its defaults).
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    sizes = [math.prod(int(d) for d in shape) for shape in shapes]
    n = float(sum(sizes))
    if contender == "local":
        return Traffic(0.0, 0.0, codec_s)
    if contender in ("ddp", "ddp-fp16"):
        itemsize = 2 if contender == "ddp-fp16" else 4
        buckets = max(1, math.ceil(4 * n / _DDP_BUCKET_BYTES))
        return Traffic(
            _dense_bytes(n, ranks, itemsize), buckets * _rounds_allreduce(ranks, True), codec_s
        )
    if contender.startswith("ddp-powersgd"):
        rank = int(contender.removeprefix("ddp-powersgd") or 1)
        factors = 0.0
        rest = 0.0
        for shape, size in zip(shapes, sizes, strict=True):
            if len(shape) >= 2:
                a, b = int(shape[0]), size // int(shape[0])
                if a * b >= _POWERSGD_MIN_COMPRESSION * rank * (a + b):
                    factors += rank * (a + b)
                    continue
            rest += size
        # The uncompressed tensors, P and Q: three allreduces of one bucket.
        return Traffic(
            _dense_bytes(factors + rest, ranks), 3 * _rounds_allreduce(ranks, True), codec_s
        )
    if not contender.startswith("sparcomm-"):
        raise ValueError(
            f"unknown contender {contender!r}; expected local, {', '.join(TORCH_CONTENDERS)} "
            "or sparcomm-<codec>"
        )
    from sparcomm.reducer import DEFAULT_DENSE_BELOW, DEFAULT_FUSION_THRESHOLD_BYTES

    if callable(getattr(codec, "choose", None)) and hasattr(codec, "codecs"):
        return _policy_traffic(contender, shapes, ranks, codec, codec_s, dense_below, fusion_bytes)
    dense_below = DEFAULT_DENSE_BELOW if dense_below is None else dense_below
    fusion_bytes = DEFAULT_FUSION_THRESHOLD_BYTES if fusion_bytes is None else fusion_bytes
    check_rounds = math.ceil(math.log2(ranks)) if ranks > 1 else 0
    dense_codec = codec is None or type(getattr(codec, "codec", codec)).__name__ == "NoCompression"
    if dense_codec:
        buckets = max(1, math.ceil(4 * n / fusion_bytes))
        return Traffic(
            _dense_bytes(n, ranks),
            buckets * (check_rounds + _rounds_allreduce(ranks, False)),
            codec_s,
            allreduce_bytes=4 * n,
            allreduce_sent=_dense_bytes(n, ranks),
        )
    # The optimizer plans buckets in reverse definition order (gradients' ready order).
    compressed = [s for s in reversed(sizes) if s >= dense_below]
    compressed_shapes = [
        sh for sh, s in zip(reversed(shapes), reversed(sizes), strict=True) if s >= dense_below
    ]
    dense_rest = n - sum(compressed)
    sent = _dense_bytes(dense_rest, ranks)
    rounds = (check_rounds + _rounds_allreduce(ranks, False)) if dense_rest else 0.0
    sparse = bool(getattr(codec, "is_sparse", False))
    ran = [a for a in algorithms or [] if a != "dense"]
    low_rank = type(getattr(codec, "codec", codec)).__name__ == "PowerSGD"
    for i, size in enumerate(compressed):
        algorithm = ran[i] if i < len(ran) else None
        if low_rank:
            # Two allreduces of the factors P (a x r) and Q (b x r); vectors go dense.
            shape = compressed_shapes[i]
            r = int(getattr(codec, "rank", 1))
            a, b = int(shape[0]), size // int(shape[0])
            elements = r * (a + b) if len(shape) >= 2 and a * b >= 2 * r * (a + b) else size
            sent += _dense_bytes(elements, ranks)
            rounds += check_rounds + 2 * _rounds_allreduce(ranks, False)
            continue
        payload = float(codec.encoded_nbytes(size))
        gather = (ranks - 1) * payload
        scatter_gather = 2.0 * (ranks - 1) / ranks * payload
        if algorithm is None:
            algorithm = "allgather" if sparse or gather <= scatter_gather else "reduce_scatter"
        if sparse or algorithm in ("allgather", "recursive_doubling"):
            sent += gather
            rounds += check_rounds + math.ceil(math.log2(max(ranks, 2)))
        else:
            sent += scatter_gather
            rounds += check_rounds + _rounds_allreduce(ranks, False)
    return Traffic(
        sent,
        rounds,
        codec_s,
        allreduce_bytes=4 * dense_rest,
        allreduce_sent=_dense_bytes(dense_rest, ranks),
    )


def _policy_traffic(
    contender: str,
    shapes: Sequence[Sequence[int]],
    ranks: int,
    policy: Any,
    codec_s: float,
    dense_below: int | None,
    fusion_bytes: int | None,
) -> Traffic:
    """A :class:`~sparcomm.CodecPolicy`'s traffic: each group of tensors that one codec
    takes (the reducer never mixes codecs in a bucket) counted as that codec's.  The
    policy sees each tensor's shape and its index as name (``traffic`` has no names)."""
    groups: dict[int, tuple[Any, list[Sequence[int]]]] = {}
    for index, shape in enumerate(shapes):
        chosen = policy.choose(str(index), tuple(int(d) for d in shape))
        groups.setdefault(id(chosen), (chosen, []))[1].append(shape)
    parts = [
        traffic(
            contender, group, ranks, codec=codec, dense_below=dense_below, fusion_bytes=fusion_bytes
        )
        for codec, group in groups.values()
    ]
    return Traffic(
        sum(t.bytes_sent for t in parts),
        sum(t.rounds for t in parts),
        codec_s,
        allreduce_bytes=sum(t.allreduce_bytes for t in parts),
        allreduce_sent=sum(t.allreduce_sent for t in parts),
    )


def measure_codec_seconds(
    codec: Any, shapes: Sequence[Sequence[int]], ranks: int, *, repeats: int = 3
) -> float:
    """Seconds per step that ``codec`` adds on this machine, measured on random gradients.

    For each tensor the reducer compresses: one encode, the decode-and-adds a rank does
    (``ranks`` payloads for sparse codecs, whose collectives gather every rank's entries;
    two full-length passes for the quantized codecs, whose reduce-scatter + allgather
    decodes each chunk twice; none for ``NoCompression``, which MPI sums), and one pass
    writing the mean back.  One thread; median of ``repeats`` after two warm-up steps.
    """
    import numpy as np

    from sparcomm.reducer import DEFAULT_DENSE_BELOW

    inner = getattr(codec, "codec", codec)
    if type(inner).__name__ == "NoCompression":
        decodes = 0
    elif getattr(codec, "is_sparse", False):
        decodes = ranks
    else:
        decodes = min(2, ranks)
    rng = np.random.default_rng(0)
    grads = [
        rng.standard_normal(tuple(shape), dtype=np.float32)
        for shape in shapes
        if math.prod(shape) >= DEFAULT_DENSE_BELOW
    ]
    outs = [np.zeros_like(g) for g in grads]

    def once(step: int) -> float:
        start = time.perf_counter()
        for i, (g, out) in enumerate(zip(grads, outs, strict=True)):
            payload = codec.encode(g, key=f"t{i}", step=step)
            if decodes:
                out[...] = 0
                for _ in range(decodes):
                    codec.decode(payload, out=out, accumulate=1)
                np.multiply(out, 1.0 / decodes, out=g)
            else:
                np.multiply(g, 1.0 / ranks, out=out)
        return time.perf_counter() - start

    import numba

    # One thread, as one rank per core runs: Numba's parallel kernels on a busy machine
    # wait for their other threads and would report the load, not the codec.
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        once(0)
        once(1)  # the second call compiles the paths with a residual
        return statistics.median(once(step) for step in range(2, 2 + repeats))
    finally:
        numba.set_num_threads(threads)


def _powersgd(rank: int) -> Any:
    from sparcomm.codecs import PowerSGD

    return PowerSGD(rank=rank)


def _fp16() -> Any:
    from sparcomm.codecs import FP16

    return FP16()


#: The sparcomm codec whose arithmetic stands for a DDP hook's in :func:`predict`.
_HOOK_PROXIES: dict[str, Any] = {
    "ddp-fp16": _fp16,
    "ddp-powersgd1": lambda: _powersgd(1),
    "ddp-powersgd4": lambda: _powersgd(4),
}


def predict(
    shapes: Sequence[Sequence[int]],
    ranks: int,
    *,
    bandwidth_bps: float,
    latency_s: float,
    compute_s: float,
    contenders: dict[str, Any] | None = None,
    codec_seconds: dict[str, float] | None = None,
    batch: int = 32,
    overlap_s: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Predicted step and crossover bandwidth against DDP for every contender.

    Parameters
    ----------
    shapes : sequence of shapes
        The model's parameters.
    ranks : int
    bandwidth_bps, latency_s, compute_s, overlap_s : float
        See :func:`predict_step`.
    contenders : dict of id to codec (None for DDP and local), optional
        Default: local, the four DDP contenders and every sparcomm codec as the cluster
        benchmark runs them.
    codec_seconds : dict of id to float, optional
        Measured compute each contender adds per step; contenders missing here are
        measured with :func:`measure_codec_seconds`: sparcomm codecs themselves, DDP's
        hooks through the sparcomm codec doing the same arithmetic (``FP16`` for
        ``fp16_compress_hook``, ``PowerSGD(rank=r)`` for the PowerSGD hook: the same
        products, orthogonalisation and error feedback).
    batch : int
        Per-rank batch (kept for callers; the hooks' compute is measured).

    Returns
    -------
    dict
        ``{id: {"traffic": Traffic, "step": StepPrediction, "crossover_bps": float}}``.
    """
    if contenders is None:
        from sparcomm._contenders import contender_specs

        contenders = {s.id: (s.codec() if s.codec is not None else None) for s in contender_specs()}
    codec_seconds = dict(codec_seconds or {})
    results: dict[str, dict[str, Any]] = {}
    dense = traffic("ddp", shapes, ranks)
    for cid, codec in contenders.items():
        if cid not in codec_seconds:
            if cid.startswith("sparcomm-") and codec is not None:
                codec_seconds[cid] = measure_codec_seconds(codec, shapes, ranks)
            elif cid in _HOOK_PROXIES:
                codec_seconds[cid] = measure_codec_seconds(_HOOK_PROXIES[cid](), shapes, ranks)
            else:
                codec_seconds[cid] = 0.0
        t = traffic(cid, shapes, ranks, codec=codec, codec_s=codec_seconds[cid])
        step = predict_step(
            t,
            bandwidth_bps=bandwidth_bps,
            latency_s=latency_s,
            compute_s=compute_s,
            overlap_s=overlap_s,
        )
        results[cid] = {
            "traffic": t,
            "step": step,
            "crossover_bps": crossover_bandwidth(t, dense, latency_s=latency_s)
            if cid not in ("ddp", "local")
            else None,
        }
    return results


def from_benchmark(
    contenders: dict[str, dict[str, Any]],
    *,
    rate_bps: float,
    latency_s: float,
    ranks: int,
    shapes: Sequence[Sequence[int]],
    batch: int,
    beta_allreduce: float | None = None,
    local_costs: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Predictions for a ``sparcomm bench train`` run, from what it measured.

    Measured inputs: the link rate, the MPI latency, sparcomm's calibrated
    ``beta_allreduce``, the compute floor (the ``local`` contender's step), and each
    contender's compression compute as it ran in training: for sparcomm, its collectives'
    encode and merge phases and the time inside them no phase names; for DDP's hooks,
    ``hook_compute_s`` (the hook's body and callbacks, less their waits for its
    allreduces, timed in every step) plus DDP's own bucket work, ``local_costs["ddp"]``
    (plain DDP on a one-rank group against the bare backward, timed apart from training,
    as plain DDP is charged); reports without ``hook_compute_s`` fall back to
    ``local_costs`` of the hook (DDP with the hook on a one-rank group, timed apart).
    Bytes and message steps come from :func:`traffic`, never from the measured step.  A
    sparcomm contender's signature checks are charged as measured (``agreement``): on an
    oversubscribed machine they are waiting for the slowest rank, which no latency
    constant measured in lock-step describes.

    Returns
    -------
    dict
        As :func:`predict`: ``{id: {"traffic", "step", "crossover_bps"}}``, the crossover
        against ``ddp`` (None for ``ddp`` and ``local``).
    """
    from sparcomm._contenders import contender_specs

    specs = {s.id: s for s in contender_specs(everything=True)}
    local_costs = local_costs or {}
    compute = contenders["local"]["step_s"]
    fp16 = contenders.get("sparcomm-fp16", {}).get("phases_s")
    out: dict[str, dict[str, Any]] = {}
    for cid, entry in contenders.items():
        phases = entry.get("phases_s")
        codec = None
        codec_s = 0.0
        if phases is not None:
            # sparcomm reports its collectives' phases: encode, merge and the time no
            # named phase covers are its compute; check is agreement; exchange is what
            # the model predicts from bytes instead.
            codec_s = phases["encode"] + phases["merge"] + phases.get("other", 0.0)
            spec = specs.get(cid)
            codec = spec.codec() if spec is not None and spec.codec is not None else None
            if spec is not None and codec is not None:
                _at_scheduled_level(codec, spec.optimizer_options(), entry)
        elif entry.get("hook_compute_s") is not None:
            # The hook's own work as it ran, and DDP's bucket work around it (copies into
            # and out of its buckets, which every DDP contender does and plain DDP is
            # charged): the same DDP, without a hook, timed apart.
            codec_s = entry["hook_compute_s"] + local_costs.get("ddp", 0.0)
        elif cid in local_costs:
            codec_s = local_costs[cid]
        elif cid == "ddp-fp16" and fp16 is not None:
            codec_s = fp16["encode"] + fp16["merge"]
        t = traffic(
            cid, shapes, ranks, codec=codec, codec_s=codec_s, algorithms=entry.get("algorithms")
        )
        if phases is not None:
            t = dataclasses.replace(t, agreement_s=phases["check"])
        step = predict_step(
            t,
            bandwidth_bps=rate_bps,
            latency_s=latency_s,
            compute_s=compute,
            beta_allreduce=beta_allreduce,
        )
        out[cid] = {"traffic": t, "step": step, "crossover_bps": None}
    dense = out.get("ddp", {}).get("traffic")
    for cid, result in out.items():
        if dense is not None and cid not in ("ddp", "local"):
            result["crossover_bps"] = crossover_bandwidth(
                result["traffic"], dense, latency_s=latency_s
            )
    return out


def _at_scheduled_level(codec: Any, options: dict[str, Any], entry: dict[str, Any]) -> None:
    """Set ``codec`` (or a policy's codecs) to its scheduled level at the run's middle
    step: the median step time of a schedule that only lowers (or only raises) the
    bytes is the step time at its median step."""
    schedule = options.get("schedule")
    if schedule is None or isinstance(schedule, dict):  # per-codec schedules: not modelled
        return
    from sparcomm.schedule import as_schedule, level_parameter, set_level

    level = as_schedule(schedule)(int(entry.get("steps", 0)) // 2)
    for each in getattr(codec, "codecs", (codec,)):
        if level_parameter(each) is not None:
            set_level(each, level)


def network_outlook(
    shapes: Sequence[Sequence[int]],
    ranks: int,
    *,
    compute_s: float,
    batch: int,
    rates: Sequence[float] = (1e9, 10e9),
    latency_s: float = 50e-6,
) -> str:
    """A few lines: the predicted step of each contender at each of ``rates``.

    For programs that ran on one machine (``sparcomm demo``), whose own timings cannot
    show what a network would do.
    """
    from sparcomm._contenders import contender_specs
    from sparcomm._emulate import format_rate

    specs = [s for s in contender_specs() if s.id != "local"]
    contenders = {s.id: (s.codec() if s.codec is not None else None) for s in specs}
    seconds: dict[str, float] = {}
    lines = [
        f"predicted step on a {ranks}-rank cluster (sparcomm predict; compute "
        f"{compute_s * 1e3:.2f} ms, alpha {latency_s * 1e6:.0f} us):"
    ]
    for rate in rates:
        results = predict(
            shapes,
            ranks,
            bandwidth_bps=rate,
            latency_s=latency_s,
            compute_s=compute_s,
            contenders=contenders,
            codec_seconds=seconds,
            batch=batch,
        )
        seconds.update({cid: r["traffic"].codec_s for cid, r in results.items()})
        steps = ", ".join(f"{cid} {r['step'].total * 1e3:.1f}" for cid, r in results.items())
        lines.append(f"  {format_rate(rate)}: {steps} ms")
    return "\n".join(lines)


# -- the command ----------


def _configure(parser: argparse.ArgumentParser) -> None:
    from sparcomm._emulate import parse_link

    parser.add_argument(
        "--bandwidth",
        type=lambda text: parse_link(text).rate_bps,
        default=[1e9, 10e9],
        action="append",
        metavar="RATE",
        help="link rate per rank, e.g. 1gbit (repeatable; default 1gbit and 10gbit)",
    )
    parser.add_argument("--latency-us", type=float, default=50.0, help="alpha per message step")
    parser.add_argument("-np", "-n", dest="ranks", type=int, default=4)
    parser.add_argument(
        "--params",
        type=float,
        default=None,
        help="parameter count, as one square-ish matrix per 4M (default: the benchmark MLP)",
    )
    parser.add_argument("--compute-ms", type=float, required=True, help="step with no comm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--overlap-ms", type=float, default=0.0)


def _shapes_for(params: float | None) -> list[tuple[int, ...]]:
    if params is None:
        from sparcomm._train_tasks import make_task

        return make_task("mlp").parameter_shapes()
    side = 2048
    matrices = max(1, round(params / side**2))
    rows = max(1, round(params / matrices / side))
    return [(rows, side)] * matrices + [(rows,)] * matrices


def format_predictions(
    results: dict[str, dict[str, Any]], bandwidth_bps: float, labels: dict[str, str] | None = None
) -> str:
    """A table of :func:`predict`'s output."""
    from sparcomm._emulate import format_rate

    ddp = results.get("ddp", {}).get("step")
    lines = [
        f"at {format_rate(bandwidth_bps)}:",
        f"  {'contender':<32} {'MB/rank':>8} {'step ms':>8} {'vs DDP':>7} {'crossover':>14}",
    ]
    for cid, r in results.items():
        step, cross = r["step"], r["crossover_bps"]
        cross_text = (
            "-"
            if cross is None
            else "never"
            if cross == 0
            else "always"
            if math.isinf(cross)
            else "< " + format_rate(cross)
        )
        ratio = f"{step.total / ddp.total:.2f}" if ddp is not None else "-"
        lines.append(
            f"  {(labels or {}).get(cid, cid):<32} {r['traffic'].bytes_sent / 1e6:>8.2f} "
            f"{step.total * 1e3:>8.1f} {ratio:>7} {cross_text:>14}"
        )
    return "\n".join(lines)


@command("predict", help="predict each contender's step time and crossover bandwidth")
@arguments(_configure)
def predict_command(args: argparse.Namespace) -> int:
    from sparcomm._contenders import contender_specs

    given = args.bandwidth[2:] or args.bandwidth[:2]
    shapes = _shapes_for(args.params)
    specs = contender_specs()
    labels = {s.id: s.label for s in specs}
    contenders = {s.id: (s.codec() if s.codec is not None else None) for s in specs}
    codec_seconds: dict[str, float] = {}
    try:
        for rate in given:
            results = predict(
                shapes,
                args.ranks,
                bandwidth_bps=rate,
                latency_s=args.latency_us * 1e-6,
                compute_s=args.compute_ms * 1e-3,
                contenders=contenders,
                codec_seconds=codec_seconds,
                batch=args.batch,
                overlap_s=args.overlap_ms * 1e-3,
            )
            codec_seconds.update({cid: r["traffic"].codec_s for cid, r in results.items()})
            print(format_predictions(results, rate, labels))
    except (TypeError, ValueError) as error:
        print(f"sparcomm predict: {error}", file=sys.stderr)
        return 2
    print(
        "codec compute measured here, one thread, on random gradients; crossover: the link "
        "rate below which the contender steps faster than DDP"
    )
    return 0
