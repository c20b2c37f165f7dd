// Sparse streams: kernel contract ``scatter_add`` and the index check that it and
// the merges (merge.cu) run first.
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
