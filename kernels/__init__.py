"""sparcomm compute kernels, installed as ``sparcomm.kernels``.

``kernels/cpu`` holds the Numba kernels (NumPy arrays), ``kernels/gpu`` the CUDA kernels
bound to CuPy (CuPy arrays), ``kernels/cuda`` their CUDA sources and CuPy-free launch
logic; ``kernels/reference.py`` holds a plain NumPy reference for every kernel, which the
tests hold both to and ``sparcomm bench codecs`` measures as the "plain NumPy" peer.
``sparcomm._backend.kernels_for`` picks the module by array type.

Each kernel belongs to a family, named in ``_checks.FAMILIES`` (the one list of kernel
names): family ``f`` is ``kernels/cpu/f.py`` on the CPU and ``kernels/cuda/f.cu`` on the
GPU.  This package imports nothing from sparcomm but itself and ``sparcomm._random``.

Kernel contract (identical for ``cpu``, ``gpu`` and ``reference``)
------------------------------------------------------------------
All arrays are 1-D and C-contiguous; ``x`` is float32 or float64; the caller allocates
every output (``out*`` arguments) and the kernels return only small scalars.
``n = x.size``, ``nb = ceil(n / bucket)`` buckets, the last one possibly short.

Bit packing (``pack_bits``/``unpack_bits`` and every packed field below): element ``i``
occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian, LSB-first bit stream stored in
``ceil(n*bits/8)`` uint8 bytes; unused trailing bits are zero.  ``1 <= bits <= 8``.

Random uniform ``u(stream, i)``: defined in ``sparcomm/_random.py`` (24-bit, exact in
float32).

Deterministic bucket sums (``lane_sum``): a bucket's sum of ``f(x_i)`` is accumulated in
float64 in 8 lanes, lane ``j`` taking the bucket's elements ``j, j+8, j+16, ...`` in order,
then combined as ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))``; each ``f(x_i)`` is evaluated
in float64 (``x*x`` is ``float64(x)*float64(x)``), and a lane that takes only some of the
bucket's positions (OneBit's two groups) skips the others.  CPU and GPU follow this order,
so scales and means are bitwise identical on both.

Deterministic standard deviation (``std(x) -> float``, TernGrad's ``clip * std(x)``):
the population standard deviation in two passes over fixed blocks of ``B = 2**14``
consecutive elements (the last one possibly short), whatever the device, thread count or
grid.  Pass 1: ``s1_b = lane_sum(float64(x_i))`` over block b; ``mean = S1 / n`` where
``S1 = ((0.0 + s1_0) + s1_1) + ...`` adds the block sums one after another in block
order, in float64.  Pass 2: ``s2_b = lane_sum(d_i * d_i)`` with ``d_i = float64(x_i) -
mean`` (one float64 subtraction and one float64 multiply, never fused); ``var = S2 / n``
(``S2`` the sequential sum of the ``s2_b``); ``std = sqrt(var)``, IEEE float64, returned
as a Python float.  ``n == 0`` raises ValueError (the standard deviation of nothing is
undefined; the codecs refuse empty tensors first).  NaN or inf in ``x`` give NaN; finite
values whose squares overflow give inf.  Float32 subnormals are kept (no flush to zero).

Kernels
~~~~~~~
stream_read(x) -> float
    Sum of ``x`` read once, in parallel: the streamed-read peer of the benchmarks.
uniform(stream, start, out)
    ``out[i] = u(stream, start + i)`` as float64 (a test hook for the RNG).
pack_bits(fields, bits, out) / unpack_bits(packed, bits, out)
    ``fields``/``out`` uint8 of length n; bits of a field above ``bits`` are ignored.
topk(x, k, out_indices, out_values) -> int
    Exact top-k of ``|x|`` by radix select over the float bit pattern (no sort, no
    argpartition).  ``out_indices`` (int32 or int64, length k) ascending; ties at the
    threshold go to the lowest indices; ``out_values`` the signed ``x`` values there.
    ``-0.0`` and ``+0.0`` are equal.  Returns the number of non-finite entries of ``x``
    (the caller raises when it is not zero).  ``0 <= k <= n``.
scatter_add(indices, values, out)
    ``out[indices[j]] += values[j]``; duplicates allowed and summed in order of j.
qsgd_encode(x, levels, bits, bucket, norm, stream, out_scales, out_packed)
    ``norm`` 0 = L2 (``sqrt(lane_sum(x*x))``, cast to x.dtype), 1 = max ``|x|``.
    Per element, in x.dtype: ``inv = levels / scale`` (once per bucket, 0 when
    scale == 0); ``t = |x_i| * inv``; ``l = floor(t)``; ``level = l + (u(stream, i) <
    t - l)``, clamped to ``levels`` (NaN clamps to ``levels`` too); field
    ``(level << 1) | (x_i < 0)``, ``bits`` wide.
    ``out_scales`` x.dtype, length nb; ``out_packed`` uint8, ``ceil(n*bits/8)``.
qsgd_decode(packed, scales, levels, bits, bucket, out, accumulate=0)
    ``d_i = ±(level * (scale / levels))``, ``scale / levels`` computed once per bucket
    in out.dtype; sign from the low bit.  ``d_i`` goes to ``out`` by ``accumulate``
    (below).
max_abs(x, bucket, out)
    ``out[b] = max |x_i|`` over bucket b (x.dtype, length nb).
terngrad_encode(x, scales, bucket, clip, stream, out_packed)
    ``a = min(|x_i|, clip)``; ``p = a / s_b`` (x.dtype); code = 0 unless
    ``u(stream, i) < p``, then 1 for ``x_i > 0`` and 2 for ``x_i < 0``; 2-bit fields.
    ``s_b == 0`` gives code 0.  ``clip`` = inf disables clipping.
terngrad_decode(packed, scales, bucket, out, accumulate=0)
    ``d_i``: code 1 -> ``+s_b``, 2 -> ``-s_b``, 0 -> 0 (3 never produced; decodes as
    0).  ``d_i`` goes to ``out`` by ``accumulate`` (below).
onebit_encode(x, bucket, out_packed, out_means)
    bit = ``x_i < 0``; ``out_means[2b]`` = mean of bucket b's entries with bit 0,
    ``out_means[2b+1]`` = mean of those with bit 1 (0 where none); means are
    ``lane_sum(x over the group) / count`` in float64, cast to x.dtype.
onebit_decode(packed, means, bucket, out, accumulate=0)
    ``d_i = means[2b + bit_i]``, to ``out`` by ``accumulate`` (below).
``accumulate`` of the decodes (``d_i`` the decoded value above)
    ``0``: ``out_i = d_i``; ``1``: ``out_i = out_i + d_i``; ``-1``: ``out_i = out_i -
    d_i``; each one IEEE operation rounded to nearest-even in out.dtype, subnormals
    kept (no flush to zero, no fused multiply-add with the product that formed
    ``d_i``), NaN and inf propagated.  So a fused decode is bit for bit decoding into a
    separate buffer ``d`` and then ``add(out, d, out)`` / ``subtract(out, d, out)``
    (NaN results may differ only in sign and payload, as ``add``/``subtract``'s do).
    It saves that second pass over n elements in error feedback (``compensated -=
    decoded``) and in the quantized collectives (``sum += decoded``).  Any other value
    (a bool or float included) raises ValueError naming the allowed ones, also when
    ``n == 0``.
add(a, b, out) / subtract(a, b, out)
    ``out[i] = a[i] + b[i]`` / ``a[i] - b[i]``, each rounded once to nearest-even in
    ``a.dtype``; ``b`` and ``out`` have ``a``'s dtype and size.  ``out`` may be ``a`` or
    ``b`` (in place) but must not partly overlap either (ValueError).  NaN and inf
    propagate; subnormal results are kept, not flushed to zero (CuPy's own ufuncs flush
    float32 ones).  Error feedback's ``x + residual`` and ``compensated - decoded``.
divide_scalar(x, divisor, out)
    ``out[i] = x[i] / d`` with ``d = x.dtype(divisor)`` (a finite, non-zero number),
    one IEEE division rounded to nearest-even in ``x.dtype``, subnormals kept; ``out``
    may be ``x``.  The ``op="mean"`` of a sum that stays on the GPU (NumPy's ``x / P``).
fp16_encode(x, out) -> int
    ``out[i] = float16(x[i])`` (``out`` float16, ``x``'s size): IEEE round to nearest
    even, bit for bit NumPy's ``x.astype(numpy.float16)`` for float32 and float64
    ``x`` (float64 converted directly, not through float32): subnormal halves kept,
    signed zeros, ``|x| >= 65520`` overflows to ±inf, NaN -> NaN keeping the sign and
    the top ten payload bits (at least one set).  Returns the number of non-finite
    *outputs* (NaN or inf; the FP16 codec raises when it is not zero).  Integer bit
    manipulation on every implementation (no float16 arithmetic type needed).
fp16_decode(half, out, accumulate=0)
    ``d_i = out.dtype(half[i])`` (exact; NaN payloads kept when stored), to ``out``
    by ``accumulate`` as the quantizers' decodes (same values, same ValueError).
copy_finite(x, out) -> int
    ``out[i] = x[i]`` (same dtype and size); returns the number of non-finite entries
    of ``x`` (NoCompression's encode and its check in one pass).
    For these three, ``out`` must not overlap the input (ValueError).
"""

if __name__ != "sparcomm.kernels":
    # Numba's cache keys a kernel on its source file, not on its module's name: a kernel
    # compiled here under another name (a checkout's root on sys.path, ``import
    # kernels``) would be loaded by every later sparcomm process and fail to unpickle.
    raise ImportError(
        f"the kernels were imported as {__name__!r}; import them as sparcomm.kernels "
        "(the package installs them there; `pip install -e .` in a checkout)"
    )
