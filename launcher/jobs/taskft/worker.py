"""The rank of `trellis finetune`: a pretrained trunk with a fresh task head in one engine;
cross-entropy (classification), squared error (regression) or start/end cross-entropy (QA)
on its share of the labelled rows; held-out metrics over every validation row."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trellis.data_pipeline.task_collate import TaskCollator
from trellis.data_pipeline.task_rows import read_table
from trellis.launcher.config_loader import from_dict
from trellis.launcher.jobs.taskft.config import TaskFTJobConfig
from trellis.model import task_metrics as tm
from trellis.model.io import _unshared, load_module
from trellis.model.task_heads import TaskModel, best_spans, trunk_of
from trellis.parallel.engine_worker import EngineWorker
from trellis.parallel.rng import seed_all

TASK_META = "task_model.json"


class TaskWorker(EngineWorker):
    def __init__(self, rank: int, world_size: int, cfg: dict, init_dir: str, train_path: str,
                 val_path: str, labels: list[str], run_dir: str):
        c = from_dict(TaskFTJobConfig, cfg)
        seed_all(c.seed)
        pretrained, self.model_cfg, _ = load_module(init_dir)
        self.cfg, self.kind, self.labels = c, c.task.kind, labels
        model = TaskModel(trunk_of(pretrained), self.kind, max(1, len(labels)))
        self._setup(rank, world_size, model, c.parallel, c.optim, c.train.steps, run_dir,
                    c.data.max_len, c.checkpoint.keep_last)
        self.train_rows = read_table(train_path).to_pylist()
        self.val_rows = read_table(val_path).to_pylist()
        self.collate = TaskCollator()
        self.per_rank = len(self.train_rows) // world_size
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    # ---- data ---------------------------------------------------------------------------
    def _epoch_order(self) -> list[int]:
        perm = np.random.default_rng([self.cfg.data.seed, self.epoch]).permutation(len(self.train_rows))
        return perm[self.rank::self.world][:self.per_rank].tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        mb = self.plan.micro_batch
        if self.pos + mb > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order()
        rows = [self.train_rows[i] for i in self._order[self.pos:self.pos + mb]]
        self.pos += mb
        return self.collate(rows)

    def data_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "rows": len(self.train_rows),
                "world_size": self.world}

    def load_data_state(self, state: dict[str, Any]) -> None:
        if state and (state.get("rows"), state.get("world_size")) != (len(self.train_rows), self.world):
            raise ValueError(f"finetune data state was saved with {state.get('rows')} rows on "
                             f"{state.get('world_size')} ranks; this run has "
                             f"{len(self.train_rows)} on {self.world}: use a new run_dir")
        if state:
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
            self._order = self._epoch_order()

    def validate(self) -> None:
        if self.per_rank < self.plan.micro_batch:
            raise ValueError(f"{len(self.train_rows)} training rows are too few for {self.world} "
                             f"ranks x micro-batch {self.plan.micro_batch}")

    # ---- loss ---------------------------------------------------------------------------
    def _out(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        return self.engine.forward(b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                                   token_type_ids=b["token_type_ids"].to(dev))

    def _loss(self, out: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = out.device
        if self.kind == "classification":
            return F.cross_entropy(out.float(), b["label"].long().to(dev))
        if self.kind == "regression":
            return F.mse_loss(out.float().squeeze(-1), b["label"].float().to(dev))
        pad = ~b["attention_mask"].bool().to(dev)  # (B, T): no answer starts on a pad
        logits = out.float().masked_fill(pad[..., None], -1e9)  # (B, T, 2)
        return 0.5 * (F.cross_entropy(logits[..., 0], b["start"].to(dev))
                      + F.cross_entropy(logits[..., 1], b["end"].to(dev)))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self._loss(self._out(batch), batch)
        return loss, {"loss": loss.item()}

    # ---- held-out metrics ---------------------------------------------------------------
    @torch.no_grad()
    def predict(self, rows: list[dict]) -> list[dict[str, Any]]:
        """Per row: the prediction and the row's loss. Every rank runs the same number of
        forwards (ZeRO-3 gathers are collective), padding its share with row 0."""
        self.engine.eval()
        mine = list(range(self.rank, len(rows), self.world))
        mb = self.plan.micro_batch
        n_batches = math.ceil(math.ceil(len(rows) / self.world) / mb)
        out: list[dict[str, Any]] = []
        for k in range(n_batches):
            idx = mine[k * mb:(k + 1) * mb]
            b = self.collate([rows[i] for i in idx] or [rows[0]])
            logits = self._out(b).float().cpu()
            for j, i in enumerate(idx):
                one = {key: v[j:j + 1] for key, v in b.items()}
                out.append({"row": i, "loss": self._loss(logits[j:j + 1], one).item(),
                            **self._prediction(logits[j:j + 1], one)})
        return out

    def _prediction(self, logits: torch.Tensor, b: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.kind == "classification":
            return {"pred": int(logits.argmax(-1)), "gold": int(b["label"])}
        if self.kind == "regression":
            return {"pred": float(logits.squeeze()), "gold": float(b["label"])}
        s, e = best_spans(logits, b["attention_mask"])
        return {"pred": (int(s), int(e)), "gold": (int(b["start"]), int(b["end"]))}

    def evaluate(self) -> dict[str, float]:
        mine = self.predict(self.val_rows)
        parts = [mine]
        if torch.distributed.is_initialized() and self.world > 1:
            parts = [None] * self.world
            torch.distributed.all_gather_object(parts, mine)
        preds = sorted((p for part in parts for p in part), key=lambda p: p["row"])
        return self.metrics(preds)

    def metrics(self, preds: list[dict[str, Any]]) -> dict[str, float]:
        loss = float(np.mean([p["loss"] for p in preds]))
        pred, gold = [p["pred"] for p in preds], [p["gold"] for p in preds]
        if self.kind == "classification":
            return {"accuracy": tm.accuracy(pred, gold),
                    "f1": tm.macro_f1(pred, gold, len(self.labels)), "loss": loss}
        if self.kind == "regression":
            return {"pearson": tm.pearson(pred, gold), "spearman": tm.spearman(pred, gold),
                    "loss": loss}
        em = [float(p == g) for p, g in zip(pred, gold)]
        f1 = [_span_f1(p, g) for p, g in zip(pred, gold)]
        return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1)), "loss": loss}

    # ---- best weights -------------------------------------------------------------------
    def save_best(self, out_dir: str, step: int, metrics: dict[str, float]) -> None:
        """Collective: gather the full weights; rank 0 writes them (trellis files + meta)."""
        from safetensors.torch import save_file
        state = self.engine.consolidated_state_dict()
        if self.rank != 0:
            return
        import dataclasses
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.safetensors.tmp"
        save_file(_unshared(state), str(tmp), metadata={"format": "pt"})
        tmp.replace(out / "model.safetensors")
        meta = {"model": dataclasses.asdict(self.model_cfg), "task": self.kind,
                "labels": self.labels, "step": step, "metrics": metrics}
        (out / TASK_META).write_text(json.dumps(meta, indent=2) + "\n")


def _span_f1(p: tuple[int, int], g: tuple[int, int]) -> float:
    """F1 of two token spans (inclusive ends) by overlap."""
    overlap = max(0, min(p[1], g[1]) - max(p[0], g[0]) + 1)
    if overlap == 0:
        return 0.0
    prec, rec = overlap / (p[1] - p[0] + 1), overlap / (g[1] - g[0] + 1)
    return 2 * prec * rec / (prec + rec)


def load_task_model(path: str | Path) -> tuple[TaskModel, dict]:
    """A TaskModel and its meta from the best/ folder save_best wrote (safetensors only)."""
    from safetensors.torch import load_file

    from trellis.model.config import ModelConfig
    from trellis.model.io import load_full_state_dict
    from trellis.model.task_heads import build_task_model

    path = Path(path)
    meta = json.loads((path / TASK_META).read_text())
    cfg = ModelConfig.from_saved(meta["model"])
    model = build_task_model(cfg, meta["task"], max(1, len(meta["labels"])))
    load_full_state_dict(model, load_file(str(path / "model.safetensors")), str(path))
    return model.eval(), meta
