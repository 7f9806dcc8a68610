"""Packed rows: several sequences laid end to end in one row of the batch, told apart by
segment ids (B, T): 1, 2, ... for the row's sequences in order, 0 on padding.

Each sequence must see exactly what it would see alone in a padded row: keys of its own
segment up to itself (a block-diagonal causal mask) and positions counted from 0 at its
first token (GPT-2's learned position embeddings)."""
from __future__ import annotations

import torch


def segment_attn_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T), True = may attend: a query sees the real keys of
    its own segment at or before it. Every query also sees itself, so a padding query
    (segment 0) has one key and stays finite (as padding_attn_mask does); its output is unused.
    """
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device)  # (T,)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    real_key = (segment_ids != 0)[:, None, :]  # (B, 1, T)
    allowed = (same & real_key & causal) | (idx[None, :] == idx[:, None])  # (B, T, T)
    return allowed[:, None]  # (B, 1, T, T)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its segment: 0 at every segment's first token.
    Segments are contiguous runs of one id (a later run of the same id starts again at 0)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return idx - first
