"""torch.distributed process-group setup (through DeepSpeed's comm layer) and small helpers.

gloo on CPU, NCCL when CUDA is available. DeepSpeed is imported inside functions only, so
`import parallel.dist` stays cheap.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch


def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> 'nccl' when CUDA is available, else 'gloo'."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available here; use gloo or auto")
    return backend


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_device_index(rank: int = 0) -> int:
    """CUDA device index for a rank: Ray usually exposes one GPU per actor (index 0);
    otherwise ranks on a node share the visible devices round-robin."""
    n = torch.cuda.device_count()
    return rank % n if n else 0


def device_for_rank(rank: int | None = None) -> torch.device:
    """cuda:<local index> when CUDA is available, else cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    r = int(os.environ.get("LOCAL_RANK", 0)) if rank is None else rank
    return torch.device("cuda", local_device_index(r))


def _skip_shm_comm_jit() -> None:
    """DeepSpeed JIT-builds a shared-memory all-reduce op (30 s cold) at every init on CPU;
    it only serves inference all-reduce, so mark it incompatible (a private knob)."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(rank: int, world_size: int, master_addr: str = "127.0.0.1",
                     master_port: int | None = None, backend: str = "auto",
                     timeout_s: float = 600.0) -> str:
    """Join (or create) the default process group; returns the backend used.

    Idempotent when already initialized with the same rank and world size.
    """
    import deepspeed
    import torch.distributed as tdist

    if tdist.is_initialized():
        if tdist.get_rank() != rank or tdist.get_world_size() != world_size:
            raise RuntimeError(
                f"process group already initialized as rank {tdist.get_rank()} of "
                f"{tdist.get_world_size()}, asked for rank {rank} of {world_size}")
        return tdist.get_backend()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    backend = resolve_backend(backend)
    port = master_port if master_port is not None else free_port(master_addr)
    local = local_device_index(rank) if torch.cuda.is_available() else 0
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(local)
    _skip_shm_comm_jit()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s),
                               init_method=f"tcp://{master_addr}:{port}",
                               rank=rank, world_size=world_size)
    return backend


def destroy_distributed() -> None:
    """Leave the default process group (no-op when none)."""
    import torch.distributed as tdist
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_initialized() -> bool:
    import torch.distributed as tdist
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    import torch.distributed as tdist
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    import torch.distributed as tdist
    return tdist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as tdist
    if is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def all_reduce_mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of each named metric, in one collective. NaN entries (a metric a rank
    could not measure, e.g. accuracy of a batch without pairs) are left out of that mean;
    every rank must pass the same keys."""
    import torch.distributed as tdist
    keys = sorted(values)
    v = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = torch.stack([torch.nan_to_num(v, nan=0.0), (~v.isnan()).double()])  # (2, K)
    if is_initialized() and tdist.get_world_size() > 1 and keys:
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
    t = t.cpu()
    return {k: float(t[0, i] / t[1, i]) if t[1, i] > 0 else float("nan")
            for i, k in enumerate(keys)}


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (e.g. a logged loss); returns a Python float."""
    import torch.distributed as tdist
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone().cpu()
    if is_initialized() and tdist.get_world_size() > 1:
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
        t = t / tdist.get_world_size()
    return float(t.item())
