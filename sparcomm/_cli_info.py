"""``sparcomm info``: versions and usable backends."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import Any

from sparcomm.cli import arguments, command


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - absent or broken: reported as missing
        return None


def collect() -> dict[str, Any]:
    """Facts about this installation (a dict, also printed by ``sparcomm info``)."""
    import numpy

    import sparcomm

    facts: dict[str, Any] = {
        "sparcomm": sparcomm.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import numba

        facts["numba"] = numba.__version__
        facts["numba_threads"] = numba.get_num_threads()
        facts["numba_threading_layer"] = numba.config.THREADING_LAYER  # type: ignore[attr-defined]
    except Exception as error:  # noqa: BLE001
        facts["numba"] = f"unavailable ({error})"
    try:
        import mpi4py
        from mpi4py import MPI

        facts["mpi4py"] = mpi4py.__version__
        facts["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
        facts["mpi_standard"] = "{}.{}".format(*MPI.Get_version())
        facts["mpi_thread_level"] = {
            MPI.THREAD_SINGLE: "single",
            MPI.THREAD_FUNNELED: "funneled",
            MPI.THREAD_SERIALIZED: "serialized",
            MPI.THREAD_MULTIPLE: "multiple",
        }[MPI.Query_thread()]
    except Exception as error:  # noqa: BLE001
        facts["mpi4py"] = f"unavailable ({error})"
    facts["torch"] = _version("torch")
    backends = {"cpu": "numba" in facts and "unavailable" not in str(facts["numba"])}
    try:
        from sparcomm._gpu_info import gpu_info

        gpu = gpu_info()
        facts["gpu"] = gpu
        backends["gpu"] = bool(gpu.get("usable"))
    except ImportError:
        backends["gpu"] = False
        facts["gpu"] = {"usable": False, "reason": "sparcomm GPU support not installed"}
    facts["backends"] = backends
    return facts


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


@command("info", help="versions of sparcomm's stack and which backends are usable")
@arguments(_configure)
def run(args: argparse.Namespace) -> int:
    facts = collect()
    if args.json:
        json.dump(facts, sys.stdout, indent=2, default=str)
        print()
        return 0
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return 0
