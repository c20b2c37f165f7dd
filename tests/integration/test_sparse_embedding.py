"""Sparse embedding gradients through DistributedOptimizer: ``sparse_allreduce`` (sparse
COO in, sparse COO out) and Horovod's ``sparse_as_dense``, under ``mpiexec``.

The pytest functions launch this file as a script; ``case_*`` run on every rank.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
pytest.importorskip("mpi4py.MPI")

import _torch_dist  # noqa: E402

ROWS, WIDTH = 40, 5


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(ROWS, WIDTH, sparse=True).double()
        self.head = torch.nn.Linear(WIDTH, 2).double()

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(dim=1))


def _tokens(comm, step):
    """Different rows on every rank, with repeats (duplicate COO entries)."""
    rng = np.random.default_rng(10 * step + comm.Get_rank())
    return torch.from_numpy(rng.integers(0, ROWS // 2 + 4 * comm.Get_rank(), (6, 3)))


def _same_on_all_ranks(comm, values, what):
    root = comm.bcast(values, root=0)
    assert np.array_equal(values, root), f"ranks differ: {what}"


def _check_sum(comm, got, local):
    from mpi4py import MPI

    expected = comm.allreduce(local, op=MPI.SUM) / comm.Get_size()
    _same_on_all_ranks(comm, got, "embedding gradient")
    if comm.Get_size() <= 2:
        assert np.array_equal(got, expected)  # two addends: the order cannot matter
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-16)
    assert np.count_nonzero(got.any(axis=1)) > np.count_nonzero(local.any(axis=1)) or (
        comm.Get_size() == 1
    )


def case_sparse():
    from mpi4py import MPI

    from sparcomm.torch import DistributedOptimizer

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    for sparse_as_dense in (False, True):
        model = _Model()
        optimizer = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5),
            model.named_parameters(),
            sparse_as_dense=sparse_as_dense,
        )
        with optimizer:
            for step in range(3):
                optimizer.zero_grad()
                tokens = _tokens(comm, step)
                torch.nn.functional.cross_entropy(model(tokens), tokens[:, 0] % 2).backward()
                local = model.embedding.weight.grad.to_dense().numpy().copy()
                optimizer.synchronize()
                grad = model.embedding.weight.grad
                assert grad.is_sparse is (not sparse_as_dense)
                _check_sum(comm, grad.to_dense().numpy(), local)
                with optimizer.skip_synchronize():
                    optimizer.step()
        weights = model.embedding.weight.detach().numpy()
        _same_on_all_ranks(comm, weights, "embedding after training")
        assert not np.array_equal(weights, _Model().embedding.weight.detach().numpy())
    print("sparse ok")


CASES = {"sparse": case_sparse}


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_sparse_embedding_gradient_equals_dense_sum(ranks):
    _torch_dist.run_script(__file__, "sparse", ranks)


if __name__ == "__main__":
    CASES[sys.argv[1]]()
