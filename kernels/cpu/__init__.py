"""Numba CPU kernels of sparcomm (NumPy arrays); the contract is in ``kernels/__init__.py``.

Kernel ``name`` lives in ``kernels/cpu/<family>.py``, the family named in
``sparcomm.kernels._checks.FAMILIES`` (its GPU twin is ``kernels/cuda/<family>.cu``).

Every kernel is ``@njit(cache=True, nogil=True)``, parallel over chunks where it pays, and
writes into caller-allocated ``out`` buffers.  The plain NumPy twin of each is in
``kernels/reference.py``.  Kernels that take a stream key or small integer parameters are
thin Python wrappers that normalise those arguments' types (a Python int above 2**63
types differently in Numba) before calling the compiled code.
"""

from __future__ import annotations

from importlib import import_module

from sparcomm.kernels._checks import CONTRACT, EXTRA, FAMILIES

from . import _cache  # noqa: F401 - drops stale Numba caches before any kernel runs

# Each kernel from its family's module, so FAMILIES stays the one list of names: a kernel
# listed there but missing from kernels/cpu/<family>.py fails this import.
for _name, _family in FAMILIES.items():
    globals()[_name] = getattr(import_module(f".{_family}", __name__), _name)
del _name, _family

#: Host-only fusions beyond the contract (error feedback's passes in one): the codecs
#: look them up with ``getattr`` and run the contract's kernels where they are absent.
#: ``topk`` of ``add``'s result:
topk_of_sum = import_module(".topk", __name__).topk_of_sum
#: Host-only fusion of error feedback's add, 1-bit encode and decode-subtract.
onebit_encode_feedback = import_module(".onebit", __name__).onebit_encode_feedback
#: Host-only fusions of the quantized collectives' sums: several payloads decoded and
#: added in one pass over the output, bit for bit the decodes with ``accumulate=1``.
qsgd_decode_sum = import_module(".quantize", __name__).qsgd_decode_sum
onebit_decode_sum = import_module(".onebit", __name__).onebit_decode_sum

__all__ = list(CONTRACT + EXTRA)
