// Sparse streams: kernel contract ``scatter_add`` and the merge of two sorted
// streams (``merge_sum_two``, the inner step of SparCML's sparse allreduce:
// Renggli et al., "SparCML: High-Performance Sparse Communication for Machine
// Learning", SC 2019).
//
// Floating-point addition is not associative, so no kernel here adds two values
// for one output slot from different threads (atomicAdd would make the bits
// depend on timing): duplicates are summed by one thread, in order of j.
#include "common.cuh"

// Classify an index array (one pass; totals added to flags, zero on entry):
// flags[0] = entries outside [0, size), flags[1] = descents idx[j] > idx[j+1],
// flags[2] = repeats idx[j] == idx[j+1].
extern "C" __global__ void sc_check_indices(const index_t* indices, i64 m, i64 size,
                                            u64* flags) {
    u64 outside = 0, descents = 0, repeats = 0;
    for (i64 j = sc_thread_id(); j < m; j += sc_grid_threads()) {
        const i64 v = (i64)indices[j];
        outside += (v < 0 || v >= size);
        if (j + 1 < m) {
            const i64 next = (i64)indices[j + 1];
            descents += v > next;
            repeats += v == next;
        }
    }
    if (outside) atomicAdd(flags, outside);
    if (descents) atomicAdd(flags + 1, descents);
    if (repeats) atomicAdd(flags + 2, repeats);
}

// out[idx] += values in order of position, for an index sequence that is
// non-decreasing after the permutation `order` (use_order = 0: the identity).
// The thread at the head of each run of equal indices adds the whole run, so a
// run of one (unique indices) is one thread per entry.
extern "C" __global__ void sc_scatter_add_runs(const index_t* indices, const real_t* values,
                                               const i64* order, int use_order, i64 m,
                                               real_t* out) {
    for (i64 j = sc_thread_id(); j < m; j += sc_grid_threads()) {
        const i64 pj = use_order ? order[j] : j;
        const index_t target = indices[pj];
        if (j > 0) {
            const i64 pprev = use_order ? order[j - 1] : j - 1;
            if (indices[pprev] == target) continue;  // not the head of its run
        }
        real_t acc = out[target];
        for (i64 q = j; q < m; ++q) {
            const i64 pq = use_order ? order[q] : q;
            if (indices[pq] != target) break;
            acc = acc + values[pq];
        }
        out[target] = acc;
    }
}

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
