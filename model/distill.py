"""DistilBERT student initialisation: half the teacher's depth, every other layer copied."""
from __future__ import annotations

import dataclasses

from trellis.model.bert import BertForMaskedLM
from trellis.model.config import ModelConfig


def student_config(teacher_cfg: ModelConfig, dropout: float | None = None) -> ModelConfig:
    """The teacher's config with half the layers (at least one)."""
    changes = {"n_layer": max(1, teacher_cfg.n_layer // 2), "preset": ""}
    if dropout is not None:
        changes["dropout"] = dropout
    return dataclasses.replace(teacher_cfg, **changes)


def init_student_from_teacher(teacher: BertForMaskedLM, teacher_cfg: ModelConfig,
                              dropout: float | None = None) -> BertForMaskedLM:
    """Student = teacher with layers 0, 2, 4, ... (Sanh et al. 2019: 'taking one layer out of
    two'); embeddings, MLM head and pooler copied as they are."""
    if not isinstance(teacher, BertForMaskedLM):
        raise ValueError(f"distillation teacher must be a BERT masked LM, got {type(teacher).__name__}")
    cfg = student_config(teacher_cfg, dropout)
    student = BertForMaskedLM(cfg)
    src = teacher.state_dict()
    dst = {}
    for name in student.state_dict():
        if name.startswith("bert.layers."):
            idx, rest = name[len("bert.layers."):].split(".", 1)
            dst[name] = src[f"bert.layers.{2 * int(idx)}.{rest}"]
        else:
            dst[name] = src[name]
    student.load_state_dict(dst)
    return student

