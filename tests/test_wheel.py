"""The built wheel ships the kernels inside the package and works outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROUND_TRIP = """
import numpy as np, sparcomm, sparcomm.kernels.cpu as cpu
assert 'site-packages' in sparcomm.__file__, sparcomm.__file__
assert 'site-packages' in cpu.__file__, cpu.__file__
x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
for codec in (sparcomm.TopK(density=0.05), sparcomm.QSGD(bits=4), sparcomm.OneBit()):
    p = sparcomm.Payload.from_bytes(codec.encode(x, key='w').to_bytes())
    y = codec.decode(p)
    assert y.shape == x.shape and np.isfinite(y).all()
print('wheel round trip ok')
# The CUDA sources ship as package data of sparcomm.kernels.cuda, one per kernel family,
# and load (header inlined) without CuPy.
from sparcomm.kernels import cuda
assert 'site-packages' in str(cuda.SOURCE_DIR), cuda.SOURCE_DIR
for family in set(cuda.FAMILIES.values()):
    assert 'include "common.cuh"' not in cuda.source_text(family), family
print('cuda sources ok')
"""


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_round_trips(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            # Built in pip's isolated environment from pyproject's build requirements, as
            # a user's `pip install` builds it: the test environment's own setuptools may
            # predate them (Python 3.11's venv ships setuptools 65 without `wheel`).
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("sparcomm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparcomm/kernels/cpu/__init__.py" in names
    assert "sparcomm/kernels/reference.py" in names
    assert "sparcomm/kernels/cuda/common.cuh" in names
    assert "sparcomm/kernels/cuda/onebit.cu" in names
    assert "sparcomm/py.typed" in names
    assert not any(name.startswith("kernels/") for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # numpy and numba come from the package index (or pip's cache); MPI is not needed
    # for a codec round trip, so the wheel goes in without its other dependencies.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "numpy", "numba"], check=True, timeout=600
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", ROUND_TRIP],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wheel round trip ok" in result.stdout
    assert "cuda sources ok" in result.stdout
