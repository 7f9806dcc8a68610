"""DPO's algorithm settings (stdlib dataclasses; validated by launcher/config_loader.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DPOConfig:
    beta: float = field(default=0.1, metadata={"min": 1e-6})
    """Strength of the implicit KL to the reference (DPO's beta; IPO's tau)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss on length-averaged
    log-ratios (Azar et al. 2023)."""
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5})
    """Conservative DPO: the share of labels assumed flipped (sigmoid loss only)."""
    weighting: Literal["prompt", "pair"] = "prompt"
    """'prompt': a K-way ranking's pairs share one unit of weight (as the RM's InstructGPT
    weighting); 'pair': every pair counts alike."""
    reference: Literal["group", "precompute"] = "group"
    """group: a frozen reference worker group scores every batch; precompute: reference
    log-probs of every row computed once before training (saved in the run dir), then no
    reference group while training."""
    prompts_per_step: int = field(default=16, metadata={"min": 1})
    """Comparison rows (prompts, all their pairs) per optimizer step, across policy ranks."""
    max_prompt_len: int = field(default=32, metadata={"min": 1})
    """Prompt tokens kept (its end)."""
    max_response_len: int = field(default=32, metadata={"min": 1})
    """Response tokens kept, EOS included (longer responses are cut)."""
    eval_rows: int = field(default=64, metadata={"min": 0})
    """Held-out comparison rows for implicit-reward accuracy; 0 = none."""
