"""``auto`` against the fastest algorithm in recorded allreduce grids (issue 11).

Reads the JSON that ``sparcomm bench allreduce --output`` writes and prints, per cell
(TopK's user call at every size and density, and every quantized codec and size), the
algorithm ``auto`` ran, the fastest algorithm and two ratios:

* ``choice/best``: the chosen algorithm's own median over the fastest one's, both timed
  in the same interleaved rounds (the quality of the choice);
* ``auto/best``: ``auto``'s separately timed median over the fastest one's (the choice
  plus the noise of a second sample of the same work).

and how many cells are within ``--limit`` (1.1 by default) on each ratio::

    python bench/auto_vs_best.py bench/results/allreduce_grid_tuned_run1.json ...

Grids that record every round (``rounds_s``, since session 15) also get the referee's
own uncertainty.  The rounds interleave the contenders, so round ``i`` of the chosen
algorithm and round ``i`` of another one pair up; ``slower by`` is the largest lower
bound, over the other algorithms, of a distribution-free confidence interval (at least
95 %, from the binomial order statistics) for the median of the paired ratios
``choice_i / other_i``.  A cell is a *clear miss* when that lower bound is above
``--limit``: the referee can tell the choice is more than ``--limit`` slower.  A miss
by the medians whose bound is below it is within the referee's noise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

Cell = tuple[str, str, str, float, float, float | None, float | None]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``' population.

    ``[x_(j), x_(n+1-j)]`` of the sorted sample with the largest ``j`` whose coverage,
    ``1 - 2 P(Binomial(n, 1/2) < j)``, is still at least ``confidence``: exact for any
    continuous distribution.  Too few values for that coverage (n < 6 at 95 %) give
    ``(-inf, inf)``.
    """
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    below = 0.0  # P(Binomial(n, 1/2) < j), for j = 1, 2, ...
    j = 0
    while j < n // 2:
        below += math.comb(n, j) / 2**n
        if below > tail:
            break
        j += 1
    if j == 0:
        return -math.inf, math.inf
    return ordered[j - 1], ordered[n - j]


def slower_by(row: dict, choice: str) -> float | None:
    """The largest lower bound, over the other algorithms, of the paired ratio
    ``choice / other``'s median interval (:func:`median_interval`); ``None`` when the
    grid has no rounds recorded or the choice was not timed as an algorithm.
    ``choice="auto"``: ``auto``'s own rounds against every algorithm."""
    algorithms = row["algorithms"]
    timed = row["auto"] if choice == "auto" else algorithms.get(choice, {})
    if "rounds_s" not in timed:
        return None
    mine = timed["rounds_s"]
    bounds = [
        median_interval([a / b for a, b in zip(mine, other["rounds_s"], strict=True)])[0]
        for name, other in algorithms.items()
        if name != choice
    ]
    return max(bounds, default=0.0)


def _cell(label: str, row: dict) -> Cell:
    medians = {name: a["median_s"] for name, a in row["algorithms"].items()}
    fastest = min(medians, key=medians.__getitem__)
    choice = row["auto"]["choice"]
    by_choice = medians[choice] / medians[fastest]
    by_auto = row["auto"]["median_s"] / medians[fastest]
    bound, auto_bound = slower_by(row, choice), slower_by(row, "auto")
    return label, choice, fastest, by_choice, by_auto, bound, auto_bound


def cells(result: dict) -> list[Cell]:
    """(cell, chosen, fastest, choice/best, auto/best, slower by, auto slower by) of
    every cell of one grid (the last two as :func:`slower_by`: the choice's rounds, then
    ``auto``'s own)."""
    rows = [
        _cell(f"topk n=2^{row['n'].bit_length() - 1} d={row['density']:g}", row)
        for row in result["rows"]
    ]
    rows += [
        _cell(f"{row['codec']} n=2^{row['n'].bit_length() - 1}", row)
        for row in result.get("quantized") or []
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of the grid")
    parser.add_argument("--limit", type=float, default=1.1)
    args = parser.parse_args(argv)
    for path in args.results:
        result = json.loads(path.read_text())
        load = result["machine"].get("loadavg_start"), result["machine"].get("loadavg_end")
        print(f"{path}  (load at start {load[0]}, at end {load[1]})")
        rows = cells(result)
        print(f"{'cell':<22} {'auto ran':<26} {'fastest':<26} choice/best auto/best slower by")
        for label, choice, fastest, by_choice, by_auto, bound, _ in rows:
            flag = ""
            if by_choice > args.limit:
                clear = bound is not None and bound > args.limit
                flag = "  <- miss" + (" (clear)" if clear else "")
            shown = "" if bound is None else f"{bound:9.2f}"
            print(
                f"{label:<22} {choice:<26} {fastest:<26} {by_choice:11.2f} {by_auto:9.2f} "
                f"{shown:>9}{flag}"
            )
        within = sum(r[3] <= args.limit for r in rows)
        within_auto = sum(r[4] <= args.limit for r in rows)
        print(
            f"within {args.limit}x: {within} of {len(rows)} cells by the chosen algorithm's "
            f"figure, {within_auto} of {len(rows)} by auto's own"
        )
        bounds = [r[5] for r in rows if r[5] is not None]
        if bounds:
            clear = sum(b > args.limit for b in bounds)
            clear_auto = sum(r[6] is not None and r[6] > args.limit for r in rows)
            rounds = [
                len(row["auto"]["rounds_s"])
                for row in [*result["rows"], *(result.get("quantized") or [])]
            ]
            print(
                f"clear misses (the choice slower than another algorithm by more than "
                f"{args.limit}x, >= 95 % confidence, paired rounds): {clear} of "
                f"{len(bounds)} cells ({clear_auto} by auto's own rounds); rounds per cell "
                f"{min(rounds)}-{max(rounds)}, median {statistics.median(rounds):g}"
            )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
