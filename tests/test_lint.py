"""The checkout is clean under the pinned ruff and mypy of the ``test`` extra.

CI runs the README's test command, so these make ``ruff check``, ``ruff format --check``
and ``mypy sparcomm`` part of CI; each fails with the tool's own report.  The versions
are pinned in ``pyproject.toml`` (a new release brings new rules); a different installed
version skips rather than fail on rules the checkout was never held to.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _pinned(tool: str) -> str:
    """The version of ``tool`` pinned (``tool==x.y.z``) in the ``test`` extra."""
    # A regular expression, not tomllib: that is Python >= 3.11, the package supports 3.10.
    pins = re.findall(rf'"{tool}==([^"]+)"', PYPROJECT.read_text())
    assert len(pins) == 1, f"the test extra of pyproject.toml must pin {tool}==X.Y.Z once"
    return pins[0]


def _command(tool: str) -> list[str]:
    """How to run ``tool`` from this interpreter's environment, or skip without it."""
    if tool == "mypy":
        try:
            import mypy  # noqa: F401
        except ImportError:
            pytest.skip("mypy is not installed (pip install -e '.[test]')")
        return [sys.executable, "-m", "mypy"]
    beside = Path(sys.executable).parent / tool  # the venv's script, before any on PATH
    found = str(beside) if beside.exists() else shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
    return [found]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _require_pinned_version(tool: str, command: list[str]) -> None:
    pinned = _pinned(tool)
    report = _run([*command, "--version"]).stdout
    match = re.search(r"\d+\.\d+(\.\d+)?", report)
    installed = match.group(0) if match else report.strip()
    if installed != pinned:
        pytest.skip(f"{tool} {installed} installed, the checkout pins {pinned}")


@pytest.mark.parametrize(
    "arguments",
    [["check", "."], ["format", "--check", "."]],
    ids=["check", "format"],
)
def test_ruff(arguments):
    command = _command("ruff")
    _require_pinned_version("ruff", command)
    result = _run([*command, *arguments])
    assert result.returncode == 0, (
        f"ruff {' '.join(arguments)} failed (fix with `ruff check --fix .` / "
        f"`ruff format .`):\n{result.stdout}{result.stderr}"
    )


@pytest.mark.slow
def test_mypy():
    command = _command("mypy")
    _require_pinned_version("mypy", command)
    result = _run([*command, "sparcomm"])
    assert result.returncode == 0, f"mypy sparcomm failed:\n{result.stdout}{result.stderr}"
