"""GPT-2 decoder (Radford et al. 2019): pre-LN blocks, learned positions, tanh GELU,
language-model head tied to the token embedding.

Parameter names follow GPT-2's (wte, wpe, h.N.attn.c_attn, ...), so the Hugging Face
mapping is a prefix plus a transpose of the Conv1D weights (model/hf.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trellis.model.config import ModelConfig
from trellis.model.kv_cache import KVCache
from trellis.model.layers import Embedding, Linear, attention, merge_heads, padding_attn_mask, split_heads
from trellis.model.packed import segment_attn_mask, segment_positions


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.layer_idx, self.dropout = cfg.n_head, layer_idx, cfg.dropout
        # Residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3).
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_attn = Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = Linear(cfg.d_model, cfg.d_model, std=proj_std, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None) -> torch.Tensor:
        C = x.shape[-1]
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, causal=True, dropout=p)  # (B, H, T, D)
        return self.resid_drop(self.c_proj(merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.c_proj = Linear(cfg.ff_dim, cfg.d_model, std=0.02 / math.sqrt(2 * cfg.n_layer),
                             bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"GPT needs arch 'gpt', got '{cfg.arch}'")
        self.config = cfg
        self.activation_checkpointing = False  # set by build.set_activation_checkpointing
        self.wte = Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # Blocks are built one by one (not deep-copied): DeepSpeed zero.Init breaks on copies.
        self.h = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        # A real module for the output projection, so ZeRO-3 gathers the shared weight in
        # its forward hook; the weight is the embedding's (tied).
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) after the final LayerNorm.

        attention_mask (B, T): 1 = token, 0 = pad, for the new tokens only (a kv_cache
        remembers earlier ones). Without position_ids, positions count real tokens:
        cumsum(mask) - 1 clamped at 0, continuing from what the cache has seen.
        segment_ids (B, T): packed rows (model/packed.py; 0 = pad), which then decide the
        mask and, without position_ids, the positions (from 0 in each segment).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("packed rows (segment_ids) cannot use a kv_cache")
            mask = segment_attn_mask(segment_ids)  # (B, 1, T, T)
            pos = segment_positions(segment_ids) if position_ids is None else position_ids
            return self._blocks(input_ids, pos, mask, None)
        if kv_cache is not None:
            kv_cache.check_room(T)
        dev = input_ids.device
        new_mask = (torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None
                    else attention_mask.bool())
        if position_ids is None:
            position_ids = (new_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
            if kv_cache is not None:
                position_ids = position_ids + kv_cache.seen_tokens(B, dev)[:, None]
        mask = None  # unpadded, uncached: SDPA's causal fast path
        if attention_mask is not None or kv_cache is not None:
            keys = new_mask if kv_cache is None else torch.cat(
                [kv_cache.past_mask(B, dev), new_mask], dim=1)  # (B, S)
            mask = padding_attn_mask(keys, T, past, causal=True)  # (B, 1, T, S)
        x = self._blocks(input_ids, position_ids, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.commit(new_mask)
        return x

    def _blocks(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        """Embeddings, the blocks and the final LayerNorm: (B, T) ids -> (B, T, C)."""
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        use_ckpt = (self.activation_checkpointing and self.training
                    and torch.is_grad_enabled() and kv_cache is None)
        for block in self.h:
            if use_ckpt:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, kv_cache)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids,
                                               kv_cache, segment_ids))
