"""The sparse allreduce family of SparCML: allgather, SSAR recursive doubling, SSAR
split-allgather and DSAR split-allgather.

Renggli, Ashkboos, Aghagolzadeh, Alistarh, Hoefler, "SparCML: High-Performance Sparse
Communication for Machine Learning", SC'19, Section 4.  Each algorithm takes this rank's
sorted, duplicate-free stream ``(indices, values)`` and returns the sum of every rank's
stream as a list of :class:`Piece` objects that tile ``[0, n)``; :func:`finish` turns
them into the dense or sparse output.  Algorithms are chosen by name from
:data:`ALGORITHMS`.

Every rank ends with the same bits: either one owner computes each entry and the others
receive it (split-allgather, DSAR), every rank merges the same streams with the same
fixed tree (allgather), or partners merge the same two operands, the lower rank's
first (recursive doubling; IEEE addition is commutative, so ``a + b`` on one rank equals
``b + a`` on the other).  No algorithm depends on arrival order.

Dense switch (SparCML's rule): a stream of ``K`` entries is sent sparse while
``K * (index bytes + value bytes) < length * value bytes`` and dense otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from sparcomm.comm._context import Channel
from sparcomm.kernels.cpu import merge as _merge

# Tags of the point-to-point messages in recursive doubling (a block of four per step).
_TAG_INDICES, _TAG_VALUES = 1, 2


@dataclass
class Piece:
    """Part ``[start, stop)`` of the result: sparse (global ``indices`` + ``values``) or
    dense (``indices is None`` and ``values`` has ``stop - start`` entries)."""

    start: int
    stop: int
    indices: np.ndarray | None
    values: np.ndarray

    @property
    def dense(self) -> bool:
        return self.indices is None

    @property
    def nnz(self) -> int:
        return self.values.size


@dataclass
class Problem:
    """One rank's input to a sparse algorithm (validated, on the wire dtypes)."""

    channel: Channel
    n: int
    indices: np.ndarray  # ascending, unique, dtype index_dtype
    values: np.ndarray  # float32 / float64
    k_all: np.ndarray  # every rank's k, in rank order
    out: np.ndarray | None = None  # the caller's dense output buffer, when it asked for one
    scratch: Callable[[str, int, np.dtype], np.ndarray] | None = None  # reusable buffers

    @property
    def entry_bytes(self) -> int:
        return self.indices.dtype.itemsize + self.values.dtype.itemsize

    def goes_dense(self, count: int, length: int) -> bool:
        """SparCML's switch: dense when sparse would be no smaller."""
        return count * self.entry_bytes >= length * self.values.dtype.itemsize


def split_bounds(n: int, size: int) -> np.ndarray:
    """Index ranges of the split algorithms: owner ``j`` holds ``[b_j, b_{j+1})``,
    ``b_j = j * n // size`` (sizes differ by at most one when ``size`` does not divide n)."""
    return (np.arange(size + 1, dtype=np.int64) * n) // size


# ------------------------------------------------------------------------ helpers


def _buffer(problem: Problem, name: str, size: int, dtype: np.dtype) -> np.ndarray:
    """A temporary that does not outlive the call: reused across calls when possible."""
    if problem.scratch is None:
        return np.empty(size, dtype)
    return problem.scratch(name, size, dtype)


def _merge_streams(
    problem: Problem,
    indices: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    result_is_temporary: bool,
):
    """Merge-and-sum the streams; the output is scratch when the caller only sends it."""
    total = indices.size
    if result_is_temporary:
        out_i = _buffer(problem, "merge_out_i", total, indices.dtype)
        out_v = _buffer(problem, "merge_out_v", total, values.dtype)
    else:
        out_i = np.empty(total, indices.dtype)
        out_v = np.empty(total, values.dtype)
    work_i = _buffer(problem, "merge_work_i", total, indices.dtype)
    work_v = _buffer(problem, "merge_work_v", total, values.dtype)
    count = _merge.merge_sum_streams(indices, values, offsets, out_i, out_v, work_i, work_v)
    return out_i[:count], out_v[:count]


def _densify(indices: np.ndarray, values: np.ndarray, start: int, length: int) -> np.ndarray:
    if indices.size == length:  # sorted, unique, in range and full: already dense
        return values.copy()
    dense = np.zeros(length, dtype=values.dtype)
    _merge.scatter_assign(indices, values, start, dense)
    return dense


# ---------------------------------------------------------------------- allgather


