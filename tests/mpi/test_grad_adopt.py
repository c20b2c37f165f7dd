"""DistributedOptimizer hands each reduced gradient to ``p.grad`` without a copy
(Horovod's ``p.grad.set_(output)``): the gradient must own that memory, so a later step
never writes into a gradient a user kept, and every codec still gives the same values as
a plain ``sparcomm.allreduce`` per tensor.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at several process counts.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
MPI = pytest.importorskip("mpi4py.MPI")

import sparcomm  # noqa: E402
from sparcomm.torch import DistributedOptimizer  # noqa: E402

COMM = MPI.COMM_WORLD

CODECS = {
    "dense": lambda: sparcomm.NoCompression(),
    "fp16": lambda: sparcomm.FP16(),
    "topk": lambda: sparcomm.ErrorFeedback(sparcomm.TopK(density=0.1)),
    "powersgd": lambda: sparcomm.PowerSGD(rank=2),
    "qsgd": lambda: sparcomm.QSGD(bits=4),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + COMM.Get_rank())
    return torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("set_to_none", [True, False])
def test_kept_gradients_are_never_overwritten(name: str, set_to_none: bool) -> None:
    model = _model()
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        named_parameters=model.named_parameters(),
        compression=CODECS[name](),
        fusion_threshold_bytes=4096,  # several buckets, fused ones among them
        dense_below=16,
    )
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    with optimizer:
        for step in range(4):
            optimizer.zero_grad(set_to_none=set_to_none)
            x, y = _batch(step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            for p in model.parameters():
                assert p.grad is not None
                kept.append((p.grad, p.grad.detach().clone()))
            if not set_to_none:
                # A user who keeps the gradient objects across zero_grad(set_to_none=False)
                # sees them zeroed and refilled: only the values are compared below.
                kept = [(g.clone(), v) for g, v in kept]
    for held, value in kept:
        assert torch.equal(held, value)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_adopted_gradients_equal_the_reducers_outputs(name: str) -> None:
    """Two identical models: one through DistributedOptimizer (gradients adopted), one
    whose gradient copies go through a GradientReducer of the same settings, in the same
    order.  Bit-identical gradients and parameters after every step, on every rank."""
    model, twin = _model(), _model()
    settings = {"fusion_threshold_bytes": 4096, "dense_below": 16}
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        named_parameters=model.named_parameters(),
        compression=CODECS[name](),
        **settings,
    )
    reducer = sparcomm.GradientReducer(CODECS[name](), **settings)
    plain = torch.optim.SGD(twin.parameters(), lr=0.05)
    # DistributedOptimizer plans its buckets from the last parameter to the first.
    named = list(twin.named_parameters())[::-1]
    with optimizer, reducer:
        for step in range(3):
            x, y = _batch(step)
            for m in (model, twin):
                m.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
            optimizer.step()
            outputs = reducer.reduce({n: p.grad.numpy().copy() for n, p in named})  # type: ignore[union-attr]
            for n, p in named:
                p.grad = torch.from_numpy(np.ascontiguousarray(outputs[n]).reshape(p.shape))
            plain.step()
            for (n, a), (_, b) in zip(
                model.named_parameters(), twin.named_parameters(), strict=True
            ):
                assert torch.equal(a.grad, b.grad), (name, step, n)  # type: ignore[arg-type]
                assert torch.equal(a, b), (name, step, n)
    gathered = COMM.allgather(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    assert all(g == gathered[0] for g in gathered)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_in_place_submission_takes_the_result_where_the_collective_can(
    error_feedback: bool,
) -> None:
    """``submit(..., in_place=True)``: PowerSGD's buckets write each result into the
    given array (wait() returns that array); the values are the same bits as a reducer
    that returns new arrays; the sparse family's ``"layer"`` buckets return new arrays."""
    rng = np.random.default_rng(7 + COMM.Get_rank())
    shapes = {"w1": (48, 20), "b1": (48,), "w2": (5, 48), "b2": (5,)}

    def reducer(codec):
        return sparcomm.GradientReducer(codec, fusion_threshold_bytes=1 << 20, dense_below=0)

    given = reducer(sparcomm.PowerSGD(rank=2, error_feedback=error_feedback))
    fresh = reducer(sparcomm.PowerSGD(rank=2, error_feedback=error_feedback))
    plain = reducer(sparcomm.ErrorFeedback(sparcomm.TopK(density=0.2)))
    with given, fresh, plain:
        for r in (given, fresh, plain):
            r.setup([(n, s, np.float32) for n, s in shapes.items()])
        for _ in range(3):
            grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
            copies = {n: g.copy() for n, g in grads.items()}
            for n, g in grads.items():
                given.submit(n, g, in_place=True)
                fresh.submit(n, copies[n])
            got, want = given.wait(), fresh.wait()
            # PowerSGD's steps show in the reducer's per-phase split.
            phases = given.last_stats.phases
            assert phases["encode"] > 0 and phases["exchange"] > 0 and phases["merge"] > 0
            for n in shapes:
                assert got[n] is grads[n]  # the given array, holding the result
                np.testing.assert_array_equal(got[n], want[n])
                assert not np.shares_memory(want[n], copies[n])
            topk_in = {n: g.copy() for n, g in grads.items()}
            for n, g in topk_in.items():
                plain.submit(n, g, in_place=True)
            for n, out in plain.wait().items():
                assert not np.shares_memory(out, topk_in[n])


@pytest.mark.parametrize(
    "make",
    [
        lambda: sparcomm.NoCompression(),
        lambda: sparcomm.FP16(),
        lambda: sparcomm.ErrorFeedback(sparcomm.TopK(density=0.2)),
    ],
    ids=["dense", "fp16", "topk+ef"],
)
@pytest.mark.parametrize("fusion", [0, 1 << 20], ids=["alone", "fused"])
def test_given_up_arrays_take_their_results(make, fusion) -> None:
    """A given-up NumPy gradient in a bucket of its own holds its own result, with the
    bits of a reducer that returns new arrays (every collective reads all of ``x``
    before it writes ``out=x``); in fused buckets the values are the same too."""
    rng = np.random.default_rng(11 + COMM.Get_rank())
    shapes = {"w1": (300, 20), "b1": (300,), "w2": (5, 300), "b2": (5,)}

    def reducer():
        return sparcomm.GradientReducer(make(), fusion_threshold_bytes=fusion, dense_below=0)

    given, fresh = reducer(), reducer()
    with given, fresh:
        for r in (given, fresh):
            r.setup([(n, s, np.float32) for n, s in shapes.items()])
        for step in range(2):
            grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
            for n, g in grads.items():
                fresh.submit(n, g.copy())
                given.submit(n, g, in_place=True)
            want, got = fresh.wait(), given.wait()
            for n in shapes:
                np.testing.assert_array_equal(got[n], want[n], err_msg=f"{n} step {step}")
                if not fusion:
                    assert np.shares_memory(got[n], grads[n]), (n, step)
