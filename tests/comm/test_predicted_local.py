"""``AllreduceStats.predicted`` of a sparse codec call includes its encode and its dense
output, so that it compares with the measured call (one rank)."""

from __future__ import annotations

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from sparcomm import ErrorFeedback, TopK  # noqa: E402
from sparcomm.comm import AllreduceStats, allreduce, sparse_allreduce  # noqa: E402
from sparcomm.comm._cost import cost_model, local_seconds  # noqa: E402


def test_codec_call_predictions_add_encode_and_output_to_the_exchange():
    comm = MPI.COMM_SELF.Dup()
    n = 1 << 18
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    codec = ErrorFeedback(TopK(density=0.01))
    codec_stats, stream_stats = AllreduceStats(), AllreduceStats()
    allreduce(x, codec=codec, comm=comm, stats=codec_stats)
    indices = np.sort(np.argsort(np.abs(x))[-codec_stats.k :]).astype(np.int32)
    sparse_allreduce(indices, x[indices], n, comm, stats=stream_stats)
    local = local_seconds(codec, n, np.float32, cost_model(comm))
    assert local > 0
    for name, exchange in stream_stats.predicted.items():
        assert codec_stats.predicted[name] == pytest.approx(exchange + local, rel=1e-9)
    comm.Free()
