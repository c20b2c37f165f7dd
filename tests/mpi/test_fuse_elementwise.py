"""FP16 tensors fused into buckets reduce bit for bit as their own FP16 allreduces.

The reducer fuses an element-wise codec's tensors whatever ``compression=`` says
(tests/test_reducer_fuse_elementwise.py checks the plan); here, at any number of ranks,
each tensor of a fused bucket must equal ``sparcomm.allreduce(x, codec=FP16())`` of that
tensor alone, bit for bit, tensors of odd sizes (chunk boundaries that fall elsewhere in
the fused vector) and tensors below ``dense_below`` included.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import FP16, CodecPolicy, ErrorFeedback, NoCompression, TopK  # noqa: E402
from sparcomm.comm import allreduce  # noqa: E402
from sparcomm.reducer import GradientReducer, build_plan  # noqa: E402

COMM = MPI.COMM_WORLD
# Backward order; sizes prime or odd, one past layer_fuse_below (65536), one of 7 elements.
SHAPES = {
    "out.bias": (7,),
    "out.weight": (7, 331),
    "h2.bias": (1013,),
    "h2.weight": (301, 401),
    "h1.bias": (2003,),
    "h1.weight": (257, 131),
}


def _grads(step: int, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * step + COMM.Get_rank())
    # Eight decades of magnitude: float16 rounding, subnormals and the sums' rounding all
    # matter, so an order or a boundary that changed would change bits.
    return {
        name: (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, shape)).astype(dtype)
        for name, shape in SHAPES.items()
    }


def _same_on_all_ranks(arrays: dict[str, np.ndarray]) -> None:
    root = COMM.bcast(arrays if COMM.Get_rank() == 0 else None, root=0)
    for name in arrays:
        assert np.array_equal(arrays[name], root[name]), f"{name} differs between ranks"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compression", ["layer", "bucket"])
@pytest.mark.parametrize("dense_below", [0, 1000])
def test_fused_fp16_is_bitwise_the_per_tensor_fp16(dtype, compression, dense_below):
    itemsize = np.dtype(dtype).itemsize
    threshold = 60_000 * itemsize  # several FP16 buckets of several tensors
    reducer = GradientReducer(
        FP16(),
        fusion_threshold_bytes=threshold,
        dense_below=dense_below,
        compression=compression,
    )
    try:
        for step in range(2):
            grads = _grads(step, dtype)
            reduced = reducer.reduce(grads)
            _same_on_all_ranks(reduced)
            for name, grad in grads.items():
                # Below dense_below a tensor is reduced dense, as before.
                codec = FP16() if grad.size >= dense_below else NoCompression()
                expected = allreduce(grad, codec=codec, comm=COMM, op="mean")
                assert reduced[name].shape == grad.shape and reduced[name].dtype == grad.dtype
                np.testing.assert_array_equal(reduced[name], expected, err_msg=name)
        # As many FP16 collectives as the dense plan of the same tensors has buckets.
        specs = [(name, shape, np.dtype(dtype)) for name, shape in SHAPES.items()]
        large = [s for s in specs if int(np.prod(s[1])) >= dense_below]
        small = [s for s in specs if int(np.prod(s[1])) < dense_below]
        fused = len(
            build_plan(
                large,
                compress=False,
                fusion_threshold_bytes=threshold,
                dense_below=0,
                compression="layer",
            ).buckets
        )
        stats = reducer.last_stats
        assert fused < len(large)  # the test fuses something
        assert stats.compressed_buckets == fused
        assert stats.buckets == fused + (1 if small else 0)
        # FP16's algorithms (auto's choice among them: the same bits whichever runs)
        half = ("pipelined", "reduce_scatter_allgather", "allgather")
        assert sum(stats.algorithms.count(name) for name in half) == fused, stats.algorithms
    finally:
        reducer.close()


def test_policy_fp16_entries_fuse_and_keep_their_bits():
    """A policy's FP16 entry fuses its own tensors (exactly), its TopK entry keeps one
    collective per large tensor."""
    half = FP16()
    policy = CodecPolicy(ErrorFeedback(TopK(density=0.1)), rules=[("*.bias", half)])
    reducer = GradientReducer(policy, dense_below=0)
    try:
        for step in range(2):
            grads = _grads(step, np.float32)
            reduced = reducer.reduce(grads)
            _same_on_all_ranks(reduced)
            for name, grad in grads.items():
                if name.endswith(".bias"):
                    expected = allreduce(grad, codec=FP16(), comm=COMM, op="mean")
                    np.testing.assert_array_equal(reduced[name], expected, err_msg=name)
        # The three biases in one FP16 bucket; the TopK weights in "layer" mode:
        # h2.weight (120701 elements) alone, the two below layer_fuse_below in one
        # collective that keeps their own top-k (the sparse family's).
        stats = reducer.last_stats
        assert stats.buckets == 1 + 2 and stats.compressed_buckets == 3
    finally:
        reducer.close()
