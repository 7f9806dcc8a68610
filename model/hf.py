"""Hugging Face interchange, local directories only (no hub, no transformers import).

Reads and writes the layout `transformers` uses: config.json + model.safetensors (or a
sharded model.safetensors.index.json). GPT maps to GPT2LMHeadModel, BertForMaskedLM to
BertForMaskedLM; exported directories load with `from_pretrained` and no trellis code.
Loading reads safetensors and JSON only; weights that exist only as a pickle
(pytorch_model.bin) are refused with UnsafeWeightsError, never unpickled.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from trellis.model.bert import Bert, BertForMaskedLM
from trellis.model.build import build_model
from trellis.model.config import ModelConfig
from trellis.model.gpt import GPT
from trellis.model.hf_names import hf_ignored, name_table, normalize_hf_key, tied

_SPM_FILE = "tokenizer.model"  # = data_pipeline.tokenizer.TOKENIZER_FILE (model/ imports no data code)

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_GPT2_GELUS = (*_TANH_GELUS, "gelu")  # what config_from_hf accepts; "gelu" is the exact one


def hf_config(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
              architecture: str | None = None) -> dict:
    """config.json content for GPT2LMHeadModel (arch gpt) or BertForMaskedLM (arch bert)."""
    if cfg.arch == "gpt":
        return {
            "architectures": [architecture or "GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.d_ff or None,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": cfg.layer_norm_eps, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": cfg.pad_id,
        }
    return {
        "architectures": [architecture or "BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ff_dim, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02, "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_id, "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "bos_token_id": bos_id, "eos_token_id": eos_id,
    }


def _require(hf: dict, key: str, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"HF config key '{key}'={hf.get(key)!r} is not supported (need {want})")


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a GPT-2 or BERT config.json dict."""
    mtype = hf.get("model_type")
    if mtype == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        _require(hf, "activation_function", act in _GPT2_GELUS, " or ".join(_GPT2_GELUS))
        _require(hf, "scale_attn_by_inverse_layer_idx",
                 not hf.get("scale_attn_by_inverse_layer_idx", False), "false")
        _require(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), "true")
        _require(hf, "tie_word_embeddings", hf.get("tie_word_embeddings", True), "true")
        d = hf["n_embd"]
        inner = hf.get("n_inner")
        return ModelConfig(
            arch="gpt", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            d_model=d, d_ff=0 if inner in (None, 4 * d) else inner,
            max_seq_len=hf["n_positions"], dropout=float(hf.get("resid_pdrop", 0.1)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation="gelu" if act == "gelu" else "gelu_tanh",
            pad_id=hf.get("pad_token_id") or 0)
    if mtype == "bert":
        _require(hf, "hidden_act", hf.get("hidden_act", "gelu") == "gelu", "gelu")
        _require(hf, "position_embedding_type",
                 hf.get("position_embedding_type", "absolute") == "absolute", "absolute")
        _require(hf, "is_decoder", not hf.get("is_decoder", False), "false")
        d = hf["hidden_size"]
        inner = hf.get("intermediate_size", 4 * d)
        return ModelConfig(
            arch="bert", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], d_model=d, d_ff=0 if inner == 4 * d else inner,
            max_seq_len=hf["max_position_embeddings"],
            dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            type_vocab_size=hf.get("type_vocab_size", 2), pad_id=hf.get("pad_token_id") or 0,
            num_labels=len(hf.get("id2label") or {0: 0, 1: 1}))
    raise ValueError(f"HF config key 'model_type'={mtype!r} is not supported (need gpt2 or bert)")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig
                     ) -> dict[str, torch.Tensor]:
    """trellis names -> HF names. Conv1D weights transposed; tied weights written once (so
    safetensors, which refuses shared storage, accepts the result). A bare Bert trunk's
    state dict (no "bert." prefix) is accepted. Unknown keys raise."""
    if cfg.arch == "bert" and "tok_emb.weight" in state_dict:
        state_dict = {"bert." + k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    known = set(tied(cfg))
    for ours, theirs, transpose in name_table(cfg):
        known.add(ours)
        if ours in state_dict:
            t = state_dict[ours].detach()
            out[theirs] = (t.t() if transpose else t).contiguous()
        elif cfg.arch == "gpt" and not cfg.bias and ours.endswith(".bias"):
            # model.bias=False: GPT-2 with zero biases is the same function
            w = state_dict[ours[:-len("bias")] + "weight"]  # (out, in) or LayerNorm's (C,)
            out[theirs] = w.new_zeros(w.shape[0])
    unknown = [k for k in state_dict if k not in known]
    if unknown:
        raise ValueError(f"to_hf_state_dict: no HF name for '{unknown[0]}' "
                         f"({len(unknown)} unknown keys)")
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig
                       ) -> dict[str, torch.Tensor]:
    """HF names -> trellis names (tied aliases filled in). Unknown keys raise."""
    reverse = {theirs: (ours, tr) for ours, theirs, tr in name_table(cfg)}
    ignored = hf_ignored(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, t in hf_state.items():
        k = normalize_hf_key(key, cfg)
        if k in reverse:
            ours, transpose = reverse[k]
            out[ours] = t.t().contiguous() if transpose else t
        elif not ignored.match(k):
            raise ValueError(f"from_hf_state_dict: unexpected HF weight '{key}' for "
                             f"arch '{cfg.arch}'")
    for alias, source in tied(cfg).items():
        if source in out:
            out[alias] = out[source]
    return out


class UnsafeWeightsError(ValueError):
    """A model directory whose weights exist only as pickles (pytorch_model.bin, *.pt, ...),
    which trellis never loads: unpickling a file can run code it names."""


# Weight files that are pickles (or other formats trellis does not read); named in the error.
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except SafetensorError as e:  # e.g. a pickle renamed .safetensors; its message has no path
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The directory's safetensors weights. Never unpickles: a directory with only
    pytorch_model.bin (or another pickle) raises UnsafeWeightsError naming it."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        state: dict[str, torch.Tensor] = {}
        for f in files:
            # Shards are safetensors files inside this directory, nothing else.
            if not isinstance(f, str) or Path(f).name != f or not f.endswith(".safetensors"):
                raise ValueError(f"{index}: shard {f!r} is not a .safetensors file in {path}")
            state.update(_load_safetensors(path / f))
        return state
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLED_SUFFIXES)
    if pickled:
        raise UnsafeWeightsError(
            f"{path}: weights only in {pickled[0]}, a pickle, which trellis does not load "
            f"(unpickling can run code); convert it to model.safetensors with a tool you trust")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _allowed_missing(key: str, hf_state_has_head: bool) -> bool:
    # HF BertForMaskedLM has no pooler; a BertModel checkpoint has no MLM head. Both keep
    # their fresh initialisation.
    return key.startswith("bert.pooler.") or (key.startswith("head.") and not hf_state_has_head)


