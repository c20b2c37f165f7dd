"""The stale-cache guard drops Numba cache files when any kernel source changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sparcomm.kernels.cpu._cache import drop_stale_caches


def test_cache_files_dropped_only_when_sources_change(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("A = 1\n")
    (tmp_path / "kernel.py").write_text("B = 2\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    compiled = [cache / "kernel.f-1.py311.nbi", cache / "kernel.f-1.py311.1.nbc"]
    bytecode = cache / "kernel.cpython-311.pyc"
    for path in [*compiled, bytecode]:
        path.write_bytes(b"x")
    assert drop_stale_caches(tmp_path)  # no stamp yet: start clean
    assert not any(path.exists() for path in compiled) and bytecode.exists()
    for path in compiled:
        path.write_bytes(b"x")
    assert not drop_stale_caches(tmp_path)  # same sources: caches kept
    assert all(path.exists() for path in compiled)
    (tmp_path / "helpers.py").write_text("A = 3\n")  # a helper other kernels inline
    assert drop_stale_caches(tmp_path)
    assert not any(path.exists() for path in compiled)


def test_the_kernels_refuse_another_module_name():
    # A kernel compiled under another name would sit in the shared Numba cache and fail
    # to load in every later sparcomm process; the import is refused instead.
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", "import kernels"], cwd=root, capture_output=True, text=True
    )
    assert run.returncode != 0
    assert "import them as sparcomm.kernels" in run.stderr
