"""DistributedOptimizer under MPI: equal to single-process training, identical on all ranks,
exact resume from a checkpoint, fusion equal to per-tensor reduction.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at several process counts.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import ErrorFeedback, NoCompression, TopK  # noqa: E402
from sparcomm.torch import (  # noqa: E402
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)

COMM = MPI.COMM_WORLD
BATCH = 4  # per rank and per backward pass


def _model(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 3),
    )
    return model.to(dtype)


def _global_batches(steps: int, passes: int, seed: int = 1, dtype=np.float64):
    """The same global batches on every rank: (x, y) of size ranks * passes * BATCH."""
    rng = np.random.default_rng(seed)
    n = COMM.Get_size() * passes * BATCH
    return [
        (
            torch.from_numpy(rng.standard_normal((n, 6)).astype(dtype)),
            torch.from_numpy(rng.integers(0, 3, n)),
        )
        for _ in range(steps)
    ]


def _local(x: torch.Tensor, passes: int, micro: int) -> slice:
    """This rank's rows of micro-batch ``micro`` (ranks and passes interleave freely:
    the mean over all of them is what counts)."""
    start = (COMM.Get_rank() * passes + micro) * BATCH
    return slice(start, start + BATCH)


def _train_distributed(batches, passes=1, optimizer_cls=torch.optim.SGD, **options):
    model = _model()
    base = optimizer_cls(
        model.parameters(),
        lr=0.1,
        **({"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {}),
    )
    optimizer = DistributedOptimizer(
        base, model.named_parameters(), backward_passes_per_step=passes, **options
    )
    try:
        for x, y in batches:
            optimizer.zero_grad()
            for micro in range(passes):
                rows = _local(x, passes, micro)
                torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    finally:
        optimizer.close()
    return model


def _train_single(batches, optimizer_cls=torch.optim.SGD):
    model = _model()
    optimizer = optimizer_cls(
        model.parameters(),
        lr=0.1,
        **({"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {}),
    )
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _flat(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def _assert_identical_on_all_ranks(values: np.ndarray) -> None:
    root = COMM.bcast(values if COMM.Get_rank() == 0 else None, root=0)
    assert np.array_equal(values, root), "ranks hold different parameters"


@pytest.mark.parametrize(
    ("passes", "optimizer_cls"),
    [(1, torch.optim.SGD), (2, torch.optim.SGD), (1, torch.optim.Adam)],
    ids=["sgd", "sgd-2-passes", "adam"],
)
def test_no_compression_equals_single_process_on_concatenated_batches(passes, optimizer_cls):
    batches = _global_batches(steps=5, passes=passes)
    distributed = _flat(_train_distributed(batches, passes, optimizer_cls, codec=NoCompression()))
    single = _flat(_train_single(batches, optimizer_cls))
    _assert_identical_on_all_ranks(distributed)
    np.testing.assert_allclose(distributed, single, rtol=1e-10, atol=1e-12)
    # the test can fail: five steps moved the parameters well beyond the tolerance
    assert np.abs(single - _flat(_model())).max() > 1e-3


def test_fusion_equals_per_tensor_reduction():
    batches = _global_batches(steps=4, passes=1)
    results = {}
    for label, threshold in (("per-tensor", 0), ("fused", 1 << 20)):
        for codec_label, codec in (("dense", NoCompression), ("topk", None)):
            codec_obj = codec() if codec else ErrorFeedback(TopK(density=0.1))
            model = _train_distributed(
                batches,
                codec=codec_obj,
                fusion_threshold_bytes=threshold,
                dense_below=100,
            )
            results[label, codec_label] = _flat(model)
    for codec_label in ("dense", "topk"):
        _assert_identical_on_all_ranks(results["fused", codec_label])
        np.testing.assert_allclose(
            results["fused", codec_label],
            results["per-tensor", codec_label],
            rtol=1e-12,
            atol=1e-14,
        )


def _checkpointed_run(batches, split, codec_factory, *, restore_residuals=True):
    """Train ``split`` steps, save, rebuild everything from the checkpoint, train on."""
    model = _model()
    options = dict(codec=codec_factory(), dense_below=0, warmup_steps=1)
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model.named_parameters(),
        **options,
    )

    def run(model, optimizer, part):
        for x, y in part:
            optimizer.zero_grad()
            rows = _local(x, 1, 0)
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()

    run(model, optimizer, batches[:split])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    optimizer.close()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    if not restore_residuals:
        checkpoint["optimizer"] = copy.deepcopy(checkpoint["optimizer"])
        checkpoint["optimizer"]["sparcomm"]["codec_state"] = None
    model = _model(seed=123)  # different initial values: all must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model.named_parameters(),
        codec=codec_factory(),
        dense_below=0,
        warmup_steps=1,
    )
    optimizer.load_state_dict(checkpoint["optimizer"])
    run(model, optimizer, batches[split:])
    optimizer.close()
    return _flat(model)


def test_save_load_resumes_exactly_with_error_feedback_residuals():
    batches = _global_batches(steps=6, passes=1)

    def codec():
        return ErrorFeedback(TopK(density=0.05))

    uninterrupted = _flat(_train_distributed(batches, codec=codec(), dense_below=0, warmup_steps=1))
    resumed = _checkpointed_run(batches, 3, codec)
    _assert_identical_on_all_ranks(resumed)
    np.testing.assert_array_equal(resumed, uninterrupted)
    # Control: dropping the residuals changes the result, so the comparison above has
    # teeth (the residuals really are carried by the state dict).
    without = _checkpointed_run(batches, 3, codec, restore_residuals=False)
    assert not np.array_equal(without, uninterrupted)


def test_synchronize_then_clip_under_skip_synchronize():
    batches = _global_batches(steps=3, passes=1)
    model = _model()
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
    )
    reference = _model()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in batches:
        optimizer.zero_grad()
        rows = _local(x, 1, 0)
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        with optimizer.skip_synchronize():
            optimizer.step()
        reference_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        reference_optimizer.step()
    optimizer.close()
    _assert_identical_on_all_ranks(_flat(model))
    np.testing.assert_allclose(_flat(model), _flat(reference), rtol=1e-10, atol=1e-12)


def test_unused_parameter_on_some_ranks_does_not_hang():
    """A parameter without a gradient on one rank is reduced as zeros there."""
    model = _model()
    extra = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    optimizer = DistributedOptimizer(
        torch.optim.SGD([*model.parameters(), extra], lr=1.0),
        [*model.named_parameters(), ("extra", extra)],
    )
    optimizer.zero_grad()
    loss = model(torch.ones(2, 6, dtype=torch.float64)).sum()
    if COMM.Get_rank() == 0:
        loss = loss + extra.sum()  # only rank 0 uses it: gradient 1 there, none elsewhere
    loss.backward()
    optimizer.step()
    optimizer.close()
    expected = 1.0 - 1.0 / COMM.Get_size()  # 1 - lr * mean(1, 0, 0, ...)
    np.testing.assert_allclose(extra.detach().numpy(), expected)


def test_broadcast_parameters_and_optimizer_state():
    model = _model(seed=COMM.Get_rank())  # different on every rank
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * (COMM.Get_rank() + 1), momentum=0.9)
    model(torch.ones(1, 6, dtype=torch.float64)).sum().backward()
    optimizer.step()  # creates momentum buffers, different per rank
    broadcast_parameters(model.state_dict(), root_rank=0)
    broadcast_optimizer_state(optimizer, root_rank=0)
    _assert_identical_on_all_ranks(_flat(model))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    buffers = np.concatenate(
        [optimizer.state[p]["momentum_buffer"].numpy().ravel() for p in model.parameters()]
    )
    _assert_identical_on_all_ranks(buffers)
