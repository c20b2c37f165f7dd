// Reductions: kernel contract ``stream_read`` and ``max_abs``.
#include "common.cuh"

// Deterministic block sum in float64 (shared-memory tree); all threads call it.
__device__ double sc_block_sum(double v) {
    __shared__ double sum_buf[SC_MAX_BLOCK];
    const unsigned t = threadIdx.x;
    sum_buf[t] = v;
    __syncthreads();
    for (unsigned half = blockDim.x >> 1; half > 0; half >>= 1) {
        if (t < half) sum_buf[t] += sum_buf[t + half];
        __syncthreads();
    }
    const double total = sum_buf[0];
    __syncthreads();
    return total;
}

// Stage 1 of stream_read: every element read exactly once, coalesced, four
// independent loads in flight per thread; one float64 partial per block.
extern "C" __global__ void sc_stream_read_partial(const real_t* x, i64 n, double* partial) {
    const i64 stride = sc_grid_threads();
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    i64 i = sc_thread_id();
    for (; i + 3 * stride < n; i += 4 * stride) {
        const real_t v0 = x[i], v1 = x[i + stride], v2 = x[i + 2 * stride], v3 = x[i + 3 * stride];
        a0 += (double)v0;
        a1 += (double)v1;
        a2 += (double)v2;
        a3 += (double)v3;
    }
    for (; i < n; i += stride) a0 += (double)x[i];
    const double total = sc_block_sum((a0 + a1) + (a2 + a3));
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Stage 2: one block sums the partials (fixed order: deterministic).
extern "C" __global__ void sc_stream_read_final(const double* partial, i64 count, double* out) {
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    const double total = sc_block_sum(acc);
    if (threadIdx.x == 0) out[0] = total;
}

// max |x| per bucket over the bit pattern: for non-negative IEEE floats the
// unsigned order of the bits is the numeric order, so an integer atomicMax is
// exact and order-free (NaN, whose masked bits exceed +inf, propagates as NaN).
// One warp per segment of at most `segment` elements of one bucket; a bucket
// longer than a segment is split over several warps that meet in atomicMax.
// `out` must hold zeros on entry.
extern "C" __global__ void sc_max_abs(const real_t* x, i64 n, i64 bucket, i64 segment,
                                      i64 segments_per_bucket, i64 total_segments,
                                      bits_t* out) {
    const i64 warp = sc_thread_id() / SC_WARP;
    const int lane = threadIdx.x % SC_WARP;
    const i64 warps = sc_grid_threads() / SC_WARP;
    // Every lane of a warp runs the same number of iterations (the loop bound
    // depends on the warp only), so the shuffles below see the full warp.
    for (i64 s = warp; s < total_segments; s += warps) {
        const i64 b = s / segments_per_bucket;
        const i64 start = b * bucket + (s % segments_per_bucket) * segment;
        i64 end = start + segment;
        const i64 bucket_end = (b + 1) * bucket < n ? (b + 1) * bucket : n;
        if (end > bucket_end) end = bucket_end;
        bits_t m = 0;
        for (i64 i = start + lane; i < end; i += SC_WARP) {
            const bits_t k = sc_abs_key(x[i]);
            m = k > m ? k : m;
        }
        for (int offset = SC_WARP / 2; offset > 0; offset >>= 1) {
            const bits_t other = __shfl_down_sync(SC_FULL_MASK, m, offset);
            m = other > m ? other : m;
        }
        if (lane == 0 && start < end) atomicMax(out + b, m);
    }
}
