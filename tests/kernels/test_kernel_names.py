"""One list of kernel names (``kernels/_checks.py`` FAMILIES) and one file name per family.

Every listed kernel exists on the NumPy reference, the CPU package and the GPU launcher
(``sparcomm.kernels.cuda.GpuKernels``); kernel ``name`` of family ``f`` is defined in
``kernels/cpu/f.py`` and launched from ``kernels/cuda/f.cu``; and the kernel layer imports
nothing from sparcomm above ``sparcomm.kernels`` and ``sparcomm._random``.  No GPU needed.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from sparcomm.kernels import cpu, cuda, reference
from sparcomm.kernels._checks import CONTRACT, EXTRA, FAMILIES

KERNELS_DIR = Path(cpu.__file__).resolve().parent.parent


def test_contract_and_extra_partition_the_families():
    assert CONTRACT + EXTRA == tuple(FAMILIES)
    assert len(set(FAMILIES)) == len(FAMILIES)
    assert cuda.CONTRACT == CONTRACT and cuda.EXTRA == EXTRA


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kernel_exists_on_reference_cpu_and_gpu_launcher(name):
    assert callable(getattr(reference, name, None)), f"kernels/reference.py lacks {name}"
    assert callable(getattr(cpu, name, None)), f"sparcomm.kernels.cpu lacks {name}"
    assert callable(getattr(cuda.GpuKernels, name, None)), f"GpuKernels lacks {name}"


@pytest.mark.parametrize("name, family", list(FAMILIES.items()))
def test_cpu_and_gpu_files_of_a_family_share_its_name(name, family):
    assert getattr(cpu, name).__module__ == f"sparcomm.kernels.cpu.{family}"
    assert (cuda.SOURCE_DIR / f"{family}.cu").is_file()
    launched = _sources_launched(name)
    assert family in launched, f"GpuKernels.{name} launches from {launched}, not {family}.cu"


def _sources_launched(method: str, seen: set[str] | None = None) -> set[str]:
    """The ``.cu`` sources a ``GpuKernels`` method launches, directly or through the
    methods it calls (``self._fn("source", ...)`` is the one way to get a kernel)."""
    seen = set() if seen is None else seen
    seen.add(method)
    text = inspect.getsource(getattr(cuda.GpuKernels, method))
    sources = set(re.findall(r'_fn\(\s*"(\w+)"', text))
    for called in re.findall(r"self\.(\w+)\(", text):
        if called not in seen and inspect.isfunction(getattr(cuda.GpuKernels, called, None)):
            sources |= _sources_launched(called, seen)
    return sources


def test_every_file_is_a_family():
    cpu_modules = {p.stem for p in (KERNELS_DIR / "cpu").glob("*.py") if not p.stem[0] == "_"}
    cuda_sources = {p.stem for p in cuda.SOURCE_DIR.glob("*.cu")}
    families = set(FAMILIES.values())
    assert cpu_modules == families
    assert cuda_sources == families


def test_packages_export_exactly_the_listed_kernels():
    assert cpu.__all__ == list(CONTRACT + EXTRA)
    assert list(cuda.export(cuda.GpuKernels(runtime=None)).keys()) == list(FAMILIES)  # type: ignore[arg-type]
    spec = (KERNELS_DIR / "__init__.py").read_text()
    assert [name for name in CONTRACT if f"{name}(" not in spec] == []


def _sparcomm_imports(path: Path) -> list[str]:
    """The ``sparcomm...`` modules a file imports (absolute, or relative resolved)."""
    package = ["sparcomm", *path.relative_to(KERNELS_DIR.parent).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "sparcomm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.split(".")[0] == "sparcomm":
                found.append(node.module)
    return found


def test_kernel_layer_imports_nothing_above_itself():
    allowed = ("sparcomm.kernels", "sparcomm._random")
    files = sorted(KERNELS_DIR.rglob("*.py"))
    assert len(files) > 10
    upward = {
        str(path.relative_to(KERNELS_DIR.parent)): [
            module
            for module in _sparcomm_imports(path)
            if not any(module == a or module.startswith(a + ".") for a in allowed)
        ]
        for path in files
    }
    assert {path: modules for path, modules in upward.items() if modules} == {}
