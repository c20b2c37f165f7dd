"""A failed reduction step loses nothing: every rank's codec state (error-feedback
residuals, DGC's velocities, PowerSGD's residuals and warm-start Q, each codec of a
policy) is as it was before the step, and retrying the step gives bit for bit the
result of a run in which the failure never happened.

The failure is a NaN in one tensor of the last rank, injected after a few good steps
(the buckets' layouts are agreed, so the collectives check in steady state, where the
other ranks have already encoded when the error is found).  Every body works at any
number of ranks.
"""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

# Both runs of a comparison time the same race candidates (see the fixture).
pytestmark = pytest.mark.usefixtures("untimed_race_lengths")

from _state_checks import STATEFUL_CODECS, assert_same  # noqa: E402

from sparcomm import (  # noqa: E402
    DGC,
    CodecPolicy,
    ErrorFeedback,
    NonFiniteError,
    OneBit,
    PowerSGD,
    TopK,
)
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
BAD = SIZE - 1
#: Spec (and bucket) order: the first and the last compressed tensor are poisoned in
#: turn, so that a failure finds no bucket, or every other bucket, already reduced.
SHAPES = {"w1": (24, 20), "w2": (30, 16), "bias": (6,), "w3": (20, 12)}
GOOD_STEPS = 3  # before the failed step: step 0 agrees the layouts, later ones are steady

CODECS = {
    **STATEFUL_CODECS,
    "dgc-masking": lambda: DGC(TopK(density=0.1), momentum=0.9, masking=True),
    "policy": lambda: CodecPolicy(
        ErrorFeedback(TopK(density=0.1)),
        rules=[("w2", PowerSGD(rank=2)), ("w3", OneBit())],
    ),
}


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([step, RANK, 11])
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _run(make_codec, poisoned=None, expected=NonFiniteError, **options):
    """Good steps, optionally a failed step (NaN in ``poisoned`` on the last rank), then
    two more good steps.  Returns the results of the good steps and the final state."""
    outputs = []
    settings = dict(dense_below=16, layer_fuse_below=0, fusion_threshold_bytes=0) | options
    with GradientReducer(codec=make_codec(), comm=COMM, **settings) as reducer:
        for step in range(GOOD_STEPS):
            outputs.append(reducer.reduce(_grads(step)))
        if poisoned is not None:
            before = reducer.state_dict()
            grads = _grads(GOOD_STEPS)
            if RANK == BAD:
                grads[poisoned].reshape(-1)[5] = np.nan
            with pytest.raises(expected):
                reducer.reduce(grads)
            assert reducer.step == GOOD_STEPS  # the failed step does not count
            assert_same(reducer.state_dict(), before)
        for step in range(GOOD_STEPS, GOOD_STEPS + 2):
            outputs.append(reducer.reduce(_grads(step)))
        return outputs, reducer.state_dict()


def _assert_identical_runs(make_codec, poisoned, expected=NonFiniteError, **options):
    clean_outputs, clean_state = _run(make_codec, **options)
    outputs, state = _run(make_codec, poisoned, expected, **options)
    for step, (result, expected) in enumerate(zip(outputs, clean_outputs, strict=True)):
        assert_same(result, expected, f"step {step}'s result")
    assert_same(state, clean_state, "final state")


@pytest.mark.parametrize("poisoned", ["w1", "w3"])
@pytest.mark.parametrize("name", list(CODECS))
def test_failed_step_leaves_state_unchanged_and_retry_is_exact(name, poisoned):
    _assert_identical_runs(CODECS[name], poisoned)


