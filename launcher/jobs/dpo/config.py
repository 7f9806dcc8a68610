"""`trellis dpo` job config: a trainable policy group and (by default) a frozen reference
group, on the same comparison data as the reward model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.cluster.metrics import MetricsConfig
from trellis.launcher.jobs.finetune.config import RowsConfig
from trellis.launcher.jobs.ppo.config import FrozenRoleConfig, TrainRoleConfig
from trellis.launcher.loop_config import LoopConfig
from trellis.parallel.config import CheckpointConfig, OptimConfig
from trellis.rl.dpo_config import DPOConfig


@dataclass
class DPOJobConfig:
    run_dir: str = "runs/dpo"
    """The policy's checkpoints (loadable like an SFT run dir), metrics, the ingested rows and
    the precomputed reference log-probs (dpo.reference=precompute)."""
    seed: int = 0
    policy_init: str = ""
    """The policy to train: an SFT run dir (or trellis / HF weights)."""
    reference_init: str = ""
    """Frozen reference; empty = policy_init."""
    data: RowsConfig = field(default_factory=RowsConfig)
    """Comparisons {prompt, responses, ranking} (data.train, data.val or data.val_fraction);
    data.max_len and data.max_prompt_len are not used (see dpo.max_*)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    policy: TrainRoleConfig = field(default_factory=lambda: TrainRoleConfig(
        optim=OptimConfig(lr=5e-6, weight_decay=0.0)))
    reference: FrozenRoleConfig = field(default_factory=FrozenRoleConfig)
    placement: Literal["colocate", "separate"] = "separate"
    """colocate: rank r of policy and reference share one bundle; separate: a placement
    group each."""
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100, log_every=10,
                                                                 eval_every=50))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        for key in ("policy_init", "data.train"):
            obj, _, name = key.rpartition(".")
            if not getattr(self.data if obj else self, name):
                raise ValueError(f"{key} is required")
        if self.data.packing:
            raise ValueError("data.packing is for sft and rm; dpo does not pack its rows")
        w = self.policy.parallel.num_workers
        if self.dpo.prompts_per_step % w:
            raise ValueError(f"dpo.prompts_per_step {self.dpo.prompts_per_step} must divide by "
                             f"policy.parallel.num_workers {w}")
        r = self.reference.parallel.num_workers
        if self.dpo.reference == "group" and r != w:
            raise ValueError(f"reference.parallel.num_workers {r} must equal "
                             f"policy.parallel.num_workers {w} (each reference rank scores its "
                             f"policy rank's rows)")
