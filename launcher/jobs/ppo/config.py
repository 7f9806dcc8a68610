"""`trellis ppo` job config: four roles, each with its own engine settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.cluster.metrics import MetricsConfig
from trellis.launcher.loop_config import LoopConfig
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig
from trellis.rl.ppo_config import PPOConfig
from trellis.rl.selection import SelectionConfig


@dataclass
class TrainRoleConfig:
    """A trainable role (actor, critic): optimizer + engine/placement settings."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class FrozenRoleConfig:
    """A frozen role (reference, reward): ZeRO-3 inference, no optimizer."""
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(zero_stage=3))


@dataclass
class PPOJobConfig:
    run_dir: str = "runs/ppo"
    """Role checkpoints (RUN_DIR/actor, RUN_DIR/critic), driver state, metrics, rollouts."""
    seed: int = 0
    actor_init: str = ""
    """The policy to improve: an SFT run dir (or trellis/HF weights)."""
    reward_init: str = ""
    """The reward model: an RM run dir (or trellis weights with a score head)."""
    reward_members: list[str] = field(default_factory=list)
    """More reward models (RM run dirs or weights) scored with reward_init as an ensemble;
    the reward is their ppo.ensemble_reduce."""
    heldout_reward: str = ""
    """A reward model scored at evaluation only, never optimised: without a gold scorer,
    selection by "rm" uses it (an independent judge of over-optimisation)."""
    critic_init: str = ""
    """Critic start (a value head on this trunk); empty = the reward model's trunk."""
    reference_init: str = ""
    """Frozen reference policy; empty = actor_init."""
    prompts: str = ""
    """Training prompts: an ingested prompts folder or JSONL {prompt} files."""
    eval_prompts: str = ""
    """Held-out prompts for evaluation (same forms); empty = none."""
    gold: Literal["", "demo"] = ""
    """The task's own scorer, where there is one ("demo": the embedded demo's rule): every
    evaluation then reports gold next to the RM score and KL, and selection can use it."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Which evaluated iteration is the result (RUN_DIR/best), and early stopping."""
    placement: Literal["colocate", "separate"] = "separate"
    """colocate: rank r of every role shares one placement-group bundle (same devices,
    fractional shares); separate: each role its own placement group."""
    save_rollouts: bool = False
    """Write each iteration's rollout batch to RUN_DIR/rollouts/*.parquet for inspection."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    actor: TrainRoleConfig = field(default_factory=TrainRoleConfig)
    critic: TrainRoleConfig = field(default_factory=lambda: TrainRoleConfig(
        optim=OptimConfig(lr=5e-5, weight_decay=0.0)))
    reference: FrozenRoleConfig = field(default_factory=FrozenRoleConfig)
    reward: FrozenRoleConfig = field(default_factory=FrozenRoleConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=20, log_every=1,
                                                                 eval_every=0))
    """The driver loop: train.steps iterations (rollout + PPO epochs), train.stop_after,
    train.max_failures (a dead worker of any role restarts all four groups from the latest
    complete checkpoint); train.eval_every iterations between held-out evaluations."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=5))
    """checkpoint.every counts iterations (actor + critic engines, then the driver state)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        for key in ("actor_init", "reward_init", "prompts"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
        p = self.ppo
        roles = ("actor", "critic", "reference", "reward") if p.has_critic else \
            ("actor", "reference", "reward")  # the critic-free algorithms start no critic
        worlds = {r: getattr(self, r).parallel.num_workers for r in roles}
        for r, w in worlds.items():
            if p.rollout_rows % w:
                what = f"ppo.prompts_per_iteration {p.prompts_per_iteration}" + \
                    (f" x ppo.group_size {p.group_size}" if p.group_size > 1 else "")
                raise ValueError(f"{what} must divide by {r}.parallel.num_workers {w}")
        for r in roles[:2 if p.has_critic else 1]:
            rows = p.rollout_rows // worlds[r]
            if rows % self.ppo.minibatches:
                raise ValueError(f"{rows} rows per {r} rank must divide into ppo.minibatches "
                                 f"{self.ppo.minibatches}")
        if self.placement == "colocate" and len(set(worlds.values())) != 1:
            raise ValueError(f"placement=colocate needs equal num_workers for every role, "
                             f"got {worlds}")
