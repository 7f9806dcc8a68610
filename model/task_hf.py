"""Export a fine-tuned TaskModel as a transformers directory (config.json + model.safetensors):
GPT2ForSequenceClassification, BertForSequenceClassification, GPT2ForQuestionAnswering or
BertForQuestionAnswering. The trunk goes through the GPT-2 / BERT name table (model/hf.py);
the head keeps its name (score / classifier / qa_outputs). No transformers import.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trellis.model.hf import hf_config, to_hf_state_dict
from trellis.model.task_heads import TaskModel

_ARCH = {("gpt", "classification"): "GPT2ForSequenceClassification",
         ("gpt", "regression"): "GPT2ForSequenceClassification",
         ("gpt", "qa"): "GPT2ForQuestionAnswering",
         ("bert", "classification"): "BertForSequenceClassification",
         ("bert", "regression"): "BertForSequenceClassification",
         ("bert", "qa"): "BertForQuestionAnswering"}


def hf_task_architecture(arch: str, task: str) -> str:
    return _ARCH[(arch, task)]


def task_hf_state_dict(model: TaskModel) -> dict[str, torch.Tensor]:
    """HF names of every weight: trunk via the name table, head names unchanged."""
    state = model.state_dict()
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    if model.arch == "gpt":
        trunk.pop("lm_head.weight", None)  # tied to wte; the HF task models have no LM head
    out = to_hf_state_dict(trunk, model.config)
    if model.arch == "gpt":  # the name table says GPT2LMHeadModel's "transformer." prefix
        out = {k: v for k, v in out.items() if k.startswith("transformer.")}
    if model.task == "qa" and model.arch == "bert":  # BertForQuestionAnswering has no pooler
        out = {k: v for k, v in out.items() if not k.startswith("bert.pooler.")}
    for k, v in state.items():
        if not k.startswith("trunk."):
            out[k] = v.detach().contiguous()
    return out


def task_hf_config(model: TaskModel, labels: list[str] | None = None,
                   eos_id: int | None = None) -> dict:
    """config.json: the trunk's GPT-2/BERT config plus the head's (labels, problem type)."""
    conf = hf_config(model.config, eos_id=eos_id,
                     architecture=hf_task_architecture(model.arch, model.task))
    if model.task == "qa":
        conf["num_labels"] = 2
        return conf
    names = labels or [f"LABEL_{i}" for i in range(model.num_labels)]
    conf["id2label"] = {str(i): n for i, n in enumerate(names)}
    conf["label2id"] = {n: i for i, n in enumerate(names)}
    conf["problem_type"] = ("regression" if model.task == "regression"
                            else "single_label_classification")
    return conf


def save_hf_task(model: TaskModel, out_dir: str | Path, labels: list[str] | None = None,
                 eos_id: int | None = None) -> Path:
    """Write config.json + model.safetensors of `model` to out_dir (atomic weight write).
    GPT classifiers read the last token that is not pad_token_id (config.json's pad id), as
    trellis reads the last token of its attention mask: pad only on the right, never inside."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.float().cpu() for k, v in task_hf_state_dict(model).items()}
    conf = task_hf_config(model, labels, eos_id) | {"dtype": "float32"}
    tmp = out / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return out
