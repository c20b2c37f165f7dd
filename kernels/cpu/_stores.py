"""Non-temporal (streaming) stores of whole cache lines, for kernels that write a large
output once and do not read it back.

A plain store to a line that is not in cache first reads the line from memory (the
read-for-ownership), so writing an n-element output moves ``2 n`` elements through the
memory bus; a non-temporal store writes the whole line straight to memory and moves
``n``.  Ranks that share memory bandwidth (several ranks per socket) pay for every pass,
so the dense outputs of the collectives are written this way.

The stores are weakly ordered: each task that streams calls :func:`store_fence` at its
end, on the thread that stored, so that the data is visible to any thread that later
synchronises with this one (the parallel loop's own join included).
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE_BYTES = 64
"""Bytes per cache line (x86-64, AArch64): the unit of :func:`stream_line_from`."""
STREAM_MIN = 1 << 21
"""Elements from which a decode streams its output: well beyond the per-core caches, so
the output would leave the cache before it is read again anyway.  Smaller outputs (the
blocks the collectives sum payloads into, 1 MiB) stay in cache for the next pass."""
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def stream_line_from(typingctx, source, source_first, out, first):
    """Store ``source[source_first:source_first+L]`` to ``out[first:first+L]`` with one
    non-temporal store, ``L = LINE_BYTES // out.itemsize`` (any alignment of the source;
    the caller guarantees that ``out[first]`` is ``LINE_BYTES``-aligned, that
    ``first + L <= out.size`` and that ``source`` has ``out``'s dtype)."""
    signature = types.void(source, types.int64, out, types.int64)

    def codegen(context, builder, sig, args):
        source_v, source_first_v, out_v, first_v = args
        source_a = context.make_array(sig.args[0])(context, builder, source_v)
        target = context.make_array(sig.args[2])(context, builder, out_v)
        element = context.get_data_type(sig.args[2].dtype)
        itemsize = context.get_abi_sizeof(element)
        vector = ir.VectorType(element, LINE_BYTES // itemsize)
        read = builder.bitcast(builder.gep(source_a.data, [source_first_v]), vector.as_pointer())
        value = builder.load(read, align=1)
        pointer = builder.bitcast(builder.gep(target.data, [first_v]), vector.as_pointer())
        store = builder.store(value, pointer, align=LINE_BYTES)
        flag = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        store.set_metadata("nontemporal", flag)
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, nogil=True)
def stream_copy(source, out, first, count):
    """``out[first:first+count] = source[:count]``, the whole lines of ``out`` with
    non-temporal stores (the partial lines at both ends with plain ones).  The calling
    task runs :func:`store_fence` after its last streaming store."""
    lanes = LINE_BYTES // out.itemsize
    address = out.ctypes.data + first * out.itemsize
    head = count
    if address % out.itemsize == 0:
        head = min(count, (LINE_BYTES - address % LINE_BYTES) % LINE_BYTES // out.itemsize)
    for t in range(head):
        out[first + t] = source[t]
    t = head
    while t + lanes <= count:
        stream_line_from(source, t, out, first + t)
        t += lanes
    for u in range(t, count):
        out[first + u] = source[u]


@intrinsic
def store_fence(typingctx):
    """Order the non-temporal stores before every later store (x86 ``sfence``; a full
    fence elsewhere, where LLVM has no ``sfence``)."""
    signature = types.void()

    def codegen(context, builder, sig, args):
        if _X86:
            sfence = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence"
            )
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return signature, codegen
