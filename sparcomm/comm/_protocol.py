"""The agreement protocol: what ranks tell each other so that no mistake can hang them.

Two mechanisms, both here:

* **The signature check** before any data moves: every rank contributes one int64 row
  (:data:`SIGNATURE_COLUMNS`: format version, n, dtype, index size, codec fingerprint,
  algorithm, op, cost model, k, error) to one ``Allgather``.  A rank whose input failed
  raises its own error and every other rank raises one of the same class; ranks that
  disagree on n, dtype, codec, op or algorithm all raise ``ValueError``.
* **Status words** in data blocks: collectives whose local work can fail after the
  check (an encode of non-finite values at an owner, say) head every block with
  :data:`STATUS_BYTES` bytes naming the failing rank and its error class, and every
  rank raises at the end of the schedule, which all ranks complete.

Every value that travels is a code from an explicit table below (never a position in
a tuple), and tests/comm/test_protocol.py pins each one: changing a code's meaning
would make ranks of different sparcomm versions misread each other.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from sparcomm._errors import NonFiniteError
from sparcomm.comm._context import Channel

#: Version of the signature row.
VERSION = 1

#: Column of each field in the signature row.
SIGNATURE_COLUMNS: dict[str, int] = {
    "version": 0,
    "n": 1,
    "dtype": 2,
    "index_itemsize": 3,
    "codec": 4,
    "algorithm": 5,
    "op": 6,
    "cost_model": 7,
    "k": 8,
    "error": 9,
}
#: The field names in column order.
SIGNATURE_FIELDS: tuple[str, ...] = tuple(
    sorted(SIGNATURE_COLUMNS, key=lambda name: SIGNATURE_COLUMNS[name])
)
#: Bytes of one row.
SIGNATURE_BYTES = 8 * len(SIGNATURE_FIELDS)

#: dtype codes of the values (the payload header has its own table, payload.DTYPE_CODES).
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}

#: Reduction codes.
OP_CODES: dict[str, int] = {"sum": 0, "mean": 1}

#: Algorithm codes, per family.  ``auto`` is 0 everywhere: ranks agree on the request,
#: and ``auto`` resolves alike on every rank from agreed inputs.  Each family has a
#: range of its own (sparse and dense 1..99, quantized 100..199, low-rank 200..299).
SPARSE_ALGORITHM_CODES: dict[str, int] = {
    "auto": 0,
    "allgather": 1,
    "recursive_doubling": 2,
    "split_allgather": 3,
    "dsar": 4,
    "dense": 5,
}
#: The dense family's requests: ``dense`` (= ``auto``: the measured choice), MPI's own
#: ``Allreduce`` or the pipelined ring of :mod:`sparcomm.comm._ring`.
DENSE_ALGORITHM_CODES: dict[str, int] = {"auto": 0, "dense": 5, "mpi": 6, "ring": 7}
QUANTIZED_ALGORITHM_CODES: dict[str, int] = {
    "auto": 0,
    "allgather": 100,
    "reduce_scatter_allgather": 101,
    "shared_scale": 102,
    "pipelined": 103,
}
LOWRANK_ALGORITHM_CODES: dict[str, int] = {
    "auto": 0,
    "powersgd": 200,
}
#: code -> algorithm name, every family (for messages).
ALGORITHM_NAMES: dict[int, str] = {
    code: name
    for table in (
        SPARSE_ALGORITHM_CODES,
        DENSE_ALGORITHM_CODES,
        QUANTIZED_ALGORITHM_CODES,
        LOWRANK_ALGORITHM_CODES,
    )
    for name, code in table.items()
}

#: Error codes: the class a rank's local failure is raised with on the other ranks
#: (0: no error; a subclass travels as its nearest listed base, any other exception
#: class as RuntimeError).  NonFiniteError (a ValueError: NaN or Inf in a rank's
#: input) has a code of its own, so every rank can say so.
ERROR_CODES: dict[type[Exception], int] = {
    TypeError: 1,
    ValueError: 2,
    NotImplementedError: 3,
    RuntimeError: 4,
    NonFiniteError: 5,
}
_ERROR_CLASSES = {code: cls for cls, code in ERROR_CODES.items()}

#: Bytes of the status that heads every data block of the collectives that carry one
#: (the rank that failed, -1 for none, and its error code); 8 keep what follows aligned.
STATUS_BYTES = 8
_STATUS = struct.Struct("<ii")


def code(table: dict[str, int], name: Any) -> int:
    """``table[name]``, or -1 (which no rank's valid request has) for anything else."""
    return table.get(name, -1) if isinstance(name, str) else -1


def error_code(error: BaseException | None) -> int:
    """The code of ``error``'s class (0 for None)."""
    if error is None:
        return 0
    for cls in type(error).__mro__:  # the nearest listed class (NonFiniteError first)
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]
    return ERROR_CODES[RuntimeError]


