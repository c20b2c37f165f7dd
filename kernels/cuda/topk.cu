// Exact top-k of |x| by radix select on the IEEE bit pattern: kernel contract ``topk``.
//
// The key of an element is its bit pattern with the sign cleared, so the order of
// keys is the order of |x| (-0.0 == +0.0; inf and NaN above every finite value).
// Passes over digits of up to 11 bits, most significant first, find the key T of
// the k-th largest element and how many elements equal to T must be kept (kt);
// a stable compaction then writes every element with key > T and the first kt
// elements with key == T, in ascending index order (ties go to the lowest
// indices).  No sort: x is read four times (first histogram, candidate
// collection, count, write).  (Alabi et al., "Fast k-selection algorithms
// for graphics processing units", JEA 2012, describe radix select on GPUs.)
//
// state[0]: key prefix found so far (T after the last pass)
// state[1]: how many elements of that prefix are still to be taken (kt at the end)
// state[2]: number of non-finite entries (counted in the first pass)
// state[3]: how many elements share the prefix after the last select
//
// Only the first pass reads all of x; the elements that share its digit are
// then compacted (sc_topk_collect) and the later digits resolved on them.
#include "common.cuh"

#define SC_TOPK_MAX_BINS 2048  // digits of at most 11 bits
#define SC_NO_DIGIT 0xFFFFFFFFu  // a lane with no element of the current prefix

// Histogram of the digit (key >> shift) & (2**digit_bits - 1) over the elements
// whose key matches the prefix found by the earlier passes.  `hist` is zero on
// entry (sc_topk_select leaves it zeroed for the next pass).
extern "C" __global__ void sc_topk_histogram(const real_t* x, i64 n, int shift, int digit_bits,
                                             int first_pass, u64* state, u64* hist) {
    __shared__ u32 local[SC_TOPK_MAX_BINS];
    const int nbins = 1 << digit_bits;
    for (int d = threadIdx.x; d < nbins; d += blockDim.x) local[d] = 0;
    __syncthreads();
    const int top = shift + digit_bits;  // bits at and above `top` form the prefix
    const bits_t high_mask = top >= (int)(8 * sizeof(bits_t)) ? (bits_t)0
                                                              : ~(((bits_t)1 << top) - 1);
    const bits_t prefix = (bits_t)state[0];
    const bits_t digit_mask = ((bits_t)1 << digit_bits) - 1;
    u64 nonfinite = 0;
    const int lane = threadIdx.x % SC_WARP;
    // Warp-uniform trip count (lanes past n take part with no digit), so that the
    // lanes holding the same digit can meet in __match_any_sync and add once: many
    // equal digits (zeros, one dominant exponent) would otherwise serialise up to
    // 32 shared-memory atomics on one address.
    for (i64 base = sc_thread_id() - lane; base < n; base += sc_grid_threads()) {
        const i64 i = base + lane;
        u32 digit = SC_NO_DIGIT;
        if (i < n) {
            const bits_t key = sc_abs_key(x[i]);
            if (first_pass && key >= SC_INF_BITS) ++nonfinite;
            if ((key & high_mask) == prefix) digit = (u32)((key >> shift) & digit_mask);
        }
        const unsigned peers = __match_any_sync(SC_FULL_MASK, digit);
        if (digit != SC_NO_DIGIT && lane == __ffs(peers) - 1) {
            atomicAdd(&local[digit], (u32)__popc(peers));
        }
    }
    if (nonfinite) atomicAdd(state + 2, nonfinite);
    __syncthreads();
    for (int d = threadIdx.x; d < nbins; d += blockDim.x) {
        if (local[d]) atomicAdd(hist + d, (u64)local[d]);
    }
}

