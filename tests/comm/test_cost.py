"""The cost model of sparcomm.comm._cost: byte formulas, fill, and the choice of ``auto``."""

from __future__ import annotations

import numpy as np
import pytest

from sparcomm.comm import ALL_ALGORITHMS, SPARSE_ALGORITHMS, CostModel, choose, predict
from sparcomm.comm._cost import expected_union
from sparcomm.comm._protocol import SIGNATURE_FIELDS

SIGNATURE = 8 * len(SIGNATURE_FIELDS)
# Roughly this machine class: 20 us latency, 1 GB/s, 4 ns per merged element.
MODEL = CostModel(alpha=2e-5, beta=1e-9, beta_allreduce=1.2e-9, merge=4e-9, dense=4e-10)


def test_expected_union_limits():
    assert expected_union(np.array([10, 10]), 100) == pytest.approx(100 * (1 - 0.9**2))
    assert expected_union(np.array([100, 3]), 100) == 100
    assert expected_union(np.array([0, 0, 0]), 100) == 0
    assert expected_union(np.array([50, 50]), 100, length=10) == pytest.approx(7.5)


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_allgather_and_dense_bytes_are_exact(size):
    k = np.arange(size) * 10 + 5
    n = 1000
    for rank in range(size):
        sent, received = predict("allgather", n, k, 4, 4).bytes(rank)
        total = 8 * k.sum()
        ring_sig = SIGNATURE * (size - 1)
        assert sent == (size - 1) * 8 * k[rank] + ring_sig
        assert received == total - 8 * k[rank] + ring_sig
        sent, received = predict("dense", n, k, 4, 4).bytes(rank)
        assert sent == received == (2 * 4 * n * (size - 1)) // size + ring_sig


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.2, 0.7, 1.0])
def test_bytes_sent_equal_bytes_received_over_all_ranks(algorithm, size, density):
    n = 10007
    k = np.full(size, int(density * n))
    k[0] //= 2
    prediction = predict(algorithm, n, k, 4, 4)
    sent = sum(prediction.bytes(r)[0] for r in range(size))
    received = sum(prediction.bytes(r)[1] for r in range(size))
    assert sent == pytest.approx(received, abs=size)  # rounding per rank only
    if size == 1:
        assert sent == received == 0


def test_split_algorithms_move_about_k_per_rank():
    n, size, k = 1 << 20, 4, 1000
    sent, received = predict("split_allgather", n, [k] * size, 4, 4).bytes(0)
    union = expected_union(np.full(size, k), n)
    # reduce-scatter: 3/4 of k entries out; allgather: the other owners' 3/4 of K
    expected = 8 * k * 3 / 4 + 8 * union * 3 / 4 + SIGNATURE * 3 + 8 * 3 + 8 * 3
    assert sent == round(expected)


def test_dsar_switches_dense_ranges_to_values_only():
    n, size = 1 << 16, 4
    full = predict("dsar", n, [n] * size, 4, 4).bytes(0)
    sparse = predict("split_allgather", n, [n] * size, 4, 4).bytes(0)
    assert full[0] < 0.6 * sparse[0]  # values only versus index + value


def test_recursive_doubling_goes_dense_after_the_threshold():
    n, size = 1 << 16, 4
    k = [int(0.3 * n)] * size  # two streams: union 51% -> dense in round 2
    prediction = predict("recursive_doubling", n, k, 4, 4)
    rounds = [p for p in prediction.phases if p.name.startswith("round")]
    assert rounds[0].sent[0] == 8 * k[0]
    assert rounds[1].sent[0] == 4 * n


def test_auto_chooses_sparse_when_sparse_and_dense_when_full():
    n, size = 1 << 24, 4
    choice, predicted = choose(MODEL, n, [int(1e-3 * n)] * size, 4, 4)
    assert choice in SPARSE_ALGORITHMS and set(predicted) == set(ALL_ALGORITHMS)
    choice, _ = choose(MODEL, n, [n] * size, 4, 4)
    assert choice == "dense"
    # Tiny streams: latency decides, and the split schedules pay the most messages.
    choice, predicted = choose(MODEL, n, [16] * size, 4, 4)
    assert choice in ("allgather", "recursive_doubling")
    assert predicted["split_allgather"] > predicted[choice]


@pytest.mark.parametrize("algorithm", SPARSE_ALGORITHMS)
def test_predicted_time_grows_with_k(algorithm):
    n, size = 1 << 20, 5
    times = [
        predict(algorithm, n, [int(d * n)] * size, 4, 4).time(MODEL)
        for d in (1e-4, 1e-3, 1e-2, 0.1)
    ]
    assert all(a < b for a, b in zip(times[:-1], times[1:], strict=True))


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown algorithm 'ring'; expected one of"):
        predict("ring", 10, [1, 1], 4, 4)


def test_fingerprint_depends_on_the_constants():
    assert MODEL.fingerprint() == CostModel(**{**MODEL.__dict__}).fingerprint()
    other = CostModel(2e-5, 1e-9, 1.2e-9, 4e-9, 5e-10)
    assert other.fingerprint() != MODEL.fingerprint()
