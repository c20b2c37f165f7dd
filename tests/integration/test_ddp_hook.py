"""The sparcomm DDP communication hook against DDP without a hook, under ``mpiexec``.

The pytest functions launch this file as a script at several process counts; the
``case_*`` functions run on every rank (gloo process group on 127.0.0.1, MPI's ranks).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="the DDP hook needs torch")
pytest.importorskip("mpi4py.MPI")

import _torch_dist  # noqa: E402

pytestmark = pytest.mark.mpi

STEPS = 6


def _model(dtype):
    import torch

    torch.manual_seed(0)
    # Several buckets at bucket_cap_mb=0.05 (about 52 kB): DDP rebuilds them after the
    # first iteration, in the order the gradients were ready.
    return torch.nn.Sequential(
        torch.nn.Linear(10, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    ).to(dtype)


def _data(comm, steps, dtype, seed=1):
    """(x, y) per step: this rank's rows of a regression task shared by all ranks."""
    import torch

    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal(10)
    batches = []
    for _ in range(steps):
        x = rng.standard_normal((8 * comm.Get_size(), 10))
        y = np.tanh(x @ teacher)[:, None]
        rows = slice(8 * comm.Get_rank(), 8 * comm.Get_rank() + 8)
        batches.append((torch.from_numpy(x[rows]).to(dtype), torch.from_numpy(y[rows]).to(dtype)))
    return batches


def _train(ddp, batches, lr=0.1, accumulate=False):
    """SGD with momentum; with ``accumulate`` the first half-batch runs under no_sync."""
    import torch

    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        if accumulate:
            with ddp.no_sync():
                torch.nn.functional.mse_loss(ddp(x[:4]), y[:4]).backward()
            loss = torch.nn.functional.mse_loss(ddp(x[4:]), y[4:])
        else:
            loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _flat(module):
    return np.concatenate([p.detach().double().numpy().ravel() for p in module.parameters()])


def _same_on_all_ranks(comm, values):
    root = comm.bcast(values, root=0)
    assert np.array_equal(values, root), "ranks hold different parameters"


def _record_relayouts(state, tables):
    """Wrap ``state._relayout`` to record the total of each per-bucket state around every
    relayout; ``tables`` names (the memory's getter of a key's array, the state's dict of
    pieces waiting for their new bucket).  Returns the list of (before, after) totals."""
    carried = []
    relayout = state._relayout

    def totals():
        sums = []
        for getter, orphans in tables:
            kept = [getattr(state._memory, getter)(k) for k in state._memory.keys()]
            held = sum(float(np.sum(v, dtype=np.float64)) for v in kept if v is not None)
            waiting = getattr(state, orphans).values()
            sums.append(held + sum(float(np.sum(p, dtype=np.float64)) for p in waiting))
        return tuple(sums)

    def checked_relayout(index, layout):
        before = totals()
        relayout(index, layout)
        carried.append((before, totals()))

    state._relayout = checked_relayout
    return carried


# ----------------------------------------------------------------- cases (under mpiexec)


def case_dense_equals_ddp():
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparcomm import NoCompression
    from sparcomm.torch import DDPCommState, ddp_comm_hook

    comm = _torch_dist.init_gloo()
    batches = _data(comm, STEPS, torch.float64)
    for accumulate in (False, True):
        plain = DDP(_model(torch.float64), bucket_cap_mb=0.05)
        _train(plain, batches, accumulate=accumulate)
        expected = _flat(plain)
        for threaded in (True, False):
            hooked = DDP(_model(torch.float64), bucket_cap_mb=0.05)
            with DDPCommState(NoCompression(), threaded=threaded) as state:
                hooked.register_comm_hook(state, ddp_comm_hook)
                _train(hooked, batches, accumulate=accumulate)
                assert state.iteration == STEPS
                assert state.buckets > STEPS  # several buckets per iteration
            got = _flat(hooked)
            _same_on_all_ranks(comm, got)
            if comm.Get_size() <= 2:
                # a + b == b + a: with two ranks the order of the sum cannot matter.
                assert np.array_equal(got, expected), np.abs(got - expected).max()
            else:
                # Three or more addends: gloo's ring and MPI's allreduce add in different
                # orders, and floating-point addition is not associative.
                np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
            assert np.abs(expected - _flat(_model(torch.float64))).max() > 1e-3
    print("dense ok")


