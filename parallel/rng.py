"""Seeding and RNG state capture/restore for python, numpy and torch (CPU and CUDA).

States are plain lists/ints/tensors so they survive torch.load(weights_only=True).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Current RNG states as tensors and primitives."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by rng_state()."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keyed_generator(*keys: int) -> torch.Generator:
    """A torch generator that is a pure function of integer keys (e.g. seed, epoch, rank,
    step): the same keys draw the same numbers on any rank, run or resume."""
    s = np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(2)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))