def allgather(problem: Problem) -> list[Piece]:
    """Every rank gathers every stream and merges them (Horovod's and GRACE's sparse path).

    Cost: two steps (signature check, one exchange) ``2 alpha``, ``beta (P - 1) k (i + v)``
    bytes out per rank, and a merge of ``P k`` entries over ``log2 P`` tree levels.
    """
    channel, stats = problem.channel, problem.channel.stats
    with stats._phase("allgather"):
        total = int(problem.k_all.sum())
        (indices, offsets), (values, _) = channel.allgatherv_many(
            [problem.indices, problem.values],
            [problem.k_all, problem.k_all],
            recvs=[
                _buffer(problem, "gather_i", total, problem.indices.dtype),
                _buffer(problem, "gather_v", total, problem.values.dtype),
            ],
        )
    with stats._phase("merge"):
        out_i, out_v = _merge_streams(problem, indices, values, offsets, False)
    return [Piece(0, problem.n, out_i, out_v)]


# ------------------------------------------------------------- recursive doubling


@dataclass
class _Stream:
    indices: np.ndarray | None  # None: dense
    values: np.ndarray


def _combine(low: _Stream, high: _Stream, problem: Problem) -> _Stream:
    """Sum two streams, ``low`` (the lower-ranked group's) as the left operand."""
    if low.indices is not None and high.indices is not None:
        total = low.values.size + high.values.size
        out_i = np.empty(total, low.indices.dtype)
        out_v = np.empty(total, low.values.dtype)
        count = _merge.merge_sum_two(
            low.indices, low.values, high.indices, high.values, out_i, out_v
        )
        if problem.goes_dense(count, problem.n):
            return _Stream(None, _densify(out_i[:count], out_v[:count], 0, problem.n))
        return _Stream(out_i[:count], out_v[:count])
    if low.indices is None and high.indices is None:
        return _Stream(None, low.values + high.values)
    dense, sparse = (low, high) if low.indices is None else (high, low)
    out = dense.values.copy()
    _merge.scatter_accumulate(sparse.indices, sparse.values, 0, out)  # d + s == s + d
    return _Stream(None, out)


def load_kernels(index_dtype: np.dtype, value_dtype: np.dtype) -> None:
    """Compile (or load from Numba's cache) every merge kernel the sparse algorithms may
    call for these dtypes, including the data-dependent ones (a range that arrives partly
    dense, a sum that goes dense), so that none compiles inside a timed call."""
    i, v = np.zeros(1, index_dtype), np.zeros(1, value_dtype)
    out_i, out_v = np.empty(2, index_dtype), np.empty(2, value_dtype)
    _merge.merge_sum_two(i, v, i, v, out_i, out_v)
    offsets = np.array([0, 1], np.int64)
    _merge.merge_sum_streams(i, v, offsets, out_i, out_v, out_i.copy(), out_v.copy())
    _merge.range_offsets(i, offsets, np.empty(2, np.int64))
    _merge.scatter_assign(i, v, 0, np.zeros(1, value_dtype))
    _merge.scatter_accumulate(i, v, 0, np.zeros(1, value_dtype))
    _merge.scatter_dense(i, v, 0, np.zeros(1, value_dtype), False, value_dtype.type(1))


def _sends(stream: _Stream, dest: int, tag: int, index_dtype: np.dtype) -> list:
    """Indices and values; a dense stream sends no indices (an empty message)."""
    indices = stream.indices if stream.indices is not None else np.empty(0, index_dtype)
    return [(indices, dest, tag + _TAG_INDICES), (stream.values, dest, tag + _TAG_VALUES)]


def _receive_buffers(problem: Problem, source: int, tag: int, bound: int):
    """Receives for a stream of at most ``bound`` entries, dense or sparse: buffers sized
    by the bound (untouched memory costs nothing), so no count message is needed."""
    bound = min(bound, problem.n)
    may_be_dense = problem.goes_dense(bound, problem.n)
    index_dtype = problem.indices.dtype if bound else np.dtype(np.int64)
    indices = np.empty(bound, index_dtype)
    values = np.empty(problem.n if may_be_dense else bound, problem.values.dtype)
    return (
        indices,
        values,
        [(indices, source, tag + _TAG_INDICES), (values, source, tag + _TAG_VALUES)],
    )


def _as_stream(problem: Problem, indices, values, counts: list[int]) -> _Stream:
    """A dense stream arrives as no indices and ``n`` values (a sparse one always has
    fewer values than ``n``, by the dense switch)."""
    index_count, value_count = counts[-2], counts[-1]
    if index_count == 0 and value_count == problem.n:
        return _Stream(None, values[: problem.n])
    return _Stream(
        indices[:index_count].astype(problem.indices.dtype, copy=False), values[:value_count]
    )


