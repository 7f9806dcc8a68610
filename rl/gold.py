"""Gold scorers: the task's own measure of a response, where a task has one (the embedded
demo does; human-preference data such as HH-RLHF does not). RL evaluation reports the gold
score next to the reward model's (the proxy) so over-optimisation shows (Gao et al. 2022)."""
from __future__ import annotations

from typing import Callable, Sequence

GoldFn = Callable[[str, str], float]


def gold_scorer(name: str) -> GoldFn | None:
    """'' -> None (no gold); 'demo' -> the embedded demo task's rule (rl.demo_task.score)."""
    if not name:
        return None
    if name == "demo":
        from trellis.rl.demo_task import score
        return score
    raise ValueError(f"unknown gold scorer {name!r} (known: 'demo', or '' for none)")


def gold_stats(fn: GoldFn, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Mean gold score and the share of responses that score 1 (exactly right)."""
    s = [fn(p, r) for p, r in zip(prompts, responses)]
    n = max(1, len(s))
    return {"gold": sum(s) / n, "exact": sum(x == 1.0 for x in s) / n}
