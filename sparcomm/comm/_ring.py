"""Pipelined allreduces of our own over nonblocking point-to-point (issue 11).

Two bandwidth-optimal schedules (each rank sends and receives ``2 (P - 1) / P`` of the
buffer), cut into segments so that the arithmetic on one segment overlaps the transfer
of the next, as gloo's ring does:

:func:`ring_allreduce` (float32 / float64, ``NoCompression``'s ``"ring"``)
    The buffer is cut into ``P`` chunks and every chunk into segments.  Reduce-scatter:
    in step ``s = 0 .. P-2`` rank ``r`` sends chunk ``(r - s) mod P`` to rank ``r + 1``
    and writes its own values plus what rank ``r - 1`` sends (chunk ``(r - s - 1) mod
    P``) into the output (``x`` is only read);
    allgather: in step ``t = 0 .. P-2`` it forwards chunk ``(r + 1 - t) mod P`` and
    receives chunk ``(r - t) mod P`` in place.  Each segment travels on as soon as it is
    summed (the segment's message of step ``s + 1`` depends on its message of step
    ``s`` only), so the ring streams.  **Summation order**: chunk ``c`` is the left fold
    ``((x_c + x_{c+1}) + x_{c+2}) + ... + x_{c-1}`` over ranks in ring order starting at
    rank ``c`` (indices mod ``P``); its last rank (``c - 1``) holds the sum and the
    allgather copies those bits to every rank, so the result is identical on every rank,
    and exact wherever the float sum is (integers, for example).  It differs from MPI's
    own ``Allreduce`` in the last bits only where rounding depends on the order.

:func:`half_allreduce` (``FP16``'s ``"pipelined"``)
    The quantized family's reduce-scatter + allgather with float16 on the wire and no
    payload framing: every rank rounds its buffer to float16 segment by segment and
    sends segment ``i`` of chunk ``j`` straight to chunk ``j``'s owner; the owner sums
    the ``P`` float16 values in float32 **in rank order** (``x_0 + x_1 + ... + x_{P-1}``,
    each decoded exactly; the same sum, bit for bit, as the ``reduce_scatter_allgather``
    algorithm's), rounds the sum to float16 once and sends it to every rank, which
    decodes it into the output: one encode pass, the owner's sum, one decode pass.
    **Schedule**: every receive is posted first; the scatter's sends of every segment
    are posted as they are encoded (each leaves while the next is encoded, the owners
    in ring order from the right neighbour); then one polling loop sums each of the
    owner's segments as soon as its ``P - 1`` pieces are in, sends the sum to every
    rank at once, and decodes every sum that arrived, testing the requests between
    these steps, so that MPI's progress engine keeps the sockets fed while a rank sums
    or decodes.  Measured against the same pipeline waiting on one segment at a time,
    and against schedules with one flow in and one out per rank (a window of scatter
    sends, a ring or one-at-a-time allgather, lockstep shifted rounds), in
    docs/benchmarks.md ("Float16 schedules"): the flows' incast was not what slowed it.

Both keep every posted message's buffer untouched until its request completes: a
region of the buffer is overwritten by the ring's allgather only after the send that
read it has completed.  Messages go on the caller's private communicator with tags of
their own (``_TAG_RING``), so they cannot match another collective's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from mpi4py import MPI

from sparcomm._backend import kernels_for
from sparcomm.comm._waiting import DEFAULT_PAUSE_S, PAUSE_GROWTH
from sparcomm.comm._waiting import wait as _wait
from sparcomm.comm._waiting import waitall as _waitall

#: Tag base of the ring's messages (the private communicator's other exchanges use
#: ``1 << 10`` and ``2 << 10``).
_TAG_RING = 3 << 10
_TAG_HALF_SCATTER = 4 << 10
_TAG_HALF_GATHER = 5 << 10
#: The pipelines cut each rank's chunk into this many segments (more overlap of the
#: sums with the transfers, but every MPI message over libfabric's tcp provider costs a
#: handshake), within [MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES] of wire data.  Measured in
#: the emulated 1 Gbit/s cluster (docs/benchmarks.md, issue 11) on 16-24 MiB buckets:
#: 128 KiB segments were 1.2-1.6x gloo, 512 KiB 1.0-1.2x, 1-4 MiB 1.0-1.1x; float16
#: chunks in 3-4 segments 1.02x DDP's fp16 hook, in 1-2 segments 1.13-1.39x.
SEGMENTS_PER_CHUNK = 4
MIN_SEGMENT_BYTES = 256 << 10
MAX_SEGMENT_BYTES = 4 << 20


def default_segment_bytes(chunk_bytes: int, itemsize: int = 1) -> int:
    """The segment of a pipeline whose chunks hold ``chunk_bytes`` of wire data: a
    multiple of ``itemsize``, so that a chunk is cut into at most
    :data:`SEGMENTS_PER_CHUNK` segments (rounded down to whole elements, a quarter of
    the bytes could leave a fifth segment of one element)."""
    quarter = -(-chunk_bytes // SEGMENTS_PER_CHUNK)
    whole = -(-quarter // itemsize) * itemsize
    return max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, whole))


def default_segment_elements(chunk_elements: int, itemsize: int) -> int:
    """Elements per segment of a pipeline whose chunks hold ``chunk_elements`` items."""
    return _segment_elements(default_segment_bytes(chunk_elements * itemsize, itemsize), itemsize)


_MPI_TYPES = {
    np.dtype(np.float16): MPI.UINT16_T,  # moved as bits: MPI has no standard float16
    np.dtype(np.float32): MPI.FLOAT,
    np.dtype(np.float64): MPI.DOUBLE,
}


def chunk_bounds(n: int, size: int) -> np.ndarray:
    """``size + 1`` offsets of near-equal chunks (the first ``n % size`` one longer)."""
    base, extra = divmod(n, size)
    lengths = np.full(size, base, dtype=np.int64)
    lengths[:extra] += 1
    bounds = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    return bounds


def _segments(start: int, stop: int, segment: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into pieces of at most ``segment`` elements (at least one
    piece, possibly empty, so that every chunk has the same number of messages on both
    sides of a link when the chunk lengths agree)."""
    return [(a, min(stop, a + segment)) for a in range(start, stop, segment)] or [(start, start)]


