// Shared definitions for the sparcomm CUDA kernels (kernels/cuda/*.cu).
//
// Every source is compiled once per (device, real dtype, index dtype) by
// kernels/cuda/_kernels.py, which defines the macros below on the command line
// (NVRTC options) and inlines this header in place of the #include, so that
// CuPy's compile cache keys on the full text.  The defaults let `nvcc -c` compile
// each source on its own (tests/test_nvcc_compile.py).
//
// Build with FMA contraction off (`--fmad=false` / `-fmad=false`): the kernel
// contract (kernels/__init__.py) fixes the rounding of every product and sum,
// and a fused multiply-add would round once instead of twice.
//
// Only a small CUDA subset is used -- threadIdx/blockIdx/blockDim/gridDim,
// static __shared__ arrays, __syncthreads, full-warp shuffles and
// __match_any_sync, integer atomics -- so that tests/gpu/cuda_emulator.h can run
// these same sources on the host, one std::thread per CUDA thread, where no GPU
// exists.
#pragma once

#ifndef SPARCOMM_FLOAT64
#define SPARCOMM_FLOAT64 0
#endif
#ifndef SPARCOMM_INDEX64
#define SPARCOMM_INDEX64 0
#endif
// Elements per thread in the tiled kernels (top-k, merges); the Python side
// passes the same value so that tile = blockDim.x * SC_ITEMS on both sides.
#ifndef SC_ITEMS
#define SC_ITEMS 8
#endif
// Largest block size any kernel is launched with (static shared arrays).
#define SC_MAX_BLOCK 1024
#define SC_WARP 32
#define SC_FULL_MASK 0xffffffffu
// Lanes of the deterministic bucket sum (kernel contract: ``lane_sum``).
#define SC_LANES 8

#if SPARCOMM_FLOAT64
typedef double real_t;
typedef unsigned long long bits_t;  // IEEE bit pattern of real_t
#define SC_ABS_MASK 0x7FFFFFFFFFFFFFFFull
#define SC_INF_BITS 0x7FF0000000000000ull
#else
typedef float real_t;
typedef unsigned int bits_t;
#define SC_ABS_MASK 0x7FFFFFFFu
#define SC_INF_BITS 0x7F800000u
#endif

#if SPARCOMM_INDEX64
typedef long long index_t;
#else
typedef int index_t;
#endif

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;

__device__ __forceinline__ bits_t sc_bits(real_t v) {
#if SPARCOMM_FLOAT64
    return (bits_t)__double_as_longlong(v);
#else
    return __float_as_uint(v);
#endif
}

__device__ __forceinline__ real_t sc_from_bits(bits_t b) {
#if SPARCOMM_FLOAT64
    return __longlong_as_double((long long)b);
#else
    return __uint_as_float(b);
#endif
}

// |x| as an unsigned key: the order of non-negative IEEE floats is the order of
// their bit patterns, and masking the sign makes -0.0 equal +0.0.
__device__ __forceinline__ bits_t sc_abs_key(real_t v) { return sc_bits(v) & SC_ABS_MASK; }

__device__ __forceinline__ real_t sc_abs(real_t v) { return sc_from_bits(sc_abs_key(v)); }

// Global thread id and grid size in 64 bits: n may exceed 2**31.
__device__ __forceinline__ i64 sc_thread_id() {
    return (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;
}

__device__ __forceinline__ i64 sc_grid_threads() { return (i64)gridDim.x * (i64)blockDim.x; }

// ---------------------------------------------------------------------------
// Counter-based uniform: bit for bit sparcomm/_random.py (hash_reference).
// ---------------------------------------------------------------------------
__device__ __forceinline__ u32 sc_mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

__device__ __forceinline__ u32 sc_hash(u64 stream, u64 index) {
    const u32 k1 = (u32)(stream & 0xFFFFFFFFull);
    const u32 k2 = (u32)(stream >> 32);
    const u32 lo = (u32)(index & 0xFFFFFFFFull);
    const u32 hi = (u32)(index >> 32);
    u32 h = sc_mix32((lo * 0x9E3779B9u) ^ k1 ^ (hi * 0x85EBCA6Bu));
    return sc_mix32(h + k2);
}

// 24-bit uniform on [0, 1); exact in float32, so the same in either dtype.
__device__ __forceinline__ real_t sc_uniform_real(u64 stream, u64 index) {
    return (real_t)(sc_hash(stream, index) >> 8) * (real_t)5.9604644775390625e-08;
}

// ---------------------------------------------------------------------------
// Block-wide exclusive scan of one u64 per thread (Hillis-Steele in shared
// memory).  Every thread of the block must call it.  Returns the exclusive
// prefix; *total receives the block total.
// ---------------------------------------------------------------------------
__device__ u64 sc_block_exclusive_scan(u64 value, u64* total) {
    __shared__ u64 scan_buf[2][SC_MAX_BLOCK];
    const unsigned t = threadIdx.x;
    int src = 0;
    scan_buf[0][t] = value;
    __syncthreads();
    for (unsigned offset = 1; offset < blockDim.x; offset <<= 1) {
        u64 v = scan_buf[src][t];
        if (t >= offset) v += scan_buf[src][t - offset];
        scan_buf[1 - src][t] = v;
        src = 1 - src;
        __syncthreads();
    }
    const u64 inclusive = scan_buf[src][t];
    *total = scan_buf[src][blockDim.x - 1];
    __syncthreads();  // the buffer is reused by the next call
    return inclusive - value;
}

// ---------------------------------------------------------------------------
// Shared by the quantizers' decoders (quantize.cu, onebit.cu) and their lane sums.
// ---------------------------------------------------------------------------

// Store the decoded d into out[i] by `accumulate` (0: d, 1: out[i] + d, -1:
// out[i] - d): one IEEE operation rounded to nearest in real_t, bit for bit
// sc_add / sc_subtract (elementwise.cu) of a separately decoded buffer.  The build
// has -fmad=false, so QSGD's level * step is never fused into this add, and
// -ftz=false, so subnormal sums are kept.  `accumulate` is a kernel argument, the
// same for every thread: the branch never diverges, and out is read only when
// accumulating.
__device__ __forceinline__ void sc_store_decoded(real_t* out, i64 i, real_t d, int accumulate) {
    if (accumulate == 0) {
        out[i] = d;
    } else if (accumulate > 0) {
        out[i] = out[i] + d;
    } else {
        out[i] = out[i] - d;
    }
}

// ---------------------------------------------------------------------------
// lane_sum: 8 consecutive threads per bucket, thread j accumulating the
// bucket's elements j, j+8, j+16, ... in order, in float64; the three shuffle
// steps then form ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)) in lane 0 of the group.
// `mode` 0: sum of x*x (QSGD's L2 norm); 1: OneBit's sums and counts of the
// entries with x >= 0 and with x < 0.
// ---------------------------------------------------------------------------
__device__ __forceinline__ double sc_lane_combine(double v, int lane) {
    // Lanes 1, 3, 5, 7 feed lanes 0, 2, 4, 6; then 2 -> 0 and 6 -> 4; then 4 -> 0.
    double other = __shfl_down_sync(SC_FULL_MASK, v, 1);
    if ((lane & 1) == 0) v = v + other;
    other = __shfl_down_sync(SC_FULL_MASK, v, 2);
    if ((lane & 3) == 0) v = v + other;
    other = __shfl_down_sync(SC_FULL_MASK, v, 4);
    if ((lane & 7) == 0) v = v + other;
    return v;
}
