"""Codecs on CuPy arrays give the same payload bits as on NumPy arrays (same seed).

The GPU path must never differ from the CPU path: a payload encoded on one device
decodes to the same array on the other.  Skipped without CuPy or a GPU.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _gpu_skip import emulated, require_gpu

cupy = require_gpu()
# Larger than a few grid passes on either runtime; the host CUDA emulator (one thread per
# CUDA thread) needs a smaller size to stay fast.
LARGE = (12_007,) if emulated() else (300_001,)

from sparcomm import (  # noqa: E402
    FP16,
    QSGD,
    ErrorFeedback,
    NoCompression,
    OneBit,
    Payload,
    TernGrad,
    TopK,
)


def codecs():
    return [
        NoCompression(),
        FP16(),
        TopK(density=0.01),
        TopK(k=3),
        QSGD(bits=4, bucket_size=7),
        QSGD(levels=1, bucket_size=512, norm="max"),
        QSGD(bits=8, bucket_size=100_003),
        TernGrad(),
        TernGrad(bucket_size=5, clip=2.5),
        OneBit(bucket_size=4, error_feedback=False),
        OneBit(bucket_size=512, error_feedback=False),
    ]


@pytest.mark.parametrize("codec", codecs(), ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7, 9), LARGE])
def test_payload_bits_match_cpu(codec, dtype, shape):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(dtype)
    try:
        cpu = codec.encode(x, key="w", step=3)
    except (TypeError, ValueError) as error:  # e.g. TopK(k=3) of one element
        with pytest.raises(type(error), match=re.escape(str(error))):
            codec.encode(cupy.asarray(x), key="w", step=3)
        return
    gpu = codec.encode(cupy.asarray(x), key="w", step=3)
    assert gpu.n == cpu.n and gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    assert set(gpu.arrays) == set(cpu.arrays)
    for name, array in cpu.arrays.items():
        assert isinstance(gpu.arrays[name], cupy.ndarray), name
        got = cupy.asnumpy(gpu.arrays[name])
        assert got.dtype == array.dtype and got.tobytes() == array.tobytes(), name
    assert cupy.asnumpy(gpu.to_bytes()).tobytes() == cpu.to_bytes().tobytes()
    decoded = codec.decode(gpu)
    assert isinstance(decoded, cupy.ndarray)
    assert cupy.asnumpy(decoded).tobytes() == codec.decode(cpu).tobytes()


def test_payload_crosses_devices():
    codec = QSGD(bits=4)
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    # The same step on both devices: without it the per-key call counter gives the second
    # encode a fresh random stream, and the payloads differ whatever the devices do.
    wire = cupy.asnumpy(codec.encode(cupy.asarray(x), key=0, step=0).to_bytes())
    assert np.array_equal(
        codec.decode(Payload.from_bytes(wire)), codec.decode(codec.encode(x, key=0, step=0))
    )


def test_error_feedback_on_gpu_matches_cpu():
    rng = np.random.default_rng(3)
    cpu, gpu = ErrorFeedback(TopK(density=0.05)), ErrorFeedback(TopK(density=0.05))
    for step in range(3):
        x = rng.standard_normal(5000).astype(np.float32)
        a = cpu.encode(x, key="w", step=step)
        b = gpu.encode(cupy.asarray(x), key="w", step=step)
        assert cupy.asnumpy(b.to_bytes()).tobytes() == a.to_bytes().tobytes()
    assert cupy.asnumpy(gpu.residual("w")).tobytes() == np.asarray(cpu.residual("w")).tobytes()


def test_non_finite_input_raises_on_gpu():
    x = cupy.ones(100, np.float32)
    x[7] = cupy.nan
    with pytest.raises(ValueError):
        TopK(k=5).encode(x)


def test_variance_bound_accepts_device_arrays():
    x = np.random.default_rng(4).standard_normal(3000).astype(np.float32)
    for codec in (QSGD(bits=4), QSGD(bits=3, bucket_size=100, norm="max")):
        assert codec.variance_bound(cupy.asarray(x)) == codec.variance_bound(x)


def test_to_bytes_out_must_match_the_payload_device():
    x = np.random.default_rng(2).standard_normal(100).astype(np.float32)
    host, device = TopK(k=5).encode(x), TopK(k=5).encode(cupy.asarray(x))
    with pytest.raises(TypeError, match=r"same device as the payload's arrays \(a cupy array\)"):
        device.to_bytes(out=np.empty(device.nbytes, np.uint8))
    with pytest.raises(TypeError, match=r"same device as the payload's arrays \(a numpy array\)"):
        host.to_bytes(out=cupy.empty(host.nbytes, np.uint8))
    out = cupy.zeros(device.nbytes + 8, np.uint8)
    assert cupy.asnumpy(device.to_bytes(out=out)).tobytes() == host.to_bytes().tobytes()


def test_residuals_follow_the_data_between_host_and_device():
    # A checkpoint loads residuals onto the host; the next encode of a CuPy array moves
    # them to the device once, and the run continues with the CPU run's bits.
    rng = np.random.default_rng(21)
    steps = [rng.standard_normal(3000).astype(np.float32) for _ in range(4)]
    cpu = ErrorFeedback(QSGD(bits=2, bucket_size=64))
    for step in range(2):
        cpu.encode(steps[step], key="w", step=step)
    gpu = ErrorFeedback(QSGD(bits=2, bucket_size=64))
    gpu.load_state_dict(cpu.state_dict())
    assert isinstance(gpu.residual("w"), np.ndarray)
    for step in (2, 3):
        want = cpu.encode(steps[step], key="w", step=step)
        got = gpu.encode(cupy.asarray(steps[step]), key="w", step=step)
        assert isinstance(gpu.residual("w"), cupy.ndarray)
        assert cupy.asnumpy(got.to_bytes()).tobytes() == want.to_bytes().tobytes()
    assert cupy.asnumpy(gpu.residual("w")).tobytes() == cpu.residual("w").tobytes()
    # And back: a host array after device encodes moves the residual to the host.
    want = cpu.encode(steps[0], key="w", step=4)
    got = gpu.encode(steps[0], key="w", step=4)
    assert got.to_bytes().tobytes() == want.to_bytes().tobytes()
    assert isinstance(gpu.residual("w"), np.ndarray)
