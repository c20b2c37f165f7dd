// Counter-based uniforms (a test hook for the RNG): kernel contract ``uniform``.
#include "common.cuh"

// out[i] = u(stream, start + i) as float64, bit for bit sparcomm/_random.py.
extern "C" __global__ void sc_uniform(u64 stream, i64 start, i64 n, double* out) {
    for (i64 i = sc_thread_id(); i < n; i += sc_grid_threads()) {
        out[i] = (double)(sc_hash(stream, (u64)(start + i)) >> 8) * 5.9604644775390625e-08;
    }
}
