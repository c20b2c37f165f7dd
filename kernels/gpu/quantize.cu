// Quantizing codecs: kernel contract ``qsgd_encode/decode``, ``terngrad_encode/decode``,
// ``onebit_encode/decode`` and the deterministic bucket sums they need.
//
// QSGD: Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
// Quantization and Encoding", NeurIPS 2017.  TernGrad: Wen et al., "TernGrad:
// Ternary Gradients to Reduce Communication in Distributed Deep Learning",
// NeurIPS 2017.  1-bit SGD: Seide et al., Interspeech 2014.
//
// The decoders take `accumulate` (0: out = d, 1: out = out + d, -1: out = out - d),
// so error feedback's `compensated -= decoded` and the quantized collectives'
// `sum += decoded` need no second pass over n elements.
//
// Encoders run one thread per group of 8 elements: 8 fields of `bits` bits are
// exactly `bits` whole bytes, so every thread owns its output bytes (no atomics,
// no read-modify-write) whatever the field width.
#include "common.cuh"

// Write the low `count` bytes of `word` to out[first .. first+count).
__device__ __forceinline__ void sc_store_bytes(u8* out, i64 first, u64 word, i64 count) {
    for (i64 j = 0; j < count; ++j) out[first + j] = (u8)((word >> (8 * j)) & 0xFFull);
}

// Read up to 8 bytes (fewer at the end of the stream) as a little-endian word.
__device__ __forceinline__ u64 sc_load_bytes(const u8* in, i64 first, i64 count) {
    u64 word = 0;
    for (i64 j = 0; j < count; ++j) word |= (u64)in[first + j] << (8 * j);
    return word;
}

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

// QSGD L2 scale: out_scales[b] = (real_t) sqrt(lane_sum(x*x)), the squares
// taken in float64.  Launch with a multiple of 32 threads per block.
extern "C" __global__ void sc_l2_norm(const real_t* x, i64 n, i64 bucket, i64 nb,
                                      real_t* out_scales) {
    const i64 groups = sc_grid_threads() / SC_LANES;
    const int lane = threadIdx.x % SC_LANES;
    // Loop bound depends on the warp's first group only, so every lane of a
    // warp takes the same number of trips and the shuffles see the full warp.
    const i64 warp_first_group = (sc_thread_id() / SC_WARP) * (SC_WARP / SC_LANES);
    for (i64 base = warp_first_group; base < nb; base += groups) {
        const i64 b = base + (threadIdx.x % SC_WARP) / SC_LANES;
        double acc = 0.0;
        if (b < nb) {
            const i64 start = b * bucket;
            const i64 end = start + bucket < n ? start + bucket : n;
#pragma unroll 4
            for (i64 i = start + lane; i < end; i += SC_LANES) {
                const double v = (double)x[i];
                acc = acc + v * v;
            }
        }
        acc = sc_lane_combine(acc, lane);
        if (lane == 0 && b < nb) out_scales[b] = (real_t)sqrt(acc);
    }
}

// QSGD encode, one thread per 8 elements.  Per element, in real_t:
// inv = levels / scale (0 when scale == 0), t = |x| * inv, l = floor(t),
// level = l + (u < t - l) clamped to levels; field = (level << 1) | (x < 0).
extern "C" __global__ void sc_qsgd_encode(const real_t* x, i64 n, int levels, int bits,
                                          i64 bucket, u64 stream, const real_t* scales,
                                          u8* out_packed, i64 nbytes) {
    const i64 ngroups = (n + 7) / 8;
    const real_t levels_r = (real_t)levels;
    for (i64 g = sc_thread_id(); g < ngroups; g += sc_grid_threads()) {
        const i64 first = g * 8;
        u64 word = 0;
        i64 cached_bucket = -1;
        real_t inv = 0;
        for (int e = 0; e < 8; ++e) {
            const i64 i = first + e;
            if (i >= n) break;
            const i64 b = i / bucket;
            if (b != cached_bucket) {
                const real_t scale = scales[b];
                inv = scale == (real_t)0 ? (real_t)0 : levels_r / scale;
                cached_bucket = b;
            }
            const real_t xi = x[i];
            const real_t t = sc_abs(xi) * inv;
            const real_t l = floor(t);
            u32 level = (u32)levels;
            // t >= 0 or NaN; NaN (and inf) fail the test and take the clamp, as the
            // reference's np.where(level <= levels, level, levels) does.
            if (l < levels_r) {
                level = (u32)l + (sc_uniform_real(stream, (u64)i) < t - l ? 1u : 0u);
                if (level > (u32)levels) level = (u32)levels;
            }
            const u64 field = ((u64)level << 1) | (xi < (real_t)0 ? 1ull : 0ull);
            word |= field << (e * bits);
        }
        const i64 first_byte = g * bits;
        const i64 count = first_byte + bits <= nbytes ? bits : nbytes - first_byte;
        sc_store_bytes(out_packed, first_byte, word, count);
    }
}

