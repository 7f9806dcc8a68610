"""A model's shape and parameter counts without its weights, for memory planning.

trellis architectures (GPT-2, BERT, and HF gpt2/bert configs, which map onto them) are built
on the meta device, so every count is the real module's. Llama-family HF configs (llama,
mistral, qwen2: gated SwiGLU MLP, grouped-query attention, RMSNorm, untied head unless the
config ties it) are counted from their config; LLAMA2 holds the published 7B/13B/70B ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis.model.config import ModelConfig
from trellis.model.presets import PRESETS

LLAMA_TYPES = ("llama", "mistral", "qwen2")
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
           "tie_word_embeddings": False}
LLAMA2: dict[str, dict] = {  # the released Llama 2 config.json values
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    """Key/value heads (fewer than n_head under grouped-query attention)."""
    ff_dim: int
    vocab_size: int
    gated_mlp: bool
    """SwiGLU MLP (gate, up, down) instead of GPT-2's two matrices with GELU."""
    dropout: bool
    """Dropout masks are kept for backward."""
    param_sizes: tuple[int, ...]
    """Elements of every parameter tensor (tied ones once)."""
    largest_layer: int
    """Most parameters one module holds itself (DeepSpeed's ZeRO-3 working-set unit)."""

    @property
    def params(self) -> int:
        return sum(self.param_sizes)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def of_module(module: torch.nn.Module, cfg: ModelConfig, name: str) -> ModelShape:
    """The shape of a built module (any device, meta included) of config `cfg`."""
    sizes = tuple(p.numel() for p in module.parameters())  # shared (tied) parameters once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())
    return ModelShape(name, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_head, cfg.ff_dim,
                      cfg.vocab_size, False, cfg.dropout > 0, sizes, largest)


def of_config(cfg: ModelConfig, head: str = "lm", name: str = "") -> ModelShape:
    """A trellis config with a head ('lm', 'mlm', 'value', 'score', ...), built on meta."""
    from trellis.model.build import build_model
    if head == "lm" and cfg.arch == "bert":
        head = "mlm"
    with torch.device("meta"):
        module = build_model(cfg, head)
    return of_module(module, cfg, name or cfg.preset or f"{cfg.arch}-{cfg.n_layer}x{cfg.d_model}")


def of_llama(hf: dict, head: str = "lm", name: str = "") -> ModelShape:
    """Llama-family config.json -> shape; 'value'/'score' heads replace the LM head by a
    (hidden -> 1) projection with bias."""
    try:
        h, f, n = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
        heads, vocab = hf["num_attention_heads"], hf["vocab_size"]
    except KeyError as e:
        raise ValueError(f"HF config key {e.args[0]!r} is missing ({hf.get('model_type')} "
                         f"config)") from None
    kv = hf.get("num_key_value_heads") or heads
    kv_dim = kv * (h // heads)
    layer = [h * h, h * kv_dim, h * kv_dim, h * h, h * f, h * f, f * h, h, h]  # q k v o gate up down, 2 norms
    head_sizes = [vocab * h] if head == "lm" and not hf.get("tie_word_embeddings") else \
        [] if head == "lm" else [h, 1]
    sizes = (vocab * h, *layer * n, h, *head_sizes)  # embed, layers, final norm, head
    return ModelShape(name or f"{hf['model_type']}-{n}x{h}", n, h, heads, kv, f, vocab, True,
                      bool(hf.get("attention_dropout")), sizes, max(sizes))


def of_hf(hf: dict, head: str = "lm", name: str = "") -> ModelShape:
    """An HF config.json's contents: gpt2/bert through trellis's own modules, llama-family
    counted from the config."""
    mtype = hf.get("model_type")
    if mtype in LLAMA_TYPES:
        return of_llama(hf, head, name)
    if mtype in ("gpt2", "bert"):
        from trellis.model.hf import config_from_hf
        return of_config(config_from_hf(hf), head, name or f"{mtype}-hf")
    raise ValueError(f"HF config key 'model_type'={mtype!r} is not supported (allowed: gpt2, "
                     f"bert, {', '.join(LLAMA_TYPES)})")


def named(name: str, head: str = "lm") -> ModelShape:
    """A trellis preset or a built-in HF shape (LLAMA2) by name."""
    if name in PRESETS:
        return of_config(ModelConfig.from_preset(name), head, name)
    if name in LLAMA2:
        return of_llama(LLAMA2[name], head, name)
    raise KeyError(f"unknown model '{name}' (presets: {', '.join(PRESETS)}; built-in shapes: "
                   f"{', '.join(LLAMA2)})")
