"""Single-process timings of the host passes of the user call ``allreduce(x, codec=c,
out=out)`` at 2^24 float32, each beside the sequence of passes it replaces, interleaved.

* ``sparse output``: the dense output of the sparse collectives from the merged sum of
  four ranks' top-1 % (``_sparse.finish``) against zeroing ``out`` and scattering.
* ``EF(TopK) encode``: ``ErrorFeedback(TopK(density=0.01)).encode`` with a non-zero
  residual, fused (``topk_of_sum``) against the unfused path (``add``, ``topk``, the
  kept entries cleared by NumPy), the one a TopK subclass with its own ``_encode_flat``
  takes.
* ``OneBit() encode``: the same for 1-bit SGD's error feedback
  (``onebit_encode_feedback`` against ``add``, ``onebit_encode``, decode-subtract).
* ``decode``: QSGD 4-bit and OneBit decodes of n elements into ``out`` (no peer in
  the process: run it under the commit before the change too, ``--only decode``).
* ``--only quantized``: QSGD 4-bit and TernGrad encodes (the counter-hash loops), and
  the collectives' sum of four ranks' QSGD or OneBit payloads into ``out``
  (``_sums.decode_sum``); run it under the commit before a change too.

Medians of ``--repeats`` calls after two warm-up calls, one thread
(``NUMBA_NUM_THREADS=1``, as each rank of ``sparcomm bench allreduce``).

    NUMBA_NUM_THREADS=1 python bench/user_call_kernels_cpu.py --repeats 11 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from sparcomm.kernels.cpu import merge

from sparcomm import QSGD, ErrorFeedback, OneBit, TernGrad, TopK
from sparcomm.comm import _sparse
from sparcomm.comm._sums import decode_sum


class _UnfusedTopK(TopK):
    """TopK with its own ``_encode_flat``: error feedback adds, selects, then clears."""

    def _encode_flat(self, xp, kernels, flat, stream, **options):
        return super()._encode_flat(xp, kernels, flat, stream, **options)


class _UnfusedOneBit(OneBit):
    def _encode_flat(self, xp, kernels, flat, stream, **options):
        return super()._encode_flat(xp, kernels, flat, stream, **options)


def _median_ms(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for call in cases.values():
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, call in cases.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--only",
        choices=["decode", "quantized"],
        help="only the decodes, or only the quantizers' encodes and 4-payload sums",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n = 1 << args.log2n
    xs = [np.random.default_rng([0, r, n]).standard_normal(n).astype(np.float32) for r in range(4)]
    x, out = xs[0], np.empty(n, np.float32)
    cases: dict[str, Callable[[], object]] = {}
    if args.only is None:
        topk = TopK(density=0.01)
        indices = np.unique(np.concatenate([topk.encode(v).arrays["indices"] for v in xs]))
        indices = indices.astype(np.int32)
        values = np.ones(indices.size, np.float32)
        pieces = [_sparse.Piece(0, n, indices, values)]

        def zero_scatter() -> None:
            out.fill(0)
            merge.scatter_assign(indices, values, 0, out)

        fused_ef, plain_ef = (
            ErrorFeedback(TopK(density=0.01)),
            ErrorFeedback(_UnfusedTopK(density=0.01)),
        )
        fused_ob, plain_ob = OneBit(), ErrorFeedback(_UnfusedOneBit(error_feedback=False))
        f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
        cases = {
            "sparse output: zero + scatter": zero_scatter,
            "sparse output: finish (streamed)": lambda: _sparse.finish(
                pieces, n, f32, i32, True, None, out
            ),
            "EF(TopK) encode: unfused": lambda: plain_ef.encode(x, key="x"),
            "EF(TopK) encode: fused": lambda: fused_ef.encode(x, key="x"),
            "OneBit() encode: unfused": lambda: plain_ob.encode(x, key="x"),
            "OneBit() encode: fused": lambda: fused_ob.encode(x, key="x"),
            "TopK encode (no EF)": lambda: topk.encode(x),
        }
    qsgd, onebit = QSGD(bits=4), OneBit(error_feedback=False)
    if args.only == "quantized":
        terngrad = TernGrad()
        q_payloads = [qsgd.encode(v, key="x", rank=r) for r, v in enumerate(xs)]
        o_payloads = [onebit.encode(v) for v in xs]
        cases = {
            "encode: QSGD 4-bit": lambda: qsgd.encode(x, key="x"),
            "encode: TernGrad": lambda: terngrad.encode(x, key="x"),
            "sum of 4 payloads: QSGD 4-bit": lambda: decode_sum(qsgd, q_payloads, out),
            "sum of 4 payloads: OneBit": lambda: decode_sum(onebit, o_payloads, out),
        }
    else:
        q_payload, o_payload = qsgd.encode(x), onebit.encode(x)
        cases["decode: QSGD 4-bit"] = lambda: qsgd.decode(q_payload, out=out)
        cases["decode: OneBit"] = lambda: onebit.decode(o_payload, out=out)
    load = os.getloadavg()
    result = {
        "n": n,
        "repeats": args.repeats,
        "load_1min": [load[0], os.getloadavg()[0]],
        "median_ms": _median_ms(cases, args.repeats),
    }
    result["load_1min"][1] = os.getloadavg()[0]
    print(f"load {result['load_1min'][0]:.1f} -> {result['load_1min'][1]:.1f}, n=2^{args.log2n}")
    for name, ms in result["median_ms"].items():
        print(f"{name:36s} {ms:7.2f} ms")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