def error_class(value: int) -> type[Exception]:
    """The exception class of an error code (RuntimeError for unknown codes)."""
    return _ERROR_CLASSES.get(value, RuntimeError)


# ------------------------------------------------------------------ codec descriptions


def describe_codec(codec: Any) -> str:
    """A rank-independent description of a codec: class and scalar parameters.

    ``ErrorFeedback(c)`` is described as ``ErrorFeedback(<c>)``; a wrapper derived from
    it (``DGC``) adds its public scalar options (``momentum``, ``masking``, ...), so
    ranks whose options differ disagree; per-rank state (residuals) is left out.
    """
    from sparcomm.feedback import ErrorFeedback

    if codec is None:
        return "dense"
    if isinstance(codec, ErrorFeedback):
        options = "".join(
            f", {name}={value!r}"
            for name, value in sorted(vars(codec).items())
            if not name.startswith("_") and isinstance(value, _SCALARS)
        )
        return f"{type(codec).__qualname__}({describe_codec(codec.codec)}{options})"
    params = {
        name: value for name, value in sorted(vars(codec).items()) if isinstance(value, _SCALARS)
    }
    body = ", ".join(f"{name.lstrip('_')}={value!r}" for name, value in params.items())
    return f"{type(codec).__qualname__}({body})"


_SCALARS = (int, float, str, bool, type(None))


def fingerprint(text: str) -> int:
    """The codec code of the signature: a 31-bit CRC of :func:`describe_codec`."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------ signature


def signature_row(
    n: int,
    dtype: Any,
    index_itemsize: int,
    codec_text: str,
    algorithm: int,
    op: Any,
    model_fingerprint: int,
    k: int,
) -> np.ndarray:
    """This rank's row; ``algorithm`` is a code (see :func:`code`)."""
    column = SIGNATURE_COLUMNS
    row = np.zeros(len(SIGNATURE_FIELDS), dtype=np.int64)
    row[column["version"]] = VERSION
    row[column["n"]] = n
    row[column["dtype"]] = DTYPE_CODES.get(np.dtype(dtype), 0) if dtype is not None else 0
    row[column["index_itemsize"]] = index_itemsize
    row[column["codec"]] = fingerprint(codec_text)
    row[column["algorithm"]] = algorithm
    row[column["op"]] = code(OP_CODES, op)
    row[column["cost_model"]] = model_fingerprint
    row[column["k"]] = k
    return row


def _describe_field(name: str, value: int, codec_names: dict[int, str]) -> str:
    if name == "dtype":
        names = {code: dtype.name for dtype, code in DTYPE_CODES.items()}
        return names.get(value, "an invalid dtype")
    if name == "algorithm":
        return repr(ALGORITHM_NAMES[value]) if value in ALGORITHM_NAMES else "invalid"
    if name == "op":
        ops = {code: op for op, code in OP_CODES.items()}
        return repr(ops[value]) if value in ops else "invalid"
    if name == "codec":
        return codec_names.get(value, f"a different codec (fingerprint {value})")
    if name == "cost_model":
        return "no cost model" if value == 0 else f"cost model {value}"
    return str(value)


