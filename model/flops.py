"""Parameter and FLOP counts.

flops_per_token follows PaLM (Chowdhery et al. 2022, appendix B): a training step costs
    6 * N + 12 * n_layer * d_model * seq_len    FLOPs per token,
where 6N is forward (2N) + backward (4N) through the weight matmuls and the second term is
the attention score/value matmuls (QK^T and AV, forward and backward) at context seq_len.
N counts the parameters that take part in matmuls: all non-embedding parameters plus the
output projection (vocab_size * d_model; in GPT-2/BERT it is the tied token embedding,
a lookup on input but a real matmul on output). Position and token-type tables are lookups
and are excluded. MFU = achieved tokens/s * flops_per_token / peak FLOP/s.
"""
from __future__ import annotations

from torch import nn

from trellis.model.config import ModelConfig

_EMBEDDING_SUFFIXES = ("wte.weight", "wpe.weight", "tok_emb.weight", "pos_emb.weight",
                       "type_emb.weight")


def _count_from_config(cfg: ModelConfig, exclude_embeddings: bool) -> int:
    """Closed form of the default model's parameters (GPT with LM head, BertForMaskedLM);
    tests check it against a built module. Building on the meta device would do, but its
    first use imports torch._dynamo (seconds)."""
    C, F, L, V = cfg.d_model, cfg.ff_dim, cfg.n_layer, cfg.vocab_size
    lin = lambda i, o: i * o + o  # noqa: E731  weight + bias
    ln = 2 * C
    mlp = lin(C, F) + lin(F, C)
    if cfg.arch == "gpt":
        emb = V * C + cfg.max_seq_len * C
        body = L * (2 * ln + lin(C, 3 * C) + lin(C, C) + mlp) + ln  # blocks + ln_f
    else:
        emb = V * C + cfg.max_seq_len * C + cfg.type_vocab_size * C
        body = ln + L * (4 * lin(C, C) + 2 * ln + mlp) + lin(C, C)  # emb LN, layers, pooler
        body += lin(C, C) + ln + V  # MLM head: dense, LayerNorm, decoder bias (weight tied)
    return body if exclude_embeddings else body + emb


def count_params(module_or_cfg: nn.Module | ModelConfig, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights once). A ModelConfig is counted as its default model
    (GPT with LM head, BertForMaskedLM). exclude_embeddings drops token, position and
    token-type tables (Kaplan et al.'s "non-embedding" count)."""
    if isinstance(module_or_cfg, ModelConfig):
        return _count_from_config(module_or_cfg, exclude_embeddings)
    total, seen = 0, set()
    for name, p in module_or_cfg.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_embeddings and name.endswith(_EMBEDDING_SUFFIXES):
            continue
        # ZeRO-3 partitions leave an empty local tensor; ds_numel is the full size.
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at context length seq_len."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = count_params(cfg, exclude_embeddings=True) + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * seq_len