@pytest.mark.parametrize("name", ["topk-ef", "qsgd-ef"])
def test_failed_step_without_overlap(name):
    # Reduced in wait() on the caller's thread instead of the progress thread.
    _assert_identical_runs(CODECS[name], "w3", overlap=False)


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [
        ("qsgd-ef", "reduce_scatter_allgather"),
        ("onebit", "reduce_scatter_allgather"),
        ("terngrad-ef", "shared_scale"),
    ],
)
def test_failed_step_with_owner_side_feedback(name, algorithm, monkeypatch):
    # Small tensors take "allgather"; these algorithms also keep owner-side residuals
    # (reduce_scatter_allgather) or share a scale computed from the residual.
    import sparcomm.comm

    original = sparcomm.comm.allreduce

    def forced(x, **options):
        if options.get("algorithm", "auto") == "auto" and options["codec"].family == "quantized":
            options["algorithm"] = algorithm
        return original(x, **options)

    monkeypatch.setattr(sparcomm.comm, "allreduce", forced)
    # shared_scale learns of another rank's failure from an infinite shared scale, not
    # its error class: a ValueError there (NonFiniteError, a ValueError, on the bad rank).
    expected = ValueError if algorithm == "shared_scale" and RANK != BAD else NonFiniteError
    _assert_identical_runs(CODECS[name], "w3", expected)


def test_failed_step_in_bucket_mode():
    # One fused bucket per dtype: the failure is in the only compressed collective.
    _assert_identical_runs(
        CODECS["topk-ef"], "w3", compression="bucket", fusion_threshold_bytes=2**20
    )


@pytest.mark.parametrize(
    "make_codec", [CODECS["qsgd-ef"], CODECS["onebit"]], ids=["qsgd-ef", "onebit"]
)
def test_steady_placeholder_does_not_go_through_error_feedback(make_codec):
    # A rank whose preparation fails in steady state sends placeholder zeros: they must
    # not be encoded through its memory (worker or owner side).
    from sparcomm.comm import allreduce
    from sparcomm.comm._call import agreed_layout
    from sparcomm.feedback import unwrap

    codec = make_codec()
    memory = unwrap(codec)[1]
    rng = np.random.default_rng([RANK, 5])
    with agreed_layout(("test_failed_step_state", repr(codec))):
        for step in range(3):
            x = rng.standard_normal(300).astype(np.float32)
            allreduce(x, codec=codec, comm=COMM, key="k", step=step)
        before = memory.state_dict()
        x = rng.standard_normal(300).astype(np.float32)
        if RANK == BAD:
            x = x.astype(np.float64)  # differs from the agreed layout: fails locally
        with pytest.raises(ValueError):
            allreduce(x, codec=codec, comm=COMM, key="k", step=3)
    if RANK == BAD:
        assert_same(memory.state_dict(), before)


def _train_torch(torch, poisoned: bool):
    """Five SGD steps through DistributedOptimizer with a policy (TopK+EF, PowerSGD for
    the matrices); with ``poisoned``, step 3 is first tried with a NaN in the first
    layer's weight gradient on the last rank (reduced last: the other buckets of the
    step have been reduced when it fails), then retried with the good gradients."""
    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 40), torch.nn.Linear(40, 4)
    )
    codec = CodecPolicy(ErrorFeedback(TopK(density=0.1)), rules=[("2.weight", PowerSGD(rank=2))])
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.named_parameters(),
        codec=codec,
        dense_below=16,
        fusion_threshold_bytes=0,
    )
    poison = {"on": False}

    def maybe_poison(grad):
        if poison["on"] and RANK == BAD:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    model[0].weight.register_hook(maybe_poison)
    try:
        for step in range(5):
            rng = np.random.default_rng([step, RANK, 3])
            data = torch.from_numpy(rng.standard_normal((8, 20)).astype(np.float32))
            for attempt in [True, False] if poisoned and step == 3 else [False]:
                optimizer.zero_grad()
                poison["on"] = attempt
                before = optimizer.reducer.state_dict() if optimizer.reducer._specs else None
                model(data).square().mean().backward()
                if attempt:
                    with pytest.raises(NonFiniteError):
                        optimizer.step()
                    assert_same(optimizer.reducer.state_dict(), before)
                else:
                    optimizer.step()
        parameters = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
        return parameters, optimizer.reducer.state_dict()
    finally:
        optimizer.close()


def test_distributed_optimizer_failed_step_is_retried_exactly():
    torch = pytest.importorskip("torch")
    clean_parameters, clean_state = _train_torch(torch, poisoned=False)
    parameters, state = _train_torch(torch, poisoned=True)
    assert np.array_equal(parameters, clean_parameters)
    assert_same(state, clean_state, "final state")
