"""Task heads for fine-tuning a pretrained trunk (GPT-1 / BERT style transfer).

* classification / regression: one vector per sequence -> num_labels logits (regression: 1).
  BERT reads the pooled [CLS] (tanh pooler, dropout, classifier); GPT reads the hidden state
  of the last real token (GPT-1's "extract" token) through a bias-free `score` layer.
* qa (extractive): start and end logits for every token, `qa_outputs` (C -> 2).

Parameter names follow transformers' GPT2ForSequenceClassification / BertForSequenceClassification
/ GPT2ForQuestionAnswering / BertForQuestionAnswering, so export is the trunk's name table plus
the head's names unchanged (model/task_hf.py).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from trellis.model.config import ModelConfig
from trellis.model.heads import last_token_index
from trellis.model.layers import Linear

TaskKind = Literal["classification", "regression", "qa"]
TASKS = ("classification", "regression", "qa")


def head_outputs(task: str, num_labels: int) -> int:
    """Output units of the head: classes, 1 for regression, 2 (start, end) for QA."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}' (allowed: {', '.join(TASKS)})")
    return {"classification": num_labels, "regression": 1, "qa": 2}[task]


class TaskModel(nn.Module):
    """trunk (GPT or Bert) + a task head. forward -> (B, n) for classification/regression,
    (B, T, 2) start/end logits for qa."""

    def __init__(self, trunk: nn.Module, task: str, num_labels: int = 2):
        super().__init__()
        cfg: ModelConfig = trunk.config
        self.config, self.task, self.arch = cfg, task, cfg.arch
        self.num_labels = head_outputs(task, num_labels)
        self.trunk = trunk
        d = cfg.d_model
        if task == "qa":
            self.qa_outputs = Linear(d, 2)
        elif cfg.arch == "gpt":
            self.score = Linear(d, self.num_labels, bias=False)
        else:
            self.drop = nn.Dropout(cfg.dropout)
            self.classifier = Linear(d, self.num_labels)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.arch == "gpt":  # GPT marks segments with delimiter tokens, not type ids
            return self.trunk.hidden_states(input_ids, attention_mask)
        return self.trunk.hidden_states(input_ids, attention_mask, token_type_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        if self.task == "qa":
            return self.qa_outputs(h)  # (B, T, 2)
        if self.arch == "bert":
            return self.classifier(self.drop(self.trunk.pool(h)))  # (B, n)
        B, T = input_ids.shape
        idx = last_token_index(attention_mask, B, T, input_ids.device)  # (B,)
        return self.score(h[torch.arange(B, device=h.device), idx])  # (B, n)


def trunk_of(module: nn.Module) -> nn.Module:
    """The bare GPT / Bert inside a pretrained module (GPT is its own trunk; an MLM model's
    trunk is `.bert`; score/value models keep theirs in `.trunk`)."""
    for attr in ("trunk", "bert"):
        if hasattr(module, attr) and isinstance(getattr(module, attr), nn.Module):
            return getattr(module, attr)
    return module


def build_task_model(cfg: ModelConfig, task: str, num_labels: int) -> TaskModel:
    """A fresh TaskModel (random trunk): for loading a fine-tuned checkpoint into."""
    from trellis.model.build import build_trunk
    return TaskModel(build_trunk(cfg), task, num_labels)


def best_spans(logits: torch.Tensor, mask: torch.Tensor, max_answer_len: int = 30
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, 2) start/end logits, (B, T) mask -> (start, end) (B,) each: the pair with the
    highest start + end logit among start <= end < start + max_answer_len on real tokens."""
    B, T, _ = logits.shape
    s, e = logits[..., 0].float(), logits[..., 1].float()  # (B, T)
    score = s[:, :, None] + e[:, None, :]  # (B, T, T): [b, i, j] = start i, end j
    i = torch.arange(T, device=logits.device)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_len)  # (T, T)
    m = mask.bool()
    ok = ok[None] & m[:, :, None] & m[:, None, :]  # (B, T, T)
    flat = score.masked_fill(~ok, float("-inf")).view(B, -1).argmax(-1)  # (B,)
    return flat // T, flat % T
