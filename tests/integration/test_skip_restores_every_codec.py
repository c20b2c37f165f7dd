"""``DistributedOptimizer(non_finite="propagate")``: a step whose reduced gradient comes
out non-finite *without* an error is skipped on every rank, and every codec's state is
put back as it was before the step (PowerSGD's residuals and warm-start Q, each codec of
a policy), not only a single error-feedback memory: the step retried with good
gradients gives bit for bit the result of a run without the skipped step.

The non-finite gradient without an error: float16 parameters with
``gradient_predivide_factor=1e-4``; the sum is finite in float32 (where it is reduced),
and the step with a 1e4-times larger loss overflows float16 when the sum is written
back into the parameters' gradients (before the post-scale), on every rank alike.
Runs in one process (or under mpiexec at any size).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mpi4py.MPI")

from _state_checks import assert_same, codec_state  # noqa: E402

from sparcomm import CodecPolicy, ErrorFeedback, PowerSGD, TopK  # noqa: E402

BAD_STEP = 2
STEPS = 4


def _train(make_codec, skip: bool):
    """Steps through DistributedOptimizer; with ``skip``, ``BAD_STEP`` is first tried with
    a loss that overflows float16 (skipped: every gradient NaN, no optimizer step), then
    retried.  Returns the parameters, every codec's state and the skipped step's check."""
    from mpi4py import MPI

    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16), torch.nn.Linear(16, 3)
    ).half()
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model.named_parameters(),
        codec=make_codec(),
        comm=MPI.COMM_WORLD,
        dense_below=0,
        fusion_threshold_bytes=0,
        gradient_predivide_factor=1e-4,
        non_finite="propagate",
    )
    rank = MPI.COMM_WORLD.Get_rank()

    def backward(step: int, factor: float) -> None:
        rng = np.random.default_rng([step, rank])
        x = torch.from_numpy(rng.standard_normal((8, 12)).astype(np.float16))
        y = torch.from_numpy(rng.integers(0, 3, 8))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        (loss * factor).backward()

    with optimizer:
        codecs = optimizer.reducer.codecs
        for step in range(STEPS):
            if skip and step == BAD_STEP:
                before = [codec_state(codec) for codec in codecs]
                backward(step, 1e4)
                optimizer.synchronize()  # GradScaler would find the NaN and skip step()
                assert all(bool(torch.isnan(p.grad).all()) for p in model.parameters())
                for codec, state in zip(codecs, before, strict=True):
                    assert_same(codec_state(codec), state, f"{codec!r} after the skipped step")
            backward(step, 1.0)
            optimizer.step()
            for p in model.parameters():
                assert bool(torch.isfinite(p).all()), "a good step overflowed: adjust the test"
        states = [codec_state(codec) for codec in codecs]
    return [p.detach().float().numpy().copy() for p in model.parameters()], states


def _assert_skip_is_invisible(make_codec):
    clean_params, clean_states = _train(make_codec, skip=False)
    params, states = _train(make_codec, skip=True)
    for number, (got, want) in enumerate(zip(params, clean_params, strict=True)):
        assert np.array_equal(got, want), f"parameter {number} differs"
    assert_same(states, clean_states, "final codec states")
    assert clean_states and any(state for state in clean_states)


def test_skipped_step_restores_powersgd():
    _assert_skip_is_invisible(lambda: PowerSGD(rank=2))


def test_skipped_step_restores_every_codec_of_a_policy():
    _assert_skip_is_invisible(
        lambda: CodecPolicy(
            ErrorFeedback(TopK(density=0.2)), rules=[("2.weight", PowerSGD(rank=2))]
        )
    )
