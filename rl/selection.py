"""Guards against over-optimising the reward model: pick the RL checkpoint by a held-out
criterion and stop when it stops improving.

The criterion, measured on held-out prompts at each evaluation (iteration 0 = the starting
policy, so a run that never beats it selects it):
  gold  the task's own score, where the task defines one (rl.gold);
  rm    the reward model's score, ideally from a model not used as the reward (an ensemble
        member held out of the reward) so the choice is not made by the optimised proxy;
Evaluations whose KL to the reference exceeds `kl_budget` are not eligible. Early stop:
`patience` evaluations in a row without improving the best by more than `min_delta`.
State is plain numbers, saved with the driver state."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SelectionConfig:
    criterion: Literal["auto", "gold", "rm", "last"] = "auto"
    """What picks the checkpoint: gold when the job has a gold scorer, otherwise the held-out
    RM score ("auto"); "last" keeps the final iteration (no selection)."""
    kl_budget: float = field(default=0.0, metadata={"min": 0.0})
    """Evaluations whose mean summed KL to the reference exceeds this are not eligible;
    0 = no budget."""
    patience: int = field(default=0, metadata={"min": 0})
    """Stop after this many evaluations in a row without a new best; 0 = never stop early."""
    min_delta: float = field(default=0.0, metadata={"min": 0.0})
    """An improvement must exceed this to count as a new best."""


class Selector:
    """Tracks the best evaluation so far; `update` says whether this one is the new best."""

    def __init__(self, cfg: SelectionConfig, has_gold: bool):
        if cfg.criterion == "gold" and not has_gold:
            raise ValueError("selection.criterion 'gold' needs a gold scorer (the job's gold)")
        self.cfg = cfg
        self.key = {"auto": "gold" if has_gold else "rm"}.get(cfg.criterion, cfg.criterion)
        self.best_iteration, self.best_value, self.since_best = -1, -math.inf, 0

    def update(self, iteration: int, ev: dict[str, float]) -> bool:
        if self.key == "last":
            self.best_iteration, self.best_value = iteration, math.nan
            return True
        # "rm": the held-out reward model's score when there is one, not the optimised proxy.
        value = ev.get("rm_heldout", ev["rm"]) if self.key == "rm" else ev[self.key]
        eligible = not self.cfg.kl_budget or ev.get("kl", 0.0) <= self.cfg.kl_budget
        if eligible and value > self.best_value + (self.cfg.min_delta if self.best_iteration >= 0 else 0):
            self.best_iteration, self.best_value, self.since_best = iteration, value, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self) -> bool:
        return bool(self.cfg.patience) and self.since_best >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_iteration": self.best_iteration, "best_value": self.best_value,
                "since_best": self.since_best}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.best_iteration = int(s["best_iteration"])
        self.best_value, self.since_best = float(s["best_value"]), int(s["since_best"])
