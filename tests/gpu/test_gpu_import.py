"""Asking for the GPU kernels without CuPy or without a device fails clearly.

These run everywhere (no GPU needed): each import happens in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _import_gpu(setup: str, tmp_path, extra_path: str | None = None):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(setup) + "\nimport sparcomm.kernels.gpu\n")
    env = None
    if extra_path is not None:
        import os

        env = dict(
            os.environ, PYTHONPATH=extra_path + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )


def test_without_cupy_import_error_names_the_extra(tmp_path):
    result = _import_gpu("import sys; sys.modules['cupy'] = None", tmp_path)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install 'sparcomm[gpu]'" in result.stderr


def test_without_device_runtime_error(tmp_path):
    fake = tmp_path / "fake"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text(
        textwrap.dedent("""
        class _Runtime:
            @staticmethod
            def getDeviceCount():
                raise RuntimeError("cudaErrorNoDevice (fake)")

        class cuda:
            runtime = _Runtime
        """)
    )
    result = _import_gpu("", tmp_path, extra_path=str(fake))
    assert result.returncode != 0
    assert "RuntimeError: sparcomm.kernels.gpu found no usable CUDA device" in result.stderr
    assert "cudaErrorNoDevice (fake)" in result.stderr


def test_import_sparcomm_does_not_import_cupy(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import sys, sparcomm, sparcomm._gpu_info\nprint('cupy' in sys.modules)\n")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_gpu_info_reports_without_raising(tmp_path):
    # In a child process: cuda_aware_mpi() imports mpi4py.MPI, which initialises MPI.
    script = tmp_path / "probe.py"
    script.write_text(
        "import json\nfrom sparcomm._gpu_info import gpu_info\nprint(json.dumps(gpu_info()))\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(facts["usable"], bool)
    if not facts["usable"]:
        assert facts["reason"]
    else:
        assert facts["devices"] and facts["cupy"]
    assert facts["mpi"]["cuda_aware"] in (True, False, None)
    assert facts["mpi"]["method"]
