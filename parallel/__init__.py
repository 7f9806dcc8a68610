"""trellis parallel: everything distributed.

config        OptimConfig, ParallelConfig, CheckpointConfig (stdlib dataclasses)
batch         BatchPlan: micro-batch x accumulation x world arithmetic
schedule      warmup + cosine learning-rate factor
precision     precision "auto" (default): bf16 where the device computes it natively and pays
dist          process-group init (gloo on CPU, NCCL on GPU), free_port, device_for_rank
engine        Engine: the one DeepSpeed-backed engine interface trainers use
checkpoint    atomic checkpoints with COMPLETE marker, per-rank state, prune, CheckpointError
safe_load     checkpoint files loaded weights_only (DeepSpeed's loads included), never unpickled
worker_group  WorkerGroup (Ray actors = one process group), LocalGroup, WorkerDied, ensure_ray

Importing this package imports neither DeepSpeed nor Ray (nor torch): names below other
than the configs and BatchPlan load their module on first use.
"""
from importlib import import_module

from trellis.parallel.batch import BatchPlan
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig

_LAZY = {
    "Engine": "trellis.parallel.engine", "ds_config": "trellis.parallel.engine",
    "zero_init_context": "trellis.parallel.engine",
    "init_distributed": "trellis.parallel.dist", "free_port": "trellis.parallel.dist",
    "device_for_rank": "trellis.parallel.dist",
    "save_checkpoint": "trellis.parallel.checkpoint", "load_checkpoint": "trellis.parallel.checkpoint",
    "latest_complete": "trellis.parallel.checkpoint", "prune": "trellis.parallel.checkpoint",
    "CheckpointError": "trellis.parallel.checkpoint",
    "WorkerGroup": "trellis.parallel.worker_group", "LocalGroup": "trellis.parallel.worker_group",
    "WorkerDied": "trellis.parallel.worker_group", "ensure_ray": "trellis.parallel.worker_group",
}

__all__ = ["BatchPlan", "CheckpointConfig", "OptimConfig", "ParallelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")
