"""Horovod's names on DistributedOptimizer: op=Average/Sum (and strings),
gradient_predivide_factor, compression= (codecs and Compression.none/fp16), num_groups,
under ``mpiexec``; ``case_*`` run on every rank."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
pytest.importorskip("mpi4py.MPI")

import _torch_dist  # noqa: E402


def _model():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 16) for _ in range(6)]
    return torch.nn.Sequential(*layers).double()


def _reduced_grads(comm, **options):
    from sparcomm.torch import DistributedOptimizer

    model = _model()
    rng = np.random.default_rng(comm.Get_rank())
    x = torch.from_numpy(rng.standard_normal((4, 16)))
    with DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), **options
    ) as optimizer:
        model(x).square().sum().backward()
        local = [p.grad.numpy().copy() for p in model.parameters()]
        optimizer.synchronize()
        stats = optimizer.last_stats
    return local, [p.grad.numpy().copy() for p in model.parameters()], stats


def case_names():
    from mpi4py import MPI

    from sparcomm import FP16, NoCompression
    from sparcomm.torch import Average, Compression, Sum

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    size = comm.Get_size()
    local, mean, _ = _reduced_grads(comm)
    sums = [comm.allreduce(g, op=MPI.SUM) for g in local]
    for got, total in zip(mean, sums, strict=True):
        np.testing.assert_allclose(got, total / size, rtol=1e-14)
    for op in (Average, "average", "AVG", "mean"):
        assert all(
            np.array_equal(a, b) for a, b in zip(_reduced_grads(comm, op=op)[1], mean, strict=True)
        )
    for op in (Sum, "sum"):
        for got, total in zip(_reduced_grads(comm, op=op)[1], sums, strict=True):
            np.testing.assert_allclose(got, total, rtol=1e-14)
    # Horovod: grads / f before the sum, * f / size after: the mean again.
    for got, want in zip(_reduced_grads(comm, gradient_predivide_factor=4.0)[1], mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-13)
    # compression= takes codecs and Horovod's names; fp16 rounds the values.
    for compression in (Compression.none, NoCompression()):
        got = _reduced_grads(comm, compression=compression, dense_below=0)[1]
        assert all(np.array_equal(a, b) for a, b in zip(got, mean, strict=True))
    half = _reduced_grads(comm, compression=Compression.fp16, dense_below=0)
    assert isinstance(Compression.fp16, FP16)
    for got, want in zip(half[1], mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3)
    assert half[2].compressed_buckets > 0
    # num_groups: at most that many fused buckets (one without it: 16 KiB of gradients).
    for groups in (1, 2, 3):
        stats = _reduced_grads(comm, num_groups=groups)[2]
        assert stats.buckets <= groups, (groups, stats.buckets)
    assert _reduced_grads(comm, num_groups=3)[2].buckets == 3
    print("names ok")


CASES = {"names": case_names}


@pytest.mark.mpi
def test_horovod_names():
    _torch_dist.run_script(__file__, "names", 2)


if __name__ == "__main__":
    CASES[sys.argv[1]]()
