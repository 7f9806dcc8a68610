"""Parameter-name tables between trellis and Hugging Face GPT2LMHeadModel / BertForMaskedLM.

Each table row is (trellis name, HF name, transpose). GPT-2's HF checkpoint stores its
linear layers as Conv1D with (in, out) weights, so those rows transpose. Tied weights
(the LM head / MLM decoder share the token embedding) are listed separately: written once
on export, re-created on import.
"""
from __future__ import annotations

import re

from trellis.model.config import ModelConfig

_WB = ("weight", "bias")

# GPT-2: identical names under "transformer."; Conv1D weights transposed.
_GPT_LAYER = [("ln_1", False), ("attn.c_attn", True), ("attn.c_proj", True), ("ln_2", False),
              ("mlp.c_fc", True), ("mlp.c_proj", True)]
GPT_TIED = {"lm_head.weight": "wte.weight"}  # trellis alias -> trellis source
# HF keys that carry no weights of their own (old causal-mask buffers, the tied head).
GPT_HF_IGNORED = re.compile(r"^(transformer\.h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")

# BERT: trellis module -> HF module, all with weight and bias.
_BERT_LAYER = [("attn.query", "attention.self.query"), ("attn.key", "attention.self.key"),
               ("attn.value", "attention.self.value"), ("attn.out", "attention.output.dense"),
               ("ln_1", "attention.output.LayerNorm"), ("fc", "intermediate.dense"),
               ("proj", "output.dense"), ("ln_2", "output.LayerNorm")]
_BERT_TOP = [("bert.tok_emb.weight", "bert.embeddings.word_embeddings.weight"),
             ("bert.pos_emb.weight", "bert.embeddings.position_embeddings.weight"),
             ("bert.type_emb.weight", "bert.embeddings.token_type_embeddings.weight"),
             ("bert.emb_ln.weight", "bert.embeddings.LayerNorm.weight"),
             ("bert.emb_ln.bias", "bert.embeddings.LayerNorm.bias"),
             ("bert.pooler.weight", "bert.pooler.dense.weight"),
             ("bert.pooler.bias", "bert.pooler.dense.bias"),
             ("head.dense.weight", "cls.predictions.transform.dense.weight"),
             ("head.dense.bias", "cls.predictions.transform.dense.bias"),
             ("head.ln.weight", "cls.predictions.transform.LayerNorm.weight"),
             ("head.ln.bias", "cls.predictions.transform.LayerNorm.bias"),
             ("head.decoder.bias", "cls.predictions.bias")]
BERT_TIED = {"head.decoder.weight": "bert.tok_emb.weight"}
# The decoder's weight/bias duplicate word_embeddings / cls.predictions.bias; the NSP head
# of BertForPreTraining and the position_ids buffer are not part of an MLM model.
BERT_HF_IGNORED = re.compile(r"^(cls\.predictions\.decoder\.(weight|bias)|cls\.seq_relationship\..*"
                             r"|bert\.embeddings\.position_ids)$")


def name_table(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """All (trellis, HF, transpose) rows for this config's LM/MLM model."""
    rows: list[tuple[str, str, bool]] = []
    if cfg.arch == "gpt":
        for n in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            rows.append((n, "transformer." + n, False))
        for i in range(cfg.n_layer):
            for mod, conv in _GPT_LAYER:
                for p in _WB:
                    name = f"h.{i}.{mod}.{p}"
                    rows.append((name, "transformer." + name, conv and p == "weight"))
        return rows
    rows += [(a, b, False) for a, b in _BERT_TOP]
    for i in range(cfg.n_layer):
        for ours, theirs in _BERT_LAYER:
            for p in _WB:
                rows.append((f"bert.layers.{i}.{ours}.{p}",
                             f"bert.encoder.layer.{i}.{theirs}.{p}", False))
    return rows


def tied(cfg: ModelConfig) -> dict[str, str]:
    return GPT_TIED if cfg.arch == "gpt" else BERT_TIED


def hf_ignored(cfg: ModelConfig) -> re.Pattern:
    return GPT_HF_IGNORED if cfg.arch == "gpt" else BERT_HF_IGNORED


def normalize_hf_key(key: str, cfg: ModelConfig) -> str:
    """Bring HF checkpoint variants to the GPT2LMHeadModel / BertForMaskedLM names: base-model
    checkpoints without the "transformer."/"bert." prefix, and TF-era gamma/beta names."""
    if cfg.arch == "gpt":
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        return key
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = "bert." + key
    if "LayerNorm." in key:
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    return key
