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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(label: str, row: dict) -> tuple[str, str, str, float, float]:
    medians = {name: a["median_s"] for name, a in row["algorithms"].items()}
    fastest = min(medians, key=medians.__getitem__)
    choice = row["auto"]["choice"]
    by_choice = medians[choice] / medians[fastest]
    return label, choice, fastest, by_choice, row["auto"]["median_s"] / medians[fastest]


def cells(result: dict) -> list[tuple[str, str, str, float, float]]:
    """(cell, chosen, fastest, choice/best, auto/best) of every cell of one grid."""
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
        print(f"{'cell':<22} {'auto ran':<26} {'fastest':<26} choice/best auto/best")
        for label, choice, fastest, by_choice, by_auto in rows:
            flag = "" if by_choice <= args.limit else "  <- miss"
            print(f"{label:<22} {choice:<26} {fastest:<26} {by_choice:11.2f} {by_auto:9.2f}{flag}")
        within = sum(r[3] <= args.limit for r in rows)
        within_auto = sum(r[4] <= args.limit for r in rows)
        print(
            f"within {args.limit}x: {within} of {len(rows)} cells by the chosen algorithm's "
            f"figure, {within_auto} of {len(rows)} by auto's own\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
