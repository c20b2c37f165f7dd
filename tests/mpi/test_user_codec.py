"""A codec defined outside sparcomm (tests/_user_codecs.py: RandomK, sparse family) runs
end to end through ``allreduce``, ``GradientReducer`` and ``DistributedOptimizer`` by its
family's collective.  Every body works at any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from _user_codecs import RandomK  # noqa: E402

from sparcomm import ErrorFeedback  # noqa: E402
from sparcomm.codecs import CODECS  # noqa: E402
from sparcomm.comm import AllreduceStats, allreduce  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def _sent(codec, x, key, step):
    """What this rank sends: the decoded payload, as the codec encodes it here."""
    return codec.decode(codec.encode(x, key=key, step=step, rank=RANK))


def _dense_sum(x):
    total = np.empty_like(x)
    COMM.Allreduce(x, total, op=MPI.SUM)
    return total


def _same_on_all_ranks(x):
    root = COMM.bcast(x if RANK == 0 else None, root=0)
    assert np.array_equal(x, root)


def test_the_user_codec_is_registered_in_its_family():
    assert CODECS.by_id(200) is RandomK and RandomK in CODECS.family("sparse")
    assert [p.label for p in CODECS.presets("test") if p.label == "randomk-8"] == ["randomk-8"]


@pytest.mark.parametrize("algorithm", ["auto", "allgather", "split_allgather", "dsar"])
def test_allreduce_runs_the_sparse_family(algorithm):
    x = np.random.default_rng([7, RANK]).standard_normal((30, 11))
    stats = AllreduceStats()
    result = allreduce(x, codec=RandomK(40), key="w", step=2, algorithm=algorithm, stats=stats)
    expected = _dense_sum(_sent(RandomK(40), x, "w", 2))
    _same_on_all_ranks(result)
    assert result.shape == x.shape
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)
    assert stats.k == 40 and stats.k_all == [40] * SIZE
    if algorithm != "auto":
        assert stats.algorithm == algorithm


def test_allreduce_under_error_feedback_conserves_what_is_not_sent():
    x = np.random.default_rng([8, RANK]).standard_normal(500)
    feedback = ErrorFeedback(RandomK(25))
    result = allreduce(x, codec=feedback, key="w", step=0, op="mean")
    sent = x - feedback.residual("w")
    np.testing.assert_allclose(result, _dense_sum(sent) / SIZE, rtol=1e-12, atol=1e-12)
    assert np.count_nonzero(feedback.residual("w")) == 500 - 25


def test_gradient_reducer():
    shapes = {"w": (20, 10), "b": (10,), "emb": (300, 4)}
    codec = ErrorFeedback(RandomK(16))
    reducer = GradientReducer(codec, dense_below=0, fusion_threshold_bytes=0)
    try:
        for step in range(2):
            rng = np.random.default_rng([step, RANK])
            grads = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
            reduced = reducer.reduce(grads)
            for name in shapes:
                _same_on_all_ranks(reduced[name])
                assert reduced[name].shape == shapes[name]
                # every rank sent 16 entries of each tensor: at most 16 P non-zeros
                assert 0 < np.count_nonzero(reduced[name]) <= 16 * SIZE
        assert reducer.last_stats.elements == sum(int(np.prod(s)) for s in shapes.values())
    finally:
        reducer.close()


def test_distributed_optimizer():
    torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    model = model.to(torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.named_parameters(),
        codec=ErrorFeedback(RandomK(8)),
        dense_below=0,
    )
    rng = np.random.default_rng([3, RANK])
    try:
        for _ in range(3):
            x = torch.from_numpy(rng.standard_normal((8, 6)))
            y = torch.from_numpy(rng.integers(0, 3, 8))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    finally:
        optimizer.close()
    flat = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    _same_on_all_ranks(flat)
    moved = [not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True)]
    assert all(moved)  # every tensor got (sparse) updates
