// Bit packing: kernel contract ``pack_bits`` / ``unpack_bits``.
//
// Element i occupies bits [i*bits, (i+1)*bits) of a little-endian, LSB-first
// stream.  Packing runs one thread per output byte, so no two threads write the
// same byte and no atomics are needed; unused trailing bits come out zero.
#include "common.cuh"

extern "C" __global__ void sc_pack_bits(const u8* fields, i64 n, int bits, u8* out,
                                        i64 nbytes) {
    const u32 mask = (1u << bits) - 1u;
    for (i64 byte = sc_thread_id(); byte < nbytes; byte += sc_grid_threads()) {
        const i64 first_bit = byte * 8;
        i64 e = first_bit / bits;                 // first element touching this byte
        const i64 last = (first_bit + 7) / bits;  // last element touching it
        u32 acc = 0;
        for (; e <= last && e < n; ++e) {
            const i64 shift = e * bits - first_bit;  // in (-bits, 8)
            const u32 field = (u32)fields[e] & mask;
            acc |= shift >= 0 ? (field << shift) : (field >> (-shift));
        }
        out[byte] = (u8)(acc & 0xFFu);
    }
}

extern "C" __global__ void sc_unpack_bits(const u8* packed, i64 n, int bits, u8* out,
                                          i64 nbytes) {
    const u32 mask = (1u << bits) - 1u;
    for (i64 i = sc_thread_id(); i < n; i += sc_grid_threads()) {
        const i64 bit = i * bits;
        const i64 byte = bit >> 3;
        u32 word = packed[byte];
        if (byte + 1 < nbytes) word |= (u32)packed[byte + 1] << 8;  // a field spans <= 2 bytes
        out[i] = (u8)((word >> (bit & 7)) & mask);
    }
}
