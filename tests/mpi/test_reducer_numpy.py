"""GradientReducer under MPI with NumPy gradients: the result equals a dense MPI
Allreduce of what each codec sends, on every rank; fusion, overlap, warm-up and the
policy change how, never what.  Every body works at any number of ranks.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import QSGD, ErrorFeedback, NoCompression, OneBit, TernGrad, TopK  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
SHAPES = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,), "emb": (500, 8)}


def _grads(step: int, dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * step + COMM.Get_rank())
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def _dense_mean(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, g in grads.items():
        total = np.empty_like(g)
        COMM.Allreduce(g, total, op=MPI.SUM)
        out[name] = total / COMM.Get_size()
    return out


def _same_on_all_ranks(arrays: dict[str, np.ndarray]) -> None:
    root = COMM.bcast(arrays if COMM.Get_rank() == 0 else None, root=0)
    for name in arrays:
        assert np.array_equal(arrays[name], root[name]), f"{name} differs between ranks"


@pytest.mark.parametrize(("threshold", "overlap"), [(0, True), (4096, False), (1 << 20, True)])
def test_no_compression_equals_mpi_allreduce(threshold, overlap):
    reducer = GradientReducer(NoCompression(), fusion_threshold_bytes=threshold, overlap=overlap)
    try:
        for step in range(3):
            grads = _grads(step)
            reduced = reducer.reduce(grads)
            expected = _dense_mean(grads)
            _same_on_all_ranks(reduced)
            for name in SHAPES:
                assert reduced[name].shape == SHAPES[name]
                np.testing.assert_allclose(reduced[name], expected[name], rtol=1e-12, atol=1e-14)
        stats = reducer.last_stats
        assert stats.elements == sum(int(np.prod(s)) for s in SHAPES.values())
        if threshold == 0:
            assert stats.buckets == len(SHAPES)
        if threshold == 1 << 20:
            assert stats.buckets == 1
    finally:
        reducer.close()


def test_list_input_and_sum_op():
    reducer = GradientReducer(op="sum")
    try:
        grads = list(_grads(0).values())
        reduced = reducer.reduce(grads)
        assert isinstance(reduced, list)
        for g, r in zip(grads, reduced, strict=True):
            total = np.empty_like(g)
            COMM.Allreduce(g, total, op=MPI.SUM)
            np.testing.assert_allclose(r, total, rtol=1e-12, atol=1e-14)
    finally:
        reducer.close()


def _codec_or_skip(make):
    """Run one tiny allreduce with the codec; skip if its collective does not exist yet."""
    from sparcomm.comm import allreduce

    try:
        allreduce(np.ones(64), codec=make(), comm=COMM, op="mean", key="probe", step=0)
    except NotImplementedError as error:
        pytest.skip(f"no collective for {make()!r} yet: {error}")


def _reference_reduce(codec, grads, keys_for, step):
    """Mean over ranks of what each rank's codec decodes (the collective's contract)."""
    out = {}
    for name, g in grads.items():
        decoded = codec.decode(codec.encode(g, key=keys_for[name], step=step, rank=COMM.Get_rank()))
        total = np.empty_like(decoded)
        COMM.Allreduce(decoded, total, op=MPI.SUM)
        out[name] = total / COMM.Get_size()
    return out


def test_layer_mode_topk_with_error_feedback_equals_reference():
    """Layer-wise TopK+EF through the reducer equals encoding each tensor with its own
    residual and averaging the decoded tensors; small tensors go dense."""
    reducer = GradientReducer(
        ErrorFeedback(TopK(density=0.05)),
        dense_below=100,
        fusion_threshold_bytes=1 << 20,
        layer_fuse_below=0,  # every compressed tensor on its own, as the reference
    )
    reference = ErrorFeedback(TopK(density=0.05))
    try:
        for step in range(3):
            grads = _grads(step)
            reduced = reducer.reduce(grads)
            _same_on_all_ranks(reduced)
            big = {k: v for k, v in grads.items() if v.size >= 100}
            expected = _reference_reduce(reference, big, {k: k for k in big}, step)
            expected.update(_dense_mean({k: v for k, v in grads.items() if v.size < 100}))
            for name in SHAPES:
                np.testing.assert_allclose(reduced[name], expected[name], rtol=1e-10, atol=1e-12)
        assert reducer.last_stats.compressed_buckets == 3  # w1, w2, emb
        assert reducer.last_stats.buckets == 4  # + one fused dense bucket (b1, b2)
    finally:
        reducer.close()


def test_layer_mode_fuses_small_compressed_tensors_into_one_collective():
    """Below layer_fuse_below, tensors share one collective but keep their own top-k and
    residual: the result equals reducing each alone."""
    reducer = GradientReducer(
        ErrorFeedback(TopK(density=0.05)), dense_below=100, fusion_threshold_bytes=1 << 20
    )
    reference = ErrorFeedback(TopK(density=0.05))
    try:
        for step in range(3):
            grads = _grads(step)
            reduced = reducer.reduce(grads)
            _same_on_all_ranks(reduced)
            big = {k: v for k, v in grads.items() if v.size >= 100}
            expected = _reference_reduce(reference, big, {k: k for k in big}, step)
            expected.update(_dense_mean({k: v for k, v in grads.items() if v.size < 100}))
            for name in SHAPES:
                np.testing.assert_allclose(reduced[name], expected[name], rtol=1e-10, atol=1e-12)
        assert reducer.last_stats.compressed_buckets == 1  # w1, w2, emb in one collective
        assert reducer.last_stats.buckets == 2  # + one fused dense bucket (b1, b2)
    finally:
        reducer.close()


def test_warmup_steps_are_dense_then_compression_starts():
    reducer = GradientReducer(
        ErrorFeedback(TopK(density=0.01)), warmup_steps=2, dense_below=0, layer_fuse_below=0
    )
    try:
        for step in range(3):
            grads = _grads(step)
            reduced = reducer.reduce(grads)
            if step < 2:
                assert reducer.last_stats.compressed_buckets == 0
                expected = _dense_mean(grads)
                for name in SHAPES:
                    np.testing.assert_allclose(reduced[name], expected[name], rtol=1e-12)
            else:
                assert reducer.last_stats.compressed_buckets == len(SHAPES)
                # a 1% top-k mean has far fewer non-zeros than the dense mean
                assert np.count_nonzero(reduced["w1"]) <= COMM.Get_size() * 21
    finally:
        reducer.close()


def test_bucket_mode_compresses_fused_buckets():
    reducer = GradientReducer(
        ErrorFeedback(TopK(density=0.05)),
        compression="bucket",
        dense_below=0,
        fusion_threshold_bytes=1 << 20,
    )
    reference = ErrorFeedback(TopK(density=0.05))
    try:
        grads = _grads(0)
        reduced = reducer.reduce(grads)
        _same_on_all_ranks(reduced)
        assert reducer.last_stats.buckets == 1 and reducer.last_stats.compressed_buckets == 1
        # the reference: the same top-k over the concatenation, in registration order
        flat = np.concatenate([g.ravel() for g in grads.values()])
        key = reducer._plans[True].buckets[0].key
        expected = _reference_reduce(reference, {"all": flat}, {"all": key}, 0)["all"]
        got = np.concatenate([reduced[name].ravel() for name in SHAPES])
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    finally:
        reducer.close()


def _error_bound(label: str, g: np.ndarray) -> float:
    """Expected squared error of one rank's codec on ``g`` (an upper bound).

    QSGD (Alistarh et al. 2017, Lemma 3.1): ``min(d/s^2, sqrt(d)/s) * ||v||^2`` per bucket;
    TernGrad (Wen et al. 2017): ``sum(s*|g_i| - g_i^2) <= max|g| * ||g||_1``; OneBit: the
    group means are the least-squares reconstruction, no worse than sending zeros, so
    ``||g||^2``.
    """
    if label == "qsgd":
        d, s = 512, 7
        return min(d / s**2, np.sqrt(d) / s) * float(np.sum(g * g))
    if label == "terngrad":
        return float(np.abs(g).max() * np.abs(g).sum())
    return float(np.sum(g * g))


@pytest.mark.parametrize(
    ("label", "make"),
    [
        ("qsgd", lambda: QSGD(bits=4)),
        ("terngrad", lambda: TernGrad()),
        ("onebit", lambda: OneBit()),
    ],
    ids=["qsgd", "terngrad", "onebit"],
)
def test_quantized_codecs_identical_on_all_ranks_and_close_to_mean(label, make):
    _codec_or_skip(make)
    reducer = GradientReducer(make(), dense_below=0)
    try:
        grads = _grads(0)
        reduced = reducer.reduce(grads)
        _same_on_all_ranks(reduced)
        expected = _dense_mean(grads)
        size = COMM.Get_size()
        for name in SHAPES:
            assert reduced[name].shape == SHAPES[name]
            error2 = float(np.sum((reduced[name] - expected[name]) ** 2))
            # ranks quantise independently: E||mean error||^2 = sum of the bounds / P^2
            bound = COMM.allreduce(_error_bound(label, grads[name])) / size**2
            assert error2 <= 3.0 * bound, f"{name}: squared error {error2:.3g} > 3 x {bound:.3g}"
            # and the result points along the true mean (zeros or noise would not)
            alignment = float(np.sum(reduced[name] * expected[name]))
            assert alignment >= 0.3 * float(np.sum(expected[name] ** 2))
    finally:
        reducer.close()


def test_state_dict_round_trip_resumes_exactly():
    def make():
        return GradientReducer(ErrorFeedback(TopK(density=0.05)), dense_below=0)

    first, second = make(), make()
    try:
        for step in range(2):
            first.reduce(_grads(step))
        state = first.state_dict()
        assert state["step"] == 2
        second.load_state_dict(state)
        for step in range(2, 4):
            a = first.reduce(_grads(step))
            b = second.reduce(_grads(step))
            for name in SHAPES:
                np.testing.assert_array_equal(a[name], b[name])
    finally:
        first.close()
        second.close()


def test_different_models_on_ranks_raise_on_every_rank():
    if COMM.Get_size() == 1:
        pytest.skip("needs two ranks")
    reducer = GradientReducer()
    shapes = {"w": (4, 4)} if COMM.Get_rank() == 0 else {"w": (4, 5)}
    try:
        with pytest.raises(ValueError, match="differ between ranks"):
            reducer.reduce({k: np.zeros(s) for k, s in shapes.items()})
    finally:
        reducer.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_step_stats_split_the_time_into_phases(overlap):
    reducer = GradientReducer(
        ErrorFeedback(TopK(density=0.05)), dense_below=100, overlap=overlap, layer_fuse_below=0
    )
    try:
        covered = []  # per step after the first: the share of the calls' time in phases
        for step in range(5):
            reducer.reduce(_grads(step))
            last = reducer.last_stats
            inside = sum(value for name, value in last.phases.items() if name != "fuse")
            covered.append(inside / last.seconds if step else 0.0)
        stats = reducer.last_stats
        phases = stats.phases
        assert set(phases) == {
            "fuse",
            "encode",
            "check",
            "exchange",
            "merge",
            "write_back",
            "other",
        }
        assert phases["encode"] > 0 and phases["write_back"] > 0 and phases["fuse"] > 0
        assert phases["exchange"] > 0 or COMM.Get_size() == 1
        # The collectives' phases lie inside the collective calls.
        inside = sum(value for name, value in phases.items() if name != "fuse")
        assert inside <= stats.seconds * 1.001 + 1e-6
        # ... and cover most of them: in one step at least, as a calls' time of 1-2 ms
        # can take a scheduling gap of as much on a loaded machine.
        assert max(covered) >= 0.5, covered
        assert stats.wait_seconds >= 0
        if not overlap:  # the whole reduction ran inside wait()
            assert stats.wait_seconds >= stats.seconds
    finally:
        reducer.close()


@pytest.mark.parametrize("size", [1000, 300_000], ids=["mpi", "ring"])
def test_fused_dense_bucket_is_filled_on_submit_and_read_once(monkeypatch, size):
    """A fused host bucket is copied (and counted for NaN/Inf) as each gradient is
    submitted; the dense collective then reduces the buffer in place without reading it
    again (no max_abs, no second copy), on MPI's path and the ring's alike."""
    from sparcomm.kernels import cpu

    calls = {"copy_finite": 0, "max_abs": 0}
    for name in calls:
        kernel = getattr(cpu, name)

        def counted(*args, _kernel=kernel, _name=name):
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(cpu, name, counted)
    shapes = {"w": (size,), "b": (7,)}
    reducer = GradientReducer(fusion_threshold_bytes=1 << 26, overlap=False)
    reducer.setup([(name, shape, np.float32) for name, shape in shapes.items()])
    try:
        for step in range(3):
            rng = np.random.default_rng([step, COMM.Get_rank()])
            grads = {
                name: rng.standard_normal(shape).astype(np.float32)
                for name, shape in shapes.items()
            }
            kept = {name: g.copy() for name, g in grads.items()}
            for name, g in grads.items():
                reducer.submit(name, g)
                g[...] = np.nan  # already copied: the caller's array is not read again
            calls.update(copy_finite=0, max_abs=0)
            reduced = reducer.wait()
            assert calls == {"copy_finite": 0, "max_abs": 0}
            assert reducer.last_stats.buckets == 1
            _same_on_all_ranks(reduced)
            for name, g in kept.items():
                total = np.empty_like(g)
                COMM.Allreduce(g, total, op=MPI.SUM)
                # The ring sums in ring order, MPI in its own: a few roundings apart.
                bound = COMM.Get_size() * np.finfo(np.float32).eps * np.abs(g).max()
                np.testing.assert_allclose(reduced[name], total / COMM.Get_size(), atol=4 * bound)
    finally:
        reducer.close()


@pytest.mark.parametrize("size", [1000, 300_000], ids=["mpi", "ring"])
def test_fused_dense_bucket_with_a_nan_fails_on_every_rank(size):
    """The count taken while filling sends a bucket with a NaN through the collective's
    own check: NonFiniteError on every rank, and the next step is reduced as usual."""
    from sparcomm.codecs import NonFiniteError

    reducer = GradientReducer(fusion_threshold_bytes=1 << 26)
    bad = COMM.Get_size() - 1
    try:
        for step in range(2):
            grads = {"w": np.ones(size, np.float32), "b": np.ones(7, np.float32)}
            if step == 1 and COMM.Get_rank() == bad:
                grads["w"][size // 2] = np.nan
            if step == 1:
                with pytest.raises(NonFiniteError, match=f"rank {bad}|non-finite"):
                    reducer.reduce(grads)
            else:
                reducer.reduce(grads)
        reduced = reducer.reduce({"w": np.ones(size, np.float32), "b": np.ones(7, np.float32)})
        np.testing.assert_array_equal(reduced["w"], np.ones(size, np.float32))
    finally:
        reducer.close()
