"""A test double of CuPy for running sparcomm's CuPy code paths on the host.

**It computes nothing on a GPU.**  Arrays live in host memory as NumPy arrays behind a
wrapper class; sparcomm's own CUDA kernels run through the host CUDA emulator
(``tests/gpu/_gpu_emulator.py``), bound in by ``tests/gpu/_gpu_skip.require_gpu`` when
``SPARCOMM_TEST_HOST_CUPY=1``.  The package is put on ``sys.path`` only in the child
process of ``tests/gpu/test_host_cupy.py``; it is never installed.

What it models is CuPy's *API strictness*, so that host/device mix-ups fail here the way
they fail on a GPU instead of silently working on host memory:

- :class:`ndarray` is not a ``numpy.ndarray`` subclass; ``numpy.asarray(x)`` raises
  CuPy's "Implicit conversion to a NumPy array is not allowed" TypeError;
- a NumPy array given to a CuPy function, ufunc or operator raises
  ``TypeError: Unsupported type <class 'numpy.ndarray'>`` (CuPy's kernel argument check);
- ``x[...] = numpy_array`` (basic indexing) raises CuPy's "non-scalar numpy.ndarray
  cannot be used for fill" ValueError; advanced indexing copies host values in, as CuPy;
- ``get(out=)`` and ``set()`` check type, dtype, shape and contiguity as CuPy does;
- ``bool()`` / ``int()`` / ``float()`` only for one-element arrays; reductions and
  scalar indexing return 0-d arrays, never NumPy scalars; there is no ``__index__``;
- only names CuPy 14.2 has exist (:mod:`._names`); ``RawModule``, ``RawKernel``,
  ``ElementwiseKernel`` and ``ReductionKernel`` raise (no device code runs here);
- ``empty`` returns memory filled with a 0xA5 byte pattern, as a pool would return
  stale memory, so code that relies on zeroed memory shows up;
- devices: ``SPARCOMM_HOST_CUPY_DEVICES=N`` pretends N devices (default 1).  The current
  device and stream are per host thread, as in CUDA; an array lives on the device that
  was current when it was allocated, and a kernel (ufunc, copy, sort, fill, gather or
  scatter, or an emulated sparcomm kernel) on an array of another device raises CuPy's
  "Array device must be same as the current device" ValueError.  (CuPy proceeds with a
  warning where peer access can be enabled; the double models a node without it.)

Deliberately stricter than CuPy: an integer-array assignment ``x[idx] = values`` with
repeated indices raises (CuPy stores an undefined one of the values), and out-of-range
integer-array indices raise IndexError as in NumPy (CuPy wraps them around silently).
Device addresses (``__cuda_array_interface__["data"][0]`` and ``.data.ptr``) are the host
address plus 2**62: address arithmetic (overlap checks) works as on a GPU, but host code
that dereferences a device pointer -- an MPI library that is not CUDA-aware, given a
device array -- faults as it would on a GPU, instead of reading host memory
(``SPARCOMM_HOST_CUPY_MPI_READS_DEVICE=1`` turns this off to simulate a CUDA-aware MPI:
see :data:`DEVICE_ADDRESS_OFFSET`).  There is no ``__dlpack__``.

Not modelled: device arithmetic.  CuPy compiles its elementwise kernels with
``-ftz=true`` (float32 subnormals flushed); here NumPy computes them, so subnormal
results may differ from a GPU's.  Random numbers of :mod:`cupy.random` are NumPy's, not
cuRAND's.  Streams and events run synchronously; event times are host wall times.
"""

from __future__ import annotations

import os as _os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as _np

from . import _names, cuda
from . import random as random

__version__ = "14.2.0+sparcomm.hostdouble"
HOST_DOUBLE = True
"""Marks this package as the host test double (checked before binding the emulator)."""

