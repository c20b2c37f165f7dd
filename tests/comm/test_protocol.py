"""The agreement protocol's codes never change meaning: ranks of different sparcomm
versions (or a reordered tuple) must not misread each other.  Every value pinned here
was the one in use before the codes became explicit tables (issue 12)."""

from __future__ import annotations

import numpy as np

from sparcomm import FP16, QSGD, ErrorFeedback, NoCompression, OneBit, TernGrad, TopK
from sparcomm.codecs import CODECS, NonFiniteError
from sparcomm.comm import _protocol
from sparcomm.payload import CODEC_IDS


def test_codec_ids_are_pinned():
    builtin = {i: name for i, name in CODECS.ids().items() if i < 128}  # 128..255: users'
    assert builtin == {
        1: "NoCompression",
        2: "FP16",
        3: "TopK",
        4: "QSGD",
        5: "TernGrad",
        6: "OneBit",
        7: "PowerSGD",
    }
    for cls in (NoCompression, FP16, TopK, QSGD, TernGrad, OneBit):
        assert CODEC_IDS[cls.codec_id] == (cls.__name__, cls.array_names)
    assert {CODECS.by_id(i).__name__: CODECS.by_id(i).array_names for i in builtin} == {
        "NoCompression": ("values",),
        "FP16": ("values",),
        "TopK": ("indices", "values"),
        "QSGD": ("scales", "packed"),
        "TernGrad": ("scales", "packed"),
        "OneBit": ("means", "packed"),
        "PowerSGD": ("p", "q"),
    }


def test_algorithm_codes_are_pinned():
    assert _protocol.SPARSE_ALGORITHM_CODES == {
        "auto": 0,
        "allgather": 1,
        "recursive_doubling": 2,
        "split_allgather": 3,
        "dsar": 4,
        "dense": 5,
    }
    assert _protocol.QUANTIZED_ALGORITHM_CODES == {
        "auto": 0,
        "allgather": 100,
        "reduce_scatter_allgather": 101,
        "shared_scale": 102,
        "pipelined": 103,
    }
    assert _protocol.DENSE_ALGORITHM_CODES == {"auto": 0, "dense": 5, "mpi": 6, "ring": 7}
    assert _protocol.LOWRANK_ALGORITHM_CODES == {"auto": 0, "powersgd": 200}
    assert _protocol.code(_protocol.SPARSE_ALGORITHM_CODES, "bogus") == -1
    assert _protocol.code(_protocol.SPARSE_ALGORITHM_CODES, None) == -1


def test_signature_columns_and_small_tables_are_pinned():
    assert _protocol.SIGNATURE_FIELDS == (
        "version",
        "n",
        "dtype",
        "index_itemsize",
        "codec",
        "algorithm",
        "op",
        "cost_model",
        "k",
        "error",
    )
    assert _protocol.VERSION == 1
    assert _protocol.SIGNATURE_BYTES == 80
    assert _protocol.DTYPE_CODES == {np.dtype(np.float32): 1, np.dtype(np.float64): 2}
    assert _protocol.OP_CODES == {"sum": 0, "mean": 1}
    assert _protocol.ERROR_CODES == {
        TypeError: 1,
        ValueError: 2,
        NotImplementedError: 3,
        RuntimeError: 4,
        NonFiniteError: 5,
    }
    assert _protocol.error_code(None) == 0
    assert _protocol.error_code(NonFiniteError("nan")) == 5  # the nearest listed class
    assert _protocol.error_class(5) is NonFiniteError and issubclass(NonFiniteError, ValueError)
    assert _protocol.error_code(KeyError("x")) == 4  # others travel as RuntimeError
    assert _protocol.error_class(3) is NotImplementedError
    assert _protocol.STATUS_BYTES == 8


def test_codec_fingerprints_are_pinned():
    """The codec column: a CRC-32 of the codec's description."""
    cases = {
        "dense": None,
        "TopK(density=0.01, k=None)": TopK(density=0.01),
        "ErrorFeedback(TopK(density=None, k=5))": ErrorFeedback(TopK(k=5)),
        "QSGD(bits=4, bucket_size=512, levels=7, norm='l2', seed=0)": QSGD(bits=4),
    }
    for text, codec in cases.items():
        assert _protocol.describe_codec(codec) == text
    assert _protocol.fingerprint("dense") == 0x5DEB7869


def test_a_row_puts_every_field_in_its_column():
    row = _protocol.signature_row(1000, np.float64, 4, "dense", 101, "mean", 77, 12)
    assert row.tolist() == [1, 1000, 2, 4, _protocol.fingerprint("dense"), 101, 1, 77, 12, 0]


def test_status_blocks_round_trip():
    block = np.zeros(16, np.uint8)
    _protocol.write_status(block, 3, 2)
    assert _protocol.read_status(block) == (3, 2)
    assert bytes(block[:8]) == (3).to_bytes(4, "little") + (2).to_bytes(4, "little")
