"""BERT encoder (Devlin et al. 2018): post-LN blocks, learned positions, token-type
embeddings, exact (erf) GELU, tanh pooler; masked-LM and sequence-classification heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trellis.model.config import ModelConfig
from trellis.model.layers import Embedding, Linear, attention, merge_heads, padding_attn_mask, split_heads


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.query = Linear(cfg.d_model, cfg.d_model)
        self.key = Linear(cfg.d_model, cfg.d_model)
        self.value = Linear(cfg.d_model, cfg.d_model)
        self.out = Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(f(x), self.n_head) for f in (self.query, self.key, self.value))
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, causal=False, dropout=p)  # (B, H, T, D)
        return self.out(merge_heads(y))


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = BertSelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc = Linear(cfg.d_model, cfg.ff_dim)
        self.proj = Linear(cfg.ff_dim, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, mask)))  # post-LN
        return self.ln_2(x + self.drop(self.proj(F.gelu(self.fc(x)))))


class Bert(nn.Module):
    """The encoder trunk with its pooler."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "bert":
            raise ValueError(f"Bert needs arch 'bert', got '{cfg.arch}'")
        self.config = cfg
        self.activation_checkpointing = False  # set by build.set_activation_checkpointing
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.n_layer)])
        self.pooler = Linear(cfg.d_model, cfg.d_model)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, C). attention_mask 1 = token, 0 = pad."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids) + self.type_emb(token_type_ids)
        x = self.drop(self.emb_ln(x))  # (B, T, C)
        mask = None
        if attention_mask is not None:
            mask = padding_attn_mask(attention_mask, T, 0, causal=False)  # (B, 1, T, T)
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, mask, use_reentrant=False) if use_ckpt else layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C): tanh(dense(first token))."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.hidden_states(input_ids, attention_mask, token_type_ids))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask, token_type_ids)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weight tied to the word embedding, own bias)."""

    def __init__(self, cfg: ModelConfig, tok_emb: nn.Embedding):
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        self.decoder.weight = tok_emb.weight
        nn.init.zeros_(self.decoder.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(hidden))))  # (B, T, V)


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg)
        self.head = MLMHead(cfg, self.bert.tok_emb)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert.hidden_states(input_ids, attention_mask, token_type_ids, position_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits."""
        return self.head(self.hidden_states(input_ids, attention_mask, token_type_ids,
                                            position_ids))


class BertForSequenceClassification(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = Linear(cfg.d_model, cfg.num_labels)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert.hidden_states(input_ids, attention_mask, token_type_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, num_labels) logits from the pooled first token."""
        pooled = self.bert.pooled(input_ids, attention_mask, token_type_ids)  # (B, C)
        return self.classifier(self.drop(pooled))
