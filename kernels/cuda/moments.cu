// Moments: kernel contract ``std`` (population standard deviation in one fixed
// summation order, so TernGrad's clip * std(x) is the same float64 on CPU and GPU).
//
// TernGrad: Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in
// Distributed Deep Learning", NeurIPS 2017 (gradient clipping at 2.5 sigma).
//
// Order (kernels/__init__.py): blocks of SC_STD_BLOCK consecutive elements; in
// each block the 8-lane lane_sum (lane j adds the block's elements j, j+8, ...
// in order, then ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))); the block sums are added
// one after another in block order.  Pass 1 sums float64(x), pass 2 sums
// d*d with d = float64(x) - mean.  Build with -fmad=false: the square and the
// lane additions round separately.
#include "common.cuh"

// Elements per contract block: kernels/cuda/_kernels.py STD_BLOCK, fixed by the
// contract (never tuned to the device, or the sums would change).
#define SC_STD_BLOCK 16384
// Terms staged in shared memory at a time (float64, 16 KiB).  A multiple of
// SC_LANES, so that tile index k belongs to lane k % 8 in every tile.
#define SC_STD_TILE 2048

// One CUDA block per contract block (grid-stride over the blocks).  Every
// thread of the CUDA block stages part of a tile of terms in shared memory --
// coalesced loads, and the subtraction and square in parallel -- then threads
// 0..7, the contract's 8 lanes, add the tile's terms k = j, j+8, ... in order.
// The lane chains are sequential by definition; the staging keeps many loads in
// flight while they run.  `centered` 0: terms float64(x) (`mean` not read);
// 1: terms d*d, d = float64(x) - mean[0].  out_sums[b] = block b's lane sum.
// Launch with at least SC_LANES threads per block.
extern "C" __global__ void sc_std_block_sums(const real_t* x, i64 n, const double* mean,
                                             int centered, double* out_sums) {
    __shared__ double tile[SC_STD_TILE];
    __shared__ double lanes[SC_LANES];
    const i64 nblocks = (n + SC_STD_BLOCK - 1) / SC_STD_BLOCK;
    const double m = centered ? mean[0] : 0.0;
    const i64 t = threadIdx.x;
    for (i64 b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const i64 start = b * SC_STD_BLOCK;
        const i64 end = start + SC_STD_BLOCK < n ? start + SC_STD_BLOCK : n;
        double acc = 0.0;  // lane t's chain (threads t < SC_LANES)
        for (i64 first = start; first < end; first += SC_STD_TILE) {
            const i64 count = end - first < SC_STD_TILE ? end - first : SC_STD_TILE;
            for (i64 k = t; k < count; k += blockDim.x) {
                const double v = (double)x[first + k];
                if (centered) {
                    const double d = v - m;
                    tile[k] = d * d;
                } else {
                    tile[k] = v;
                }
            }
            __syncthreads();
            if (t < SC_LANES) {
                // Unrolled so the shared-memory loads run ahead of the dependent adds.
#pragma unroll 8
                for (i64 k = t; k < count; k += SC_LANES) acc = acc + tile[k];
            }
            __syncthreads();  // the tile is overwritten next
        }
        if (t < SC_LANES) lanes[t] = acc;
        __syncthreads();
        if (t == 0) {
            out_sums[b] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                          ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        }
        __syncthreads();  // `lanes` is rewritten by the next block
    }
}

// The sequential combine, on one thread: out[0] = S / n with
// S = ((0.0 + sums[0]) + sums[1]) + ... in order, or sqrt(S / n) when take_root.
// It runs on the device so that the mean goes from pass 1 to pass 2 without a
// host round trip: std() synchronises once, for its 8-byte result.
extern "C" __global__ void sc_std_combine(const double* sums, i64 count, i64 n, int take_root,
                                          double* out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double total = 0.0;
    for (i64 b = 0; b < count; ++b) total = total + sums[b];
    const double quotient = total / (double)n;
    out[0] = take_root ? sqrt(quotient) : quotient;
}
