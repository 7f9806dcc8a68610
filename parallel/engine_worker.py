"""The one rank-side base class of every engine worker, whatever its role (pretrain, sft, rm,
and the RL roles actor, critic, reference, reward): one DeepSpeed engine over the rank's
model, trainable or frozen; checkpoint save/resume of that engine together with the rank's
own state (its data position); the inspection calls drivers and tests use.

Training jobs that step over micro-batches implement `next_batch` and `loss` and get
`train_step` (gradient accumulation, metrics averaged over ranks); the RL roles drive the
engine themselves (several epochs over a rollout batch)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from trellis.parallel import checkpoint, dist
from trellis.parallel.batch import BatchPlan
from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.engine import Engine
from trellis.parallel.precision import describe_precision


class EngineWorker:
    engine_name = "model"
    """Name of the engine's folder inside a checkpoint (step_<n>/<engine_name>/)."""

    def _setup(self, rank: int, world_size: int, model: torch.nn.Module, par: ParallelConfig,
               optim: OptimConfig | None, total_steps: int, run_dir: str | Path, seq_len: int,
               keep_last: int = 2) -> None:
        """Build the engine; `optim=None` makes a frozen (inference-only) engine."""
        self.rank, self.world = rank, world_size
        self.run_dir, self.keep_last = Path(run_dir), keep_last
        self.plan = BatchPlan.from_config(par, seq_len, world_size)
        self.engine = Engine(model, optim, par, total_steps=total_steps,
                             trainable=optim is not None, plan=self.plan)
        self.device = self.engine.device
        self.step = 0

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ids may be narrow (int32 stream batches): they cross narrow, widen on the device."""
        return self.engine.forward(ids.to(self.device).long(),
                                   attention_mask=mask.to(self.device))

    # ---- hooks of micro-batch training jobs ----------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """(scalar loss, extra metrics: floats or detached 0-d tensors, which train_step
        accumulates on the device and reads once per step) of one micro-batch."""
        raise NotImplementedError

    @staticmethod
    def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def validate(self) -> None:
        """Check, before the first step, that the data can serve the whole run (e.g. the
        held-out split has a batch for every rank); raise a one-line error if not."""

    def data_state(self) -> dict[str, Any]:
        """This rank's position in its data, saved with every checkpoint (default: none)."""
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- one optimizer step --------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """grad_accum micro-batches and one optimizer step; metrics averaged over ranks."""
        t0 = time.perf_counter()
        self.engine.train()
        loss_sum: torch.Tensor | float = 0.0
        parts, tokens, info = {}, 0, {}
        accum = self.plan.grad_accum
        for _ in range(accum):
            batch = self.next_batch()
            loss, extra = self.loss(batch)
            self.engine.backward(loss)
            info = self.engine.step() or info
            loss_sum = loss_sum + loss.detach() / accum  # on the device: no sync per micro-batch
            tokens += self.batch_tokens(batch)
            for k, v in extra.items():
                parts[k] = parts.get(k, 0.0) + v / accum
        self.step += 1
        means = dist.all_reduce_mean_dict(parts | {"loss": float(loss_sum)})  # one read per step
        return means | {"lr": info.get("lr", 0.0), "grad_norm": info.get("grad_norm", float("nan")),
                        "tokens": tokens * self.world, "step_time": time.perf_counter() - t0}

    # ---- checkpoints (collective: every rank calls) --------------------------------------
    def save(self, step: int) -> str:
        state = {"data": self.data_state(), "step": step}
        return str(checkpoint.save_checkpoint(self.run_dir, step, {self.engine_name: self.engine},
                                              state, keep_last=self.keep_last))

    def resume(self, path: str | None) -> int:
        """Load `path` (a complete checkpoint) if given; returns the step to continue from."""
        if not path:
            return 0
        restored = checkpoint.load_checkpoint(path, {self.engine_name: self.engine})
        self.load_data_state(restored.state.get("data", {}))
        self.step = restored.step
        return restored.step

    # ---- inspection ----------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        """Model output of the current weights for these ids, on CPU (collective under ZeRO-3)."""
        self.engine.eval()
        ids = torch.tensor(input_ids, device=self.device)
        return self.engine.forward(ids).float().cpu()

    def param_numel(self) -> dict[str, int]:
        return {"local": self.engine.local_param_numel(), "global": self.engine.global_param_numel(),
                "zero_stage": self.engine.zero_stage}

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "plan": self.plan.describe(), "device": str(self.device),
                "precision": describe_precision(self.engine.requested_precision,
                                                self.engine.width),
                "compute_precision": self.engine.precision,
                "zero_stage": self.engine.zero_stage, "trainable": self.engine.trainable,
                "local_params": self.engine.local_param_numel(),
                "global_params": self.engine.global_param_numel()}

    def pid(self) -> int:
        return os.getpid()
