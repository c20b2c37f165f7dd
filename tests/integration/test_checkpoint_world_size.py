"""Checkpoints across world sizes: save at 2 ranks, resume at 3 (residuals redistributed
or dropped), from a single rank-0 file or from per-rank files, under ``mpiexec``.

The pytest function runs this file as a script twice: ``save`` at 2 ranks, ``resume``
at 3; ``case_*`` run on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
pytest.importorskip("mpi4py.MPI")

import _torch_dist  # noqa: E402

STEPS = 3


def _setup(comm):
    from sparcomm import ErrorFeedback, TopK
    from sparcomm.torch import DistributedOptimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3))
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model.named_parameters(),
        codec=ErrorFeedback(TopK(density=0.1)),
        dense_below=0,
    )
    return model, optimizer


def _train(comm, model, optimizer, steps, seed):
    for step in range(steps):
        rng = np.random.default_rng(1000 * seed + 10 * step + comm.Get_rank())
        x = torch.from_numpy(rng.standard_normal((5, 6)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, 3, 5))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _residual_total(optimizer):
    residuals = optimizer.reducer.codec.state_dict()["residuals"]
    return {key: value.astype(np.float64) for key, value in residuals.items()}


def _flat(model):
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def case_save(directory):
    from mpi4py import MPI

    from sparcomm.torch import save_checkpoint

    comm = MPI.COMM_WORLD
    directory = Path(directory)
    model, optimizer = _setup(comm)
    with optimizer:
        _train(comm, model, optimizer, STEPS, seed=1)
        save_checkpoint(directory / "single.pt", model, optimizer, epoch=7)
        torch.save(optimizer.state_dict(), directory / f"rank{comm.Get_rank()}.pt")
        totals = comm.gather(_residual_total(optimizer), root=0)
        if comm.Get_rank() == 0:
            summed = {k: sum(t[k] for t in totals) for k in totals[0]}
            np.savez(directory / "expected.npz", params=_flat(model), **summed)
        # Same world size: every rank gets its own residuals back, exactly.
        own = optimizer.reducer.codec.state_dict()["residuals"]
        model2, optimizer2 = _setup(comm)
        with optimizer2:
            from sparcomm.torch import load_checkpoint

            load_checkpoint(directory / "single.pt", model2, optimizer2)
            again = optimizer2.reducer.codec.state_dict()["residuals"]
            assert own.keys() == again.keys()
            for key in own:
                assert np.array_equal(own[key], again[key])
    print("save ok")


def case_resume(directory):
    from mpi4py import MPI

    from sparcomm.torch import load_checkpoint, load_optimizer_state

    comm = MPI.COMM_WORLD
    directory = Path(directory)
    expected = np.load(directory / "expected.npz")
    old_states = [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # A plain load of another world size's state is refused, with the way out named.
    model, optimizer = _setup(comm)
    with optimizer, pytest.raises(ValueError, match="saved by rank 1 of 2"):
        optimizer.load_state_dict(old_states[1])
    results = {}
    for source in ("single", "per-rank"):
        for mode in ("redistribute", "drop"):
            model, optimizer = _setup(comm)
            with optimizer:
                if source == "single":
                    extra = load_checkpoint(
                        directory / "single.pt", model, optimizer, residuals=mode
                    )
                    assert extra == {"epoch": 7}
                else:
                    model.load_state_dict(
                        torch.load(directory / "single.pt", weights_only=False)["model"]
                    )
                    load_optimizer_state(optimizer, old_states, residuals=mode)
                assert np.array_equal(_flat(model), expected["params"])
                momentum = optimizer.state[next(model.parameters())]["momentum_buffer"]
                assert momentum is not None and float(momentum.abs().sum()) > 0
                assert optimizer.reducer.step == STEPS
                mine = _residual_total(optimizer)
                if mode == "drop":
                    assert mine == {}
                else:
                    keys = [k for k in expected.files if k != "params"]
                    assert sorted(mine) == sorted(keys)
                    for key in keys:
                        # op="mean": the mean over ranks applied next step is unchanged.
                        applied = comm.allreduce(mine[key]) / comm.Get_size()
                        np.testing.assert_allclose(applied, expected[key] / 2, rtol=1e-6, atol=1e-9)
                _train(comm, model, optimizer, 2, seed=2)
                results[source, mode] = _flat(model)
                root = comm.bcast(results[source, mode], root=0)
                assert np.array_equal(root, results[source, mode])
    assert np.array_equal(results["single", "drop"], results["per-rank", "drop"])
    assert np.array_equal(results["single", "redistribute"], results["per-rank", "redistribute"])
    assert not np.array_equal(results["single", "drop"], results["single", "redistribute"])
    print("resume ok")


CASES = {"save": case_save, "resume": case_resume}


@pytest.mark.mpi
def test_save_at_two_ranks_resume_at_three(tmp_path):
    _torch_dist.run_script(__file__, "save", 2, extra=[str(tmp_path)])
    _torch_dist.run_script(__file__, "resume", 3, extra=[str(tmp_path)])


if __name__ == "__main__":
    CASES[sys.argv[1]](sys.argv[2])