// Same histogram over the compacted candidate keys (passes after the first).
extern "C" __global__ void sc_topk_histogram_keys(const bits_t* keys, i64 m, int shift,
                                                  int digit_bits, const u64* state, u64* hist) {
    __shared__ u32 local[SC_TOPK_MAX_BINS];
    const int nbins = 1 << digit_bits;
    for (int d = threadIdx.x; d < nbins; d += blockDim.x) local[d] = 0;
    __syncthreads();
    const int top = shift + digit_bits;
    const bits_t high_mask = top >= (int)(8 * sizeof(bits_t)) ? (bits_t)0
                                                              : ~(((bits_t)1 << top) - 1);
    const bits_t prefix = (bits_t)state[0];
    const bits_t digit_mask = ((bits_t)1 << digit_bits) - 1;
    for (i64 i = sc_thread_id(); i < m; i += sc_grid_threads()) {
        const bits_t key = keys[i];
        if ((key & high_mask) == prefix) atomicAdd(&local[(key >> shift) & digit_mask], 1u);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < nbins; d += blockDim.x) {
        if (local[d]) atomicAdd(hist + d, (u64)local[d]);
    }
}

// After the first pass: copy the keys that share the prefix (bits at and above
// `shift`) into `keys` (any order: later passes only count), so that the
// remaining digits are resolved on a few candidates instead of all of x.  One
// global atomic per block and tile reserves the block's slots.  counter: zero.
extern "C" __global__ void sc_topk_collect(const real_t* x, i64 n, int shift, const u64* state,
                                           bits_t* keys, u64* counter) {
    __shared__ u32 block_count;
    __shared__ u64 block_base;
    const bits_t high_mask = ~(((bits_t)1 << shift) - 1);
    const bits_t prefix = (bits_t)state[0];
    const i64 tile = (i64)blockDim.x * SC_ITEMS;
    // The trip count depends on the block only, so every thread meets every barrier.
    for (i64 start = (i64)blockIdx.x * tile; start < n; start += (i64)gridDim.x * tile) {
        if (threadIdx.x == 0) block_count = 0;
        __syncthreads();
        bits_t tile_keys[SC_ITEMS];  // indexed by unrolled constants only: registers
        bool match[SC_ITEMS];
        u32 mine = 0;
#pragma unroll
        for (int r = 0; r < SC_ITEMS; ++r) {
            const i64 i = start + (i64)r * blockDim.x + threadIdx.x;
            tile_keys[r] = i < n ? sc_abs_key(x[i]) : (bits_t)0;
            match[r] = i < n && (tile_keys[r] & high_mask) == prefix;
            mine += match[r];
        }
        const u32 offset = mine ? atomicAdd(&block_count, mine) : 0u;
        __syncthreads();
        if (threadIdx.x == 0 && block_count) block_base = atomicAdd(counter, (u64)block_count);
        __syncthreads();
        u64 slot = block_base + offset;
#pragma unroll
        for (int r = 0; r < SC_ITEMS; ++r) {
            if (match[r]) keys[slot++] = tile_keys[r];
        }
        __syncthreads();  // block_count and block_base are reused by the next tile
    }
}

// One block: find the digit d holding the k'-th largest candidate, i.e.
// above(d) < k' <= above(d) + hist[d] where above(d) counts candidates with a
// larger digit; append d to the prefix and keep k' - above(d).  Zeroes `hist`.
extern "C" __global__ void sc_topk_select(u64* hist, int digit_bits, int shift, u64* state) {
    const i64 nbins = 1 << digit_bits;
    const u64 wanted = state[1];  // read by every thread before the scan's first barrier
    const i64 chunk = (nbins + blockDim.x - 1) / blockDim.x;
    // Thread t owns positions [t*chunk, (t+1)*chunk) counted from the top digit down.
    const i64 first = (i64)threadIdx.x * chunk;
    u64 mine = 0;
    for (i64 r = first; r < first + chunk && r < nbins; ++r) mine += hist[nbins - 1 - r];
    u64 total;
    u64 above = sc_block_exclusive_scan(mine, &total);
    for (i64 r = first; r < first + chunk && r < nbins; ++r) {
        const i64 d = nbins - 1 - r;
        const u64 h = hist[d];
        if (above < wanted && wanted <= above + h) {  // exactly one thread, one digit
            state[0] |= (u64)d << shift;
            state[1] = wanted - above;
            state[3] = h;  // candidates left: the size of the collect buffer
        }
        above += h;
        hist[d] = 0;
    }
}

