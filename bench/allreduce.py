"""Record ``sparcomm bench allreduce`` into bench/results/allreduce.json and .png.

Usage: python bench/allreduce.py -np 4 --repeats 5 --codecs
(the recorded run; ``--codecs`` with no names skips the quantized-codec section, which
bench/results/quantized.json records separately; ``--sizes``/``--densities`` shrink the grid)

The command launches its own ranks through ``mpiexec``; the JSON keeps the exact command,
the machine's load average at the start and the end, and the calibrated cost model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparcomm.cli import main

if __name__ == "__main__":
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    sys.exit(
        main(
            [
                "bench",
                "allreduce",
                "--output",
                str(results / "allreduce.json"),
                "--plot",
                str(results / "allreduce.png"),
                *sys.argv[1:],
            ]
        )
    )