def check_signature(
    channel: Channel,
    row: np.ndarray,
    error: BaseException | None,
    codec_text: str,
    what: str,
) -> np.ndarray:
    """Allgather every rank's row; raise the same kind of error on every rank if any
    rank failed locally or the ranks disagree.  Returns the ``(P, fields)`` table."""
    column = SIGNATURE_COLUMNS
    row[column["error"]] = error_code(error)
    with channel.stats._phase("check"):
        table = channel.allgather_array(row)
    failed = np.flatnonzero(table[:, column["error"]])
    if failed.size:
        if error is not None:
            raise error
        first = int(failed[0])
        cls = error_class(int(table[first, column["error"]]))
        if cls is NonFiniteError:
            raise cls(
                f"{what}: rank {first} has non-finite values (NaN or Inf) in its input "
                f"(ranks {failed.tolist()} refused theirs); expected finite values on every "
                "rank; no data was exchanged and no output was written; check the loss "
                "scale or clip gradients first"
            )
        raise cls(
            f"{what}: rank {first} rejected its input ({cls.__name__}; ranks "
            f"{failed.tolist()} failed); its own message says why; no data was exchanged"
        )
    codec_names = {int(row[column["codec"]]): codec_text}
    # The codec first: other columns (index size, k) follow from the codec's family.
    for name in ("version", "codec", "n", "dtype", "index_itemsize", "op", "algorithm"):
        values = table[:, column[name]]
        if np.any(values != values[0]):
            other = int(np.flatnonzero(values != values[0])[0])
            if name == "codec":
                # Every rank saw the same table, so every rank takes this error path:
                # one more collective names each rank's codec (fingerprints cannot).
                texts = channel.comm.allgather(codec_text)
                codec_names = {int(f): t for f, t in zip(values, texts, strict=True)}
            raise ValueError(
                f"{what}: ranks disagree on {name}: rank 0 has "
                f"{_describe_field(name, int(values[0]), codec_names)}, rank {other} has "
                f"{_describe_field(name, int(values[other]), codec_names)}; every rank "
                f"must call with the same {name}"
            )
    if table[0, column["algorithm"]] == 0:  # auto: every rank must predict alike
        values = table[:, column["cost_model"]]
        if np.any(values != values[0]):
            raise ValueError(
                f"{what}: ranks hold different cost models (fingerprints "
                f"{values.tolist()}); call sparcomm.comm.calibrate(comm) on every rank, or "
                "install the same model everywhere with set_cost_model"
            )
    return table


# ------------------------------------------------------------------ status blocks


def write_status(block: np.ndarray, failed_rank: int, code: int) -> None:
    """Head ``block`` with a status: the failing rank (-1: none) and its error code."""
    block[:STATUS_BYTES] = np.frombuffer(_STATUS.pack(failed_rank, code), dtype=np.uint8)


def read_status(block: np.ndarray) -> tuple[int, int]:
    return _STATUS.unpack(block[:STATUS_BYTES].tobytes())


def first_failure(blocks: np.ndarray, offsets: np.ndarray) -> tuple[int, int]:
    """The first failure reported by the blocks ``blocks[offsets[r]:offsets[r+1]]``
    (empty blocks, such as a rank's own in an ``Alltoallv``, are skipped)."""
    for r in range(offsets.size - 1):
        if offsets[r + 1] - offsets[r] >= STATUS_BYTES:
            failed, value = read_status(blocks[offsets[r] : offsets[r] + STATUS_BYTES])
            if failed >= 0:
                return failed, value
    return -1, 0


def raise_failure(own: BaseException | None, failed: int, value: int) -> None:
    """Raise this rank's own error, or the class another rank reported."""
    if own is not None:
        raise own
    if failed >= 0:
        cls = error_class(value)
        if cls is NonFiniteError:
            raise cls(
                f"allreduce: rank {failed} met non-finite values (NaN or Inf, or a sum that "
                "overflowed at an owner) while encoding its part; expected finite values; "
                "the result was discarded on every rank; check the loss scale or clip "
                "gradients first"
            )
        raise cls(
            f"allreduce: rank {failed} failed to encode its part ({cls.__name__}; for "
            "example non-finite values, or a sum that overflowed at an owner); its own "
            "message says why; the result was discarded on every rank"
        )
