"""Schedules and codec policies under MPI: identical results on every rank, bit-exact
resume mid-schedule, a policy mixing PowerSGD, TopK and dense through
DistributedOptimizer with several buckets, and a policy that differs between ranks.

Every body works at any number of ranks (1 included); tests/test_mpi_ranks.py runs this
directory under ``mpiexec`` at several process counts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import (  # noqa: E402
    CodecPolicy,
    ErrorFeedback,
    Exponential,
    Linear,
    PowerSGD,
    TopK,
)
from sparcomm.reducer import GradientReducer  # noqa: E402

COMM = MPI.COMM_WORLD
SHAPES = {
    "embed.weight": (200, 12),
    "fc1.weight": (48, 40),
    "fc1.bias": (48,),
    "fc2.weight": (10, 48),
    "fc2.bias": (10,),
    "scale": (1500,),
}
SCHEDULE = {"density": Exponential(0.3, 0.02, 4), "rank": Linear(1, 3, 3)}


def _policy():
    return CodecPolicy(
        ErrorFeedback(TopK(density=0.01)),
        matrices=PowerSGD(rank=1),
        embeddings=ErrorFeedback(TopK(density=0.01)),
    )


def _grads(step):
    """Different on every rank."""
    rng = np.random.default_rng(1000 * step + COMM.Get_rank())
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def _digest(arrays):
    hasher = hashlib.sha256()
    for name in sorted(arrays):
        hasher.update(np.ascontiguousarray(arrays[name]).tobytes())
    return hasher.hexdigest()


def _make():
    return GradientReducer(
        _policy(), dense_below=100, warmup_steps=1, fusion_threshold_bytes=4096, schedule=SCHEDULE
    )


def test_identical_on_every_rank_and_bytes_follow_the_density():
    sent = []
    with _make() as reducer:
        for step in range(5):
            got = reducer.reduce(_grads(step))
            digests = COMM.allgather(_digest(got))
            assert len(set(digests)) == 1, f"step {step}: ranks differ"
            stats = reducer.last_stats
            assert COMM.allgather(stats.levels) == [stats.levels] * COMM.Get_size()
            sent.append(stats.bytes_sent)
        assert stats.levels == {
            "embeddings.density": 0.02,
            "matrices.rank": 3,
            "default.density": 0.02,
        }
    if COMM.Get_size() > 1:  # one rank sends nothing
        assert sent[1] > sent[4]  # density 0.3 * (0.02/0.3)**0.25 at step 1, 0.02 at 4


def test_resume_mid_schedule_is_bit_exact():
    with _make() as reducer:
        expected = [reducer.reduce(_grads(s)) for s in range(6)]
    with _make() as reducer:
        for s in range(3):
            reducer.reduce(_grads(s))
        state = reducer.state_dict()
    with _make() as resumed:
        resumed.load_state_dict(state)
        for s in range(3, 6):
            got = resumed.reduce(_grads(s))
            for name in SHAPES:
                np.testing.assert_array_equal(got[name], expected[s][name])


def test_a_policy_that_differs_between_ranks_raises_on_every_rank():
    if COMM.Get_size() == 1:
        return
    rank = COMM.Get_rank()
    policy = CodecPolicy(
        ErrorFeedback(TopK(density=0.01)),
        rules=[(lambda name, shape: rank == 0 and name == "scale", None)],
    )
    with GradientReducer(policy, dense_below=100) as reducer:
        with pytest.raises(ValueError, match="differ between ranks"):
            reducer.setup([(name, shape, np.float64) for name, shape in SHAPES.items()])


def test_distributed_optimizer_with_a_mixed_policy_and_several_buckets():
    torch = pytest.importorskip("torch")
    from sparcomm.torch import DistributedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 8),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 3),
    ).double()
    names = dict(model.named_parameters())
    policy = CodecPolicy(
        ErrorFeedback(TopK(density=0.05)),
        matrices=PowerSGD(rank=2),
        rules=[(lambda name, shape: name.startswith("0."), ErrorFeedback(TopK(density=0.1)))],
    )
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model.named_parameters(),
        codec=policy,
        dense_below=100,
        fusion_threshold_bytes=4000,
        schedule={"rank": Linear(1, 2, 2)},
    )
    rng = np.random.default_rng(7 + COMM.Get_rank())
    try:
        for _ in range(4):
            x = torch.from_numpy(rng.integers(0, 50, (8, 4)))
            y = torch.from_numpy(rng.integers(0, 3, 8))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        reducer = optimizer.reducer
        buckets = reducer._plans[True].buckets
        specs = [(name, tuple(p.shape), None) for name, p in names.items()]
        choice = {
            name: index if names[name].numel() >= 100 else -1  # dense_below=100
            for name, index in zip(names, policy.assign(specs), strict=True)
        }
        for bucket in buckets:  # a bucket never mixes codecs
            assert {choice[slot.name] for slot in bucket.slots} == {bucket.codec}
        codecs_used = sorted(b.codec for b in buckets)
        assert codecs_used.count(1) >= 2  # PowerSGD's matrices over several buckets
        assert {-1, 0, 1} <= set(codecs_used)  # the rule's TopK, PowerSGD and dense
        assert optimizer.last_stats.levels["matrices.rank"] == 2
        params = {name: p.detach().numpy() for name, p in model.named_parameters()}
        assert len(set(COMM.allgather(_digest(params)))) == 1
        state = optimizer.state_dict()["sparcomm"]
        assert len(state["codec_state"]) == len(policy.codecs)
    finally:
        optimizer.close()
