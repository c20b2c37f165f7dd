"""Record ``sparcomm bench codecs`` into bench/results/codecs.json.

Usage: NUMBA_NUM_THREADS=2 python bench/codecs.py [--sizes 20 24 26]
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparcomm.cli import main

if __name__ == "__main__":
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    sys.exit(main(["bench", "codecs", "--output", str(results / "codecs.json"), *sys.argv[1:]]))
