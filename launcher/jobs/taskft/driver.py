"""`trellis finetune`: task fine-tuning (GPT-1 / BERT transfer) on the shared training loop.

A pretrained GPT or BERT (a pretrain run, trellis weights, or a local HF GPT-2 / BERT dir)
gets a fresh head: sequence classification or regression (BERT's pooled [CLS], GPT's last
token), sentence pairs, or extractive QA (start / end). Held-out metrics every
train.eval_every steps; the best evaluation's weights are kept in RUN_DIR/best and, at the
end, exported to RUN_DIR/hf as the transformers ...ForSequenceClassification /
...ForQuestionAnswering model (early stopping: early_stop.patience).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.driver_loop import GroupSession, LoopSpec, run_loop
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, resolve_config
from trellis.launcher.jobs.taskft.config import TaskFTJobConfig

BEST, BEST_JSON, HF_DIR = "best", "best.json", "hf"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)


def _split(cfg: TaskFTJobConfig, rows: list) -> tuple[list, list]:
    from trellis.data_pipeline.row_stream import split_rows
    tr, va = split_rows(len(rows), cfg.data.val_fraction, cfg.data.seed)
    return [rows[i] for i in tr], [rows[i] for i in va]


def prepare(cfg: TaskFTJobConfig) -> dict[str, Any]:
    """Initial weights, tokenizer, and the encoded train / val tables (once per run dir)."""
    from trellis.data_pipeline import task_rows as tr
    from trellis.launcher.jobs.finetune.driver import init_weights
    from trellis.model.io import read_meta

    cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init, tok = init_weights(cfg.init_from, run_dir)
    model = read_meta(init)["model"]
    if cfg.data.max_len > model["max_seq_len"]:
        raise ConfigError(f"config key 'data.max_len': {cfg.data.max_len} exceeds the model's "
                          f"max_seq_len {model['max_seq_len']}")
    f = cfg.task
    train = tr.read_task_rows(cfg.data.train, f)
    val = tr.read_task_rows(cfg.data.val, f) if cfg.data.val else None
    if val is None:
        train, val = _split(cfg, train)
    if cfg.data.max_train_rows:
        train = train[:cfg.data.max_train_rows]
    names = tr.label_names(train, f) if f.kind == "classification" else []
    if f.kind == "classification" and len(names) < 2:
        raise ConfigError(f"config key 'task.labels': a classifier needs at least 2 labels, "
                          f"found {names} in '{cfg.data.train}'")
    world, mb = cfg.parallel.num_workers, cfg.parallel.micro_batch_size
    if len(train) // world < mb:
        raise ConfigError(f"config key 'data.train': {len(train)} training rows are too few "
                          f"for {world} ranks x micro-batch {mb} (parallel.micro_batch_size)")
    if not val:
        raise ConfigError("config key 'data.val_fraction': no held-out rows (set data.val or "
                          "a larger data.val_fraction)")
    enc = dict(f=f, tok=tok, arch=model["arch"], max_len=cfg.data.max_len,
               truncate=cfg.data.truncate, names=names)
    paths = {"train_path": tr.write_table(tr.encode_rows(train, **enc), run_dir / "data" / "train.arrow"),
             "val_path": tr.write_table(tr.encode_rows(val, **enc), run_dir / "data" / "val.arrow")}
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    print(f"finetune: {model['arch']} {f.kind} on {len(train)} rows, {len(val)} held out"
          + (f"; labels {names}" if names else ""), flush=True)
    return {"cfg": dataclasses.asdict(cfg), "init_dir": str(init), "labels": names,
            "run_dir": str(run_dir), **{k: str(v) for k, v in paths.items()}}


class TaskSession(GroupSession):
    """The one-group session plus model selection: the best held-out evaluation's weights go
    to RUN_DIR/best; `should_stop` ends the run after `patience` evaluations without gain."""

    def __init__(self, cfg: TaskFTJobConfig, *args: Any, **kw: Any):
        super().__init__(cfg, *args, **kw)
        self.key = cfg.select_metric
        self.sign = -1.0 if self.key == "loss" else 1.0  # larger is better after the sign
        best = self.run_dir / BEST_JSON
        state = json.loads(best.read_text()) if self.resume and best.is_file() else {}
        self.best = state.get("value", -math.inf)
        self.best_step = state.get("step", 0)
        self.bad = state.get("bad", 0)

    def evaluate(self, step: int) -> dict[str, float]:
        if getattr(self, "_last", (None,))[0] == step:  # finish() after an early stop
            return self._last[1]
        ev = super().evaluate(step)
        self._last = (step, ev)
        value = self.sign * ev[self.key]
        if value > self.best + self.cfg.early_stop.min_delta or self.best_step == 0:
            self.best, self.best_step, self.bad = value, step, 0
            self.group.call("save_best", str(self.run_dir / BEST), step, ev)
        else:
            self.bad += 1
        (self.run_dir / BEST_JSON).write_text(json.dumps(
            {"value": self.best, "step": self.best_step, "bad": self.bad, "metric": self.key}))
        return ev

    def should_stop(self) -> str | None:
        p = self.cfg.early_stop.patience
        if p and self.bad >= p:
            return (f"held-out {self.key} did not improve for {self.bad} evaluations "
                    f"(best {self.sign * self.best:.4f} at step {self.best_step})")
        return None

    def finish(self, last: dict[str, Any]) -> dict[str, Any]:
        out = super().finish(last)
        return out | {"best_step": self.best_step, f"best_{self.key}": self.sign * self.best}


def export_best(run_dir: Path) -> Path:
    """RUN_DIR/best -> RUN_DIR/hf: the transformers task model, tokenizer files, labels."""
    from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer
    from trellis.launcher.jobs.export.driver import write_tokenizer_files
    from trellis.launcher.jobs.taskft.worker import load_task_model
    from trellis.model.task_hf import save_hf_task

    model, meta = load_task_model(run_dir / BEST)
    tok = run_dir / TOKENIZER_FILE
    out = save_hf_task(model, run_dir / HF_DIR, labels=meta["labels"] or None,
                       eos_id=Tokenizer(tok).eos_id)
    (out / TOKENIZER_FILE).write_bytes(tok.read_bytes())
    # Task rows are right-padded (the GPT head reads the last non-pad token).
    write_tokenizer_files(tok, out, model.config.max_seq_len, "bert")
    return out


def finetune(cfg: TaskFTJobConfig, local: bool = False, address: str | None = None) -> dict[str, Any]:
    from trellis.cluster.metrics import MetricsLogger

    kwargs = prepare(cfg)
    run_dir = Path(cfg.run_dir)
    spec = LoopSpec(role="finetune", worker="trellis.launcher.jobs.taskft.worker:TaskWorker",
                    worker_kwargs=kwargs)
    metrics = MetricsLogger(run_dir, cfg.metrics, role="driver")
    try:
        res = run_loop(lambda resume: TaskSession(cfg, spec, run_dir, metrics, local, address,
                                                     resume),
                       cfg.train, cfg.checkpoint, metrics)
    finally:
        metrics.close()
    if cfg.export == "hf" and (run_dir / BEST).is_dir():
        res["hf_dir"] = str(export_best(run_dir))
    return res


def run(args: argparse.Namespace) -> int:
    res = finetune(resolve_config(TaskFTJobConfig, args), args.local, args.address)
    vals = " ".join(f"{k} {v:.4f}" for k, v in res.items() if k.startswith(("val_", "best_"))
                    and isinstance(v, float))
    print(f"final: step {res['step']} {vals} (best at step {res.get('best_step')})")
    if res.get("hf_dir"):
        print(f"exported the best weights -> {res['hf_dir']}")
    return 0
