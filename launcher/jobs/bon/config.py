"""`trellis bon` config: best-of-n (rejection) sampling from a policy, a reward model picks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BoNJobConfig:
    run_dir: str = "runs/bon"
    """Materialised weights and the output (RUN_DIR/demonstrations.jsonl unless `out`)."""
    policy: str = ""
    """The sampling policy: an SFT/PPO/DPO run dir or trellis / HF weights."""
    reward: str = ""
    """The reward model that picks: an RM run dir or trellis weights with a score head."""
    prompts: str = ""
    """JSONL file of {"prompt": text} rows (other keys are ignored)."""
    out: str = ""
    """Where the picked {prompt, response} rows go (an SFT demonstrations JSONL); empty =
    RUN_DIR/demonstrations.jsonl."""
    n: int = field(default=4, metadata={"min": 1, "max": 1024})
    """Samples per prompt; the reward model keeps the best one."""
    max_prompts: int = field(default=0, metadata={"min": 0})
    """Use the first max_prompts prompts; 0 = all."""
    temperature: float = field(default=1.0, metadata={"min": 0.01})
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    max_len: int = field(default=128, metadata={"min": 8})
    """Prompt + response tokens the reward model scores."""
    seed: int = 0
    gold: Literal["", "demo"] = ""
    """The task's own scorer (rl.gold): reports the gold score of the picks next to the RM's."""

    def __post_init__(self) -> None:
        for key in ("policy", "reward", "prompts"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
