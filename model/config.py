"""ModelConfig: one dataclass for every architecture (GPT decoder, BERT encoder, the original
encoder-decoder Transformer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.model.presets import PRESETS

RETIRED_FIELDS = frozenset({
    "activation_checkpointing",  # now parallel.activation_checkpointing (applied by parallel/)
})
"""Fields older versions wrote into saved model configs; ignored when loading them."""


@dataclass
class ModelConfig:
    arch: Literal["gpt", "bert", "seq2seq"] = "gpt"
    """gpt: GPT-2 causal decoder (pre-LN); bert: original BERT encoder (post-LN); seq2seq: the
    encoder-decoder Transformer of Vaswani et al. 2017 (model/seq2seq.py)."""
    preset: str = ""
    """Name of a size preset (model/presets.py); the config loader fills its values."""
    vocab_size: int = field(default=2000, metadata={"min": 8})
    """Token vocabulary size (must match the tokenizer)."""
    n_layer: int = field(default=4, metadata={"min": 1})
    """Number of transformer blocks."""
    n_head: int = field(default=4, metadata={"min": 1})
    """Attention heads per block; must divide d_model."""
    d_model: int = field(default=128, metadata={"min": 8})
    """Hidden size."""
    d_ff: int = field(default=0, metadata={"min": 0})
    """MLP inner size; 0 means 4 * d_model."""
    max_seq_len: int = field(default=256, metadata={"min": 1})
    """Number of learned positions (longest sequence the model accepts)."""
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Dropout on embeddings, attention probabilities and residual branches."""
    bias: bool = True
    """gpt: biases in the attention/MLP linear layers and the LayerNorms, as GPT-2 has them.
    False drops them (nanoGPT's bias=False): ~4-5% faster steps on CPU; an HF export then
    writes zero biases, which is the same function."""
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    """gpt: the MLP's GELU: GPT-2's tanh approximation (HF `gelu_new`), or the exact erf GELU
    (nanoGPT's nn.GELU, HF `gelu`). torch's CPU kernel of the tanh form is the slower: an MLP
    of 768 x 512 activations took 2.0 ms forward + backward vs 1.4 ms exact (fp32; bf16 2.2
    vs 1.0 ms). Exported as the matching HF activation (same logits)."""
    layer_norm_eps: float = field(default=1e-5, metadata={"min": 0.0})
    """LayerNorm epsilon (GPT-2 1e-5, BERT 1e-12)."""
    type_vocab_size: int = field(default=2, metadata={"min": 1})
    """BERT token-type (segment) vocabulary size."""
    pad_id: int = field(default=0, metadata={"min": 0})
    """Padding token id."""
    num_labels: int = field(default=2, metadata={"min": 1})
    """Classes of the BERT sequence-classification head."""
    n_decoder_layer: int = field(default=0, metadata={"min": 0})
    """seq2seq: decoder blocks; 0 means n_layer (n_layer counts the encoder's)."""
    norm_position: Literal["post", "pre"] = "post"
    """seq2seq: post-LN blocks (the original Transformer, Marian) or pre-LN blocks with a final
    LayerNorm after each stack (more stable when deep)."""
    share_embeddings: bool = True
    """seq2seq: one token embedding for source, target and output (one joint vocabulary);
    False gives the encoder its own (the decoder's stays tied to the output projection)."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_head != 0:
            raise ValueError(f"n_head={self.n_head} must divide d_model={self.d_model}")
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} must be < vocab_size={self.vocab_size}")

    @property
    def ff_dim(self) -> int:
        """The MLP inner size actually used."""
        return self.d_ff or 4 * self.d_model

    @property
    def decoder_layers(self) -> int:
        """seq2seq: the decoder blocks actually used."""
        return self.n_decoder_layer or self.n_layer

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def preset_values(cls, name: str) -> dict:
        """Field values of a preset; KeyError naming the allowed ones if unknown."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset '{name}' (allowed: {', '.join(PRESETS)})")
        return {**PRESETS[name], "preset": name}

    @classmethod
    def from_saved(cls, values: dict) -> "ModelConfig":
        """From a saved config (model.json, run_model.json): keys of retired fields are
        dropped, so weights written by older versions still load; other unknown keys fail."""
        return cls(**{k: v for k, v in values.items() if k not in RETIRED_FIELDS})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """Build directly from a preset (outside the YAML loader)."""
        return cls(**{**cls.preset_values(name), **overrides})
