"""DGC's set-up checks where users meet them: ``DistributedOptimizer`` refuses an optimizer
that applies momentum under DGC's momentum correction (also inside a policy), and
``GradientReducer`` refuses a ``world_size`` other than its communicator's (one process,
COMM_WORLD of size 1)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mpi4py.MPI")

from sparcomm import DGC, CodecPolicy, TopK  # noqa: E402
from sparcomm.reducer import GradientReducer  # noqa: E402
from sparcomm.torch import DistributedOptimizer  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))


@pytest.mark.parametrize(
    "make_codec",
    [
        lambda: DGC(TopK(density=0.1), momentum=0.9),
        lambda: CodecPolicy(None, matrices=DGC(TopK(density=0.1), momentum=0.9)),
    ],
    ids=["dgc", "policy"],
)
def test_optimizer_momentum_under_momentum_correction_is_refused(make_codec):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"construct the optimizer with momentum=0"):
        DistributedOptimizer(optimizer, model.named_parameters(), codec=make_codec())


def test_optimizer_without_momentum_and_dgc_without_momentum_are_accepted():
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    DistributedOptimizer(
        plain, model.named_parameters(), codec=DGC(TopK(density=0.1), momentum=0.9)
    ).close()
    model = _model()
    with_momentum = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    DistributedOptimizer(
        with_momentum, model.named_parameters(), codec=DGC(TopK(density=0.1), momentum=0.0)
    ).close()


def test_reducer_refuses_a_world_size_other_than_its_communicators():
    with pytest.raises(ValueError, match="world_size"):
        GradientReducer(DGC(TopK(density=0.1), world_size=3))