def _send_one_way(channel: Channel, problem: Problem, stream: _Stream, dest: int, tag: int):
    channel.transfer(_sends(stream, dest, tag, problem.indices.dtype), [])


def _recv_one_way(channel: Channel, problem: Problem, source: int, tag: int, bound: int):
    indices, values, receives = _receive_buffers(problem, source, tag, bound)
    return _as_stream(problem, indices, values, channel.transfer([], receives))


def _swap(channel, problem: Problem, mine: _Stream, partner: int, tag: int, bound: int):
    """Exchange streams with ``partner``, whose stream has at most ``bound`` entries:
    indices and values both ways in flight together, one wait."""
    indices, values, receives = _receive_buffers(problem, partner, tag, bound)
    counts = channel.transfer(_sends(mine, partner, tag, problem.indices.dtype), receives)
    return _as_stream(problem, indices, values, counts)


def recursive_doubling(problem: Problem) -> list[Piece]:
    """SSAR recursive doubling: ``log2 P`` rounds of exchange-and-merge with rank ``r ^ 2^j``.

    For ``P`` not a power of two, ranks ``P' .. P-1`` (``P'`` the largest power of two
    below ``P``) first fold their stream into rank ``r - P'`` and receive the result at the
    end.  A stream switches to dense as soon as its merged count makes sparse larger.
    """
    channel, stats = problem.channel, problem.channel.stats
    rank, size = channel.rank, channel.size
    low_size = 1 << (size.bit_length() - 1)
    extra = size - low_size
    # A copy: with one rank the input would otherwise come back as the result.
    stream = _Stream(problem.indices.copy(), problem.values.copy())
    if problem.goes_dense(problem.values.size, problem.n):
        stream = _Stream(None, _densify(problem.indices, problem.values, 0, problem.n))
    fold_tag, unfold_tag = 0, 4 * (low_size.bit_length() + 1)
    k_all = problem.k_all

    def group_bound(first: int, count: int) -> int:
        """Entries held by the group of low ranks ``first .. first + count - 1``."""
        members = list(range(first, first + count))
        members += [q + low_size for q in members if q < extra]
        return int(sum(int(k_all[q]) for q in members))

    with stats._phase("exchange"):
        if rank >= low_size:
            _send_one_way(channel, problem, stream, rank - low_size, fold_tag)
            stream = _recv_one_way(channel, problem, rank - low_size, unfold_tag, int(k_all.sum()))
        else:
            if rank < extra:
                theirs = _recv_one_way(
                    channel, problem, rank + low_size, fold_tag, int(k_all[rank + low_size])
                )
                stream = _combine(stream, theirs, problem)
            mask, step = 1, 1
            while mask < low_size:
                partner = rank ^ mask
                bound = group_bound(partner & ~(mask - 1), mask)
                theirs = _swap(channel, problem, stream, partner, 4 * step, bound)
                # The lower-ranked group's stream is always the left operand.
                low, high = (stream, theirs) if rank < partner else (theirs, stream)
                stream = _combine(low, high, problem)
                mask <<= 1
                step += 1
            if rank < extra:
                _send_one_way(channel, problem, stream, rank + low_size, unfold_tag)
    if stream.indices is None:
        stats.dense_ranges = 1
    return [Piece(0, problem.n, stream.indices, stream.values)]


# -------------------------------------------------------------- split-allgather