_GARBAGE = 0xA5
DEVICE_ADDRESS_OFFSET = (
    0 if _os.environ.get("SPARCOMM_HOST_CUPY_MPI_READS_DEVICE") == "1" else 1 << 62
)
"""Added to host addresses to make device pointers: non-canonical on x86-64, so they fault.

``SPARCOMM_HOST_CUPY_MPI_READS_DEVICE=1`` makes it 0: device pointers are then host
addresses that MPI can read, which simulates a CUDA-aware MPI library (for testing the
code path that hands device buffers to MPI directly)."""
_UNSUPPORTED_NOT_FORWARDED = frozenset(
    # Host/device semantics differ (CuPy copies host data in; NumPy returns views of it,
    # or reads files into host memory): implement explicitly before anything uses them.
    (
        "frombuffer",
        "fromfile",
        "fromfunction",
        "fromiter",
        "fromstring",
        "from_dlpack",
        "genfromtxt",
        "load",
        "loadtxt",
        "save",
        "savetxt",
        "savez",
        "savez_compressed",
    )
)


def _unsupported(value: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(value)}")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, complex, _np.generic))


class _Flags:
    """``ndarray.flags``: contiguity and ownership of the device buffer."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, array: _np.ndarray) -> None:
        self.c_contiguous = bool(array.flags.c_contiguous)
        self.f_contiguous = bool(array.flags.f_contiguous)
        self.owndata = bool(array.flags.owndata)

    def __getitem__(self, name: str) -> bool:
        key = {"C_CONTIGUOUS": "c_contiguous", "F_CONTIGUOUS": "f_contiguous"}
        return getattr(self, key.get(name, name.lower()))

    def __repr__(self) -> str:
        return (
            f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n"
            f"  OWNDATA : {self.owndata}"
        )


# ----------------------------------------------------------------------------- conversion


def _unwrap(value: Any, *, host_ok: bool = False) -> Any:
    """Replace double arrays by their NumPy storage; refuse NumPy arrays unless host_ok."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, _np.ndarray):
        if host_ok:
            return value
        raise _unsupported(value)
    if isinstance(value, (list, tuple)):
        items = [_unwrap(v, host_ok=host_ok) for v in value]
        return type(value)(items) if isinstance(value, tuple) else items
    return value


