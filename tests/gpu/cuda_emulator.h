// A small host emulation of the CUDA subset used by kernels/cuda/*.cu, so that the
// kernels' logic (indexing, barriers, warp shuffles, atomics, scans) can be
// tested bit for bit against the NumPy reference on machines without a GPU.
//
// Blocks run one after another.  The threads of a block are fibers (ucontext) on
// the launching thread, switched only at barriers: a thread runs until it reaches
// __syncthreads or a warp shuffle, then the next thread runs.  The scheduler
// passes over the threads alternately in ascending and descending order (odd
// blocks start descending), so a missing barrier shows up whichever thread
// writes first, and deterministically.  (One OS thread per CUDA thread, the
// emulator's first design, spent most of its time in sched_yield on two cores,
// and left the order to the OS.)  A barrier that can never complete (threads
// waiting on different barriers) is an error, not a hang.
// `__shared__` becomes `static`, which is right because only one block is alive
// at a time.  A thread leaves its barriers when it returns, like an exited CUDA
// thread.
//
// What this cannot show: timing, memory coalescing, occupancy, races between
// blocks (blocks never overlap here), and device compiler behaviour (the
// device build is checked separately by tests/test_nvcc_compile.py).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct sc_emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace sc_emu {

// The fibers of the block being run on this OS thread, and the one running.
struct Scheduler {
    ucontext_t main;
    std::vector<ucontext_t> contexts;
    std::vector<unsigned char> done;
    unsigned running = 0;
    // Barrier phases completed and threads finished: a pass over the threads in
    // which neither moved is a deadlock.
    unsigned long long progress = 0;
    void yield() { swapcontext(&contexts[running], &main); }
};

inline thread_local Scheduler* scheduler = nullptr;

// std::barrier's contract (arrive_and_wait, arrive_and_drop) for fibers.
struct Barrier {
    explicit Barrier(unsigned count) : expected(count) {}
    void arrive_and_wait() {
        const unsigned long long phase = generation;
        if (++arrived == expected) {
            complete();
            return;
        }
        while (generation == phase) scheduler->yield();
    }
    void arrive_and_drop() {
        --expected;
        if (expected > 0 && arrived == expected) complete();
    }
    void complete() {
        arrived = 0;
        ++generation;
        ++scheduler->progress;
    }
    unsigned expected;
    unsigned arrived = 0;
    unsigned long long generation = 0;
};

struct Block {
    explicit Block(unsigned threads) : block_barrier(threads) {
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
            const unsigned size = threads - 32 * w < 32 ? threads - 32 * w : 32;
            warp_barriers.emplace_back(std::make_unique<Barrier>(size));
        }
        exchange.resize(threads);
    }
    Barrier block_barrier;
    std::vector<std::unique_ptr<Barrier>> warp_barriers;
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

// Stack of each fiber: the kernels keep a few scalars and small arrays per thread.
// Allocated once per launch and never touched beyond what a thread uses.
constexpr std::size_t STACK_BYTES = 256 * 1024;

struct Launch {
    const std::function<void()>* kernel;
    Block* block;
    std::exception_ptr error;
};

inline thread_local Launch* launching = nullptr;

inline void run_thread() {
    Scheduler& s = *scheduler;
    Launch& l = *launching;
    const unsigned t = s.running;
    try {
        (*l.kernel)();
    } catch (...) {
        if (!l.error) l.error = std::current_exception();
    }
    l.block->warp_barriers[t / 32]->arrive_and_drop();
    l.block->block_barrier.arrive_and_drop();
    s.done[t] = 1;
    ++s.progress;
    // Returning resumes uc_link: the scheduler.
}

// Run `kernel` on a grid of `grid` blocks of `block` threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    if (block == 0 || block > 1024) throw std::invalid_argument("block size out of range");
    std::unique_ptr<char[]> stacks(new char[STACK_BYTES * block]);
    Scheduler s;
    s.contexts.resize(block);
    s.done.assign(block, 0);
    // Whatever leaves this function (an error included) restores the caller's state.
    struct Restore {
        Scheduler* scheduler;
        Launch* launching;
        ~Restore() {
            sc_emu::scheduler = scheduler;
            sc_emu::launching = launching;
        }
    } restore{scheduler, launching};
    scheduler = &s;
    blockDim.x = block;
    gridDim.x = grid;
    for (unsigned b = 0; b < grid; ++b) {
        Block state(block);
        Launch l{&kernel, &state, nullptr};
        launching = &l;
        current = &state;
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) {
            ucontext_t& c = s.contexts[t];
            if (getcontext(&c) != 0) throw std::runtime_error("getcontext failed");
            c.uc_stack.ss_sp = stacks.get() + STACK_BYTES * t;
            c.uc_stack.ss_size = STACK_BYTES;
            c.uc_link = &s.main;
            makecontext(&c, run_thread, 0);
            s.done[t] = 0;
        }
        unsigned live = block;
        // Even blocks start ascending, odd ones descending: a read of a neighbour's
        // value before the first barrier is also caught in either direction.
        bool ascending = b % 2 == 0;
        while (live > 0) {
            const unsigned long long before = s.progress;
            for (unsigned i = 0; i < block; ++i) {
                const unsigned t = ascending ? i : block - 1 - i;
                if (s.done[t]) continue;
                s.running = t;
                threadIdx.x = t;
                swapcontext(&s.main, &s.contexts[t]);
                if (s.done[t]) --live;
            }
            ascending = !ascending;
            if (live > 0 && s.progress == before) {
                throw std::runtime_error(
                    "emulated kernel deadlock: threads wait on barriers that cannot complete");
            }
        }
        if (l.error) std::rethrow_exception(l.error);
    }
}

// launch(), with an error returned as its message (nullptr: none), for callers that
// cannot take a C++ exception (ctypes).
inline const char* launch_or_message(unsigned grid, unsigned block,
                                     const std::function<void()>& kernel) {
    static thread_local std::string message;
    try {
        launch(grid, block, kernel);
        return nullptr;
    } catch (const std::exception& error) {
        message = error.what();
    } catch (...) {
        message = "unknown exception in an emulated kernel";
    }
    return message.c_str();
}

}  // namespace sc_emu