def _reduce_scatter(problem: Problem, bounds: np.ndarray, switch: bool) -> Piece:
    """Sparse reduce-scatter: send each index range to its owner, who merges in rank order.

    With ``switch`` (DSAR) a part is sent dense when that is no larger, and the owner's
    sum goes dense when its exact merged count says so.  Counts travel as int64, ``-1``
    meaning "dense" (the length is known from ``bounds``).
    """
    channel, stats = problem.channel, problem.channel.stats
    size, rank = channel.size, channel.rank
    lengths = np.diff(bounds)
    positions = np.empty(size + 1, dtype=np.int64)
    _merge.range_offsets(problem.indices, bounds, positions)
    counts = np.diff(positions)
    dense_parts = np.zeros(size, dtype=bool)
    if switch:
        for j in range(size):
            dense_parts[j] = counts[j] > 0 and problem.goes_dense(int(counts[j]), int(lengths[j]))
    header = np.where(dense_parts, -1, counts).astype(np.int64)
    index_counts = np.where(dense_parts, 0, counts)
    value_counts = np.where(dense_parts, lengths, counts)
    index_offsets = np.zeros(size, dtype=np.int64)
    np.cumsum(index_counts[:-1], out=index_offsets[1:])
    value_offsets = np.zeros(size, dtype=np.int64)
    np.cumsum(value_counts[:-1], out=value_offsets[1:])
    if dense_parts.any():
        sparse_parts = [j for j in range(size) if not dense_parts[j]]
        send_indices = np.concatenate(
            [problem.indices[positions[j] : positions[j + 1]] for j in sparse_parts]
            or [problem.indices[:0]]
        )
        send_values = np.empty(int(value_counts.sum()), dtype=problem.values.dtype)
        for j in range(size):
            part_i = problem.indices[positions[j] : positions[j + 1]]
            part_v = problem.values[positions[j] : positions[j + 1]]
            target = send_values[value_offsets[j] : value_offsets[j] + value_counts[j]]
            if dense_parts[j] and part_i.size == target.size:  # full part: already dense
                target[:] = part_v
            elif dense_parts[j]:
                target[:] = 0
                _merge.scatter_assign(part_i, part_v, int(bounds[j]), target)
            else:
                target[:] = part_v
    else:
        send_indices, send_values = problem.indices, problem.values
    with stats._phase("reduce_scatter"):
        recv_header = channel.alltoall_counts(header)
        recv_dense = recv_header < 0
        own_length = int(lengths[rank])
        recv_index_counts = np.where(recv_dense, 0, recv_header)
        recv_value_counts = np.where(recv_dense, own_length, recv_header)
        (indices, index_offsets_in), (values, value_offsets_in) = channel.alltoallv_many(
            [
                (send_indices, index_counts, index_offsets, recv_index_counts),
                (send_values, value_counts, value_offsets, recv_value_counts),
            ],
            recvs=[
                _buffer(problem, "parts_i", int(recv_index_counts.sum()), send_indices.dtype),
                _buffer(problem, "parts_v", int(recv_value_counts.sum()), send_values.dtype),
            ],
        )
    start, stop = int(bounds[rank]), int(bounds[rank + 1])
    with stats._phase("merge"):
        if not recv_dense.any():
            out_i, out_v = _merge_streams(problem, indices, values, index_offsets_in, True)
            if switch and out_i.size and problem.goes_dense(out_i.size, own_length):
                return Piece(start, stop, None, _densify(out_i, out_v, start, own_length))
            return Piece(start, stop, out_i, out_v)
        # Some part arrived dense: accumulate densely, in rank order.
        acc = np.zeros(own_length, dtype=values.dtype)
        for source in range(size):
            v = values[value_offsets_in[source] : value_offsets_in[source + 1]]
            if recv_dense[source]:
                acc += v
            else:
                i = indices[index_offsets_in[source] : index_offsets_in[source + 1]]
                _merge.scatter_accumulate(i, v, start, acc)
        return Piece(start, stop, None, acc)


def _allgather_pieces(problem: Problem, bounds: np.ndarray, mine: Piece) -> list[Piece]:
    """Allgather every owner's reduced range (sparse or dense) to every rank."""
    channel, stats = problem.channel, problem.channel.stats
    size = channel.size
    lengths = np.diff(bounds)
    with stats._phase("allgather"):
        header = channel.allgather_array(np.array([-1 if mine.dense else mine.nnz], np.int64))
        header = header[:, 0]
        dense = header < 0
        index_counts = np.where(dense, 0, header)
        value_counts = np.where(dense, lengths, header)
        send_i = problem.indices[:0] if mine.indices is None else mine.indices
        (indices, index_offsets), (values, value_offsets) = channel.allgatherv_many(
            [send_i, mine.values], [index_counts, value_counts]
        )
    stats.dense_ranges = int(dense.sum())
    if not dense.any():
        # The ranges arrive in rank order, which is index order: one sorted stream, no copy.
        return [Piece(0, problem.n, indices, values)]
    pieces = []
    for j in range(size):
        v = values[value_offsets[j] : value_offsets[j + 1]]
        i = None if dense[j] else indices[index_offsets[j] : index_offsets[j + 1]]
        pieces.append(Piece(int(bounds[j]), int(bounds[j + 1]), i, v))
    return pieces


