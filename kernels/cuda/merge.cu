// Merge of two sorted sparse streams: ``merge_sum_two`` (the twin of
// kernels/cpu/merge.py), the inner step of SparCML's sparse allreduce: Renggli et
// al., "SparCML: High-Performance Sparse Communication for Machine Learning",
// SC 2019.  The launcher also runs sc_check_indices (sparse.cu) on both streams
// and sc_scan_rows (topk.cu) on the per-tile match counts.
//
// Floating-point addition is not associative, so no kernel here adds two values
// for one output slot from different threads: an index in both streams is summed
// once, by the thread of A's entry.
#include "common.cuh"

// First position p in sorted[0..len) with sorted[p] >= value.
__device__ __forceinline__ i64 sc_lower_bound(const index_t* sorted, i64 len, index_t value) {
    i64 lo = 0, hi = len;
    while (lo < hi) {
        const i64 mid = (lo + hi) >> 1;
        if (sorted[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Merge of two strictly ascending streams A and B.  An index in both is written
// once, by A's entry, with value a + b; every other entry is copied.  With
// lb(v) the position of v in the other stream and matches(i) the number of A
// entries before i that also occur in B, A[i] goes to slot i + lb_B(A[i]) -
// matches(i); an unmatched B[j] to j + lb_A(B[j]) - (matched B entries before j).
// Tiles: blocks [0, tiles_a) cover A, blocks [tiles_a, tiles_a + tiles_b) cover B;
// counts[0 .. row) are A's per-tile match counts, counts[row ..) B's.
extern "C" __global__ void sc_merge_count(const index_t* a, i64 na, const index_t* b, i64 nb,
                                          i64 tiles_a, i64 row, u64* counts) {
    const bool in_a = (i64)blockIdx.x < tiles_a;
    const i64 tile = in_a ? (i64)blockIdx.x : (i64)blockIdx.x - tiles_a;
    const index_t* self = in_a ? a : b;
    const index_t* other = in_a ? b : a;
    const i64 nself = in_a ? na : nb;
    const i64 nother = in_a ? nb : na;
    const i64 tile_start = tile * blockDim.x * SC_ITEMS;
    u64 matched = 0;
    for (int r = 0; r < SC_ITEMS; ++r) {
        const i64 i = tile_start + (i64)r * blockDim.x + threadIdx.x;
        if (i < nself) {
            const i64 p = sc_lower_bound(other, nother, self[i]);
            matched += p < nother && other[p] == self[i];
        }
    }
    u64 total;
    sc_block_exclusive_scan(matched, &total);
    if (threadIdx.x == 0) counts[(in_a ? 0 : row) + tile] = total;
}

extern "C" __global__ void sc_merge_write(const index_t* a, const real_t* a_values, i64 na,
                                          const index_t* b, const real_t* b_values, i64 nb,
                                          i64 tiles_a, i64 row, const u64* offsets,
                                          index_t* out_indices, real_t* out_values) {
    const bool in_a = (i64)blockIdx.x < tiles_a;
    const i64 tile = in_a ? (i64)blockIdx.x : (i64)blockIdx.x - tiles_a;
    const index_t* self = in_a ? a : b;
    const index_t* other = in_a ? b : a;
    const i64 nself = in_a ? na : nb;
    const i64 nother = in_a ? nb : na;
    const i64 first = (tile * blockDim.x + threadIdx.x) * SC_ITEMS;
    i64 where[SC_ITEMS];
    u64 matched = 0;
#pragma unroll
    for (int r = 0; r < SC_ITEMS; ++r) {
        const i64 i = first + r;
        where[r] = -1;
        if (i < nself) {
            const i64 p = sc_lower_bound(other, nother, self[i]);
            where[r] = p;
            matched += p < nother && other[p] == self[i];
        }
    }
    u64 unused;
    u64 before = offsets[(in_a ? 0 : row) + tile] + sc_block_exclusive_scan(matched, &unused);
#pragma unroll
    for (int r = 0; r < SC_ITEMS; ++r) {
        const i64 i = first + r;
        if (i >= nself) break;
        const i64 p = where[r];
        const bool match = p < nother && other[p] == self[i];
        const i64 slot = i + p - (i64)before;
        if (match) ++before;
        if (in_a) {
            out_indices[slot] = self[i];
            out_values[slot] = match ? a_values[i] + b_values[p] : a_values[i];
        } else if (!match) {
            out_indices[slot] = self[i];
            out_values[slot] = b_values[i];
        }
    }
}
