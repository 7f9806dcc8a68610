"""PPO's algorithm settings (stdlib dataclasses; validated by launcher/config_loader.py).
The iteration count and cadence are the driver loop's (`train.*` of the job config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_GROUP_SIZE = 4
"""Responses per prompt of grpo and rloo when group_size is 0 (auto)."""


@dataclass
class PPOConfig:
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    """Advantage estimator (rl/advantages.py); all share generation, scoring, the KL
    machinery, the clipped ratio, checkpoints and recovery. ppo: critic + GAE; grpo:
    group-normalised rewards; rloo: leave-one-out baseline; reinforce_pp: returns of
    KL-shaped token rewards whitened over the batch. Only ppo starts a critic group."""
    group_size: int = field(default=0, metadata={"min": 0, "max": 256})
    """Responses sampled per prompt (G); grpo and rloo need >= 2. 0 = the algorithm's own
    default: 4 for grpo and rloo (DeepSeekMath samples more; 4 keeps CPU runs small), 1
    otherwise. Rollout rows per iteration = prompts_per_iteration * group_size."""
    grpo_variant: Literal["grpo", "dr_grpo"] = "grpo"
    """grpo: (r - mean) / (std + adv_eps) per group; dr_grpo: r - mean (no std) and, with
    loss_agg=auto, no length normalisation (Liu et al. 2025)."""
    adv_eps: float = field(default=1e-6, metadata={"min": 0.0})
    """GRPO's epsilon under the group std."""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """Where beta * KL to the reference acts: the reward (InstructGPT; auto for ppo, rloo,
    reinforce_pp) or a loss term on the policy (auto for grpo, with kl_loss_kind)."""
    kl_loss_kind: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimate of the loss term (kl_in=loss); k3 as GRPO."""
    loss_agg: Literal["auto", "token_mean", "seq_mean", "seq_sum_norm"] = "auto"
    """Policy-loss reduction (ppo_math.aggregate): auto = token_mean, or seq_sum_norm for
    dr_grpo; seq_mean is DeepSeekMath's 1/|o_i| per response."""
    prompts_per_iteration: int = field(default=32, metadata={"min": 1})
    """Prompts sampled per iteration (group_size responses each), across all actor ranks."""
    ppo_epochs: int = field(default=2, metadata={"min": 1})
    """Passes over each rollout batch."""
    minibatches: int = field(default=2, metadata={"min": 1})
    """Optimizer steps per epoch on each rank (the rank's rows split evenly)."""
    clip_eps: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    """Policy ratio clip (PPO's epsilon)."""
    value_clip_eps: float = field(default=0.2, metadata={"min": 0.0})
    """Value clip around the rollout's values."""
    gamma: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    """Discount; 1 as in InstructGPT / DeepSpeed-Chat (episodes are short)."""
    lam: float = field(default=0.95, metadata={"min": 0.0, "max": 1.0})
    """GAE lambda."""
    kl_kind: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate in the reward: k1 = log pi - log ref; k3 = (r - 1) - log r."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """fixed beta, or Ziegler et al.'s adaptive beta toward target_kl."""
    init_beta: float = field(default=0.05, metadata={"min": 0.0})
    """KL coefficient beta (initial value when adaptive)."""
    target_kl: float = field(default=6.0, metadata={"min": 0.0})
    """Adaptive controller: target summed KL per response."""
    kl_horizon: float = field(default=10000.0, metadata={"min": 1.0})
    """Adaptive controller horizon (in responses)."""
    score_clip: float = field(default=5.0, metadata={"min": 0.0})
    """Reward-model scores are clipped to [-score_clip, score_clip]; 0 = no clipping."""
    missing_eos_penalty: float = field(default=0.0, metadata={"min": 0.0})
    """Subtracted from the score of a response cut by max_new_tokens (no EOS; it is scored
    with an EOS appended). TRL's option of the same name."""
    ensemble_reduce: Literal["mean", "min", "mean_minus_std"] = "mean"
    """With several reward models (the job's reward_members): the reward is their mean,
    their min, or mean - ensemble_lambda * std (Coste et al. 2023)."""
    ensemble_lambda: float = field(default=1.0, metadata={"min": 0.0})
    """The std weight of ensemble_reduce=mean_minus_std."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch's real tokens."""
    ptx_coef: float = field(default=0.0, metadata={"min": 0.0})
    """PPO-ptx: weight of the LM loss on pretraining data (InstructGPT's gamma); 0 = off."""
    ptx_data: str = ""
    """Ingested token folder for PPO-ptx (needed when ptx_coef > 0)."""
    max_new_tokens: int = field(default=16, metadata={"min": 1})
    """Response length cap."""
    temperature: float = field(default=1.0, metadata={"min": 0.01})
    """Sampling temperature of rollouts (log-probs are taken at this temperature)."""
    top_k: int = field(default=0, metadata={"min": 0})
    """Rollout top-k (0 = off)."""
    top_p: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    """Rollout nucleus (1 = off)."""
    max_prompt_len: int = field(default=32, metadata={"min": 1})
    """Prompt tokens kept; a longer prompt is an error unless long_prompts says otherwise."""
    long_prompts: Literal["error", "truncate_left"] = "error"
    """A prompt over max_prompt_len: an error naming the row, or cut from the left (a
    conversation keeps its latest turns), the number of cut prompts printed."""
    eval_prompts: int = field(default=64, metadata={"min": 0})
    """Held-out prompts scored (greedy) at the start, every train.eval_every iterations and
    at the end; 0 = none."""

    def __post_init__(self) -> None:
        if self.group_size == 0:
            self.group_size = DEFAULT_GROUP_SIZE if self.algorithm in ("grpo", "rloo") else 1
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx_data (an ingested token folder)")
        if self.algorithm in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"algorithm {self.algorithm} needs group_size >= 2 (responses per "
                             f"prompt to compare), got {self.group_size}")

    # -- what the algorithm implies ----------------------------------------------------------
    @property
    def has_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def rollout_rows(self) -> int:
        """Responses per iteration: prompts_per_iteration * group_size."""
        return self.prompts_per_iteration * self.group_size

    @property
    def kl_placement(self) -> str:
        """'reward' or 'loss' (kl_in resolved)."""
        if self.kl_in != "auto":
            return self.kl_in
        return "loss" if self.algorithm == "grpo" else "reward"

    @property
    def policy_loss_agg(self) -> str:
        if self.loss_agg != "auto":
            return self.loss_agg
        return "seq_sum_norm" if self.algorithm == "grpo" and self.grpo_variant == "dr_grpo" \
            else "token_mean"
