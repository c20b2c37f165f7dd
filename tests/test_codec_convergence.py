"""Convergence of every registered codec, and of the DGC options, on a least-squares task.

The task: multi-output least squares ``min_W L(W) = ||A W - B||_F^2 / (2 M)`` with ``A``
(``M x D`` = 1024 x 32, Gaussian), ``B = A W_true + sigma E`` (``W_true`` Gaussian,
``D x C`` = 32 x 8, noise ``sigma = 0.5``), from fixed seeds.  The unknown is a matrix so
that PowerSGD compresses it (a vector would travel dense).

Data parallelism is simulated in-process: ``P = 4`` workers hold the rows ``i, i + P, ...``
and each step compute their shard's gradient ``A_i^T (A_i W - B_i) / M`` (float32; the
shards' gradients sum to the full gradient); every worker has its own codec instance
(its own residuals, keyed by the tensor, and its own random stream through ``rank=i``),
and the step applies the **sum of the workers' decoded payloads**, which is what the
sparse and allgather collectives compute (tests/mpi checks the collectives against that
sum at P = 1..5).  PowerSGD runs as it is: its own steps (``start`` / ``project`` /
``finish``) with the two sums of its factors done in-process where its collective
allreduces them.  Simulating keeps four distinct workers (their shard gradients differ,
and do not vanish at the optimum: only their sum does) at the cost of one process, where
the real collectives at size 1 would test one worker and no averaging.

Schedule: gradient descent at rate ``0.7`` (below ``2 / lambda_max(A^T A / M) = 1.49``)
for 30 steps, then ``0.7 * 30 / (t + 1)`` up to step 150: the decay lets the unbiased
quantizers' noise average out and error feedback's limit cycle (the workers' residuals
around an optimum where only the sum of their gradients vanishes) shrink.  DGC's momentum
correction makes its steps ``1 / (1 - m)`` times longer, so its rate is ``0.7 (1 - m)``.

Tolerance, derived from the task: the optimisation error ``L(W_T) - L(W*)`` (``W*`` the
exact least-squares solution) must be below the task's statistical error, the excess loss
of ``W*`` against the truth, ``E[L(W*) - L(W_true)]`` in magnitude, ``sigma^2 D C / (2 M)``
= 0.031: past that point more optimisation cannot improve the estimate of ``W_true``.
The start is ``L(0) - L(W*)`` = 134, 4300 times that bound.  Measured excess / bound
(fixed seeds): NoCompression 2e-12, FP16 3e-8, TopK 10 % + EF 0.08 (without
EF 0.94), QSGD 4 bits 0.016 (0.010-0.016 over codec seeds 0-5), TernGrad 0.07 (0.06-0.08
over seeds 0-5), OneBit 0.03, PowerSGD rank 1 0.18; DGC momentum correction + masking
0.035, with clipping 0.034, clipping alone 0.07, momentum correction without masking
0.08 at rate 0.02 (38 at DGC's rate 0.07: masking is what makes the long steps stable).

The kernels run on one Numba thread here: on arrays of 256 elements a parallel launch
costs more than the work, and far more on a loaded machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from sparcomm import DGC, FP16, QSGD, ErrorFeedback, NoCompression, OneBit, PowerSGD, TernGrad, TopK
from sparcomm.codecs import CODECS

WORKERS, ROWS, DIM, OUTPUTS, NOISE = 4, 1024, 32, 8, 0.5
STEPS, RATE, DECAY_AFTER = 150, 0.7, 30
MOMENTUM = 0.9
#: DGC's clipping threshold: clip_norm / sqrt(P) = 1 per worker, below the shard
#: gradients' norm at the start (about 4) and above it near the optimum (about 0.1).
CLIP_NORM = 2.0


@dataclass(frozen=True)
class Problem:
    shards: list[tuple[np.ndarray, np.ndarray]]  # float32 (A_i, B_i) per worker
    solution: np.ndarray  # W*, the exact least-squares solution
    hessian: np.ndarray  # A^T A / M

    def excess(self, w: np.ndarray) -> float:
        """``L(W) - L(W*)`` (exact for a quadratic)."""
        error = w - self.solution
        return 0.5 * float(np.sum(error * (self.hessian @ error)))

    def gradients(self, w: np.ndarray) -> list[np.ndarray]:
        w32 = w.astype(np.float32)
        return [a.T @ (a @ w32 - b) / np.float32(ROWS) for a, b in self.shards]


#: The task's statistical error sigma^2 D C / (2 M): the tolerance of every case.
BOUND = NOISE**2 * DIM * OUTPUTS / (2 * ROWS)


@pytest.fixture(scope="module")
def problem() -> Problem:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((ROWS, DIM))
    b = a @ rng.standard_normal((DIM, OUTPUTS)) + NOISE * rng.standard_normal((ROWS, OUTPUTS))
    shards = [
        (a[i::WORKERS].astype(np.float32), b[i::WORKERS].astype(np.float32)) for i in range(WORKERS)
    ]
    return Problem(shards, np.linalg.lstsq(a, b, rcond=None)[0], a.T @ a / ROWS)


@pytest.fixture(scope="module", autouse=True)
def one_numba_thread():
    numba = pytest.importorskip("numba")
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


def _sum_of_decodes(codecs: list[Any], gradients: list[np.ndarray], step: int) -> np.ndarray:
    total = np.zeros(gradients[0].shape, np.float64)
    for worker, (codec, g) in enumerate(zip(codecs, gradients, strict=True)):
        total += codec.decode(codec.encode(g, key="W", step=step, rank=worker))
    return total


def _allreduce_in_process(buffers: list[np.ndarray]) -> None:
    total = sum(buffers[1:], buffers[0].copy())
    for buffer in buffers:
        buffer[...] = total


def _powersgd_sum(codecs: list[PowerSGD], gradients: list[np.ndarray], step: int) -> np.ndarray:
    """PowerSGD's collective with the two allreduces (sum) done in-process."""
    works = []
    for codec, g in zip(codecs, gradients, strict=True):
        p_size, q_size = codec.factor_sizes(g.shape)
        p, q = np.empty(p_size, g.dtype), np.empty(q_size, g.dtype)
        works.append(codec.start(g, "W", p, q))
    _allreduce_in_process([work.p for work in works])
    for codec, work in zip(codecs, works, strict=True):
        codec.project(work)
    _allreduce_in_process([work.q for work in works])
    results = [
        codec.finish(work, WORKERS, mean=False) for codec, work in zip(codecs, works, strict=True)
    ]
    for other in results[1:]:  # the collective's contract: the same sum on every worker
        np.testing.assert_array_equal(other, results[0])
    return results[0].astype(np.float64)


