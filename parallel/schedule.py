"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio.

Kept as a pure function of the optimizer step so it can be tested without DeepSpeed; the
engine wraps it in a torch LambdaLR that DeepSpeed steps once per optimizer step.
"""
from __future__ import annotations

import math
from functools import partial

from trellis.parallel.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based: the lr used by step 0).

    Warmup: (step + 1) / warmup_steps, so step 0 already trains and step warmup-1 is at peak.
    Decay: cosine from 1 at step=warmup to min_lr_ratio at step=total_steps-1, then flat.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Absolute learning rate for optimizer step `step`."""
    return optim.lr * lr_factor(step, optim.warmup_steps, total_steps, optim.min_lr_ratio)


def make_lambda_lr(optim: OptimConfig, total_steps: int):
    """A callable (torch optimizer -> LambdaLR) as DeepSpeed's `lr_scheduler` argument wants."""
    def build(optimizer):
        import torch
        fn = partial(lr_factor, warmup_steps=optim.warmup_steps, total_steps=total_steps,
                     min_lr_ratio=optim.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    return build
