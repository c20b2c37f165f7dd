// Elementwise a + b and a - b: kernel contract ``add`` and ``subtract``.
//
// Why not cupy.add / the `-=` operator: CuPy builds its ufuncs with -ftz=true, so
// a float32 result below 2**-126 (a subnormal) is flushed to zero.  Error feedback
// (sparcomm/feedback.py) adds and subtracts residuals whose small entries are
// exactly such values, and flushing them would lose gradient mass and break bit
// equality with NumPy.  These kernels are built by kernels/cuda/nvrtc.py with
// -ftz=false, so every result is the IEEE round-to-nearest-even sum or difference
// in real_t, subnormals kept and NaN/inf propagated: bit for bit np.add/np.subtract.
//
// In place: `out` may be `a` or `b`.  Each element is read and written by the same
// thread, the reads first, so exact aliasing is safe; a partial overlap is not
// (the launcher in kernels/cuda/_kernels.py rejects it).
#include "common.cuh"

// Elements of one 16-byte vector access: 4 floats or 2 doubles.
#define SC_VEC ((i64)(16 / sizeof(real_t)))

// A 16-byte aligned group, so that one load or store moves 16 bytes (ld.global.v4.f32
// / v2.f64) -- fewer memory instructions for a kernel that only streams.
struct alignas(16) sc_vec_t {
    real_t v[16 / sizeof(real_t)];
};

template <bool SUBTRACT>
__device__ __forceinline__ real_t sc_binary(real_t x, real_t y) {
    return SUBTRACT ? x - y : x + y;
}

// out[i] = a[i] (+|-) b[i] for i < n, grid-stride.  When the three addresses have the
// same offset modulo 16 bytes (always so for fresh allocations), the first `head`
// elements are done one by one and the aligned middle in 16-byte vectors; otherwise
// every element is done one by one.
template <bool SUBTRACT>
__device__ __forceinline__ void sc_elementwise(const real_t* a, const real_t* b, real_t* out,
                                               i64 n) {
    const i64 tid = sc_thread_id();
    const i64 stride = sc_grid_threads();
    const u64 offset = (u64)a % 16;
    i64 head = n;  // elements before the vector part (all of them: no vector part)
    i64 vectors = 0;
    if ((u64)b % 16 == offset && (u64)out % 16 == offset && offset % sizeof(real_t) == 0) {
        head = (i64)(((16 - offset) % 16) / sizeof(real_t));
        head = head < n ? head : n;
        vectors = (n - head) / SC_VEC;
    }
    const i64 tail = head + vectors * SC_VEC;
    for (i64 i = tid; i < head; i += stride) out[i] = sc_binary<SUBTRACT>(a[i], b[i]);
    const sc_vec_t* av = reinterpret_cast<const sc_vec_t*>(a + head);
    const sc_vec_t* bv = reinterpret_cast<const sc_vec_t*>(b + head);
    sc_vec_t* ov = reinterpret_cast<sc_vec_t*>(out + head);
    for (i64 v = tid; v < vectors; v += stride) {
        sc_vec_t x = av[v];
        const sc_vec_t y = bv[v];
#pragma unroll
        for (int e = 0; e < (int)SC_VEC; ++e) x.v[e] = sc_binary<SUBTRACT>(x.v[e], y.v[e]);
        ov[v] = x;
    }
    for (i64 i = tail + tid; i < n; i += stride) out[i] = sc_binary<SUBTRACT>(a[i], b[i]);
}

// out = a + b (contract ``add``).
extern "C" __global__ void sc_add(const real_t* a, const real_t* b, real_t* out, i64 n) {
    sc_elementwise<false>(a, b, out, n);
}

// out = a - b (contract ``subtract``).
extern "C" __global__ void sc_subtract(const real_t* a, const real_t* b, real_t* out, i64 n) {
    sc_elementwise<true>(a, b, out, n);
}

// out[i] = x[i] / d (contract ``divide_scalar``): the op="mean" of a sum kept on the GPU.
// One IEEE division (-prec-div=true, -ftz=false in nvrtc.py), so a subnormal quotient
// is kept where cupy's `/=` would flush it.  `out` may be `x` (each element is read,
// then written, by one thread).
extern "C" __global__ void sc_divide_scalar(const real_t* x, real_t d, real_t* out, i64 n) {
    const i64 stride = sc_grid_threads();
    for (i64 i = sc_thread_id(); i < n; i += stride) out[i] = x[i] / d;
}
