"""The encoder-decoder Transformer (Vaswani et al. 2017), the model BERT takes its encoder from
and GPT its decoder: token embeddings scaled by sqrt(d_model) plus fixed sinusoidal positions,
an encoder of self-attention blocks, a decoder of causal self-attention + cross-attention
blocks, ReLU feed-forward layers, an output projection tied to the target embedding.

Blocks are post-LN as in the paper (LayerNorm(x + Sublayer(x))) or pre-LN (x +
Sublayer(LayerNorm(x)), with a final LayerNorm after each stack), by `norm_position`.
Parameter names follow Hugging Face's MarianMTModel (encoder.layers.N.self_attn.q_proj, ...),
so the mapping to it is a prefix (model/hf_seq2seq.py).

Decoder inputs are right-padded (BOS + target); the causal mask alone keeps real positions
from seeing padding, so the decoder takes no padding mask. A Seq2SeqCache holds the
decoder's self-attention keys/values (a KVCache) and each layer's cross-attention keys/values,
computed once from the encoder output.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trellis.model.config import ModelConfig
from trellis.model.kv_cache import KVCache
from trellis.model.layers import Embedding, Linear, attention, merge_heads, padding_attn_mask, split_heads


def sinusoid_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) fixed positions, angle pos / 10000^(2i/dim): sines in the first half,
    cosines in the second (Marian's layout; the paper interleaves them, a permutation)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (P, C)
    half = (dim + 1) // 2
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, :half] = torch.sin(angle[:, 0::2])
    out[:, half:] = torch.cos(angle[:, 1::2])
    return out.float()


class Seq2SeqCache:
    """Decoding state: self-attention K/V of the target so far, cross-attention K/V per layer."""

    def __init__(self, max_len: int):
        self.self_attn = KVCache(max_len)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, H, S, D) x 2

    @property
    def length(self) -> int:
        return self.self_attn.length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',), in that order (beam search)."""
        self.self_attn.reorder(index)
        self.cross = {i: (k.index_select(0, index), v.index_select(0, index))
                      for i, (k, v) in self.cross.items()}


class Attention(nn.Module):
    """Multi-head attention with Marian's names; self- or cross-attention by its caller."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        C = cfg.d_model
        self.n_head, self.layer_idx, self.dropout = cfg.n_head, layer_idx, cfg.dropout
        self.q_proj, self.k_proj, self.v_proj = Linear(C, C), Linear(C, C), Linear(C, C)
        self.out_proj = Linear(C, C)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) -> keys, values (B, H, S, D)."""
        return split_heads(self.k_proj(x), self.n_head), split_heads(self.v_proj(x), self.n_head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C) queries; `kv` given = cross-attention over those keys/values, else
        self-attention (appended to `cache` when given). mask (B, 1, T|1, S) bool."""
        q = split_heads(self.q_proj(x), self.n_head)  # (B, H, T, D)
        if kv is None:
            k, v = self.kv(x)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, H, past + T, D)
        else:
            k, v = kv
        p = self.dropout if self.training else 0.0
        return self.out_proj(merge_heads(attention(q, k, v, mask, causal, p)))


class _Block(nn.Module):
    """Residual wiring shared by encoder and decoder layers, post-LN or pre-LN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.fc1 = Linear(cfg.d_model, cfg.ff_dim)
        self.fc2 = Linear(cfg.ff_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, x: torch.Tensor, ln: nn.LayerNorm,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre:
            return x + self.drop(fn(ln(x)))
        return ln(x + self.drop(fn(x)))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(_Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, mask, False))
        return self.residual(x, self.final_layer_norm, self.ffn)


