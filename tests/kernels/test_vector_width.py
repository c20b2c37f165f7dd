"""``wide_vectors()`` marks a kernel for 512-bit vectors and changes none of its bits."""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
import pytest
from numba import njit
from sparcomm.kernels.cpu import quantize
from sparcomm.kernels.cpu._random import GOLDEN32, hash24_golden
from sparcomm.kernels.cpu._vector import WIDTH_BITS, wide_vectors


def _hash_loop(wide: bool):
    # Not cached: the two variants differ only in the closure's constant.
    @njit(nogil=True)
    def fields(key_lo, k2, out):
        if wide:
            wide_vectors()
        golden = np.uint32(0)
        for t in range(out.size):
            out[t] = hash24_golden(golden, key_lo, k2)
            golden = np.uint32(golden + GOLDEN32)

    return fields


def _run(fn, n=4099):
    out = np.empty(n, dtype=np.uint32)
    fn(np.uint32(0x12345678), np.uint32(0x9ABCDEF0), out)
    return out


def test_the_attributes_reach_only_the_marked_function() -> None:
    plain, wide = _hash_loop(False), _hash_loop(True)
    _run(plain)
    _run(wide)
    marked = f'"prefer-vector-width"="{WIDTH_BITS}"'
    assert marked in "".join(wide.inspect_llvm().values())
    assert marked not in "".join(plain.inspect_llvm().values())


def test_wide_and_narrow_hash_loops_give_the_same_bits() -> None:
    for n in (1, 15, 16, 17, 4099):
        assert np.array_equal(_run(_hash_loop(True), n), _run(_hash_loop(False), n))


@pytest.mark.skipif(
    "avx512f" not in llvm.get_host_cpu_features().flatten(),
    reason="the 512-bit registers need AVX-512",
)
def test_avx512_cpus_get_zmm_registers() -> None:
    wide = _hash_loop(True)
    _run(wide)
    assert "zmm" in "".join(wide.inspect_asm().values())


def test_the_quantizers_hash_loops_are_marked() -> None:
    # The stochastic quantizers' field loops, whose time the hash decides.  Compiled
    # afresh from their source: a function loaded from Numba's cache has no IR to read.
    x = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
    lanes = np.empty(64, dtype=np.uint8)
    k = np.uint32(7)
    calls = {
        quantize._qsgd_fields: (x, 0, 64, np.float32(15.0), 15, k, k, lanes, 0),
        quantize._terngrad_fields: (x, 0, 64, np.float32(1.0), np.float32(2.5), k, k, lanes, 0),
    }
    for kernel, args in calls.items():
        fresh = njit(nogil=True)(kernel.py_func)
        fresh(*args)
        text = "".join(fresh.inspect_llvm().values())
        assert f'"prefer-vector-width"="{WIDTH_BITS}"' in text, kernel.py_func.__name__
