// Stochastic quantizers: kernel contract ``qsgd_encode/decode`` and
// ``terngrad_encode/decode`` (OneBit is in onebit.cu; the decoded store and the
// lane sums they share are in common.cuh).
//
// QSGD: Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
// Quantization and Encoding", NeurIPS 2017.  TernGrad: Wen et al., "TernGrad:
// Ternary Gradients to Reduce Communication in Distributed Deep Learning",
// NeurIPS 2017.
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
