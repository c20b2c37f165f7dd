"""GradientReducer compiles its CPU kernels at set-up: no Numba dispatcher gains a
compiled signature during the steps (the first one with a non-zero error-feedback
residual included), and the warm-up leaves no codec state behind.
Every body works at any number of ranks.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")
import sparcomm.kernels.cpu as cpu_kernels  # noqa: E402
from numba.core.registry import CPUDispatcher  # noqa: E402

from sparcomm import FP16, QSGD, ErrorFeedback, OneBit, TopK  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
SHAPES = {"w1": (300, 200), "b1": (300,), "w2": (10, 300), "b2": (10,)}


def _compiled() -> dict[str, int]:
    """Compiled signatures of every Numba kernel in sparcomm.kernels.cpu."""
    counts = {}
    for info in pkgutil.iter_modules(cpu_kernels.__path__):
        module = importlib.import_module(f"{cpu_kernels.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher):
                counts[f"{info.name}.{name}"] = len(value.signatures)
    return counts


@pytest.mark.parametrize(
    "make",
    [lambda: ErrorFeedback(TopK(density=0.01)), lambda: ErrorFeedback(QSGD(bits=4))],
    ids=["topk-ef", "qsgd-ef"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_kernel_compiles_during_the_steps(make, dtype):
    codec = make()
    rank = COMM.Get_rank()
    with GradientReducer(codec, dense_below=100) as reducer:
        reducer.setup([(name, shape, dtype) for name, shape in SHAPES.items()])
        assert codec.keys() == []  # the warm-up's residuals are gone
        before = _compiled()
        assert sum(before.values()) > 0  # the check can fail: kernels were compiled
        for step in range(3):
            rng = np.random.default_rng(10 * step + rank)
            reducer.reduce({n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()})
        after = _compiled()
    grown = {name: (before.get(name, 0), count) for name, count in after.items()}
    grown = {name: pair for name, pair in grown.items() if pair[0] != pair[1]}
    assert not grown, f"kernels compiled during the steps (before, after): {grown}"


@pytest.mark.parametrize(
    "make",
    [
        FP16,
        lambda: ErrorFeedback(FP16()),
        lambda: ErrorFeedback(QSGD(bits=4)),
        OneBit,
        lambda: ErrorFeedback(TopK(density=0.01)),
    ],
    ids=["fp16", "fp16-ef", "qsgd-ef", "onebit", "topk-ef"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_kernel_compiles_in_large_compressed_buckets(make, dtype):
    """Tensors past one kernel chunk (65,536 elements): FP16's conversions and error
    feedback's add and subtract run their parallel variants there, and ``auto`` races
    FP16's ``pipelined``; the set-up ran them, so the steps (races included) load no
    kernel."""
    shapes = {"w0": (400, 300), "b0": (400,), "w1": (10, 400)}
    with GradientReducer(make()) as reducer:
        reducer.setup([(name, shape, dtype) for name, shape in shapes.items()])
        before = _compiled()
        for step in range(8):
            rng = np.random.default_rng(10 * step + COMM.Get_rank())
            reducer.reduce({n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()})
        algorithms = set(reducer.last_stats.algorithms)
        after = _compiled()
    grown = {name: (before.get(name, 0), count) for name, count in after.items()}
    grown = {name: pair for name, pair in grown.items() if pair[0] != pair[1]}
    assert not grown, f"kernels compiled during the steps (before, after): {grown} ({algorithms})"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_kernel_compiles_in_large_fused_dense_buckets(dtype):
    """The default codec's fused bucket past 1 MiB: its gradients are copied in by
    ``copy_finite``'s parallel variant as they are submitted, and the ring sums it; the
    set-up ran both, so the steps load no kernel."""
    shapes = {"w0": (400, 300), "b0": (400,), "w1": (10, 400)}
    with GradientReducer() as reducer:
        reducer.setup([(name, shape, dtype) for name, shape in shapes.items()])
        before = _compiled()
        for step in range(3):
            rng = np.random.default_rng(10 * step + COMM.Get_rank())
            reducer.reduce({n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()})
            assert reducer.last_stats.buckets == 1  # one fused dense bucket
        after = _compiled()
    grown = {name: (before.get(name, 0), count) for name, count in after.items()}
    grown = {name: pair for name, pair in grown.items() if pair[0] != pair[1]}
    assert not grown, f"kernels compiled during the steps (before, after): {grown}"
