"""``sparcomm bench codecs``: codec speed against the machine and a plain NumPy peer.

Every figure is a ratio to something measured in the same run on the same buffer:

* ``read``: one streamed read of the input (``kernels.stream_read``), the physical limit
  of any codec that must look at every element once;
* ``numpy``: a plain NumPy implementation of the same codec (``kernels/reference.py``;
  for TopK the usual ``np.argpartition`` on ``|x|``).

Timings are medians over ``--repeats`` runs after one warm-up call (which also compiles).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from sparcomm.cli import arguments, command

DEFAULT_SIZES = (20, 24, 26)


def _median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up: JIT compilation, page faults of fresh buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _codecs() -> list[tuple[str, Any]]:
    """The codec registry's presets tagged ``"bench"``, labelled by preset."""
    from sparcomm.codecs import CODECS

    return [(p.label, p.make()) for p in CODECS.presets("bench")]


def _numpy_peer(codec: Any, x: np.ndarray) -> Callable[[], Any]:
    """A plain NumPy implementation of the codec's encode, for the same input."""
    from sparcomm.codecs.qsgd import NORMS, n_buckets, packed_nbytes
    from sparcomm.kernels import reference

    n = x.size
    name = type(codec).__name__
    if name == "NoCompression":
        return lambda: x.copy()
    if name == "FP16":
        return lambda: x.astype(np.float16)
    if name == "TopK":
        k = codec.k_for(n)
        return lambda: np.argpartition(np.abs(x), n - k)[n - k :]
    if name == "QSGD":
        scales = np.empty(n_buckets(n, codec.bucket_size), x.dtype)
        packed = np.empty(packed_nbytes(n, codec.bits), np.uint8)
        return lambda: reference.qsgd_encode(
            x, codec.levels, codec.bits, codec.bucket_size, NORMS[codec.norm], 1, scales, packed
        )
    if name == "TernGrad":
        bucket = codec.bucket_for(n)
        scales = np.empty(n_buckets(n, bucket), x.dtype)
        packed = np.empty(packed_nbytes(n, 2), np.uint8)

        def terngrad() -> None:
            reference.max_abs(x, bucket, scales)
            reference.terngrad_encode(x, scales, bucket, np.inf, 1, packed)

        return terngrad
    if name == "OneBit":
        means = np.empty(2 * n_buckets(n, codec.bucket_size), x.dtype)
        packed = np.empty(packed_nbytes(n, 1), np.uint8)
        return lambda: reference.onebit_encode(x, codec.bucket_size, packed, means)
    raise ValueError(f"no NumPy peer for {name}")


def bench_codecs(
    sizes: list[int],
    dtype: str = "float32",
    repeats: int = 7,
    numpy_repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure every codec at every size; one dict per (size, codec)."""
    from tqdm import tqdm

    from sparcomm.kernels import cpu

    rows = []
    codecs = _codecs()
    bar = tqdm(
        total=len(sizes) * len(codecs), disable=not progress, desc="bench codecs", file=sys.stderr
    )
    for log2n in sizes:
        n = 1 << log2n
        x = np.random.default_rng(seed).standard_normal(n, dtype=np.float64).astype(dtype)
        read = _median_seconds(partial(cpu.stream_read, x), repeats)
        for label, codec in codecs:
            bar.set_postfix_str(f"2^{log2n} {label}")
            payload = codec.encode(x, key="bench", step=0)
            out = np.empty_like(x)
            encode = _median_seconds(partial(codec.encode, x, key="bench", step=0), repeats)
            decode = _median_seconds(partial(codec.decode, payload, out=out), repeats)
            peer = _median_seconds(_numpy_peer(codec, x), numpy_repeats)
            rows.append(
                {
                    "codec": label,
                    "n": n,
                    "log2n": log2n,
                    "dtype": dtype,
                    "encode_s": encode,
                    "decode_s": decode,
                    "read_s": read,
                    "numpy_encode_s": peer,
                    "encode_gbps": x.nbytes / encode / 1e9,
                    "decode_gbps": x.nbytes / decode / 1e9,
                    "payload_bytes": payload.nbytes,
                    "compression_ratio": x.nbytes / payload.nbytes,
                    "encode_over_read": encode / read,
                    "speedup_over_numpy": peer / encode,
                }
            )
            bar.update()
    bar.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'n':>6} {'codec':<20} {'encode ms':>10} {'decode ms':>10} {'enc GB/s':>9} "
        f"{'ratio':>7} {'enc/read':>9} {'vs numpy':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{'2^' + str(row['log2n']):>6} {row['codec']:<20} {row['encode_s'] * 1e3:>10.2f} "
            f"{row['decode_s'] * 1e3:>10.2f} {row['encode_gbps']:>9.2f} "
            f"{row['compression_ratio']:>6.1f}x {row['encode_over_read']:>8.2f}x "
            f"{row['speedup_over_numpy']:>8.1f}x"
        )
    return "\n".join(lines)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="LOG2N",
        help="log2 of the element counts (default 20 24 26)",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure")
    parser.add_argument(
        "--numpy-repeats", type=int, default=3, help="timed runs of the (slow) NumPy peers"
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON rows to FILE")


@command("bench", "codecs", help="encode/decode speed of every codec vs streamed read and NumPy")
@arguments(_configure)
def run(args: argparse.Namespace) -> int:
    import numba

    if args.device == "gpu":
        from sparcomm._cli_bench_codecs_gpu import bench_codecs_gpu  # raises without CuPy/GPU

        rows = bench_codecs_gpu(args.sizes, args.dtype, args.repeats)
    else:
        rows = bench_codecs(args.sizes, args.dtype, args.repeats, args.numpy_repeats)
    result = {"threads": numba.get_num_threads(), "device": args.device, "rows": rows}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(
            f"device {args.device}, {result['threads']} numba threads, medians of "
            f"{args.repeats} runs ({args.numpy_repeats} for NumPy peers)"
        )
        print(format_table(rows) if args.device == "cpu" else json.dumps(rows, indent=2))
    return 0
