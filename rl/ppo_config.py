"""PPO's algorithm settings (stdlib dataclasses; validated by launcher/config_loader.py).
The iteration count and cadence are the driver loop's (`train.*` of the job config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PPOConfig:
    prompts_per_iteration: int = field(default=32, metadata={"min": 1})
    """Prompts sampled per iteration (one response each), across all actor ranks."""
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
    """Prompts longer than this are an error, not silently cut."""
    eval_prompts: int = field(default=64, metadata={"min": 0})
    """Held-out prompts scored (greedy) at the start, every train.eval_every iterations and
    at the end; 0 = none."""

    def __post_init__(self) -> None:
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx_data (an ingested token folder)")
