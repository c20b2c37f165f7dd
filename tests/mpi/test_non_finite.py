"""NaN/Inf policy on every path: one rank's non-finite input is a NonFiniteError (a
ValueError) on every rank, raised through the agreement before any data moves; no rank
receives a sum.  The last rank holds the bad value (rank 0 at P = 1); every body works
at any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import ErrorFeedback, NoCompression, TopK  # noqa: E402
from sparcomm.codecs import NonFiniteError  # noqa: E402
from sparcomm.comm import allreduce, sparse_allreduce  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
BAD = SIZE - 1
BAD_VALUES = [np.nan, np.inf, -np.inf]


def _expect_everywhere(call, *, local_message: str):
    """``call()`` raises NonFiniteError on every rank: the bad rank names its count,
    the others name the bad rank; the message says what was expected and the fix."""
    with pytest.raises(NonFiniteError) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    if RANK == BAD:
        assert local_message in message
    else:
        assert f"rank {BAD} has non-finite values (NaN or Inf)" in message
    assert "expected finite values" in message
    assert "check the loss scale or clip gradients" in message
    # The collective is usable afterwards: nothing was left in flight.
    total = allreduce(np.ones(3), comm=COMM)
    np.testing.assert_array_equal(total, np.full(3, float(SIZE)))


def _poisoned(shape, bad, dtype=np.float64):
    x = np.random.default_rng([3, RANK]).standard_normal(shape).astype(dtype)
    if RANK == BAD:
        x.reshape(-1)[-1] = bad
    return x


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("codec", [None, NoCompression(), ErrorFeedback(NoCompression())], ids=repr)
def test_dense_allreduce_refuses_non_finite_on_every_rank(codec, dtype, bad):
    x = _poisoned((7, 5), bad, dtype)
    before = x.copy()
    _expect_everywhere(
        lambda: allreduce(x, codec=codec, comm=COMM, op="mean"),
        local_message="x contains 1 non-finite values",
    )
    np.testing.assert_array_equal(x, before)  # the input is untouched


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_dense_allreduce_in_place_refuses_non_finite_and_leaves_x(bad):
    x = _poisoned(100, bad)
    before = x.copy()
    _expect_everywhere(
        lambda: allreduce(x, comm=COMM, out=x), local_message="x contains 1 non-finite values"
    )
    np.testing.assert_array_equal(x, before)  # checked before MPI wrote into it


def test_dense_allreduce_of_finite_values_is_the_mpi_sum():
    x = _poisoned(1000, 0.0)
    expected = np.empty_like(x)
    COMM.Allreduce(x, expected, op=MPI.SUM)
    np.testing.assert_array_equal(allreduce(x, comm=COMM), expected)
    in_place = x.copy()
    np.testing.assert_array_equal(allreduce(in_place, comm=COMM, out=in_place), expected)


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_sparse_allreduce_refuses_non_finite_values(bad):
    indices = np.array([1, 4, 7])
    values = np.array([1.0, 2.0, bad if RANK == BAD else 3.0])
    _expect_everywhere(
        lambda: sparse_allreduce(indices, values, 10, comm=COMM),
        local_message="values contains 1 non-finite values",
    )


@pytest.mark.parametrize(
    "codec", [None, NoCompression(), ErrorFeedback(TopK(density=0.1))], ids=repr
)
def test_reducer_refuses_non_finite_in_dense_tensors(codec):
    """The default codec, and a bias under ``dense_below`` with TopK: reduced dense."""
    kwargs = {} if codec is None else {"codec": codec}
    reducer = GradientReducer(**kwargs, dense_below=64)
    grads = {
        "weight": np.random.default_rng([4, RANK]).standard_normal((20, 30)),
        "bias": _poisoned(20, np.nan),
    }
    try:
        _expect_everywhere(
            lambda: reducer.reduce(grads), local_message="x contains 1 non-finite values"
        )
    finally:
        reducer.close()


@pytest.mark.parametrize("dense_below", [0, 1 << 20])
def test_distributed_optimizer_default_codec_refuses_non_finite(dense_below):
    """The default (dense) codec: every tensor; with TopK, the biases below dense_below."""
    torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Linear(40, 3)).double()
    codec = {} if dense_below == 0 else {"codec": ErrorFeedback(TopK(density=0.1))}
    with DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.named_parameters(),
        dense_below=dense_below,
        **codec,
    ) as optimizer:
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.from_numpy(np.random.default_rng([5, RANK]).standard_normal((4, 6)))
        model(x).sum().backward()
        if RANK == BAD:
            model[1].bias.grad[0] = float("nan")  # a bias: reduced dense in both settings
        _expect_everywhere(optimizer.step, local_message="non-finite values")
        for p, q in zip(model.parameters(), before, strict=True):
            assert torch.equal(p.detach(), q)  # no rank stepped


@pytest.mark.parametrize("codec", [ErrorFeedback(TopK(density=0.1)), None], ids=repr)
def test_reducer_refuses_non_finite_after_the_first_steps(codec):
    """Later steps too (the reducer's agreed layouts check in steady state): the class
    reaches every rank, and the rank at fault says why."""
    kwargs = {} if codec is None else {"codec": codec}
    reducer = GradientReducer(**kwargs, dense_below=0)
    try:
        for step in range(3):
            grads = {"weight": _poisoned((20, 30), 0.0 if step < 2 else np.inf)}
            if step < 2:
                reducer.reduce(grads)
                continue
            with pytest.raises(NonFiniteError) as caught:
                reducer.reduce(grads)
            message = str(caught.value)
            if RANK == BAD:
                assert "x contains 1 non-finite values" in message
            else:
                assert f"rank {BAD}" in message
    finally:
        reducer.close()


@pytest.mark.parametrize("non_finite", ["raise", "propagate"])
def test_sparse_embedding_gradient_with_non_finite_values(non_finite):
    """sparse_allreduce's values check: an error on every rank, or with
    ``non_finite="propagate"`` (GradScaler) a step every rank skips (NaN gradients)."""
    torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(30, 4, sparse=True).double()
    head = torch.nn.Linear(4, 2).double()
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    with DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.named_parameters(),
        non_finite=non_finite,
    ) as optimizer:
        tokens = torch.from_numpy(np.random.default_rng([6, RANK]).integers(0, 30, (5, 3)))
        head(embedding(tokens).mean(dim=1)).sum().backward()
        if RANK == BAD:
            embedding.weight.grad._values()[0, 0] = float("inf")
        if non_finite == "raise":
            with pytest.raises(NonFiniteError):
                optimizer.synchronize()
        else:
            optimizer.synchronize()
            for p in model.parameters():
                assert torch.isnan(p.grad.to_dense()).all()
