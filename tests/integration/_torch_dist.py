"""Shared by the PyTorch integration tests that run under ``mpiexec``: a gloo process
group over 127.0.0.1 whose ranks are MPI's, and the pytest side that launches a test
file as a script at several process counts."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def init_gloo():
    """``torch.distributed`` on gloo with MPI's rank and size; rank 0 picks a free port
    and broadcasts it (MASTER_ADDR/PORT through mpi4py)."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
    )
    return comm


def run_script(
    path: str, case: str, ranks: int, timeout: float = 300, extra: list[str] | None = None
) -> str:
    """Run ``python path case *extra`` under ``mpiexec -n ranks``; fail the test on any
    rank's failure or a hang."""
    import _mpiexec

    env = dict(os.environ)
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if ranks > (os.cpu_count() or 1):
        env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return _mpiexec.run(
        ranks, [sys.executable, path, case, *(extra or [])], env=env, cwd=ROOT, timeout=timeout
    )
