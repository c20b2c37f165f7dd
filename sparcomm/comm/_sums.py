"""The sum of decoded payloads in rank order, as the quantized collectives run it.

Shared by the collectives (:mod:`._quantized`) and the cost model's calibration
(:mod:`._cost`), which prices one more payload of this sum as ``decode_add``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparcomm._backend import kernels_for
from sparcomm.comm._quantized_layout import chunk_alignment
from sparcomm.payload import Payload

#: Elements per block of :func:`decode_sum` on the host: the block of the sum (1 MiB of
#: float32) stays in cache while every payload's block is added to it, instead of
#: streaming a chunk-sized buffer through memory once per rank.
SUM_BLOCK = 1 << 18


#: Elements from which the host sums payloads with the codec's fused kernel where it has
#: one (``Codec._decode_sum_flat``: every payload added to each block of ``out`` in
#: cache, ``out`` written once); below it the kernel's argument lists cost more than the
#: passes they save.
FUSED_SUM_MIN = 1 << 16


def decode_sum(codec: Any, payloads: list[Payload], out: Any, blocked: bool = True) -> None:
    """``out = sum of decode(p)`` in list order (rank order: the same on every rank), each
    payload added in its decode pass (``decode(..., accumulate=1)``).

    ``blocked`` (host arrays) runs the codec's fused kernel (QSGD, OneBit), or else works
    block by block (blocks of whole buckets, see ``Codec.slice_payload``), so that a block
    of ``out`` stays in cache while every payload is added to it; every element is still
    the same rank-order sum, so the result depends on neither.  On the device one launch
    per payload covers all of ``out``.
    """
    n = out.size
    if blocked and len(payloads) > 1 and n >= FUSED_SUM_MIN:
        for payload in payloads:
            codec.check_payload(payload)
            if payload.n != n or payload.dtype != out.dtype:
                raise ValueError(
                    f"a payload of {payload.n} x {payload.dtype} cannot be summed into "
                    f"{n} x {out.dtype}: corrupted payload"
                )
        if codec._decode_sum_flat(kernels_for(np), payloads, out):
            return
    align = chunk_alignment(codec)
    block = max(align, SUM_BLOCK // align * align) if blocked else n
    # An overflowing sum becomes inf, as in MPI's own Allreduce; an owner then refuses
    # to re-encode it, and every rank raises (see reduce_scatter_allgather).
    with np.errstate(over="ignore"):
        for start in range(0, n, block):
            stop = min(n, start + block)
            target = out[start:stop]
            parts = (
                payloads
                if stop - start == n
                else [codec.slice_payload(p, start, stop) for p in payloads]
            )
            codec.decode(parts[0], out=target)
            for part in parts[1:]:
                codec.decode(part, out=target, accumulate=1)