def _wrap(value: Any) -> Any:
    """NumPy results back to device arrays; NumPy scalars become 0-d arrays (as CuPy)."""
    if isinstance(value, _np.ndarray):
        return ndarray._wrap(value)
    if isinstance(value, _np.generic):
        return ndarray._wrap(_np.array(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _call(
    function: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    owner: ndarray | None = None,
    check_device: bool = True,
) -> Any:
    """Call a NumPy function on unwrapped device arrays and wrap the result.

    A result that *is* one of the inputs (``astype(copy=False)``, ``out=``) comes back
    as that input's wrapper, so identity checks behave as with CuPy.  Every device array
    taking part must be on the current device (``check_device``; views need not).
    """
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if not isinstance(o, ndarray):
                raise TypeError(f"out must be a cupy.ndarray, got {type(o)}")
    if check_device:
        _check_device(owner, args, kwargs)
    result = function(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
    if isinstance(result, _np.ndarray):
        candidates = [owner, out, *args, *kwargs.values()]
        for candidate in candidates:
            if isinstance(candidate, ndarray) and candidate._a is result:
                return candidate
    return _wrap(result)


def _forwarding(
    name: str, function: Callable[..., Any], owner: ndarray | None = None
) -> Callable[..., Any]:
    check_device = name not in _VIEWS

    def forwarded(*args: Any, **kwargs: Any) -> Any:
        return _call(function, args, kwargs, owner, check_device)

    forwarded.__name__ = forwarded.__qualname__ = name
    forwarded.__doc__ = f"cupy.{name} on the host double (NumPy's {name} on device arrays)."
    return forwarded


_VIEWS = frozenset(
    ("reshape", "ravel", "squeeze", "swapaxes", "transpose", "diagonal", "real", "imag")
)
"""Methods that only make views: no kernel runs, so the array may live on any device."""


def _check_device(*things: Any) -> None:
    """CuPy runs kernels on the current device only (no peer access modelled)."""
    current = cuda.runtime.getDevice()
    stack = list(things)
    while stack:
        item = stack.pop()
        if isinstance(item, ndarray):
            if item._device != current:
                raise ValueError(
                    "Array device must be same as the current device: array device = "
                    f"{item._device} while current = {current}"
                )
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def _garbage(array: _np.ndarray) -> _np.ndarray:
    if array.size:
        array.reshape(-1).view(_np.uint8)[:] = _GARBAGE
    return array


def _index_key(key: Any) -> tuple[Any, bool]:
    """``(key for NumPy, advanced?)``: device and host index arrays are both accepted."""
    parts = key if isinstance(key, tuple) else (key,)
    advanced = any(
        isinstance(p, (ndarray, _np.ndarray, list)) or isinstance(p, bool) for p in parts
    )
    return _unwrap(key, host_ok=True), advanced


# ----------------------------------------------------------------------------- ndarray


_OWNERS: weakref.WeakValueDictionary[int, ndarray] = weakref.WeakValueDictionary()
"""id of an owning NumPy array -> its wrapper (checked against ``_a`` on lookup)."""


class ndarray:  # noqa: N801 - CuPy's name
    """A device array of the host double: NumPy storage, CuPy's rules.

    Parameters
    ----------
    shape, dtype, order
        As ``cupy.ndarray(shape, dtype=float, memptr=None, strides=None, order='C')``;
        the memory is uninitialised (a 0xA5 byte pattern).
    """

    __slots__ = ("_a", "_device", "__weakref__")
    __array_priority__ = 100.0
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        shape: Any,
        dtype: Any = float,
        memptr: Any = None,
        strides: Any = None,
        order: str = "C",
    ) -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("the host double has no device memory pointers")
        self._a = _garbage(_np.empty(shape, dtype=dtype, order=order))
        self._device = cuda.runtime.getDevice()
        _OWNERS[id(self._a)] = self

    @classmethod
    def _wrap(cls, array: _np.ndarray) -> ndarray:
        obj = cls.__new__(cls)
        obj._a = array
        if array.base is None:  # owns its memory: the ``base`` of its views
            _OWNERS[id(array)] = obj
            obj._device = cuda.runtime.getDevice()  # new memory: on the current device
        else:
            owner = _OWNERS.get(id(array.base))
            known = owner is not None and owner._a is array.base
            obj._device = owner._device if known else cuda.runtime.getDevice()
        return obj

    # -- attributes -------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: ndarray._wrap(self._a.T))
    flags = property(lambda self: _Flags(self._a))
    device = property(lambda self: cuda.Device(self._device))

    @property
    def base(self) -> ndarray | None:
        """The array owning the memory of this view (the same object, as in CuPy)."""
        owner = _OWNERS.get(id(self._a.base)) if self._a.base is not None else None
        return owner if owner is not None and owner._a is self._a.base else None

    @property
    def data(self) -> cuda.MemoryPointer:
        """The device pointer: not host-addressable (see the module docstring)."""
        return cuda.MemoryPointer(
            self._a.ctypes.data + DEVICE_ADDRESS_OFFSET, device_id=self._device
        )

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        strides = None if self._a.flags.c_contiguous else self._a.strides
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "descr": self.dtype.descr,
            "data": (self._a.ctypes.data + DEVICE_ADDRESS_OFFSET, False),
            "strides": strides,
            "stream": 1,  # CuPy's value for the legacy default stream
            "version": 3,
        }

    def __getattr__(self, name: str) -> Any:
        if name not in _names.NDARRAY or not hasattr(_np.ndarray, name):
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        attribute = getattr(self._a, name)
        if callable(attribute):
            return _forwarding(name, attribute, self)
        return _wrap(attribute)

    # -- host transfers ---------------------------------------------------------------
    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> _np.ndarray:
        """Copy to host memory (``out``: a NumPy array of the same dtype and shape)."""
        if out is None:
            return _np.array(self._a, order=order, copy=True)
        if not isinstance(out, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if self.dtype != out.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if self.shape != out.shape:
            raise ValueError(
                f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}"
            )
        if not (out.flags.c_contiguous or out.flags.f_contiguous):
            raise RuntimeError("`out` cannot be specified when copying to non-contiguous ndarray")
        out[...] = self._a
        return out

    def set(self, arr: Any, stream: Any = None) -> None:
        """Copy a host NumPy array of the same dtype and shape in."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self._a.flags.c_contiguous or self._a.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        self._a[...] = arr

    def __array__(self, *args: Any, **kwargs: Any) -> _np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    # -- methods with CuPy-specific rules -------------------------------------------
    def fill(self, value: Any) -> None:
        _check_device(self, value)
        if isinstance(value, (_np.ndarray, ndarray)):
            if value.shape != ():
                kind = "numpy" if isinstance(value, _np.ndarray) else "cupy"
                raise ValueError(f"non-scalar {kind}.ndarray cannot be used for fill")
            value = _unwrap(value, host_ok=True)[()]
        elif not _is_scalar(value):
            raise _unsupported(value)
        self._a.fill(value)

    def view(self, dtype: Any = None, array_class: Any = None) -> ndarray:
        if array_class is not None:
            raise NotImplementedError("view(type=...) is not supported by CuPy")
        return ndarray._wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def argsort(self, axis: int = -1, kind: str | None = None) -> ndarray:
        # CuPy's sort is always stable and accepts no other kind.
        if kind not in (None, "stable"):
            raise NotImplementedError(f"kind={kind!r} is not supported by cupy.argsort")
        _check_device(self)
        return ndarray._wrap(_np.argsort(self._a, axis=axis, kind="stable"))

    def sort(self, axis: int = -1, kind: str | None = None) -> None:
        if kind not in (None, "stable"):
            raise NotImplementedError(f"kind={kind!r} is not supported by cupy.ndarray.sort")
        _check_device(self)
        self._a.sort(axis=axis, kind="stable")

    def copy(self, order: str = "C") -> ndarray:
        """A copy on the *current* device (CuPy copies across devices here)."""
        return ndarray._wrap(self._a.copy(order=order))

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo: Any) -> ndarray:
        return self.copy()

    def __reduce__(self) -> tuple:
        return array, (self.get(),)

    # -- indexing ---------------------------------------------------------------------
    def __getitem__(self, key: Any) -> ndarray:
        numpy_key, advanced = _index_key(key)
        if advanced:  # a gather kernel; basic indexing only makes a view
            _check_device(self, key)
        return _wrap(self._a[numpy_key])

    def __setitem__(self, key: Any, value: Any) -> None:
        numpy_key, advanced = _index_key(key)
        _check_device(self, key, value)
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, _np.ndarray) or isinstance(value, (list, tuple)):
            if not advanced:
                # CuPy fills a basic-indexed view with a scalar; arrays must be on device.
                if isinstance(value, _np.ndarray) and value.shape == ():
                    value = value[()]
                elif isinstance(value, _np.ndarray):
                    raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
                else:
                    raise _unsupported(value)
            # advanced indexing: CuPy copies host values to the device first
        elif not _is_scalar(value):
            raise _unsupported(value)
        if advanced:
            self._check_unique_targets(numpy_key, value)
        self._a[numpy_key] = value

    def _check_unique_targets(self, key: Any, value: Any) -> None:
        """Repeated targets of an integer-array assignment store an undefined value."""
        if _np.ndim(value) == 0:
            return
        parts = key if isinstance(key, tuple) else (key,)
        for part in parts:
            index = _np.asarray(part) if isinstance(part, (list, _np.ndarray)) else None
            if index is not None and index.dtype.kind in "iu" and index.size > 1:
                if _np.unique(index).size != index.size:
                    raise ValueError(
                        "integer-array assignment with repeated indices: CuPy stores an "
                        "undefined one of the values (the host double refuses it)"
                    )

    # -- Python protocol --------------------------------------------------------------
    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(
                f"The truth value of an array with {self.size} elements is ambiguous. "
                "Use a.any() or a.all()"
            )
        return bool(self._a.reshape(-1)[0])

    def __int__(self) -> int:
        if self.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        return int(self._a.reshape(-1)[0])

    def __float__(self) -> float:
        if self.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        return float(self._a.reshape(-1)[0])

    def __complex__(self) -> complex:
        if self.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        return complex(self._a.reshape(-1)[0])

    def __bytes__(self) -> bytes:
        return bytes(self.get())

    def __repr__(self) -> str:
        return repr(self._a)

    def __str__(self) -> str:
        return str(self._a)

    def __format__(self, spec: str) -> str:
        return format(self.get(), spec)

    # -- NumPy protocols: a device array never mixes with host arrays ----------------
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__" or ufunc.__name__ not in _names.MODULE:
            return NotImplemented
        for x in inputs + tuple(kwargs.get("out", ())):
            if not (isinstance(x, (ndarray, _np.ndarray)) or _is_scalar(x)):
                return NotImplemented
        if "out" in kwargs:
            out = kwargs["out"]
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs["out"] = out[0]
        return _ufunc(ufunc, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        name = func.__name__
        if name not in _names.MODULE or name in _UNSUPPORTED_NOT_FORWARDED:
            return NotImplemented
        return globals()[name](*args, **kwargs) if name in _EXPLICIT else _call(func, args, kwargs)


def _ufunc(ufunc: Any, inputs: tuple, kwargs: dict) -> Any:
    for x in inputs:
        if not (isinstance(x, ndarray) or _is_scalar(x)):
            raise _unsupported(x)
    return _call(ufunc, inputs, kwargs)


def _binary(ufunc: Any, reflected: bool = False, inplace: bool = False):
    def operator(self: ndarray, other: Any) -> Any:
        if not (isinstance(other, (ndarray, _np.ndarray)) or _is_scalar(other)):
            return NotImplemented
        if inplace:
            _ufunc(ufunc, (self, other), {"out": self})
            return self
        return _ufunc(ufunc, (other, self) if reflected else (self, other), {})

    return operator


def _unary(ufunc: Any):
    def operator(self: ndarray) -> Any:
        return _ufunc(ufunc, (self,), {})

    return operator


for _name, _uf in {
    "add": _np.add,
    "sub": _np.subtract,
    "mul": _np.multiply,
    "truediv": _np.true_divide,
    "floordiv": _np.floor_divide,
    "mod": _np.remainder,
    "pow": _np.power,
    "and": _np.bitwise_and,
    "or": _np.bitwise_or,
    "xor": _np.bitwise_xor,
    "lshift": _np.left_shift,
    "rshift": _np.right_shift,
    "matmul": _np.matmul,
}.items():
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in {
    "lt": _np.less,
    "le": _np.less_equal,
    "eq": _np.equal,
    "ne": _np.not_equal,
    "gt": _np.greater,
    "ge": _np.greater_equal,
}.items():
    setattr(ndarray, f"__{_name}__", _binary(_uf))
for _name, _uf in {"neg": _np.negative, "abs": _np.absolute, "invert": _np.invert}.items():
    setattr(ndarray, f"__{_name}__", _unary(_uf))
ndarray.__pos__ = lambda self: self  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- functions


def array(
    obj: Any,
    dtype: Any = None,
    copy: bool = True,
    order: str = "K",
    subok: bool = False,
    ndmin: int = 0,
    *,
    blocking: bool = False,
) -> ndarray:
    """A new device array from device or host data (host data is copied in)."""
    return ndarray._wrap(
        _np.array(_unwrap(obj, host_ok=True), dtype=dtype, copy=True, order=order, ndmin=ndmin)
    )


def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
    """``a`` itself when already a device array of ``dtype``; else a copy on the device."""
    if isinstance(a, ndarray) and (dtype is None or _np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, order="K" if order is None else order)


asanyarray = asarray


def asnumpy(
    a: Any, stream: Any = None, order: str = "C", out: Any = None, *, blocking: bool = True
) -> _np.ndarray:
    """A host NumPy array of ``a`` (a copy for device arrays)."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    temp = _np.asarray(a, order=order)
    if out is not None:
        out[...] = temp
        return out
    return temp


def _device_only(name: str, a: Any) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(
            f"Argument 'a' has incorrect type (expected cupy.ndarray, got {type(a).__name__})"
            f" in cupy.{name}"
        )
    return a


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    a = _device_only("ascontiguousarray", a)
    if not a._a.flags.c_contiguous:
        _check_device(a)
    result = _np.ascontiguousarray(a._a, dtype=dtype)
    return a if result is a._a else ndarray._wrap(result)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(shape, dtype, order=order)


def empty_like(
    prototype: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    prototype = _device_only("empty_like", prototype)
    return ndarray._wrap(
        _garbage(_np.empty_like(prototype._a, dtype=dtype, order=order, shape=shape))
    )


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    if dtype is None:
        dtype = fill_value.dtype if isinstance(fill_value, ndarray) else _np.array(fill_value).dtype
    result = empty(shape, dtype, order=order)
    copyto(result, fill_value, casting="unsafe")
    return result


def copyto(dst: Any, src: Any, casting: str = "same_kind", where: Any = None) -> None:
    dst = _device_only("copyto", dst)
    _check_device(dst, src, where)
    if isinstance(src, _np.ndarray):
        if src.size != 1:
            raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
        src = src.reshape(-1)[0]
    elif not (isinstance(src, ndarray) or _is_scalar(src)):
        raise _unsupported(src)
    _np.copyto(
        dst._a, _unwrap(src), casting=casting, where=True if where is None else _unwrap(where)
    )


def argsort(a: Any, axis: int = -1, kind: str | None = None) -> ndarray:
    return _device_only("argsort", a).argsort(axis=axis, kind=kind)


def sort(a: Any, axis: int = -1, kind: str | None = None) -> ndarray:
    if kind not in (None, "stable"):
        raise NotImplementedError(f"kind={kind!r} is not supported by cupy.sort")
    a = _device_only("sort", a)
    _check_device(a)
    return ndarray._wrap(_np.sort(a._a, axis=axis, kind="stable"))


def get_array_module(*args: Any) -> Any:
    import sys

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def _no_device_code(name: str) -> type:
    class NoDeviceCode:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError(
                f"cupy.{name}: the host double runs no device code; sparcomm's kernels run "
                "through the CUDA emulator (tests/gpu/_gpu_emulator.py)"
            )

    NoDeviceCode.__name__ = NoDeviceCode.__qualname__ = name
    return NoDeviceCode


RawModule = _no_device_code("RawModule")
RawKernel = _no_device_code("RawKernel")
ElementwiseKernel = _no_device_code("ElementwiseKernel")
ReductionKernel = _no_device_code("ReductionKernel")

_EXPLICIT = frozenset(
    (
        "array",
        "asarray",
        "asanyarray",
        "ascontiguousarray",
        "empty",
        "empty_like",
        "full",
        "copyto",
        "argsort",
        "sort",
    )
)


def _host_view(x: ndarray) -> _np.ndarray:
    """The NumPy storage of a device array: for the CUDA emulator's launches only.

    The array must be on the current device, where the kernel runs (a kernel reading
    another device's memory faults unless peer access is enabled).
    """
    if not isinstance(x, ndarray):
        raise _unsupported(x)
    _check_device(x)
    return x._a


def __getattr__(name: str) -> Any:
    """Every other CuPy name that NumPy has: NumPy's, on device arrays only."""
    if name in _UNSUPPORTED_NOT_FORWARDED or name not in _names.MODULE:
        raise AttributeError(
            f"module 'cupy' has no attribute '{name}' in the host test double "
            "(tests/gpu/_host_cupy): implement it there if sparcomm needs it"
        )
    value = getattr(_np, name)
    if isinstance(value, type) or not callable(value):
        return value  # dtypes, scalar types and constants are NumPy's own in CuPy too
    forwarded = _forwarding(name, value)
    globals()[name] = forwarded
    return forwarded
