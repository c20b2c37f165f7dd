"""DistributedOptimizer bad input and misuse (one process, COMM_WORLD of size 1)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch")
pytest.importorskip("mpi4py.MPI")

from sparcomm import NoCompression  # noqa: E402
from sparcomm.torch import DistributedOptimizer  # noqa: E402


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _backward(model):
    model(torch.ones(3, 4)).sum().backward()


def test_bad_arguments_are_refused():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer, got list"):
        DistributedOptimizer([sgd])
    with pytest.raises(ValueError, match="backward_passes_per_step must be an int >= 1, got 0"):
        DistributedOptimizer(sgd, backward_passes_per_step=0)
    with pytest.raises(ValueError, match="covers only 2 of the optimizer's 4 parameters"):
        DistributedOptimizer(sgd, list(model.named_parameters())[:2])
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs"):
        DistributedOptimizer(sgd, list(model.parameters()))
    wrapped = DistributedOptimizer(sgd, model.named_parameters())
    try:
        with pytest.raises(ValueError, match="already a sparcomm DistributedOptimizer"):
            DistributedOptimizer(wrapped)
    finally:
        wrapped.close()
    complex_weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"torch.complex64: sparcomm reduces float16, bfloat16"):
        DistributedOptimizer(torch.optim.SGD([complex_weight], lr=0.1))
    with pytest.raises(ValueError, match="gradient_predivide_factor .* needs op=Average"):
        DistributedOptimizer(sgd, op="sum", gradient_predivide_factor=2.0)
    with pytest.raises(NotImplementedError, match="Adasum is not supported"):
        DistributedOptimizer(sgd, op="adasum")
    with pytest.raises(ValueError, match="pass the codec once"):
        DistributedOptimizer(sgd, codec=NoCompression(), compression=NoCompression())
    with pytest.raises(ValueError, match="non_finite must be one of"):
        DistributedOptimizer(sgd, non_finite="ignore")


def test_keeps_the_optimizer_class_and_its_state():
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    _backward(model)
    adam.step()  # state exists before wrapping
    before = {k: v.clone() for k, v in adam.state[next(model.parameters())].items()}
    wrapped = DistributedOptimizer(adam, model.named_parameters())
    try:
        assert isinstance(wrapped, torch.optim.Adam)
        assert type(wrapped).__name__ == "Adam"
        after = wrapped.state[next(model.parameters())]
        for key, value in before.items():
            torch.testing.assert_close(after[key], value)
        scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)
        wrapped.zero_grad()
        _backward(model)
        wrapped.step()
        scheduler.step()
        assert wrapped.param_groups[0]["lr"] == pytest.approx(0.005)
    finally:
        wrapped.close()


def test_misuse_raises_clear_errors():
    model = _model()
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
    )
    try:
        _backward(model)
        with pytest.raises(RuntimeError, match="zero_grad\\(\\) was called after backward"):
            optimizer.zero_grad()
        with pytest.raises(RuntimeError, match="computed 2 times before step"):
            _backward(model)
        optimizer.step()
        optimizer.zero_grad()
        _backward(model)
        optimizer.step()
    finally:
        optimizer.close()


def test_one_process_step_equals_plain_optimizer_and_reports_stats():
    model, reference = _model(), _model()
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters()
    )
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    try:
        for _ in range(3):
            for m, o in ((model, optimizer), (reference, plain)):
                o.zero_grad()
                _backward(m)
                o.step()
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        stats = optimizer.last_stats
        assert stats.step == 2 and stats.elements == sum(p.numel() for p in model.parameters())
        assert stats.buckets == 1  # all four tensors fused
        assert np.isfinite(stats.seconds)
    finally:
        optimizer.close()