class DecoderLayer(_Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg)
        self.layer_idx = layer_idx
        self.self_attn = Attention(cfg, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.encoder_attn = Attention(cfg, layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor | None, memory: torch.Tensor,
                cross_mask: torch.Tensor | None, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        kv_cache = cache.self_attn if cache is not None else None
        x = self.residual(x, self.self_attn_layer_norm,
                          lambda h: self.self_attn(h, self_mask, True, cache=kv_cache))
        x = self.residual(x, self.encoder_attn_layer_norm,
                          lambda h: self.encoder_attn(h, cross_mask, False,
                                                      kv=self._cross_kv(memory, cache)))
        return self.residual(x, self.final_layer_norm, self.ffn)

    def _cross_kv(self, memory: torch.Tensor, cache: Seq2SeqCache | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is None:
            return self.encoder_attn.kv(memory)
        if self.layer_idx not in cache.cross:  # computed once per source batch
            cache.cross[self.layer_idx] = self.encoder_attn.kv(memory)
        return cache.cross[self.layer_idx]


class _Stack(nn.Module):
    """Embeddings (scaled tokens + sinusoidal positions) and the final pre-LN LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_scale = math.sqrt(cfg.d_model)
        # std d^-1/2: the scaled embedding starts at unit variance, like the positions.
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.d_model ** -0.5)
        self.register_buffer("embed_positions", sinusoid_table(cfg.max_seq_len, cfg.d_model),
                             persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layer_norm = (nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
                           if cfg.norm_position == "pre" else None)
        self.activation_checkpointing = False  # set by build.set_activation_checkpointing

    def embed(self, ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        """(B, T) ids at positions past.. -> (B, T, C)."""
        T = ids.shape[1]
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        pos = self.embed_positions[past:past + T].to(self.embed_tokens.weight.dtype)  # (T, C)
        return self.drop(self.embed_tokens(ids) * self.embed_scale + pos)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x) if self.layer_norm is not None else x

    def ckpt(self, cache: object = None) -> bool:
        return (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                and cache is None)


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList([EncoderLayer(cfg, i) for i in range(cfg.n_layer)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, S) source ids, mask 1 = token -> (B, S, C)."""
        x = self.embed(input_ids)
        mask = None if attention_mask is None else padding_attn_mask(
            attention_mask, input_ids.shape[1], 0, causal=False)  # (B, 1, S, S)
        for layer in self.layers:
            x = checkpoint(layer, x, mask, use_reentrant=False) if self.ckpt() else layer(x, mask)
        return self.finish(x)


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.decoder_layers)])

    def forward(self, input_ids: torch.Tensor, memory: torch.Tensor,
                source_mask: torch.Tensor | None = None,
                cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """(B, T) right-padded target inputs over memory (B, S, C) -> (B, T, C)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        self_mask = None  # uncached: SDPA's causal fast path
        if cache is not None:
            cache.self_attn.check_room(T)
            keys = torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device)
            self_mask = padding_attn_mask(keys, T, past, causal=True)  # (B, 1, T, past + T)
        cross_mask = None if source_mask is None else source_mask.bool()[:, None, None, :]
        x = self.embed(input_ids, past)
        for layer in self.layers:
            if self.ckpt(cache):
                x = checkpoint(layer, x, self_mask, memory, cross_mask, use_reentrant=False)
            else:
                x = layer(x, self_mask, memory, cross_mask, cache)
        if cache is not None:
            cache.self_attn.commit(torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
        return self.finish(x)


class Seq2Seq(nn.Module):
    """Encoder-decoder with the output projection tied to the target embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "seq2seq":
            raise ValueError(f"Seq2Seq needs arch 'seq2seq', got '{cfg.arch}'")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.share_embeddings:
            self.encoder.embed_tokens.weight = self.decoder.embed_tokens.weight
        # A real module, so ZeRO-3 gathers the tied weight in its forward hook (as in GPT).
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.decoder.embed_tokens.weight
        # Marian's fixed output bias (zero unless imported): kept so imports stay exact.
        self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """(B, S) -> memory (B, S, C)."""
        return self.encoder(input_ids, attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """(B, T) target inputs, memory (B, S, C), source mask (B, S) -> logits (B, T, V)."""
        h = self.decoder(decoder_input_ids, memory, attention_mask, cache)
        return self.lm_head(h) + self.final_logits_bias.to(h.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Source (B, S) + mask, target inputs (B, T) -> logits (B, T, V)."""
        if decoder_input_ids is None:
            raise ValueError("Seq2Seq.forward needs decoder_input_ids (BOS + target)")
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask),
                           attention_mask)
