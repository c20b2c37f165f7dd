// 1-bit quantization with per-bucket means: kernel contract ``onebit_encode`` /
// ``onebit_decode`` (the twin of kernels/cpu/onebit.py).  The encode is two
// launches: the sign bits, then the two group means of each bucket in the
// contract's lane order (sc_lane_combine, common.cuh); the decode stores by
// `accumulate` (sc_store_decoded, common.cuh).
//
// 1-bit SGD: Seide et al., "1-Bit Stochastic Gradient Descent and its Application
// to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014.
#include "common.cuh"

// OneBit signs, one thread per output byte: bit = x < 0.
extern "C" __global__ void sc_onebit_signs(const real_t* x, i64 n, u8* out_packed,
                                           i64 nbytes) {
    for (i64 byte = sc_thread_id(); byte < nbytes; byte += sc_grid_threads()) {
        u32 acc = 0;
        for (int e = 0; e < 8; ++e) {
            const i64 i = byte * 8 + e;
            if (i >= n) break;
            if (x[i] < (real_t)0) acc |= 1u << e;
        }
        out_packed[byte] = (u8)acc;
    }
}

// OneBit means: lane sums of the entries with bit 0 (x >= 0, NaN included) and
// bit 1 (x < 0), lane j taking the bucket's positions j, j+8, ...;
// means[2b + bit] = lane_sum / count in float64, cast to real_t, 0 where none.
extern "C" __global__ void sc_onebit_means(const real_t* x, i64 n, i64 bucket, i64 nb,
                                           real_t* out_means) {
    const i64 groups = sc_grid_threads() / SC_LANES;
    const int lane = threadIdx.x % SC_LANES;
    const i64 warp_first_group = (sc_thread_id() / SC_WARP) * (SC_WARP / SC_LANES);
    for (i64 base = warp_first_group; base < nb; base += groups) {
        const i64 b = base + (threadIdx.x % SC_WARP) / SC_LANES;
        double sum0 = 0.0, sum1 = 0.0;
        double count0 = 0.0, count1 = 0.0;  // exact below 2**53 entries
        if (b < nb) {
            const i64 start = b * bucket;
            const i64 end = start + bucket < n ? start + bucket : n;
            for (i64 i = start + lane; i < end; i += SC_LANES) {
                const real_t v = x[i];
                if (v < (real_t)0) {
                    sum1 = sum1 + (double)v;
                    count1 += 1.0;
                } else {
                    sum0 = sum0 + (double)v;
                    count0 += 1.0;
                }
            }
        }
        sum0 = sc_lane_combine(sum0, lane);
        sum1 = sc_lane_combine(sum1, lane);
        count0 = sc_lane_combine(count0, lane);
        count1 = sc_lane_combine(count1, lane);
        if (lane == 0 && b < nb) {
            out_means[2 * b] = count0 > 0.0 ? (real_t)(sum0 / count0) : (real_t)0;
            out_means[2 * b + 1] = count1 > 0.0 ? (real_t)(sum1 / count1) : (real_t)0;
        }
    }
}

// OneBit decode, one thread per element: d = means[2b + bit], by `accumulate`.
extern "C" __global__ void sc_onebit_decode(const u8* packed, const real_t* means, i64 n,
                                            i64 bucket, int accumulate, real_t* out) {
    for (i64 i = sc_thread_id(); i < n; i += sc_grid_threads()) {
        const u32 bit = (packed[i >> 3] >> (i & 7)) & 1u;
        sc_store_decoded(out, i, means[2 * (i / bucket) + bit], accumulate);
    }
}
