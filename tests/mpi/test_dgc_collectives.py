"""DGC under MPI: through ``allreduce`` (every sparse algorithm), ``GradientReducer`` and
``DistributedOptimizer``, the result equals a dense MPI Allreduce of what each rank's
DGC sends and is identical on every rank.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at several process counts.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import DGC, TopK  # noqa: E402
from sparcomm.comm import allreduce  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
N = 300


def _gradient(step: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(1000 * step + RANK).standard_normal(n)


def _same_on_all_ranks(array: np.ndarray, what: str) -> None:
    root = COMM.bcast(array if RANK == 0 else None, root=0)
    assert np.array_equal(array, root), f"{what} differs between rank {RANK} and rank 0"


def _dense_sum(x: np.ndarray) -> np.ndarray:
    total = np.empty_like(x)
    COMM.Allreduce(x, total, op=MPI.SUM)
    return total


def _make() -> DGC:
    # Clipping at a norm the gradients exceed (||g|| ~ sqrt(N) = 17), so it acts.
    return DGC(TopK(density=0.05), momentum=0.9, masking=True, clip_norm=10.0)


@pytest.mark.parametrize("algorithm", ["auto", "allgather", "recursive_doubling", "dsar"])
def test_allreduce_equals_the_sum_of_what_each_rank_sends(algorithm):
    codec, reference = _make(), _make()
    for step in range(4):
        g = _gradient(step)
        reduced = allreduce(g, codec=codec, comm=COMM, op="sum", algorithm=algorithm, key="w")
        sent = reference.decode(reference.encode(g, key="w", step=step))
        _same_on_all_ranks(reduced, f"step {step}")
        np.testing.assert_allclose(reduced, _dense_sum(sent), rtol=1e-12, atol=1e-12)
    # The clipping threshold used P = the job's size (sparcomm.size()).
    assert codec.clip_threshold() == pytest.approx(10.0 / np.sqrt(SIZE))
    np.testing.assert_array_equal(codec.residual("w"), reference.residual("w"))
    np.testing.assert_array_equal(codec.momentum_buffer("w"), reference.momentum_buffer("w"))


def test_gradient_reducer_with_dgc_and_resume():
    shapes = {"w1": (40, 20), "w2": (20, 10), "b": (10,)}
    options = {"dense_below": 50, "layer_fuse_below": 0}

    def grads(step):
        return {name: _gradient(step, int(np.prod(s))).reshape(s) for name, s in shapes.items()}

    reducer = GradientReducer(_make(), **options)
    reference = _make()
    try:
        for step in range(3):
            g = grads(step)
            reduced = reducer.reduce(g)
            for name in ("w1", "w2"):
                _same_on_all_ranks(reduced[name], name)
                sent = reference.decode(reference.encode(g[name], key=name, step=step))
                expected = _dense_sum(sent) / SIZE
                np.testing.assert_allclose(reduced[name], expected, rtol=1e-12, atol=1e-12)
        state = reducer.state_dict()
        assert set(state["codec_state"]["momenta"]) == {"w1", "w2"}  # not the warm-up's
        resumed = GradientReducer(_make(), **options)
        try:
            resumed.load_state_dict(state)
            for step in range(3, 5):
                a, b = reducer.reduce(grads(step)), resumed.reduce(grads(step))
                for name in shapes:
                    np.testing.assert_array_equal(a[name], b[name])
        finally:
            resumed.close()
    finally:
        reducer.close()


def test_distributed_optimizer_with_dgc_is_identical_on_every_rank():
    torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    model = model.double()
    before = [p.detach().clone() for p in model.parameters()]
    # DGC's momentum correction replaces the optimizer's momentum: SGD(momentum=0).
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    optimizer = DistributedOptimizer(base, model.named_parameters(), codec=_make(), dense_below=0)
    rng = np.random.default_rng(RANK)
    try:
        for _ in range(4):
            x = torch.from_numpy(rng.standard_normal((6, 8)))
            y = torch.from_numpy(rng.integers(0, 3, 6))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    finally:
        optimizer.close()
    for (name, parameter), old in zip(model.named_parameters(), before, strict=True):
        value = parameter.detach().numpy()
        _same_on_all_ranks(value, name)
        assert not np.array_equal(value, old.numpy()), f"{name} never moved"
