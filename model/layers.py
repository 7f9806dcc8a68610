"""Leaf layers shared by GPT and BERT.

Weights are initialised inside each leaf's own __init__ (normal, std given; zero bias).
Under DeepSpeed `zero.Init` a module's parameters are partitioned as soon as its __init__
returns, so a parent that re-initialises its children afterwards would write into empty
shards; initialising in the leaf keeps `zero.Init` construction correct.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear with N(0, std) weights and zero bias."""

    def __init__(self, d_in: int, d_out: int, std: float = 0.02, bias: bool = True):
        super().__init__(d_in, d_out, bias=bias)
        if self.weight.is_meta:  # shape-only build (parameter counting): nothing to fill
            return
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding with N(0, std) weights."""

    def __init__(self, num: int, dim: int, std: float = 0.02):
        super().__init__(num, dim)
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, mean=0.0, std=std)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, C/H)."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool, dropout: float) -> torch.Tensor:
    """SDPA over (B, H, T, D) q and (B, H, S, D) k/v; mask (B, 1, T, S) bool, True = attend.
    `causal` is used only when mask is None (the unpadded fast path)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None)


def padding_attn_mask(key_mask: torch.Tensor, n_query: int, past: int,
                      causal: bool) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S), True = may attend.

    key_mask (B, S) marks real keys (S = past + T). Query t sits at absolute index past + t.
    Every query may always attend to itself: a pad query whose keys are all masked (left
    padding, or an all-pad row) would otherwise softmax over nothing and give NaN. Outputs at
    pad positions are meaningless but finite; real positions never see a pad key.
    """
    B, S = key_mask.shape
    q_idx = past + torch.arange(n_query, device=key_mask.device)  # (T,)
    k_idx = torch.arange(S, device=key_mask.device)  # (S,)
    allowed = key_mask.bool()[:, None, :]  # (B, 1, S)
    if causal:
        allowed = allowed & (k_idx[None, :] <= q_idx[:, None])[None]  # (B, T, S)
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)
