"""Hugging Face MarianMTModel interchange for the post-LN encoder-decoder (model/seq2seq.py),
local directories only (no hub, no transformers import).

Marian is the original Transformer as Hugging Face builds it: post-LN, sinusoidal positions
(sines then cosines), embeddings scaled by sqrt(d_model), tied output projection, a fixed
`final_logits_bias`. trellis names are Marian's without the "model." prefix; Marian's shared
embedding (`model.shared`) is written once, its position tables never (transformers rebuilds
them). A pre-LN model has no Marian equivalent and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from trellis.model.config import ModelConfig
from trellis.model.hf import _read_weights, write_hf_dir
from trellis.model.seq2seq import Seq2Seq

_OURS_ONLY = ("lm_head.weight",)  # tied to the target embedding: written once, as that
_IGNORED = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


def marian_config(cfg: ModelConfig, bos_id: int = 2, eos_id: int = 3) -> dict:
    """config.json content for MarianMTModel; the decoder starts from bos_id."""
    if cfg.arch != "seq2seq" or cfg.norm_position != "post":
        raise ValueError(f"MarianMTModel needs a post-LN seq2seq model (arch "
                         f"'{cfg.arch}', norm_position '{cfg.norm_position}')")
    if cfg.layer_norm_eps != 1e-5:
        raise ValueError(f"MarianMTModel's LayerNorms use eps 1e-5, the model "
                         f"{cfg.layer_norm_eps}")
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian",
        "vocab_size": cfg.vocab_size, "decoder_vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len, "d_model": cfg.d_model,
        "encoder_layers": cfg.n_layer, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.ff_dim, "decoder_ffn_dim": cfg.ff_dim,
        "activation_function": "relu", "scale_embedding": True,
        "dropout": cfg.dropout, "attention_dropout": cfg.dropout, "activation_dropout": 0.0,
        "init_std": 0.02, "is_encoder_decoder": True,
        "share_encoder_decoder_embeddings": cfg.share_embeddings, "tie_word_embeddings": True,
        "pad_token_id": cfg.pad_id, "eos_token_id": eos_id, "forced_eos_token_id": eos_id,
        "decoder_start_token_id": bos_id, "bos_token_id": None,
    }


def _require(hf: dict, key: str, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"HF config key '{key}'={hf.get(key)!r} is not supported (need {want})")


def config_from_marian(hf: dict) -> ModelConfig:
    """ModelConfig (arch seq2seq, post-LN) from a MarianMTModel config.json dict."""
    _require(hf, "model_type", hf.get("model_type") == "marian", "marian")
    _require(hf, "activation_function", hf.get("activation_function") == "relu", "relu")
    _require(hf, "scale_embedding", hf.get("scale_embedding") is True, "true")
    _require(hf, "tie_word_embeddings", hf.get("tie_word_embeddings", True), "true")
    V = hf["vocab_size"]
    _require(hf, "decoder_vocab_size", hf.get("decoder_vocab_size") in (None, V), f"{V}")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"),
                 ("encoder_ffn_dim", "decoder_ffn_dim")):
        _require(hf, b, hf[a] == hf[b], f"equal to {a} {hf[a]}")
    d, ff = hf["d_model"], hf["encoder_ffn_dim"]
    return ModelConfig(
        arch="seq2seq", vocab_size=V, n_layer=hf["encoder_layers"],
        n_decoder_layer=hf["decoder_layers"], n_head=hf["encoder_attention_heads"],
        d_model=d, d_ff=0 if ff == 4 * d else ff, max_seq_len=hf["max_position_embeddings"],
        dropout=float(hf.get("dropout", 0.1)), layer_norm_eps=1e-5,
        pad_id=hf.get("pad_token_id") or 0, norm_position="post",
        share_embeddings=bool(hf.get("share_encoder_decoder_embeddings", True)))


def to_marian_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig
                         ) -> dict[str, torch.Tensor]:
    """trellis Seq2Seq names -> MarianMTModel names; tied tensors written once."""
    emb = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k in _OURS_ONLY or (cfg.share_embeddings and k in emb):
            continue
        out[k if k == "final_logits_bias" else "model." + k] = t.detach().contiguous()
    if cfg.share_embeddings:
        out["model.shared.weight"] = state["decoder.embed_tokens.weight"].detach().contiguous()
    return out


def from_marian_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig
                           ) -> dict[str, torch.Tensor]:
    """MarianMTModel names -> trellis names (tied aliases filled in)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in hf_state.items():
        if key in _IGNORED or key == "lm_head.weight":  # positions are rebuilt; head is tied
            continue
        if key == "model.shared.weight":
            out["encoder.embed_tokens.weight"] = out["decoder.embed_tokens.weight"] = t
        elif key == "final_logits_bias":
            out[key] = t
        elif key.startswith("model."):
            out.setdefault(key[len("model."):], t)
        else:
            raise ValueError(f"from_marian_state_dict: unexpected HF weight '{key}'")
    if cfg.share_embeddings and "decoder.embed_tokens.weight" in out:
        out["encoder.embed_tokens.weight"] = out["decoder.embed_tokens.weight"]
    if "decoder.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["decoder.embed_tokens.weight"]
    return out


def load_marian_pretrained(path: str | Path) -> tuple[Seq2Seq, ModelConfig]:
    """A local MarianMTModel directory (config.json + safetensors) -> Seq2Seq in eval mode."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist")
    cfg = config_from_marian(json.loads(cfg_file.read_text()))
    model = Seq2Seq(cfg)
    state = from_marian_state_dict(_read_weights(path), cfg)
    state.setdefault("final_logits_bias", torch.zeros(1, cfg.vocab_size))
    own = model.state_dict()
    for k, t in state.items():
        if k not in own:
            raise ValueError(f"{path}: unexpected weight '{k}'")
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: weight '{k}' has shape {tuple(t.shape)}, config "
                             f"expects {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{path}: missing weight '{missing[0]}' ({len(missing)} missing)")
    model.load_state_dict(state)
    return model.eval(), cfg


def save_marian_pretrained(model: nn.Module, cfg: ModelConfig, out_dir: str | Path,
                           tokenizer_file: str | None = None, bos_id: int = 2,
                           eos_id: int = 3) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer file) that MarianMTModel's
    from_pretrained loads with no trellis code."""
    if not isinstance(model, Seq2Seq):
        raise TypeError(f"save_marian_pretrained needs a Seq2Seq, got {type(model).__name__}")
    conf = marian_config(cfg, bos_id, eos_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_hf_dir(out, to_marian_state_dict(model.state_dict(), cfg), conf, tokenizer_file)
