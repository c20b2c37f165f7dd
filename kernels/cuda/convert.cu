// Half-precision conversion and the checked copy: kernel contract ``fp16_encode``,
// ``fp16_decode`` and ``copy_finite`` (the FP16 and NoCompression baselines of
// sparcomm/codecs/baselines.py; half-precision exchange as in Micikevicius et al.,
// "Mixed precision training", ICLR 2018).
//
// The float <-> half conversions are integer operations on the bit patterns, the
// same as kernels/cpu/convert.py, rather than cuda_fp16.h: NVRTC's include path is
// not guaranteed to hold that header, and tests/gpu/cuda_emulator.h runs these
// sources on the host, where it does not exist.  Round to nearest even, subnormal
// halves, signed zeros, overflow to +-inf and NaN payloads are NumPy's
// (npy_floatbits_to_halfbits / npy_doublebits_to_halfbits): bit for bit astype.
//
// The half buffer is passed as its bytes (u8*, the float16 array viewed as uint8,
// 2-byte aligned as every float16 allocation is) and read or written as unsigned
// short: the launch signatures use only the scalar types the launcher and the
// emulator know.  The non-finite counters are one u64 in device memory: each
// thread counts its own elements and adds to it only when it found one (normally
// never), and the host reads it once, as topk's does.
#include "common.cuh"

typedef unsigned short u16;

#if SPARCOMM_FLOAT64
#define SC_MBITS 52  // significand bits of real_t
#define SC_EBITS 11  // exponent bits of real_t
#else
#define SC_MBITS 23
#define SC_EBITS 8
#endif
#define SC_EMAX ((1 << SC_EBITS) - 1)
#define SC_BIAS (SC_EMAX >> 1)
#define SC_SHIFT (SC_MBITS - 10)  // significand bits dropped by the conversion
#define SC_SIG_MASK ((((bits_t)1) << SC_MBITS) - 1)
#define SC_HALF_INF 0x7C00u

// Half bit pattern of the real_t with bit pattern f, rounded to nearest even.
__device__ __forceinline__ u32 sc_to_half(bits_t f) {
    const u32 sign = (u32)(f >> (SC_MBITS + SC_EBITS - 15)) & 0x8000u;
    const bits_t a = f & SC_ABS_MASK;
    const int e = (int)(a >> SC_MBITS);
    u32 h;
    if (e == SC_EMAX) {  // inf, or NaN keeping its top payload bits (at least one set)
        const u32 payload = (u32)(a >> SC_SHIFT) & 0x3FFu;
        h = (a & SC_SIG_MASK) == 0 ? SC_HALF_INF : (SC_HALF_INF | (payload ? payload : 1u));
    } else if (e >= SC_BIAS + 16) {  // |x| >= 65536
        h = SC_HALF_INF;
    } else if (e >= SC_BIAS - 14) {  // a normal half; a carry rounds 65520.. up to inf
        const bits_t base = a - ((bits_t)(SC_BIAS - 15) << SC_MBITS);
        const bits_t round = ((((bits_t)1) << (SC_SHIFT - 1)) - 1) + ((base >> SC_SHIFT) & 1);
        h = (u32)((base + round) >> SC_SHIFT);
    } else {  // a subnormal half or zero: m * 2**(e - bias - mbits) in units of 2**-24
        const bits_t m = (a & SC_SIG_MASK) | (((bits_t)1) << SC_MBITS);
        const int s = SC_BIAS + SC_MBITS - 24 - e;  // >= 14
        if (s > SC_MBITS + 1) {  // below 2**-25 (m < 2**(s-1)): rounds to zero
            h = 0;
        } else {
            const bits_t q = m >> s;
            const bits_t rest = m & ((((bits_t)1) << s) - 1);
            const bits_t halfway = ((bits_t)1) << (s - 1);
            h = (u32)(q + ((rest > halfway || (rest == halfway && (q & 1))) ? 1 : 0));
        }
    }
    return sign | h;
}

// Bit pattern of the real_t equal to the half with bit pattern h (exact).
__device__ __forceinline__ bits_t sc_from_half(u32 h) {
    const bits_t sign = ((bits_t)(h & 0x8000u)) << (SC_MBITS + SC_EBITS - 15);
    const int e = (int)((h >> 10) & 0x1Fu);
    const bits_t m = (bits_t)(h & 0x3FFu);
    bits_t bits;
    if (e == 0x1F) {
        bits = ((bits_t)SC_EMAX << SC_MBITS) | (m << SC_SHIFT);
    } else if (e != 0) {
        bits = ((bits_t)(e + SC_BIAS - 15) << SC_MBITS) | (m << SC_SHIFT);
    } else if (m == 0) {
        bits = 0;
    } else {  // subnormal half m * 2**-24: normalise by its leading bit p (0..9)
        int p = 9;
        while (!((m >> p) & 1)) --p;
        bits = ((bits_t)(p - 24 + SC_BIAS) << SC_MBITS) | ((m << (SC_MBITS - p)) & SC_SIG_MASK);
    }
    return sign | bits;
}

// out[i] = float16(x[i]); *nonfinite += the number of inf/NaN outputs.
extern "C" __global__ void sc_fp16_encode(const real_t* x, i64 n, u8* out_bytes, u64* nonfinite) {
    u16* out = reinterpret_cast<u16*>(out_bytes);
    const i64 stride = sc_grid_threads();
    u64 bad = 0;
    for (i64 i = sc_thread_id(); i < n; i += stride) {
        const u32 h = sc_to_half(sc_bits(x[i]));
        out[i] = (u16)h;
        bad += (h & SC_HALF_INF) == SC_HALF_INF;
    }
    if (bad) atomicAdd(nonfinite, bad);
}

// d_i = real_t(half[i]) into out by `accumulate` (0: out = d, 1: out + d, -1: out - d),
// one IEEE operation (-ftz=false: subnormal sums kept).  Stored as a bit pattern when
// accumulate == 0, so NaN payloads survive as in astype.
extern "C" __global__ void sc_fp16_decode(const u8* half_bytes, i64 n, int accumulate,
                                          real_t* out) {
    const u16* half = reinterpret_cast<const u16*>(half_bytes);
    const i64 stride = sc_grid_threads();
    if (accumulate == 0) {  // the same for every thread: no divergence
        bits_t* out_bits = reinterpret_cast<bits_t*>(out);
        for (i64 i = sc_thread_id(); i < n; i += stride) out_bits[i] = sc_from_half(half[i]);
    } else if (accumulate > 0) {
        for (i64 i = sc_thread_id(); i < n; i += stride)
            out[i] = out[i] + sc_from_bits(sc_from_half(half[i]));
    } else {
        for (i64 i = sc_thread_id(); i < n; i += stride)
            out[i] = out[i] - sc_from_bits(sc_from_half(half[i]));
    }
}

// out[i] = x[i]; *nonfinite += the number of inf/NaN entries of x.
// Copied as bit patterns, so NaN payloads are kept.
extern "C" __global__ void sc_copy_finite(const real_t* x, i64 n, real_t* out, u64* nonfinite) {
    const bits_t* x_bits = reinterpret_cast<const bits_t*>(x);
    bits_t* out_bits = reinterpret_cast<bits_t*>(out);
    const i64 stride = sc_grid_threads();
    u64 bad = 0;
    for (i64 i = sc_thread_id(); i < n; i += stride) {
        const bits_t v = x_bits[i];
        out_bits[i] = v;
        bad += (v & SC_ABS_MASK) >= SC_INF_BITS;
    }
    if (bad) atomicAdd(nonfinite, bad);
}
