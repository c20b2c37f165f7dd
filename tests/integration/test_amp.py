"""Mixed precision: fp16/bf16 gradients, bf16 broadcasts, and GradScaler skipping a step
on every rank when one rank's gradient is not finite (DistributedOptimizer and the DDP
hook), with error-feedback residuals left as they were.

The pytest functions launch this file under ``mpiexec``; ``case_*`` run on every rank.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="mixed precision needs torch")
pytest.importorskip("mpi4py.MPI")

import _torch_dist  # noqa: E402

from sparcomm import QSGD, ErrorFeedback, TopK  # noqa: E402

INIT_SCALE = 1024.0


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(
        dtype
    )


def _batch(comm, step, dtype=torch.float32):
    rng = np.random.default_rng(100 * step + comm.Get_rank())
    x = torch.from_numpy(rng.standard_normal((6, 8))).to(dtype)
    y = torch.from_numpy(rng.integers(0, 3, 6))
    return x, y


def _flat(model):
    return np.concatenate([p.detach().double().numpy().ravel() for p in model.parameters()])


def _same_on_all_ranks(comm, values, what):
    root = comm.bcast(values, root=0)
    assert np.array_equal(values, root), f"ranks differ: {what}"


def _residuals(codec):
    memory = codec if isinstance(codec, ErrorFeedback) else None
    return {k: v.copy() for k, v in memory.state_dict()["residuals"].items()} if memory else {}


def _poison(comm, model, step, bad_step):
    """On the last rank at ``bad_step``: one inf in the first layer's gradient."""
    if step != bad_step or comm.Get_rank() != comm.Get_size() - 1:
        return None

    def hook(grad):
        grad = grad.clone()
        grad[0, 0] = float("inf")
        return grad

    return model[0].weight.register_hook(hook)


def _check_skip(comm, history, residual_history, scales, bad_step):
    """The bad step changed neither parameters nor residuals, on every rank; the scale
    halved there and only there."""
    assert np.array_equal(history[bad_step + 1], history[bad_step]), "the bad step moved"
    assert not np.array_equal(history[bad_step], history[bad_step - 1]), "no step moved"
    assert not np.array_equal(history[bad_step + 2], history[bad_step + 1])
    assert scales[bad_step] == INIT_SCALE / 2 and scales[bad_step - 1] == INIT_SCALE
    for key, value in residual_history[bad_step - 1].items():
        assert np.array_equal(residual_history[bad_step][key], value), key
    assert residual_history[bad_step - 1], "no residuals to compare"
    for values in history:
        _same_on_all_ranks(comm, values, "parameters")
    _same_on_all_ranks(comm, np.array(scales), "scales")


# ----------------------------------------------------------------- cases (under mpiexec)


def case_optimizer_skips():
    from mpi4py import MPI

    from sparcomm.torch import DistributedOptimizer

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    bad_step = 2
    for codec in (ErrorFeedback(TopK(density=0.2)), ErrorFeedback(QSGD(bits=4))):
        model = _model()
        optimizer = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            codec=codec,
            dense_below=0,
            non_finite="propagate",
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        history, residual_history, scales = [_flat(model)], [], []
        with optimizer:
            for step in range(bad_step + 2):
                handle = _poison(comm, model, step, bad_step)
                x, y = _batch(comm, step)
                optimizer.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                optimizer.synchronize()
                scaler.unscale_(optimizer)
                with optimizer.skip_synchronize():
                    scaler.step(optimizer)
                scaler.update()
                if handle is not None:
                    handle.remove()
                history.append(_flat(model))
                residual_history.append(_residuals(codec))
                scales.append(scaler.get_scale())
        _check_skip(comm, history, residual_history, scales, bad_step)
    print("optimizer ok")


def case_optimizer_raises_by_default():
    from mpi4py import MPI

    from sparcomm.torch import DistributedOptimizer

    comm = MPI.COMM_WORLD
    model = _model()
    with DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.named_parameters(),
        codec=ErrorFeedback(TopK(density=0.2)),
        dense_below=0,
    ) as optimizer:
        handle = _poison(comm, model, 0, 0)
        x, y = _batch(comm, 0)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match="non-finite|rejected its input"):
            optimizer.step()
        if handle is not None:
            handle.remove()
    print("raise ok")


