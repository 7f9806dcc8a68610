"""Config dataclasses for the distributed layer (stdlib only; validated by launcher.config).

OptimConfig    the AdamW optimizer and its warmup + cosine learning-rate schedule.
ParallelConfig world size, ZeRO stage, offload, precision, micro-batch/accumulation, placement.
CheckpointConfig how often to checkpoint, how many to keep, whether to resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    lr: float = field(default=3e-4, metadata={"min": 0.0})
    """Peak learning rate, reached after warmup."""
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    """AdamW decoupled weight decay; applied to weights of dim >= 2 only (not biases/norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2), each in [0, 1)."""
    eps: float = field(default=1e-8, metadata={"min": 0.0})
    """AdamW epsilon."""
    warmup_steps: int = field(default=0, metadata={"min": 0})
    """Optimizer steps of linear warmup from lr/warmup_steps up to lr."""
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    """After warmup, cosine decay from lr to lr * min_lr_ratio over the remaining steps."""
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})
    """Clip the global gradient 2-norm to this value; 0 turns clipping off."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class ParallelConfig:
    num_workers: int = field(default=1, metadata={"min": 1})
    """World size: data-parallel ranks (one Ray actor each)."""
    zero_stage: int = field(default=0, metadata={"min": 0, "max": 3})
    """DeepSpeed ZeRO stage: 0 plain DDP, 1 shards optimizer state, 2 + gradients, 3 + params."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) on CPU memory; needs zero_stage >= 1."""
    offload_params: bool = False
    """Keep partitioned parameters on CPU memory; needs zero_stage 3."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    """Compute precision; bf16/fp16 keep fp32 master weights in the optimizer. auto: bf16
    where the device computes it natively (GPUs from Ampere on; CPUs with AVX512-BF16 or
    AMX, for models at least 128 wide: below that bf16 gains little there), else fp32; the
    choice is printed at start (parallel.precision)."""
    micro_batch_size: int = field(default=8, metadata={"min": 1})
    """Sequences per rank per forward/backward."""
    grad_accum: int = field(default=1, metadata={"min": 1})
    """Micro-batches accumulated per optimizer step."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl when CUDA is available, else gloo."""
    placement: Literal["PACK", "SPREAD"] = "PACK"
    """Ray placement-group strategy for this group's workers."""
    cpus_per_worker: float = field(default=0.4, metadata={"min": 0.0})
    """Ray CPU reservation per worker; fractional so several groups can share a node."""
    gpus_per_worker: float = field(default=0.0, metadata={"min": 0.0})
    """Ray GPU reservation per worker; fractional values let groups share a GPU."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per worker, e.g. {node_a: 0.01}: the group goes only to nodes
    that declare them (`ray start --resources`), to pin roles to node types."""
    placement_timeout_s: float = field(default=120.0, metadata={"min": 1.0})
    """How long a group waits for its resources (e.g. a replacement for a lost node) before
    failing with one line naming what is missing."""
    collective_timeout_s: float = field(default=600.0, metadata={"min": 1.0})
    """How long a collective waits for every rank (gloo/NCCL process-group timeout): a hung
    peer ends in an error naming its rank and node instead of a hang."""
    zero3_persistence_threshold: int = field(default=0, metadata={"min": 0})
    """ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold, 1e5 there). 0 partitions every parameter: per-rank
    memory 0.50x at 2 ranks instead of 0.69x with 1e5 on a 1M-parameter model; raise it on
    GPUs to save gathers of small tensors."""
    bucket_elements: int = field(default=50_000_000, metadata={"min": 1})
    """Reduce / all-gather / prefetch bucket size in elements (DeepSpeed's default 5e8 holds
    a 2 GB fp32 buffer per rank whatever the model's size)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory, ~1/3 more
    compute); the engine turns it on in the model's GPT/BERT trunks (model.build's
    set_activation_checkpointing, or the model's own method of that name)."""

    def engine_stage(self, trainable: bool, precision: str) -> int:
        """The ZeRO stage the engine really runs at this (resolved) precision. Frozen engines
        have no optimizer: ZeRO-3 or nothing. Trainable bf16 runs stage 1 where stage 0 was
        asked (DeepSpeed's BF16_Optimizer: see parallel/engine.py)."""
        if not trainable:
            return 3 if self.zero_stage == 3 else 0
        return 1 if precision == "bf16" and self.zero_stage == 0 else self.zero_stage

    def bf16_optimizer(self, trainable: bool, precision: str) -> bool:
        """Whether the engine runs DeepSpeed's BF16_Optimizer (fp32 gradient accumulation):
        trainable bf16 at stage 1 without optimizer offload, which it has no path for."""
        return (trainable and precision == "bf16" and not self.offload_optimizer
                and self.engine_stage(trainable, precision) == 1)

    def __post_init__(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1, got zero_stage 0")
        bad = {k: v for k, v in self.resources.items() if k in ("CPU", "GPU") or v <= 0}
        if bad:
            raise ValueError(f"resources {bad}: custom resources need a positive amount and a "
                             f"name other than CPU/GPU (cpus_per_worker/gpus_per_worker set those)")


@dataclass
class CheckpointConfig:
    every: int = field(default=0, metadata={"min": 0})
    """Save every this many optimizer steps; 0 saves only at the end."""
    keep_last: int = field(default=2, metadata={"min": 1})
    """Complete checkpoints kept; older ones are deleted after each save."""
    resume: bool = True
    """Resume from the latest complete checkpoint in the run directory when there is one."""
