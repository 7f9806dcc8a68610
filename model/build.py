"""build_model: ModelConfig + head name -> nn.Module; activation-checkpointing switch."""
from __future__ import annotations

from typing import Literal

from torch import nn

from trellis.model.bert import Bert, BertForMaskedLM, BertForSequenceClassification
from trellis.model.config import ModelConfig
from trellis.model.gpt import GPT
from trellis.model.heads import ScoreModel, ValueModel
from trellis.model.seq2seq import Seq2Seq

Head = Literal["lm", "mlm", "cls", "value", "score", "seq2seq"]
_HEAD_ARCH = {"lm": "gpt", "mlm": "bert", "cls": "bert", "seq2seq": "seq2seq"}


def build_trunk(cfg: ModelConfig) -> nn.Module:
    """The bare trunk: GPT (its tied LM head adds no parameters) or Bert."""
    return GPT(cfg) if cfg.arch == "gpt" else Bert(cfg)


def build_model(cfg: ModelConfig, head: Head = "lm") -> nn.Module:
    """gpt+lm -> GPT; bert+mlm -> BertForMaskedLM; bert+cls -> BertForSequenceClassification;
    value/score -> ValueModel/ScoreModel around a fresh trunk of either arch;
    seq2seq+seq2seq -> Seq2Seq (encoder-decoder with its tied output projection)."""
    need = _HEAD_ARCH.get(head)
    if need is not None and cfg.arch != need:
        raise ValueError(f"head '{head}' needs arch '{need}', got arch '{cfg.arch}'")
    if head == "lm":
        return GPT(cfg)
    if head == "mlm":
        return BertForMaskedLM(cfg)
    if head == "cls":
        return BertForSequenceClassification(cfg)
    if head == "value":
        return ValueModel(build_trunk(cfg))
    if head == "score":
        return ScoreModel(build_trunk(cfg))
    if head == "seq2seq":
        return Seq2Seq(cfg)
    raise ValueError(f"unknown head '{head}' (allowed: lm, mlm, cls, value, score, seq2seq)")


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Turn block recomputation on/off in every trunk inside `module` (GPT/Bert blocks then
    run under torch.utils.checkpoint, use_reentrant=False, in training mode)."""
    trunks = [m for m in module.modules() if hasattr(m, "activation_checkpointing")]
    if not trunks:
        raise ValueError(f"{type(module).__name__} contains no GPT/Bert trunk to checkpoint")
    for m in trunks:
        m.activation_checkpointing = bool(enabled)
