"""``bench/auto_vs_best.py``: the referee's median interval and the clear-miss count."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "auto_vs_best.py"
_SPEC = importlib.util.spec_from_file_location("auto_vs_best", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
auto_vs_best = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(auto_vs_best)


def _coverage(n: int, j: int) -> float:
    """Exact coverage of [x_(j), x_(n+1-j)] for the median: 1 - 2 P(Binomial(n, 1/2) < j)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n


@pytest.mark.parametrize(("n", "j"), [(6, 1), (7, 1), (10, 2), (16, 4), (30, 10)])
def test_median_interval_takes_the_tightest_order_statistics_with_95_percent(n, j):
    low, high = auto_vs_best.median_interval([float(v) for v in range(n, 0, -1)])
    assert (low, high) == (j, n + 1 - j)
    assert _coverage(n, j) >= 0.95 > _coverage(n, j + 1)


def test_median_interval_is_unbounded_below_six_values():
    assert auto_vs_best.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == (-math.inf, math.inf)


@pytest.mark.parametrize("n", [7, 10, 16])
def test_median_interval_covers_the_median_as_often_as_promised(n):
    # Lognormal ratios with median 1.1; the empirical coverage of 4,000 intervals is
    # within four standard errors of the exact binomial coverage.
    rng = np.random.default_rng(15)
    trials = 4000
    hits = 0
    for _ in range(trials):
        low, high = auto_vs_best.median_interval(list(1.1 * rng.lognormal(0, 0.2, n)))
        hits += low <= 1.1 <= high
    j = {7: 1, 10: 2, 16: 4}[n]
    exact = _coverage(n, j)
    error = math.sqrt(exact * (1 - exact) / trials)
    assert abs(hits / trials - exact) < 4 * error


def _row(rounds: dict[str, list[float]], choice: str) -> dict:
    algorithms = {
        name: {"median_s": float(np.median(times)), "rounds_s": times}
        for name, times in rounds.items()
    }
    median = float(np.median(rounds[choice]))
    return {"algorithms": algorithms, "auto": {"choice": choice, "median_s": median}}


def test_slower_by_pairs_rounds_and_flags_only_a_clear_miss(tmp_path, capsys):
    base = [1.0, 1.3, 0.9, 1.2, 1.0, 1.1, 0.95]  # load drifting round to round
    # "b" is 1.2x "a" in every round: a clear miss, whatever the drift.
    clear = _row({"a": base, "b": [1.2 * t for t in base]}, "b")
    assert auto_vs_best.slower_by(clear, "b") == pytest.approx(1.2)
    # "d" is 1.15x "c" by the medians, but the pairs straddle 1.0: within noise.
    noisy = _row({"c": base, "d": [1.15 * t for t in reversed(base)]}, "d")
    assert auto_vs_best.slower_by(noisy, "d") < 1.1
    assert np.median(noisy["algorithms"]["d"]["rounds_s"]) / np.median(base) > 1.1
    # A grid from before rounds were recorded: no bound.
    old = {"algorithms": {"a": {"median_s": 1.0}}, "auto": {"choice": "a", "median_s": 1.0}}
    assert auto_vs_best.slower_by(old, "a") is None
    assert auto_vs_best.slower_by(old, "auto") is None

    for row, n in ((clear, 1 << 16), (noisy, 1 << 20)):
        row.update(n=n, density=0.01)
        row["auto"]["rounds_s"] = row["algorithms"][row["auto"]["choice"]]["rounds_s"]
    grid = {"machine": {}, "rows": [clear, noisy]}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    assert auto_vs_best.main([str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("topk")}
    assert lines["n=2^16"].endswith("<- miss (clear)")
    assert lines["n=2^20"].endswith("<- miss")
    assert "within 1.1x: 0 of 2 cells" in out
    assert "clear misses" in out
    assert ": 1 of 2 cells (1 by auto's own rounds); rounds per cell 7-7" in out