def case_topk_converges():
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparcomm import ErrorFeedback, TopK
    from sparcomm.torch import DDPCommState, ddp_comm_hook

    comm = _torch_dist.init_gloo()
    steps = 60
    batches = _data(comm, steps, torch.float32, seed=2)
    ddp = DDP(_model(torch.float32), bucket_cap_mb=0.05)
    state = DDPCommState(ErrorFeedback(TopK(density=0.1)), dense_below=0)
    # The residual mass (all buckets + pieces waiting for their new bucket) is the same
    # before and after every relayout: nothing is lost in DDP's rebuild.
    carried = _record_relayouts(state, [("residual", "_orphans")])
    try:
        ddp.register_comm_hook(state, ddp_comm_hook)
        losses = _train(ddp, batches, lr=0.05)
        assert state.compressed_buckets > 0
    finally:
        state.close()
    _same_on_all_ranks(comm, _flat(ddp))
    assert any(before[0] != 0.0 for before, _ in carried), "no residual was carried over"
    for before, after in carried:
        assert after == pytest.approx(before, rel=1e-12, abs=1e-12)
    # Converges: the last 10 steps' loss is well below the first 10 steps'.
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.3 * first, (first, last)
    print("topk ok", first, last)


def case_dgc_carries_velocities():
    """DGC through the hook: DDP's bucket rebuild carries both the residuals ``v`` and
    the velocities ``u`` over to the new buckets (their totals are unchanged by every
    relayout), the ranks stay identical and the loss falls."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparcomm import DGC, TopK
    from sparcomm.torch import DDPCommState, ddp_comm_hook

    comm = _torch_dist.init_gloo()
    steps = 40
    batches = _data(comm, steps, torch.float32, seed=3)
    ddp = DDP(_model(torch.float32), bucket_cap_mb=0.05)
    state = DDPCommState(DGC(TopK(density=0.1), momentum=0.9), dense_below=0)
    carried = _record_relayouts(
        state, [("residual", "_orphans"), ("momentum_buffer", "_orphan_momenta")]
    )
    try:
        ddp.register_comm_hook(state, ddp_comm_hook)
        # DGC's momentum correction replaces the optimizer's momentum.
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.02)
        losses = []
        for x, y in batches:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        state.close()
    _same_on_all_ranks(comm, _flat(ddp))
    assert any(before[1] != 0.0 for before, _ in carried), "no velocity was carried over"
    for before, after in carried:
        assert after == pytest.approx(before, rel=1e-12, abs=1e-12)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    print("dgc ok", first, last)


def case_mismatched_ranks():
    from mpi4py import MPI

    from sparcomm.torch import DDPCommState

    comm = _torch_dist.init_gloo()
    if comm.Get_size() == 1:
        return
    reversed_order = comm.Split(0, comm.Get_size() - 1 - comm.Get_rank())
    with pytest.raises(ValueError, match="hold different ranks"):
        DDPCommState(comm=reversed_order)
    with pytest.raises(ValueError, match="hold different ranks"):
        DDPCommState(comm=MPI.COMM_SELF)
    reversed_order.Free()
    print("mismatch ok")


CASES = {
    "dense": case_dense_equals_ddp,
    "topk": case_topk_converges,
    "dgc": case_dgc_carries_velocities,
    "mismatch": case_mismatched_ranks,
}

# ----------------------------------------------------------------- pytest side


@pytest.mark.parametrize("ranks", [2, 3])
def test_dense_hook_equals_ddp_without_hook(ranks):
    _torch_dist.run_script(__file__, "dense", ranks)


@pytest.mark.parametrize("ranks", [2, 3])
def test_topk_error_feedback_identical_on_all_ranks_and_converges(ranks):
    _torch_dist.run_script(__file__, "topk", ranks)


def test_dgc_velocities_survive_ddps_bucket_rebuild():
    _torch_dist.run_script(__file__, "dgc", 2)


def test_communicator_and_process_group_must_agree():
    _torch_dist.run_script(__file__, "mismatch", 3)


if __name__ == "__main__":
    CASES[sys.argv[1]]()


def test_low_rank_codec_is_refused_in_process():
    # A DDP bucket is one flat vector: PowerSGD would silently send it dense.
    from sparcomm import PowerSGD
    from sparcomm.torch import DDPCommState

    with pytest.raises(NotImplementedError, match="low-rank: a DDP bucket is one flat vector"):
        DDPCommState(codec=PowerSGD(rank=1))
