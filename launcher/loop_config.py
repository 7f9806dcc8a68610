"""The driver loop's cadence, shared by every training job (pretrain, sft, rm, ppo, ...)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoopConfig:
    steps: int = field(default=300, metadata={"min": 1})
    """Steps to train for (the schedule's length): optimizer steps for pretrain/sft/rm,
    rollout+train iterations for RL jobs."""
    log_every: int = field(default=10, metadata={"min": 1})
    """Steps between logged (and printed) metric rows."""
    eval_every: int = field(default=100, metadata={"min": 0})
    """Steps between validation passes; 0 = only at the end."""
    eval_batches: int = field(default=4, metadata={"min": 1})
    """Micro-batches per rank in a validation pass."""
    stop_after: int = field(default=0, metadata={"min": 0})
    """End this invocation after this step (checkpointed) though the schedule spans `steps`:
    for time-sliced or preemptible allocations; a later run resumes. 0 = run to the end."""
    max_failures: int = field(default=0, metadata={"min": 0})
    """Worker deaths to recover from: every worker group is restarted and resumes from the
    latest complete checkpoint (so set checkpoint.every to bound the work redone)."""
