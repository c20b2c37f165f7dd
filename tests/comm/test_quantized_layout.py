"""Local pieces of the quantized collectives (no MPI traffic): chunk layout, payload
slicing, TernGrad's integer sums, and the cost model's schedules and choices."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparcomm import FP16, QSGD, OneBit, TernGrad, TopK
from sparcomm.comm import CostModel
from sparcomm.comm._cost import (
    QUANTIZED_ALGORITHMS,
    CodecCosts,
    candidates,
    choose_quantized,
    predict_quantized,
)
from sparcomm.comm._protocol import STATUS_BYTES
from sparcomm.comm._quantized_layout import (
    apply_scales,
    chunk_alignment,
    chunk_bounds,
    expand_sums,
    owner_key,
    pack_sums,
    sum_bits,
    sum_dtype,
    sums_nbytes,
    ternary_accumulate,
)

CODECS = [
    QSGD(bits=4, bucket_size=64),
    QSGD(bits=3, bucket_size=7),
    QSGD(levels=5, bucket_size=512, norm="max"),
    TernGrad(),
    TernGrad(bucket_size=5, clip=2.5),
    OneBit(bucket_size=12, error_feedback=False),
    FP16(),
]


@given(n=st.integers(1, 5000), size=st.integers(1, 9), align=st.sampled_from([1, 8, 56, 512]))
def test_chunk_bounds_tile_the_vector_on_aligned_boundaries(n, size, align):
    bounds = chunk_bounds(n, size, align)
    assert bounds[0] == 0 and bounds[-1] == n and bounds.size == size + 1
    assert np.all(np.diff(bounds) >= 0)
    assert np.all(bounds[:-1] % align == 0)
    lengths = np.diff(bounds)
    # balanced to one unit of align (the last chunk may be short)
    assert lengths.max() - lengths[:-1].min(initial=lengths.max()) <= align


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("n", [1, 13, 1000, 4099])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_sliced_payloads_decode_to_the_parts_of_the_whole(codec, n, size):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    whole = codec.encode(x, key="s", step=1, rank=2)
    decoded = codec.decode(whole)
    bounds = chunk_bounds(n, size, chunk_alignment(codec))
    for j in range(size):
        a, b = int(bounds[j]), int(bounds[j + 1])
        if a == b:
            continue
        part = codec.slice_payload(whole, a, b)
        assert part.nbytes == codec.encoded_nbytes(b - a, np.float32)
        np.testing.assert_array_equal(codec.decode(part), decoded[a:b])
        # it survives the wire format
        buffer = part.to_bytes()
        np.testing.assert_array_equal(codec.decode(type(part).from_bytes(buffer)), decoded[a:b])


def test_alignment_is_a_multiple_of_bucket_and_byte():
    assert chunk_alignment(QSGD(bucket_size=512)) == 512
    assert chunk_alignment(QSGD(bucket_size=7)) == 56
    assert chunk_alignment(OneBit(bucket_size=12)) == 24
    assert chunk_alignment(TernGrad()) == 8  # one scale per tensor: copied into each slice
    assert chunk_alignment(FP16()) == 8


def test_owner_keys_are_strings_distinct_from_the_tensor_key():
    assert owner_key("w") != "w" and owner_key(None) != owner_key("None")
    assert isinstance(owner_key(3), str)


@pytest.mark.parametrize("size", [1, 2, 4, 5, 127, 128, 300])
def test_ternary_sums_are_exact_and_round_trip(size):
    rng = np.random.default_rng(size)
    n = 203
    ternary = rng.integers(-1, 2, size=(min(size, 9), n))
    codes = np.where(ternary == 1, 1, np.where(ternary == -1, 2, 0)).astype(np.uint8)
    total = np.zeros(n, dtype=sum_dtype(size))
    scratch_a = np.empty(n, np.uint8)
    scratch_b = np.empty(n, np.uint8)
    from sparcomm.kernels import reference

    for row in codes:
        packed = np.empty(-(-n * 2 // 8), np.uint8)
        reference.pack_bits(row, 2, packed)
        ternary_accumulate(packed, total, scratch_a, scratch_b)
    np.testing.assert_array_equal(total, ternary.sum(axis=0))
    # extreme sums +-size survive packing
    total[:2] = [size, -size] if size <= np.iinfo(total.dtype).max else total[:2]
    wire = np.empty(sums_nbytes(n, size), np.uint8)
    pack_sums(total, size, scratch_a, wire)
    out = np.empty(n, np.float32)
    expand_sums(wire, size, scratch_b, out)
    np.testing.assert_array_equal(out, total.astype(np.float32))


def test_sum_widths():
    assert sum_bits(1) == 2 and sum_bits(2) == 3 and sum_bits(4) == 4 and sum_bits(127) == 8
    assert sum_dtype(127) == np.int8 and sum_dtype(128) == np.int16 and sum_bits(128) == 16
    with pytest.raises(NotImplementedError, match="at most 32767 ranks"):
        sum_dtype(40000)


def test_apply_scales_multiplies_each_bucket_by_its_scale():
    out = np.arange(11, dtype=np.float64)
    apply_scales(out, np.array([2.0, 3.0, 5.0]), 4)
    np.testing.assert_array_equal(out, np.arange(11) * np.repeat([2.0, 3.0, 5.0], 4)[:11])


# ------------------------------------------------------------------ cost model

MODEL = CostModel(alpha=2e-6, beta=1e-10, beta_allreduce=2e-10, merge=1e-9, dense=3e-10)
COSTS = CodecCosts(
    encode=3e-9, decode=2e-9, add=5e-10, decode_add=2.2e-9, accumulate=2e-9, pack=1e-9, expand=2e-9
)


@pytest.mark.parametrize("size", [2, 4, 16])
def test_reduce_scatter_moves_about_two_over_p_of_the_allgather_volume(size):
    n = 1 << 20
    codec = QSGD(bits=4)
    payload = codec.encoded_nbytes(n)
    gather = predict_quantized("allgather", codec, n, np.float32, size).bytes(0)[0]
    rsag = predict_quantized("reduce_scatter_allgather", codec, n, np.float32, size).bytes(0)[0]
    assert gather == pytest.approx((size - 1) * (payload + STATUS_BYTES), rel=1e-3)
    assert rsag == pytest.approx(2 * (size - 1) / size * payload, rel=0.02)


@pytest.mark.parametrize(
    ("codec", "wire_bits"),
    [
        (QSGD(bits=4), 4 + 32 / 512),
        (QSGD(bits=4, bucket_size=8192), 4 + 32 / 8192),
        (OneBit(), 1 + 64 / 512),
    ],
    ids=repr,
)
def test_compression_factor_against_a_dense_ring_allreduce(codec, wire_bits):
    """At n = 2^24, P = 4 both the reduce-scatter + allgather and a bandwidth-optimal
    dense allreduce move 2 (P - 1) / P of their payload, so the factor is 32 bits over
    the wire bits per element: 4-bit QSGD reaches 32 / (4 + 32 / bucket), just under
    8x (7.88x at the default 512; 8x only without scales), and 1-bit SGD 28x."""
    n, size = 1 << 24, 4
    dense = 2 * n * 4 * (size - 1) / size
    sent = predict_quantized("reduce_scatter_allgather", codec, n, np.float32, size).bytes(1)[0]
    assert dense / sent == pytest.approx(32 / wire_bits, rel=1e-3)
    assert dense / sent >= (16 if isinstance(codec, OneBit) else 7.8)


def test_shared_scale_bytes_follow_the_sum_width():
    n, size = 1 << 16, 4
    codec = TernGrad()
    sent = predict_quantized("shared_scale", codec, n, np.float32, size).bytes(0)[0]
    expected = (size - 1) / size * n * (2 + math.ceil(math.log2(2 * size + 1))) / 8
    assert sent == pytest.approx(expected, rel=0.01)


def test_auto_prefers_reduce_scatter_for_many_ranks_and_large_vectors():
    name, predicted = choose_quantized(MODEL, COSTS, QSGD(), 1 << 22, np.float32, 16)
    assert name == "reduce_scatter_allgather"
    assert set(predicted) == {"allgather", "reduce_scatter_allgather"}
    name, predicted = choose_quantized(MODEL, COSTS, TernGrad(), 1 << 22, np.float32, 16)
    assert set(predicted) == set(QUANTIZED_ALGORITHMS)
    # two ranks, a small vector: one round of messages beats two
    name, _ = choose_quantized(MODEL, COSTS, QSGD(), 1000, np.float32, 2)
    assert name == "allgather"


def test_pipelined_float16_overlaps_its_transfers_with_its_conversions():
    """FP16's ``pipelined`` moves reduce_scatter_allgather's bytes, but segment by
    segment, the conversions and sums of one segment beside the next one's transfer: on
    a slow link its time is the transfers plus one segment's work, and the model ranks it
    first (it ranked it last, by one status allreduce, when it summed the phases)."""
    from sparcomm.comm._cost import PIPELINED_PHASES, Prediction

    n, size = 6_293_504, 4
    slow_link = CostModel(alpha=5e-5, beta=8e-9, beta_allreduce=1.6e-8, merge=1e-9, dense=3e-10)
    pipelined = predict_quantized("pipelined", FP16(), n, np.float32, size)
    rsag = predict_quantized("reduce_scatter_allgather", FP16(), n, np.float32, size)
    assert pipelined.segments == 4 and rsag.segments == 1
    for model in (slow_link, MODEL):
        overlapped = [p for p in pipelined.phases if p.name in PIPELINED_PHASES]
        alone = Prediction("pipelined", overlapped)  # the same phases in sequence
        transfers = Prediction("pipelined", [replace(p, compute={}) for p in overlapped])
        work = alone.time(model, COSTS) - transfers.time(model, COSTS)
        link = transfers.time(model, COSTS)
        whole = Prediction("pipelined", overlapped, segments=4).time(model, COSTS)
        assert whole == pytest.approx(max(link, work) + min(link, work) / 4)
    assert pipelined.time(slow_link, COSTS) < rsag.time(slow_link, COSTS)
    names = (*candidates(FP16(), size), "pipelined")  # plain FP16's, as auto asks
    name, _ = choose_quantized(slow_link, COSTS, FP16(), n, np.float32, size, names)
    assert name == "pipelined"


def test_predictions_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="unknown algorithm"):
        predict_quantized("dsar", QSGD(), 100, np.float32, 2)
    with pytest.raises(NotImplementedError, match="no shared scale"):
        predict_quantized("shared_scale", QSGD(), 100, np.float32, 2)
    assert candidates(QSGD(), 4) == ("allgather", "reduce_scatter_allgather")
    assert "shared_scale" not in candidates(TernGrad(), 40000)


def test_dense_phase_refuses_non_sparse_codecs_locally():
    from sparcomm.comm._quantized_dsar import _check_dense_phase

    with pytest.raises(NotImplementedError, match="needs codec=TopK"):
        _check_dense_phase(QSGD(), QSGD())
    with pytest.raises(NotImplementedError, match="dense_phase must be"):
        _check_dense_phase(TopK(k=1), OneBit())
    assert isinstance(_check_dense_phase(TopK(k=1), FP16()), TopK)


@pytest.mark.parametrize("size", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [4218890, 6293504, 1 << 24, 3 * (1 << 22) + 5, 10**6 + 3])
def test_the_model_counts_the_segments_the_pipelines_cut(n, size):
    """The cost model's segments are the float16 pipeline's own cut of its largest chunk
    (one helper, ``_ring.half_segment_count``), and a default cut makes at most
    SEGMENTS_PER_CHUNK pieces: a quarter of the bytes rounded down to whole elements
    used to leave a fifth piece of one element (4,218,890 float16 on 2 ranks).  More
    only where a quarter is past MAX_SEGMENT_BYTES."""
    from sparcomm.comm import _ring

    def most(itemsize: int) -> int:
        return max(_ring.SEGMENTS_PER_CHUNK, -(-chunk * itemsize // _ring.MAX_SEGMENT_BYTES))

    chunk = int(_ring.chunk_bounds(n, size)[1])
    segment = _ring.half_segment_elements(n, size)
    pieces = _ring._segments(0, chunk, segment)
    assert predict_quantized("pipelined", FP16(), n, np.float32, size).segments == len(pieces)
    assert len(pieces) <= most(2)
    for itemsize in (4, 8):  # the float32 / float64 ring
        per = _ring.default_segment_elements(chunk, itemsize)
        assert -(-chunk // per) <= most(itemsize)