def _segment_elements(segment_bytes: int, itemsize: int) -> int:
    if segment_bytes < itemsize:
        raise ValueError(f"segment_bytes must be at least {itemsize}, got {segment_bytes}")
    return segment_bytes // itemsize


def half_segment_elements(n: int, size: int) -> int:
    """Elements per segment of :func:`half_allreduce`'s default pipeline: its largest
    chunk, float16 on the wire."""
    return default_segment_elements(int(chunk_bounds(n, size)[1]), 2)


def half_segment_count(n: int, size: int) -> int:
    """Segments :func:`half_allreduce`'s default pipeline cuts its largest chunk into
    (the cost model's overlap, ``Prediction.segments``)."""
    return len(_segments(0, int(chunk_bounds(n, size)[1]), half_segment_elements(n, size)))


def ring_allreduce_inplace(
    comm: MPI.Comm,
    buffer: np.ndarray,
    *,
    segment_bytes: int | None = None,
    pause_s: float | None = DEFAULT_PAUSE_S,
) -> tuple[int, int]:
    """:func:`ring_allreduce` of ``buffer`` into itself."""
    return ring_allreduce(comm, buffer, buffer, segment_bytes=segment_bytes, pause_s=pause_s)


def ring_allreduce(
    comm: MPI.Comm,
    x: np.ndarray,
    out: np.ndarray,
    *,
    segment_bytes: int | None = None,
    pause_s: float | None = DEFAULT_PAUSE_S,
    scratch: Any = None,
) -> tuple[int, int]:
    """Sum ``x`` (1-D, float32 or float64, contiguous) over ``comm`` into ``out`` (``x``'s
    size and dtype; may be ``x``) with the pipelined ring; returns this rank's (sent,
    received) bytes.

    ``x`` is only read (unless it is ``out``): its first chunk is sent from it and the
    reduce-scatter writes ``x + received`` into ``out``, so no copy of ``x`` is made.
    Every rank must call it with the same size and dtype.  See the module docstring for
    the schedule and the summation order.  ``scratch(name, size, dtype)`` optionally
    gives a reusable buffer for the reduce-scatter's receives.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1 or x.size == 0:
        if out is not x:
            out[...] = x
        return 0, 0
    buffer = out
    datatype = _MPI_TYPES[buffer.dtype]
    bounds = chunk_bounds(buffer.size, size)
    if segment_bytes is None:
        segment = default_segment_elements(int(bounds[1]), buffer.itemsize)
    else:
        segment = _segment_elements(segment_bytes, buffer.itemsize)
    # Every chunk cut the same way: a chunk's pieces by index (chunks differ by at most
    # one element, so they have the same number of pieces unless a boundary falls
    # exactly; cut each chunk into the same count to keep the stream aligned).
    pieces = max(1, -(-int(bounds[1] - bounds[0]) // segment))
    cuts = [
        [
            (int(bounds[c]) + (int(bounds[c + 1] - bounds[c]) * i) // pieces,
             int(bounds[c]) + (int(bounds[c + 1] - bounds[c]) * (i + 1)) // pieces)
            for i in range(pieces)
        ]
        for c in range(size)
    ]  # fmt: skip
    steps = size - 1
    total = 2 * steps * pieces  # messages each way: reduce-scatter, then allgather
    right, left = (rank + 1) % size, (rank - 1) % size

    def region(message: int, sending: bool) -> tuple[int, int]:
        step, piece = divmod(message, pieces)
        if step < steps:  # reduce-scatter
            chunk = (rank - step) % size if sending else (rank - step - 1) % size
        else:
            step -= steps
            chunk = (rank + 1 - step) % size if sending else (rank - step) % size
        return cuts[chunk][piece]

    largest = max(b - a for a, b in cuts[0])
    # Reduce-scatter receives land in a scratch slot and are added; the allgather's
    # receive straight into the buffer.  One slot per reduce-scatter message: no reuse.
    count = steps * pieces * largest
    dtype = buffer.dtype
    slots = np.empty(count, dtype) if scratch is None else scratch("ring", count, dtype)
    sends: list[Any] = [None] * total
    recvs: list[Any] = [None] * total
    sent = received = 0

    def post_send(message: int) -> None:
        nonlocal sent
        a, b = region(message, True)
        # Step 0 sends this rank's own values; later steps what it summed into out.
        source = x if message < pieces else buffer
        sends[message] = comm.Isend([source[a:b], datatype], right, _TAG_RING)
        sent += (b - a) * buffer.itemsize

    def post_recv(message: int) -> None:
        nonlocal received
        a, b = region(message, False)
        if message < steps * pieces:
            target = slots[message * largest : message * largest + (b - a)]
        else:
            # The allgather overwrites a region this rank sent in reduce-scatter step
            # (message - steps * pieces): that send must have completed.
            _wait(sends[message - steps * pieces], pause_s)
            target = buffer[a:b]
        recvs[message] = comm.Irecv([target, datatype], left, _TAG_RING)
        received += (b - a) * buffer.itemsize

    for message in range(steps * pieces):
        post_recv(message)
    for message in range(pieces):
        post_send(message)
    posted = steps * pieces
    for message in range(total):
        _wait(recvs[message], pause_s)
        if message < steps * pieces:
            a, b = region(message, False)
            received_part = slots[message * largest : message * largest + (b - a)]
            np.add(x[a:b], received_part, out=buffer[a:b])
        if message + pieces < total:
            post_send(message + pieces)
        # Keep the allgather's receives a step ahead (posting waits on an old send).
        while posted < total and posted <= message + pieces:
            post_recv(posted)
            posted += 1
    _waitall([request for request in sends if request is not None], pause_s)
    return sent, received


def half_buffers(
    x: np.ndarray, size: int, rank: int, segment: int, scratch: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """The float16 pipeline's buffers and cuts on one rank: ``(encoded, sums, incoming,
    total, bounds, pieces)``.

    ``encoded``: this rank's float16 values (the scatter's sends read them); ``sums``:
    the owners' float16 sums (the gather's receives write them), two buffers so that no
    receive lands in a region a pending send reads; ``incoming``: every rank's float16
    values of this rank's chunk, one row per rank (its own row unused); ``total``: one
    segment of float32/float64 sum; ``bounds``: the chunks; ``pieces``: every chunk cut
    into segments of at most ``segment`` elements.
    """
    n = x.size
    encoded = scratch("half_encoded", n, np.float16)
    sums = scratch("half_sums", n, np.float16)
    bounds = chunk_bounds(n, size)
    length = int(bounds[rank + 1] - bounds[rank])
    incoming = scratch("half_incoming", size * length, np.float16).reshape(size, length)
    total = scratch("half_total", min(segment, max(length, 1)), x.dtype)
    pieces = [_segments(int(bounds[j]), int(bounds[j + 1]), segment) for j in range(size)]
    return encoded, sums, incoming, total, bounds, pieces


def sum_owned_piece(
    kernels: Any,
    encoded: np.ndarray,
    incoming: np.ndarray,
    total: np.ndarray,
    sums: np.ndarray,
    rank: int,
    own_a: int,
    a: int,
    b: int,
) -> int:
    """``sums[a:b]``: every rank's float16 values of this rank's piece ``[a, b)`` decoded
    and summed in ``total``'s dtype **in rank order** (the same sum on every rank, bit for
    bit ``reduce_scatter_allgather``'s), rounded once; returns the non-finite sums."""
    part = total[: b - a]
    for source in range(incoming.shape[0]):
        values = encoded[a:b] if source == rank else incoming[source, a - own_a : b - own_a]
        kernels.fp16_decode(values, part, 0 if source == 0 else 1)
    with np.errstate(over="ignore"):
        return int(kernels.fp16_encode(part, sums[a:b]))


