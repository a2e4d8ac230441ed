"""Run a function on N gloo processes (CPU) and collect what each returns."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, out_dir: str, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn, world: int, *args, backend: str = "gloo"):
    """fn(rank, world, *args) on `world` gloo processes; returns the list of results by rank."""
    with tempfile.TemporaryDirectory() as out:
        # spawn, not fork: a forked child of a process whose OpenMP pool is running can deadlock.
        mp.start_processes(_worker, args=(world, free_port(), fn, args, out, backend), nprocs=world, join=True,
                           start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def run_ranks_nccl(fn, world: int, *args):
    """fn(rank, world, *args) on `world` NCCL processes, one GPU each."""
    return run_ranks(fn, world, *args, backend="nccl")
