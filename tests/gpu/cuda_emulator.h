// A small host emulation of the CUDA subset used by kernels/cuda/*.cu, so that the
// kernels' logic (indexing, barriers, warp shuffles, atomics, scans) can be
// tested bit for bit against the NumPy reference on machines without a GPU.
//
// Blocks run one after another; the threads of a block run concurrently, one
// std::thread each, with std::barrier standing in for __syncthreads and one
// barrier per warp of 32 for the shuffles.  `__shared__` becomes `static`,
// which is right because only one block is alive at a time.  A thread leaves
// its barriers with arrive_and_drop when it returns, like an exited CUDA thread.
//
// What this cannot show: timing, memory coalescing, occupancy, races between
// blocks (blocks never overlap here), and device compiler behaviour (the
// device build is checked separately by tests/test_nvcc_compile.py).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

struct sc_emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace sc_emu {

struct Block {
    explicit Block(unsigned threads) : block_barrier(threads) {
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
            const unsigned size = threads - 32 * w < 32 ? threads - 32 * w : 32;
            warp_barriers.emplace_back(std::make_unique<std::barrier<>>(size));
        }
        exchange.resize(threads);
    }
    std::barrier<> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    std::vector<uint64_t> exchange;
};

inline thread_local Block* current = nullptr;

}  // namespace sc_emu

inline thread_local sc_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

inline void __syncthreads() { sc_emu::current->block_barrier.arrive_and_wait(); }

template <typename T>
inline T sc_emu_shuffle(T value, unsigned source_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    sc_emu::Block* block = sc_emu::current;
    const unsigned t = threadIdx.x;
    const unsigned warp = t / 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    block->exchange[t] = bits;
    block->warp_barriers[warp]->arrive_and_wait();
    const unsigned width = blockDim.x - 32 * warp < 32 ? blockDim.x - 32 * warp : 32;
    // CUDA returns the caller's own value when the source lane is out of range.
    const uint64_t got = source_lane < width ? block->exchange[32 * warp + source_lane] : bits;
    block->warp_barriers[warp]->arrive_and_wait();
    T result;
    std::memcpy(&result, &got, sizeof(T));
    return result;
}

template <typename T>
inline T __shfl_down_sync(unsigned, T value, unsigned delta) {
    return sc_emu_shuffle(value, threadIdx.x % 32 + delta);
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T value, unsigned mask) {
    return sc_emu_shuffle(value, (threadIdx.x % 32) ^ mask);
}

// Bit mask of the lanes of this warp whose `value` equals this lane's.
template <typename T>
inline unsigned __match_any_sync(unsigned, T value) {
    static_assert(sizeof(T) <= 8, "match of at most 8 bytes");
    sc_emu::Block* block = sc_emu::current;
    const unsigned t = threadIdx.x;
    const unsigned warp = t / 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    block->exchange[t] = bits;
    block->warp_barriers[warp]->arrive_and_wait();
    const unsigned width = blockDim.x - 32 * warp < 32 ? blockDim.x - 32 * warp : 32;
    unsigned mask = 0;
    for (unsigned lane = 0; lane < width; ++lane) {
        if (block->exchange[32 * warp + lane] == bits) mask |= 1u << lane;
    }
    block->warp_barriers[warp]->arrive_and_wait();
    return mask;
}

inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T sc_emu_atomic_max(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old < value &&
           !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
    }
    return old;
}
inline unsigned int atomicMax(unsigned int* address, unsigned int value) {
    return sc_emu_atomic_max(address, value);
}
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
    return sc_emu_atomic_max(address, value);
}

inline unsigned int __float_as_uint(float v) {
    unsigned int b;
    std::memcpy(&b, &v, 4);
    return b;
}
inline float __uint_as_float(unsigned int b) {
    float v;
    std::memcpy(&v, &b, 4);
    return v;
}
inline long long __double_as_longlong(double v) {
    long long b;
    std::memcpy(&b, &v, 8);
    return b;
}
inline double __longlong_as_double(long long b) {
    double v;
    std::memcpy(&v, &b, 8);
    return v;
}

using std::floor;
using std::sqrt;

namespace sc_emu {

// Run `kernel` on a grid of `grid` blocks of `block` threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    if (block == 0 || block > 1024) throw std::invalid_argument("block size out of range");
    for (unsigned b = 0; b < grid; ++b) {
        Block state(block);
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t] {
                current = &state;
                threadIdx.x = t;
                blockIdx.x = b;
                blockDim.x = block;
                gridDim.x = grid;
                kernel();
                state.warp_barriers[t / 32]->arrive_and_drop();
                state.block_barrier.arrive_and_drop();
            });
        }
        for (auto& thread : threads) thread.join();
    }
}

}  // namespace sc_emu
