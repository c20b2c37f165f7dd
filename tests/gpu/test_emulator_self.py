"""The CUDA emulator itself (``cuda_emulator.h``): what it promises the kernel tests.

Small kernels compiled with g++ against the header into one program whose ``main``
prints each result: barriers order the threads' memory as ``__syncthreads`` does, a
missing barrier gives a wrong answer whichever neighbour is read (the scheduler
alternates its order), warp shuffles read the other lanes' values, and a deadlock is
an error rather than a hang.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

if shutil.which("g++") is None:
    pytest.skip("the CUDA emulation needs g++ (C++20)", allow_module_level=True)

from _gpu_emulator import CXX, CXX_FLAGS  # noqa: E402

HERE = Path(__file__).resolve().parent

PROGRAM = r"""
#include "cuda_emulator.h"
#include <cstdio>
#include <cstring>

constexpr unsigned N = 64;
unsigned out[3 * N];

// Each thread writes its index, then reads a neighbour's (+1 or -1), with or without
// a barrier between: out[b * N + t] for each of the 3 blocks.
template <int STEP, bool SYNC>
__global__ void neighbour() {
    __shared__ unsigned values[N];
    const unsigned t = threadIdx.x;
    values[t] = 1000 * (blockIdx.x + 1) + t;
    if (SYNC) __syncthreads();
    out[blockIdx.x * N + t] = values[(t + N + STEP) % N];
    if (SYNC) __syncthreads();
    values[t] = 0;  // the next block must not see this block's values
}

__global__ void shuffle() {
    const unsigned t = threadIdx.x;
    out[t] = __shfl_down_sync(0xffffffffu, 10 * t, 1);
}

__global__ void deadlock() {
    // Lane 0 waits for the block while lane 1 waits for its warp: neither completes.
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        (void)__shfl_down_sync(0xffffffffu, 1u, 1);
    }
}

__global__ void early_exit() {
    // Threads that return leave the barrier: the others still pass it.
    if (threadIdx.x % 2) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void throws() {
    __syncthreads();
    if (threadIdx.x == 5) throw std::runtime_error("thread 5 failed");
}

template <int STEP>
bool neighbours_right() {
    for (unsigned b = 0; b < 3; ++b)
        for (unsigned t = 0; t < N; ++t)
            if (out[b * N + t] != 1000 * (b + 1) + (t + N + STEP) % N) return false;
    return true;
}

int main(int argc, char** argv) {
    const char* which = argv[1];
    std::memset(out, 0, sizeof out);
    if (!std::strcmp(which, "synced")) {
        sc_emu::launch(3, N, [] { neighbour<1, true>(); });
        const bool up = neighbours_right<1>();
        sc_emu::launch(3, N, [] { neighbour<-1, true>(); });
        std::printf("%d %d\n", up, neighbours_right<-1>());
    } else if (!std::strcmp(which, "unsynced")) {
        sc_emu::launch(3, N, [] { neighbour<1, false>(); });
        const bool up = neighbours_right<1>();
        sc_emu::launch(3, N, [] { neighbour<-1, false>(); });
        std::printf("%d %d\n", up, neighbours_right<-1>());
    } else if (!std::strcmp(which, "shuffle")) {
        sc_emu::launch(1, 40, [] { shuffle(); });
        for (unsigned t = 0; t < 40; ++t) std::printf("%u ", out[t]);
        std::printf("\n");
    } else if (!std::strcmp(which, "early_exit")) {
        sc_emu::launch(1, N, [] { early_exit(); });
        unsigned count = 0;
        for (unsigned t = 0; t < N; ++t) count += out[t];
        std::printf("%u\n", count);
    } else if (!std::strcmp(which, "message")) {
        // What the ctypes wrappers return (tests/gpu/_gpu_emulator.py raises it).
        const char* none = sc_emu::launch_or_message(1, 32, [] { early_exit(); });
        const char* error = sc_emu::launch_or_message(1, 32, [] { deadlock(); });
        std::printf("%s|%s\n", none ? none : "none", error ? error : "none");
    } else {
        try {
            if (!std::strcmp(which, "deadlock")) sc_emu::launch(2, 32, [] { deadlock(); });
            else sc_emu::launch(2, 32, [] { throws(); });
            std::printf("no error\n");
        } catch (const std::exception& error) {
            std::printf("error: %s\n", error.what());
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    build = tmp_path_factory.mktemp("emulator")
    source = build / "self_test.cpp"
    source.write_text(PROGRAM)
    binary = build / "self_test"
    flags = [f for f in CXX_FLAGS if f not in ("-shared", "-fPIC")]
    subprocess.run(
        [CXX, *flags, f"-I{HERE}", str(source), "-o", str(binary)],
        check=True,
        capture_output=True,
        text=True,
    )

    def run(case: str) -> str:
        result = subprocess.run(
            [str(binary), case], capture_output=True, text=True, timeout=60, check=True
        )
        return result.stdout.strip()

    return run


def test_barrier_orders_shared_memory_both_ways(program):
    assert program("synced") == "1 1"


def test_missing_barrier_is_wrong_whichever_neighbour_is_read(program):
    # Without the barrier, reading the next thread's value fails in ascending passes and
    # reading the previous one's in descending passes; blocks start in both directions.
    assert program("unsynced") == "0 0"


def test_shuffle_down_reads_the_next_lane_and_keeps_its_own_past_the_warp(program):
    values = [int(v) for v in program("shuffle").split()]
    # Lanes 0-30 of warp 0 get lane + 1; lane 31 keeps its own (no lane 32 in its warp);
    # the partial warp of 8 lanes (32-39) does the same within itself.
    expected = [10 * (t + 1) for t in range(31)] + [310]
    expected += [10 * (t + 1) for t in range(32, 39)] + [390]
    assert values == expected


def test_threads_that_return_leave_the_barrier(program):
    assert program("early_exit") == "32"


def test_deadlock_is_an_error_not_a_hang(program):
    assert program("deadlock").startswith("error: emulated kernel deadlock")


def test_an_exception_in_a_thread_reaches_the_launcher(program):
    assert program("throws") == "error: thread 5 failed"


def test_the_ctypes_entry_returns_the_error_as_its_message(program):
    assert program("message") == (
        "none|emulated kernel deadlock: threads wait on barriers that cannot complete"
    )
