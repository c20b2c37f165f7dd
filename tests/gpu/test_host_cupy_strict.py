"""The host CuPy double refuses what CuPy refuses, and the GPU benchmark's Python runs.

Runs only in the child process of ``test_host_cupy.py`` (``SPARCOMM_TEST_HOST_CUPY=1``):
these checks are what makes a pass of the GPU test files on the double mean something --
a host array that slips into a device path must fail here as it fails on a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _gpu_skip import emulated, require_gpu

if not emulated():
    pytest.skip("checks of the host CuPy double: run by test_host_cupy.py", allow_module_level=True)

cupy = require_gpu()

from sparcomm.kernels import gpu  # noqa: E402


def test_device_arrays_are_not_numpy_arrays():
    x = cupy.arange(10, dtype=np.float32)
    assert not isinstance(x, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(x)


def test_host_and_device_arrays_never_mix():
    x = cupy.arange(10, dtype=np.float32)
    host = np.ones(10, np.float32)
    for mixed in (
        lambda: x + host,
        lambda: host + x,
        lambda: x < host,
        lambda: cupy.add(x, host),
        lambda: cupy.isfinite(host),
        lambda: cupy.ascontiguousarray(host),
        lambda: cupy.empty_like(host),
        lambda: np.add(x, host),
    ):
        with pytest.raises(TypeError):
            mixed()
    out = cupy.empty(10, np.float32)
    with pytest.raises(TypeError, match="out must be a cupy.ndarray"):
        cupy.add(x, x, out=host)
    assert bool((cupy.add(x, 1.5, out=out) == x + np.float32(1.5)).all())


def test_host_data_enters_only_by_copy():
    host = np.arange(6, dtype=np.float64)
    x = cupy.asarray(host)
    host[0] = 99
    assert float(x[0]) == 0.0
    assert cupy.asarray(x) is x
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        x[...] = host
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for copyto"):
        cupy.copyto(x, host)
    x[np.array([1, 2])] = np.array([5.0, 6.0])  # advanced indexing copies host values in
    assert cupy.asnumpy(x).tolist() == [0.0, 5.0, 6.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="repeated indices"):
        x[cupy.array([1, 1])] = cupy.array([7.0, 8.0])


def test_get_and_set_check_their_buffers():
    x = cupy.arange(6, dtype=np.float32)
    with pytest.raises(TypeError, match="Only numpy.ndarray"):
        x.get(out=[0.0] * 6)
    with pytest.raises(TypeError, match="float64 array cannot be obtained from float32"):
        x.get(out=np.empty(6))
    with pytest.raises(ValueError, match="Shape mismatch"):
        x.get(out=np.empty((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="non-contiguous"):
        x.get(out=np.empty(12, np.float32)[::2])
    with pytest.raises(TypeError, match="Only numpy.ndarray can be set"):
        x.set([1.0] * 6)
    with pytest.raises(TypeError, match="float64 array cannot be set to float32"):
        x.set(np.zeros(6))
    with pytest.raises(ValueError, match="Shape mismatch"):
        x.set(np.zeros(5, np.float32))


def test_scalars_stay_on_the_device():
    x = cupy.arange(6, dtype=np.int64)
    total = x.sum()
    assert isinstance(total, cupy.ndarray) and total.shape == ()
    assert isinstance(x[2], cupy.ndarray) and int(x[2]) == 2
    with pytest.raises(ValueError, match="ambiguous"):
        bool(x > 2)
    with pytest.raises(TypeError):
        [0, 1, 2][x[1]]  # no __index__: a device scalar is not a Python index


def test_views_and_identities_as_in_cupy():
    x = cupy.empty(10, np.float32)
    view = x[2:8].reshape(2, 3)
    assert view.base is x and x.base is None
    assert x.astype(np.float32, copy=False) is x
    assert cupy.ascontiguousarray(x) is x
    view[...] = 1.0
    assert float(x[3]) == 1.0


def test_no_device_code_and_stale_memory():
    with pytest.raises(NotImplementedError, match="runs no device code"):
        cupy.RawModule(code="")
    assert (cupy.asnumpy(cupy.empty(8, np.uint8)) == 0xA5).all()
    x = cupy.zeros(4, np.float32)
    address = x.__cuda_array_interface__["data"][0]
    assert address == x.data.ptr and address >= 2**62  # not host-addressable


def test_emulated_launch_refuses_host_arrays():
    launch = gpu.runtime.function("packing", "sc_pack_bits", None, None)
    args = (np.int64(8), np.int32(3), cupy.zeros(3, np.uint8), np.int64(3))
    with pytest.raises(TypeError, match="Unsupported type"):
        launch(1, 32, (np.zeros(8, np.uint8), *args))
    launch(1, 32, (cupy.zeros(8, np.uint8), *args))


def test_gpu_info_sees_the_double():
    from sparcomm._gpu_info import gpu_info

    facts = gpu_info()
    assert facts["usable"], facts
    assert "host CuPy double" in facts["devices"][0]["name"]


def test_bench_codecs_gpu_cli_runs(capsys):
    from sparcomm.cli import main

    assert (
        main(["bench", "codecs", "--device", "gpu", "--sizes", "12", "--repeats", "1", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert result["device"] == "gpu" and len(rows) == 6
    assert {row["n"] for row in rows} == {4096}
    assert all(row["encode_s"] > 0 and row["decode_s"] > 0 for row in rows)
    topk = [row for row in rows if row["codec"].startswith("TopK")]
    assert topk and topk[0]["cupy_topk_s"] > 0


def test_devices_are_per_thread_and_kernels_stay_on_theirs(monkeypatch):
    import threading

    from sparcomm import TopK

    monkeypatch.setenv("SPARCOMM_HOST_CUPY_DEVICES", "2")
    with cupy.cuda.Device(1):
        x = cupy.arange(1000, dtype=np.float32)
        payload = TopK(density=0.1).encode(x)  # the codec runs on the current device
        assert all(a.device.id == 1 for a in payload.arrays.values())
        seen = []
        thread = threading.Thread(target=lambda: seen.append(cupy.cuda.Device().id))
        thread.start()
        thread.join()
        assert seen == [0]  # a new host thread starts on device 0, as in CUDA
    assert x.device.id == 1 and x[10:20].device.id == 1
    with pytest.raises(ValueError, match="array device = 1 while current = 0"):
        x + 1
    with pytest.raises(ValueError, match="array device = 1 while current = 0"):
        TopK(density=0.1).encode(x)  # the emulated kernels check their arrays too
    assert cupy.asnumpy(x)[999] == 999  # copies to the host work from any device
    assert x.copy().device.id == 0  # CuPy copies onto the current device
