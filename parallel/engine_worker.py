"""What every training worker (pretrain, sft, rm) shares on its rank: one trainable engine
named 'model', gradient accumulation over micro-batches, checkpoint save/resume with the
data position, and a few inspection calls. Subclasses supply batches and the loss."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from trellis.parallel import checkpoint, dist
from trellis.parallel.batch import BatchPlan
from trellis.parallel.engine import Engine


class EngineWorker:
    def _setup(self, rank: int, world_size: int, cfg: Any, run_dir: str, model: torch.nn.Module,
               seq_len: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.run_dir = Path(run_dir)
        self.plan = BatchPlan.from_config(cfg.parallel, seq_len, world_size)
        self.engine = Engine(model, cfg.optim, cfg.parallel, total_steps=cfg.train.steps,
                             plan=self.plan)
        self.step = 0

    # ---- subclass hooks ------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, extra metrics) of one micro-batch."""
        raise NotImplementedError

    def data_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_data_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    # ---- one optimizer step --------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """grad_accum micro-batches and one optimizer step; metrics averaged over ranks."""
        t0 = time.perf_counter()
        self.engine.train()
        loss_sum, parts, tokens, info = 0.0, {}, 0, {}
        accum = self.plan.grad_accum
        for _ in range(accum):
            batch = self.next_batch()
            loss, extra = self.loss(batch)
            self.engine.backward(loss)
            info = self.engine.step() or info
            loss_sum += loss.item() / accum
            tokens += self.batch_tokens(batch)
            for k, v in extra.items():
                parts[k] = parts.get(k, 0.0) + v / accum
        self.step += 1
        means = dist.all_reduce_mean_dict(parts | {"loss": loss_sum})
        return means | {"lr": info.get("lr", 0.0), "grad_norm": info.get("grad_norm", float("nan")),
                        "tokens": tokens * self.world, "step_time": time.perf_counter() - t0}

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, step: int) -> str:
        state = {"data": self.data_state(), "step": step}
        return str(checkpoint.save_checkpoint(self.run_dir, step, {"model": self.engine}, state,
                                              keep_last=self.cfg.checkpoint.keep_last))

    def resume(self, path: str | None) -> int:
        """Load `path` (a complete checkpoint) if given; returns the step to continue from."""
        if not path:
            return 0
        restored = checkpoint.load_checkpoint(path, {"model": self.engine})
        self.load_data_state(restored.state["data"])
        self.step = restored.step
        return restored.step

    # ---- inspection ----------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        """Model output of the current weights for these ids, on CPU (collective under ZeRO-3)."""
        self.engine.eval()
        ids = torch.tensor(input_ids, device=self.engine.device)
        return self.engine.forward(ids).float().cpu()

    def param_numel(self) -> dict[str, int]:
        return {"local": self.engine.local_param_numel(), "global": self.engine.global_param_numel(),
                "zero_stage": self.engine.zero_stage}

    def info(self) -> dict[str, Any]:
        return {"plan": self.plan.describe(), "device": str(self.engine.device)}

    def pid(self) -> int:
        return os.getpid()