// Per tile of blockDim.x * SC_ITEMS elements: how many keys are > T and == T.
// counts[b] = greater, counts[row + b] = equal.
extern "C" __global__ void sc_topk_count(const real_t* x, i64 n, const u64* state, u64* counts,
                                         i64 row) {
    const bits_t threshold = (bits_t)state[0];
    const i64 tile_start = (i64)blockIdx.x * blockDim.x * SC_ITEMS;
    u64 greater = 0, equal = 0;
#pragma unroll
    for (int r = 0; r < SC_ITEMS; ++r) {
        const i64 i = tile_start + (i64)r * blockDim.x + threadIdx.x;  // coalesced
        if (i < n) {
            const bits_t key = sc_abs_key(x[i]);
            greater += key > threshold;
            equal += key == threshold;
        }
    }
    u64 total_greater, total_equal;
    sc_block_exclusive_scan(greater, &total_greater);
    sc_block_exclusive_scan(equal, &total_equal);
    if (threadIdx.x == 0) {
        counts[blockIdx.x] = total_greater;
        counts[row + blockIdx.x] = total_equal;
    }
}

// Stable compaction: element i is kept when key > T, or key == T and fewer than
// kt equal keys precede it; its output slot is
//     (#greater before i) + min(#equal before i, kt).
// Each thread owns SC_ITEMS consecutive elements so that the block-level scan
// follows index order.  offsets: exclusive scans of counts (sc_scan_rows).
extern "C" __global__ void sc_topk_write(const real_t* x, i64 n, const u64* state,
                                         const u64* offsets, i64 row, index_t* out_indices,
                                         real_t* out_values) {
    const bits_t threshold = (bits_t)state[0];
    const u64 ties = state[1];
    const i64 first = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * SC_ITEMS;
    bits_t keys[SC_ITEMS];
    u64 greater = 0, equal = 0;
#pragma unroll
    for (int r = 0; r < SC_ITEMS; ++r) {
        const i64 i = first + r;
        keys[r] = i < n ? sc_abs_key(x[i]) : (bits_t)0;
        if (i < n) {
            greater += keys[r] > threshold;
            equal += keys[r] == threshold;
        }
    }
    u64 unused;
    u64 greater_before = offsets[blockIdx.x] + sc_block_exclusive_scan(greater, &unused);
    u64 equal_before = offsets[row + blockIdx.x] + sc_block_exclusive_scan(equal, &unused);
#pragma unroll
    for (int r = 0; r < SC_ITEMS; ++r) {
        const i64 i = first + r;
        if (i >= n) break;
        if (keys[r] > threshold) {
            const u64 slot = greater_before + (equal_before < ties ? equal_before : ties);
            out_indices[slot] = (index_t)i;
            out_values[slot] = x[i];
            ++greater_before;
        } else if (keys[r] == threshold) {
            if (equal_before < ties) {
                const u64 slot = greater_before + equal_before;
                out_indices[slot] = (index_t)i;
                out_values[slot] = x[i];
            }
            ++equal_before;
        }
    }
}

// Set the search state before the first pass: empty prefix, k still wanted.
extern "C" __global__ void sc_topk_init(u64* state, i64 k) {
    if (sc_thread_id() == 0) {
        state[0] = 0;
        state[1] = (u64)k;
        state[2] = 0;
        state[3] = 0;
    }
}

// One block per row: out[row*r + j] = sum of in[row*r + 0 .. j) (exclusive scan
// of `length` counts); totals[r] = the row's sum.  Rows are `row` apart.
extern "C" __global__ void sc_scan_rows(const u64* in, i64 length, i64 row, u64* out,
                                        u64* totals) {
    const i64 base = (i64)blockIdx.x * row;
    u64 carry = 0;
    for (i64 start = 0; start < length; start += (i64)blockDim.x * SC_ITEMS) {
        const i64 first = start + (i64)threadIdx.x * SC_ITEMS;
        u64 mine = 0;
        for (int r = 0; r < SC_ITEMS; ++r) {
            if (first + r < length) mine += in[base + first + r];
        }
        u64 chunk_total;
        u64 running = carry + sc_block_exclusive_scan(mine, &chunk_total);
        for (int r = 0; r < SC_ITEMS; ++r) {
            if (first + r < length) {
                const u64 v = in[base + first + r];
                out[base + first + r] = running;
                running += v;
            }
        }
        carry += chunk_total;
    }
    if (threadIdx.x == 0) totals[blockIdx.x] = carry;
}
