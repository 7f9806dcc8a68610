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


# torch's CPU flash attention is slow to differentiate in bf16 at short lengths: fwd + bwd
# of (B, H, T, D) = (12, 4, 64, 32) took 7.5 ms in bf16 vs 1.9 ms cast to fp32 and back,
# (16, 4, 128, 32) 28 vs 9 ms, (8, 4, 256, 32) 21 vs 14 ms; from 512 keys on it is even or
# better in bf16 (2 threads, AMX). Forward alone (generation) is as fast in bf16.
CPU_BF16_ATTN_FP32_BELOW = 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool, dropout: float) -> torch.Tensor:
    """SDPA over (B, H, T, D) q and (B, H, S, D) k/v; mask (B, 1, T, S) bool, True = attend.
    `causal` is used only when mask is None (the unpadded fast path)."""
    dtype = q.dtype
    if _attend_in_fp32(q, k):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None)
    return out.to(dtype)


def _attend_in_fp32(q: torch.Tensor, k: torch.Tensor) -> bool:
    """bf16 attention on CPU that will be differentiated, over fewer keys than the crossover."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad
            and k.shape[-2] < CPU_BF16_ATTN_FP32_BELOW)


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