def split_allgather(problem: Problem) -> list[Piece]:
    """SSAR split-allgather: sparse reduce-scatter over ``P`` index ranges, then a sparse
    allgather of the reduced ranges."""
    bounds = split_bounds(problem.n, problem.channel.size)
    mine = _reduce_scatter(problem, bounds, switch=False)
    return _allgather_pieces(problem, bounds, mine)


def dsar(problem: Problem) -> list[Piece]:
    """DSAR split-allgather: the reduce-scatter of :func:`split_allgather`, each part and
    each owner's sum switching to dense when its exact count says dense is smaller; the
    gather phase then moves dense ranges (and any range that stayed sparse, sparse)."""
    bounds = split_bounds(problem.n, problem.channel.size)
    mine = _reduce_scatter(problem, bounds, switch=True)
    return _allgather_pieces(problem, bounds, mine)


def dense(problem: Problem) -> list[Piece]:
    """Write the stream into a dense buffer and run MPI's own ``Allreduce``."""
    channel, stats = problem.channel, problem.channel.stats
    with stats._phase("densify_input"):
        if problem.values.size == problem.n:  # a full stream is its dense vector
            send = problem.values
        elif problem.scratch is not None:  # reused across calls: no page faults
            send = problem.scratch("dense_send", problem.n, problem.values.dtype)
            send.fill(0)
            _merge.scatter_assign(problem.indices, problem.values, 0, send)
        else:
            send = _densify(problem.indices, problem.values, 0, problem.n)
    with stats._phase("allreduce"):
        if problem.out is not None:  # reduce straight into the caller's buffer
            buffer = problem.out
            if np.shares_memory(buffer, send):  # out given as the values themselves
                send = send.copy()
            channel.allreduce_dense(send, buffer)
        elif problem.scratch is not None or send is problem.values:
            buffer = np.empty_like(send)  # never reduce into the caller's values
            channel.allreduce_dense(send, buffer)
        else:
            buffer = send
            channel.allreduce_dense(MPI.IN_PLACE, buffer)
    stats.dense_ranges = 1
    return [Piece(0, problem.n, None, buffer)]


ALGORITHMS: dict[str, Callable[[Problem], list[Piece]]] = {
    "allgather": allgather,
    "recursive_doubling": recursive_doubling,
    "split_allgather": split_allgather,
    "dsar": dsar,
    "dense": dense,
}


# ------------------------------------------------------------------------ output


def result_nnz(pieces: list[Piece]) -> int:
    """``K``: sparse entries plus dense lengths."""
    return sum(p.nnz for p in pieces)


def finish(
    pieces: list[Piece],
    n: int,
    dtype: np.dtype,
    index_dtype: np.dtype,
    dense_output: bool | None,
    scale: float | None,
    out: np.ndarray | None,
):
    """Turn pieces into the requested output, dividing by ``scale`` (``op="mean"``).

    ``dense_output=True``: a dense array (``out`` if given); ``False``: a sorted sparse
    ``(indices, values)`` pair (dense ranges contribute their non-zeros); ``None``: the
    algorithm's own representation, dense if any piece is dense.
    """
    if dense_output is None:
        dense_output = any(p.dense for p in pieces)
    if dense_output:
        if out is None:
            out = np.empty(n, dtype=dtype)
        # A sparse piece is written in one streaming pass, divided there for a mean
        # (the bits of zeroing, scattering and dividing after); dense ones are divided after.
        divide = scale is not None and all(not p.dense for p in pieces)
        divisor = dtype.type(1 if scale is None else scale)
        for p in pieces:
            target = out[p.start : p.stop]
            if p.dense:
                if not np.shares_memory(target, p.values):  # dense: may be out already
                    target[:] = p.values
            else:
                _merge.scatter_dense(p.indices, p.values, p.start, target, divide, divisor)
        if scale is not None and not divide:
            out /= divisor
        return out
    parts_i, parts_v = [], []
    for p in pieces:
        if p.dense:
            gi = np.empty(p.values.size, dtype=index_dtype)
            gv = np.empty(p.values.size, dtype=dtype)
            count = _merge.gather_nonzero(p.values, p.start, gi, gv)
            parts_i.append(gi[:count])
            parts_v.append(gv[:count])
        elif p.indices is not None:
            parts_i.append(p.indices)
            parts_v.append(p.values)
    # Pieces are this module's own buffers (never the caller's arrays): no copy for one.
    indices = np.concatenate(parts_i) if len(parts_i) != 1 else parts_i[0]
    values = np.concatenate(parts_v) if len(parts_v) != 1 else parts_v[0]
    if scale is not None:
        values /= dtype.type(scale)
    return indices, values