def _train(problem: Problem, make: Callable[[], Any], rate: float) -> float:
    codecs = [make() for _ in range(WORKERS)]
    reduce = _powersgd_sum if isinstance(codecs[0], PowerSGD) else _sum_of_decodes
    w = np.zeros((DIM, OUTPUTS))
    for step in range(STEPS):
        step_rate = rate if step < DECAY_AFTER else rate * DECAY_AFTER / (step + 1)
        w -= step_rate * reduce(codecs, problem.gradients(w), step)
    return problem.excess(w)


#: One configuration per registered codec: biased codecs without error feedback of
#: their own run under ErrorFeedback; OneBit and PowerSGD keep theirs.
CODEC_CASES: dict[str, Callable[[], Any]] = {
    "NoCompression": NoCompression,
    "FP16": FP16,
    "TopK": lambda: ErrorFeedback(TopK(density=0.1)),
    "QSGD": lambda: QSGD(bits=4, bucket_size=64),
    "TernGrad": TernGrad,
    "OneBit": lambda: OneBit(bucket_size=64),
    "PowerSGD": lambda: PowerSGD(rank=1),
}

#: The DGC options (rate factor 1 - m where momentum correction lengthens the steps).
DGC_CASES: dict[str, tuple[Callable[[], Any], float]] = {
    "momentum-masking": (
        lambda: DGC(TopK(density=0.1), momentum=MOMENTUM, masking=True),
        1 - MOMENTUM,
    ),
    "momentum-masking-clipping": (
        lambda: DGC(
            TopK(density=0.1),
            momentum=MOMENTUM,
            masking=True,
            clip_norm=CLIP_NORM,
            world_size=WORKERS,
        ),
        1 - MOMENTUM,
    ),
    "clipping-only": (
        lambda: DGC(TopK(density=0.1), momentum=0.0, clip_norm=CLIP_NORM, world_size=WORKERS),
        1.0,
    ),
    # Without masking the velocity of a coordinate just sent keeps pushing it (the stale
    # momentum masking removes): at rate 0.07 this diverges, so it runs at 0.02.
    "momentum-no-masking": (
        lambda: DGC(TopK(density=0.1), momentum=MOMENTUM, masking=False),
        0.02 / RATE,
    ),
}


def test_every_registered_codec_has_a_case():
    ours = {name for name, cls in CODECS.items() if cls.__module__.startswith("sparcomm.")}
    missing = ours - set(CODEC_CASES)
    assert not missing, f"give {sorted(missing)} a convergence case in CODEC_CASES"


def test_the_task_can_fail(problem):
    # The start is far above the bound, and exact gradient descent ends far below it.
    assert problem.excess(np.zeros((DIM, OUTPUTS))) > 1000 * BOUND
    assert _train(problem, NoCompression, RATE) < 1e-6 * BOUND


@pytest.mark.parametrize("name", list(CODEC_CASES))
def test_codec_reaches_the_statistical_error(problem, name):
    excess = _train(problem, CODEC_CASES[name], RATE)
    assert excess <= BOUND, f"{name}: L(W_T) - L(W*) = {excess:.4g} > bound {BOUND:.4g}"


@pytest.mark.parametrize("name", list(DGC_CASES))
def test_dgc_option_reaches_the_statistical_error(problem, name):
    make, factor = DGC_CASES[name]
    codec = make()
    if codec.clip_norm is not None:  # clipping acts at the start
        first = max(float(np.linalg.norm(g)) for g in problem.gradients(np.zeros((DIM, OUTPUTS))))
        assert codec.clip_threshold() < first
        assert math.isclose(codec.clip_threshold(), CLIP_NORM / math.sqrt(WORKERS))
    excess = _train(problem, make, RATE * factor)
    assert excess <= BOUND, f"DGC {name}: L(W_T) - L(W*) = {excess:.4g} > bound {BOUND:.4g}"