// QSGD decode: d = ±(level * (scale / levels)), the step once per bucket; stored
// into out by `accumulate` (sc_store_decoded).
extern "C" __global__ void sc_qsgd_decode(const u8* packed, const real_t* scales, i64 n,
                                          int levels, int bits, i64 bucket, i64 nbytes,
                                          int accumulate, real_t* out) {
    const i64 ngroups = (n + 7) / 8;
    const u64 mask = (1ull << bits) - 1ull;
    const real_t levels_r = (real_t)levels;
    for (i64 g = sc_thread_id(); g < ngroups; g += sc_grid_threads()) {
        const i64 first_byte = g * bits;
        const i64 count = first_byte + bits <= nbytes ? bits : nbytes - first_byte;
        const u64 word = sc_load_bytes(packed, first_byte, count);
        i64 cached_bucket = -1;
        real_t step = 0;
        for (int e = 0; e < 8; ++e) {
            const i64 i = g * 8 + e;
            if (i >= n) break;
            const i64 b = i / bucket;
            if (b != cached_bucket) {
                step = scales[b] / levels_r;
                cached_bucket = b;
            }
            const u64 field = (word >> (e * bits)) & mask;
            const real_t value = (real_t)(u32)(field >> 1) * step;
            sc_store_decoded(out, i, (field & 1ull) ? -value : value, accumulate);
        }
    }
}

// TernGrad encode, one thread per output byte (4 two-bit codes).
// a = min(|x|, clip); p = a / s_b; code 0 unless u < p, then 1 (x > 0) or 2 (x < 0).
extern "C" __global__ void sc_terngrad_encode(const real_t* x, i64 n, const real_t* scales,
                                              i64 bucket, real_t clip, u64 stream,
                                              u8* out_packed, i64 nbytes) {
    for (i64 byte = sc_thread_id(); byte < nbytes; byte += sc_grid_threads()) {
        u32 acc = 0;
        for (int e = 0; e < 4; ++e) {
            const i64 i = byte * 4 + e;
            if (i >= n) break;
            const real_t s = scales[i / bucket];
            if (s == (real_t)0) continue;
            const real_t xi = x[i];
            const real_t ax = sc_abs(xi);
            const real_t a = clip < ax ? clip : ax;
            const real_t p = a / s;
            if (sc_uniform_real(stream, (u64)i) < p) {
                const u32 code = xi > (real_t)0 ? 1u : (xi < (real_t)0 ? 2u : 0u);
                acc |= code << (2 * e);
            }
        }
        out_packed[byte] = (u8)acc;
    }
}

// TernGrad decode, one thread per element: d = +s_b for code 1, -s_b for 2, else
// +0 (added or subtracted too: -0 + +0 is +0, as sc_add gives); by `accumulate`.
extern "C" __global__ void sc_terngrad_decode(const u8* packed, const real_t* scales, i64 n,
                                              i64 bucket, int accumulate, real_t* out) {
    for (i64 i = sc_thread_id(); i < n; i += sc_grid_threads()) {
        const u32 code = (packed[i >> 2] >> (2 * (i & 3))) & 3u;
        const real_t s = scales[i / bucket];
        sc_store_decoded(out, i, code == 1u ? s : (code == 2u ? -s : (real_t)0), accumulate);
    }
}

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
