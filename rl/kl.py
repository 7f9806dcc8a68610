"""KL coefficient controllers for the per-token penalty r_t = -beta * KL_t.

Fixed (InstructGPT: beta = 0.02) or adaptive (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", section 2.2): the KL is steered toward a target with a
proportional controller whose error is clipped to +-0.2,

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

KL here is the mean over a rollout batch of each response's summed per-token KL (what
``ppo_math.shaped_rewards`` returns as ``kl.sum(1).mean()``); n_steps is the number of
responses (episodes) in that batch, so a batch of n moves beta by K = n / horizon of the
clipped error, as in lm-human-preferences, TRL and OpenRLHF.

State is plain floats, for checkpoints.
"""
from __future__ import annotations

import math
from typing import Literal, Union


class FixedKLController:
    """beta stays where it is set."""

    def __init__(self, beta: float):
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"KL coefficient beta must be finite and >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """beta steered so the policy's KL from the reference approaches `target` (nats per
    response)."""

    def __init__(self, init_beta: float, target: float, horizon: float):
        if not (math.isfinite(init_beta) and init_beta >= 0):
            raise ValueError(f"init_beta must be finite and >= 0, got {init_beta}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"KL target must be > 0, got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.value = float(init_beta)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """One controller step after a rollout batch of `n_steps` responses; returns beta."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"KL controller got a non-finite KL ({current_kl}); "
                             f"beta left at {self.value}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore beta; target and horizon stay as configured (a resumed run may change
        them on purpose)."""
        self.value = float(state["value"])


KLController = Union[FixedKLController, AdaptiveKLController]


def make_kl_controller(kind: Literal["fixed", "adaptive"], beta: float, target: float = 6.0,
                       horizon: float = 10000.0) -> KLController:
    """A controller from config values: `beta` is the fixed or the initial coefficient."""
    if kind == "fixed":
        return FixedKLController(beta)
    if kind == "adaptive":
        return AdaptiveKLController(beta, target, horizon)
    raise ValueError(f"KL controller kind must be 'fixed' or 'adaptive', not {kind!r}")