def case_ddp_skips():
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparcomm.torch import DDPCommState, ddp_comm_hook

    comm = _torch_dist.init_gloo()
    bad_step = 2
    codec = ErrorFeedback(TopK(density=0.2))
    model = DDP(_model(), bucket_cap_mb=0.001)  # several buckets
    state = DDPCommState(codec, dense_below=0, non_finite="propagate")
    model.register_comm_hook(state, ddp_comm_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    history, residual_history, scales = [_flat(model)], [], []
    with state:
        for step in range(bad_step + 2):
            handle = _poison(comm, model.module, step, bad_step)
            x, y = _batch(comm, step)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if handle is not None:
                handle.remove()
            history.append(_flat(model))
            residual_history.append(_residuals(codec))
            scales.append(scaler.get_scale())
        assert state.skipped_iterations == 1
    _check_skip(comm, history, residual_history, scales, bad_step)
    print("ddp ok")


def case_half_gradients():
    """fp16 and bf16 parameters: gradients reduced in float32, identical on all ranks,
    equal to the float32 sum of every rank's gradient rounded once to the parameter's
    dtype; the same through the DDP hook; bf16 broadcasts."""
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparcomm.torch import (
        DDPCommState,
        DistributedOptimizer,
        broadcast_optimizer_state,
        broadcast_parameters,
        ddp_comm_hook,
    )

    comm = _torch_dist.init_gloo()
    for dtype in (torch.float16, torch.bfloat16):
        model = _model(dtype)
        x, y = _batch(comm, 0, dtype)
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        local = [p.grad.float().numpy().copy() for p in model.parameters()]
        expected = [comm.allreduce(g, op=MPI.SUM) / comm.Get_size() for g in local]
        with DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
        ) as optimizer:
            optimizer.synchronize()
        for p, want in zip(model.parameters(), expected, strict=True):
            assert p.grad.dtype == dtype
            got = p.grad.float().numpy()
            _same_on_all_ranks(comm, got, f"{dtype} gradient")
            assert np.array_equal(got, torch.from_numpy(want).to(dtype).float().numpy())

        ddp = DDP(_model(dtype))
        with DDPCommState() as state:
            ddp.register_comm_hook(state, ddp_comm_hook)
            torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
        for p in ddp.parameters():
            _same_on_all_ranks(comm, p.grad.float().numpy(), f"{dtype} DDP gradient")

    # bf16 broadcasts: parameters as int16 bits, optimizer state as pickled tensors.
    model = _model(torch.bfloat16)
    if comm.Get_rank() != 0:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    broadcast_parameters(model.state_dict(), root_rank=0)
    _same_on_all_ranks(comm, _flat(model), "bf16 parameters")
    adam = torch.optim.Adam(model.parameters(), lr=0.01 * (1 + comm.Get_rank()))
    x, y = _batch(comm, 1, torch.bfloat16)
    torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    adam.step()
    broadcast_optimizer_state(adam, root_rank=0)
    for state in adam.state.values():
        _same_on_all_ranks(comm, state["exp_avg"].float().numpy(), "bf16 Adam state")
        assert state["exp_avg"].dtype == torch.bfloat16
    assert comm.allgather(adam.param_groups[0]["lr"]) == [0.01] * comm.Get_size()
    print("half ok")


CASES = {
    "optimizer": case_optimizer_skips,
    "raise": case_optimizer_raises_by_default,
    "ddp": case_ddp_skips,
    "half": case_half_gradients,
}

# ----------------------------------------------------------------- pytest side


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_one_rank_inf_every_rank_skips_and_scale_halves(ranks):
    _torch_dist.run_script(__file__, "optimizer", ranks)


@pytest.mark.mpi
def test_inf_raises_on_every_rank_by_default():
    _torch_dist.run_script(__file__, "raise", 2)


@pytest.mark.mpi
def test_ddp_hook_one_rank_inf_every_rank_skips():
    _torch_dist.run_script(__file__, "ddp", 3)


@pytest.mark.mpi
def test_fp16_bf16_gradients_and_bf16_broadcasts():
    _torch_dist.run_script(__file__, "half", 2)


@pytest.mark.parametrize("codec", [ErrorFeedback(TopK(k=3)), ErrorFeedback(QSGD(bits=2))])
def test_restore_undoes_one_step_of_encodes(codec):
    rng = np.random.default_rng(0)
    for key in ("a", "b"):
        codec.encode(rng.standard_normal(40).astype(np.float32), key=key, step=0)
    before = {k: v.copy() for k, v in codec.state_dict()["residuals"].items()}
    snapshot = codec.snapshot()
    for key in ("a", "b", "new"):
        codec.encode(rng.standard_normal(40).astype(np.float32), key=key, step=1)
    assert not np.array_equal(codec.residual("a"), before["a"])
    codec.restore(snapshot)
    assert sorted(codec.keys()) == ["a", "b"]
    for key, value in before.items():
        assert np.array_equal(codec.residual(key), value)
    # Encoding after a restore works from the restored residuals.
    x = rng.standard_normal(40).astype(np.float32)
    payload = codec.encode(x, key="a", step=2)
    sent = codec.decode(payload, out=np.empty(40, np.float32))
    np.testing.assert_allclose(sent + codec.residual("a"), x + before["a"], rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
    CASES[sys.argv[1]]()
