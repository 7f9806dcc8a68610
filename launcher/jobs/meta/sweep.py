"""The fine-tuning half of `trellis meta`: SFT of the pretrained model on the first n labelled
rows of one held-out task, for each n, scored like the in-context runs.

A row becomes a demonstration {prompt, response} whose prompt is the task's 0-shot prompt
(instruction line + input, built by `trellis eval`'s own `build_prompt`) and whose response
is the answer, so "fine-tuned, 0 examples in the prompt" and "pretrained, k examples in the
prompt" are scored on the same evaluation rows by the same exact match."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from trellis.data_pipeline import eval_tasks as et
from trellis.data_pipeline.meta_episodes import write_jsonl, write_task_yaml
from trellis.launcher.config_loader import from_dict
from trellis.launcher.jobs.finetune.config import SFTJobConfig
from trellis.launcher.jobs.lmeval.config import EvalJobConfig
from trellis.launcher.jobs.meta.config import MetaDemoConfig
from trellis.launcher.jobs.pipeline import stages


def train_subset_task(task_yaml: Path, rows: int) -> Path:
    """A copy of the task whose evaluation rows are the first `rows` labelled rows (train
    accuracy), next to the task's own files."""
    spec = et.load_task(task_yaml)
    pool = et.read_jsonl(spec.fewshot_split)[:rows]
    name = f"{spec.name}_train{rows}"
    write_jsonl(task_yaml.parent / f"{name}.jsonl", [r for _, r in pool])
    raw = yaml.safe_load(task_yaml.read_text()) | {"task": name, "dataset": f"{name}.jsonl",
                                                     "num_fewshot": [0]}
    return write_task_yaml(task_yaml.parent / f"{name}.yaml", raw)


def write_demonstrations(task_yaml: Path, out: Path, n: int) -> tuple[Path, Path]:
    """(first n labelled rows, the evaluation rows) as SFT demonstrations under `out`."""
    spec = et.load_task(task_yaml)

    def demos(docs: list[et.Doc]) -> list[dict]:
        return [{"prompt": et.build_prompt(spec, d, []), "response": d.refs[0]} for d in docs]

    train = write_jsonl(out / f"train_{n}.jsonl", demos(et.load_docs(spec, spec.fewshot_split)[:n]))
    val = write_jsonl(out / "val.jsonl", demos(et.load_docs(spec, spec.dataset)))
    return train, val


def sft_job(cfg: MetaDemoConfig, run_dir: Path, init: Path, train: Path, val: Path,
            n: int) -> SFTJobConfig:
    """The pipeline's SFT stage with the evaluation rows as validation set, evaluated every
    finetune.eval_every steps (and the train loss logged as often): the curves."""
    mb = min(cfg.sft.micro_batch_size, n)
    job = stages.sft_config(dataclasses.replace(cfg, sft=dataclasses.replace(
        cfg.sft, micro_batch_size=mb)), run_dir, init, train)
    every = cfg.finetune.eval_every
    n_val = sum(1 for _ in et.read_jsonl(val))
    job = dataclasses.replace(
        job, data=dataclasses.replace(job.data, val=str(val)),
        train=dataclasses.replace(job.train, log_every=every, eval_every=every,
                                  eval_batches=math.ceil(n_val / mb)))
    return from_dict(SFTJobConfig, dataclasses.asdict(job))


def eval_job(cfg: MetaDemoConfig, run_dir: Path, model: Path, tasks: list[Path],
             shots: list[int]) -> EvalJobConfig:
    """`trellis eval` of `model` on `tasks`; empty shots = each task's num_fewshot."""
    job = EvalJobConfig(run_dir=str(run_dir), model=str(model), tasks=[str(t) for t in tasks],
                        shots=shots, seed=cfg.eval_seed, batch_size=cfg.eval_batch_size)
    job = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel,
                                                                cpus_per_worker=0.8))
    return from_dict(EvalJobConfig, dataclasses.asdict(job))


def curves(run_dir: Path) -> dict[str, list[float]]:
    """The run's train loss (each logged step's batch) and validation loss by step."""
    from trellis.launcher.commands.plot import read_metrics

    train = read_metrics(run_dir / "metrics" / "train.csv")
    val = read_metrics(run_dir / "metrics" / "eval.csv")
    return {"train_step": train["step"], "train_loss": train["loss"],
            "val_step": val["step"], "val_loss": val["loss"]}


def exact(results: dict[str, Any], task: str) -> float:
    return results[task]["0"]["exact_match"]
