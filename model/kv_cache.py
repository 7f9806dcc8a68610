"""Key/value cache for incremental GPT decoding.

Buffers are allocated on first use per layer as (B, H, max_len, D) in the keys' dtype and
device, so the cache needs no model internals. Besides keys and values it remembers which
cached positions were real tokens (`key_mask`) and how many real tokens each row has seen
(`seen`), so later calls can pass only the new tokens' mask and still get correct
attention masking and position ids under left padding.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"KVCache max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.length = 0  # positions filled (same for every row)
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (B, H, max_len, D)
        self.values: dict[int, torch.Tensor] = {}
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool
        self.seen: torch.Tensor | None = None  # (B,) long, real tokens so far

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"KVCache full: {self.length} + {n_new} tokens > max_len "
                             f"{self.max_len}")

    def past_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, length) bool mask of the cached positions."""
        if self.key_mask is None:
            return torch.ones(batch, 0, dtype=torch.bool, device=device)
        return self.key_mask[:, : self.length]

    def seen_tokens(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) number of real tokens already in the cache."""
        if self.seen is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.seen

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k/v (B, H, T, D) after the cached ones; return all (B, H, length+T, D).
        The write position advances only at `commit`, after every layer has run."""
        B, H, T, D = k.shape
        if layer not in self.keys:
            shape = (B, H, self.max_len, D)
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + T
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, new_mask: torch.Tensor) -> None:
        """Record the mask (B, T) of the tokens just written and advance."""
        B, T = new_mask.shape
        if self.key_mask is None:
            self.key_mask = torch.zeros(B, self.max_len, dtype=torch.bool,
                                        device=new_mask.device)
            self.seen = torch.zeros(B, dtype=torch.long, device=new_mask.device)
        self.key_mask[:, self.length:self.length + T] = new_mask.bool()
        self.seen = self.seen + new_mask.long().sum(dim=1)
        self.length += T

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',) of the batch, in that order (beam search: each surviving
        hypothesis takes its parent's cache)."""
        for store in (self.keys, self.values):
            for layer, t in store.items():
                store[layer] = t.index_select(0, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
            self.seen = self.seen.index_select(0, index)