def load_hf_pretrained(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Load a local HF directory: GPT-2 -> GPT; BertForMaskedLM/BertModel -> BertForMaskedLM.
    The model is returned in eval mode (as transformers does)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    model = build_model(cfg, "lm" if cfg.arch == "gpt" else "mlm")
    state = from_hf_state_dict(_read_weights(path), cfg)
    has_head = "head.dense.weight" in state  # the tied decoder alias is always filled
    own = model.state_dict()
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: weight '{k}' has shape {tuple(t.shape)}, config "
                             f"expects {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state and not _allowed_missing(k, has_head)]
    if missing:
        raise ValueError(f"{path}: missing weight '{missing[0]}' ({len(missing)} missing)")
    model.load_state_dict(state, strict=False)
    return model.eval(), cfg


def _architecture(model: nn.Module) -> str:
    if isinstance(model, GPT):
        return "GPT2LMHeadModel"
    if isinstance(model, BertForMaskedLM):
        return "BertForMaskedLM"
    if isinstance(model, Bert):
        return "BertModel"
    raise TypeError(f"save_hf_pretrained: no HF architecture for {type(model).__name__} "
                    f"(need GPT, BertForMaskedLM or Bert)")


def save_hf_pretrained(model: nn.Module, cfg: ModelConfig, out_dir: str | Path,
                       tokenizer_file: str | None = None, bos_id: int | None = None,
                       eos_id: int | None = None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer file) to out_dir.
    A SentencePiece model is copied as tokenizer.model; other files keep their name (the
    tokenizer.json transformers reads is written by data code: data_pipeline/hf_tokenizer.py).

    bos_id / eos_id go into config.json (and so into transformers' generation config). Pass a
    bos_id only when the model was trained with that token starting its sequences: trellis's
    data never prepends BOS, so its exports leave it None ("bos_token_id": null), and a BOS
    that a user or generate() added would be a token the model never saw."""
    arch = _architecture(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = to_hf_state_dict(model.state_dict(), cfg)
    conf = hf_config(cfg, bos_id=bos_id, eos_id=eos_id, architecture=arch)
    return write_hf_dir(out, weights, conf, tokenizer_file)


def write_hf_dir(out: Path, weights: dict, conf: dict, tokenizer_file: str | Path | None) -> Path:
    """model.safetensors (written beside, then renamed), config.json with the weights' dtype,
    and the tokenizer file, into an existing folder `out`."""
    conf["dtype"] = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    tmp = out / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    if tokenizer_file is not None:
        src = Path(tokenizer_file)
        if not src.is_file():
            raise FileNotFoundError(f"tokenizer file {src} does not exist")
        shutil.copyfile(src, out / (_SPM_FILE if src.suffix == ".model" else src.name))
    return out