def half_allreduce(
    comm: MPI.Comm,
    x: np.ndarray,
    out: np.ndarray,
    *,
    segment_bytes: int | None = None,
    scratch: Any = None,
    pause_s: float | None = DEFAULT_PAUSE_S,
) -> tuple[int, int, int, int]:
    """Sum ``x`` (1-D float32/float64) into ``out`` with float16 on the wire.

    Returns ``(sent, received, bad, failed)``: this rank's bytes, the number of
    non-finite float16 values this rank produced (its input's NaN, Inf or values past
    float16's range, and its owned sums that overflowed), and the highest rank that
    produced any (-1: none; the same on every rank).  ``failed >= 0`` means every rank
    must raise: ``out`` holds garbage.  ``out``
    may be ``x``.  ``scratch(name, size, dtype)`` gives reusable work buffers.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    n = x.size
    kernels = kernels_for(np)
    if scratch is None:

        def scratch(name: str, count: int, dtype: Any) -> np.ndarray:
            return np.empty(count, dtype=dtype)

    if size == 1:
        encoded = scratch("half_encoded", n, np.float16)
        bad = int(kernels.fp16_encode(x, encoded))
        kernels.fp16_decode(encoded, out, 0)
        return 0, 0, bad, (0 if bad else -1)
    if segment_bytes is None:
        segment = half_segment_elements(n, size)
    else:
        segment = _segment_elements(segment_bytes, 2)
    encoded, sums, incoming, total, bounds, pieces = half_buffers(x, size, rank, segment, scratch)
    bits, sum_bits, incoming_bits = (b.view(np.uint16) for b in (encoded, sums, incoming))
    own_a = int(bounds[rank])
    mine = pieces[rank]
    datatype = MPI.UINT16_T
    requests: list[Any] = []
    scatter_recvs: list[list[Any]] = [[] for _ in mine]
    gather_recvs: list[Any] = []
    gathering: list[tuple[int, int]] = []  # the region of each gather receive
    depth = max(len(p) for p in pieces)
    sent = received = 0
    # Post every receive first: my chunk's pieces from every rank, then every owner's
    # sums, piece by piece (the order in which they are decoded).
    for offset in range(1, size):
        source = (rank - offset) % size
        for i, (a, b) in enumerate(mine):
            if b > a:
                view = incoming_bits[source, a - own_a : b - own_a]
                scatter_recvs[i].append(comm.Irecv([view, datatype], source, _TAG_HALF_SCATTER))
                received += 2 * (b - a)
    for i in range(depth):
        for offset in range(1, size):
            source = (rank - offset) % size
            if i < len(pieces[source]) and pieces[source][i][1] > pieces[source][i][0]:
                a, b = pieces[source][i]
                gather_recvs.append(comm.Irecv([sum_bits[a:b], datatype], source, _TAG_HALF_GATHER))
                gathering.append((a, b))
                received += 2 * (b - a)
    bad = 0
    # Encode and send piece by piece, the owners in ring order from the right
    # neighbour (the senders spread over the owners instead of queueing at one).
    for i in range(depth):
        for offset in range(1, size + 1):
            dest = (rank + offset) % size
            if i >= len(pieces[dest]):
                continue
            a, b = pieces[dest][i]
            if b == a:
                continue
            bad += kernels.fp16_encode(x[a:b], encoded[a:b])
            if dest != rank:
                requests.append(comm.Isend([bits[a:b], datatype], dest, _TAG_HALF_SCATTER))
                sent += 2 * (b - a)
    # One loop sums my pieces as they complete, sends each sum to every rank and decodes
    # every arrived sum into ``out``, testing the requests in between: MPI progresses
    # while this rank sums and decodes, instead of waiting for one piece at a time.
    # (``out`` may be ``x``: a region's sum arrives after every rank encoded it.)
    status = np.array([-1], dtype=np.int64)
    failed = np.full(1, -1, dtype=np.int64)
    reduction: Any = None
    summed = gathered = 0
    delay = pause_s or 0.0
    while reduction is None or gathered < len(gather_recvs):
        progressed = False
        while gathered < len(gather_recvs) and gather_recvs[gathered].Test():
            a, b = gathering[gathered]
            kernels.fp16_decode(sums[a:b], out[a:b], 0)
            gathered += 1
            progressed = True
        if summed < len(mine) and MPI.Request.Testall(scatter_recvs[summed]):
            a, b = mine[summed]
            if b > a:
                bad += sum_owned_piece(kernels, encoded, incoming, total, sums, rank, own_a, a, b)
                for offset in range(1, size):
                    dest = (rank + offset) % size
                    requests.append(comm.Isend([sum_bits[a:b], datatype], dest, _TAG_HALF_GATHER))
                    sent += 2 * (b - a)
                kernels.fp16_decode(sums[a:b], out[a:b], 0)
            summed += 1
            progressed = True
        if reduction is None and summed == len(mine):
            # Every rank learns which rank (the highest) met a non-finite value, its
            # input's or an owned sum's, while the gather completes: one small
            # nonblocking reduction.
            status[0] = rank if bad else -1
            reduction = comm.Iallreduce(status, failed, op=MPI.MAX)
            progressed = True
        if progressed:
            delay = pause_s or 0.0
        elif pause_s is not None:
            time.sleep(delay)
            delay = min(2 * delay, PAUSE_GROWTH * pause_s)
    _waitall([*requests, reduction], pause_s)
    return sent, received, int(bad), int(failed[0])
