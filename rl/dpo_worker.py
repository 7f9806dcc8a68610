"""DPO's ranks (the Ray integration point of DPO): one class for both groups.

  policy     trainable (from SFT): sequence log-probs, the DPO loss, one optimizer step
  reference  frozen (ZeRO-3 inference by default): sequence log-probs of the same batches

A batch is an Arrow record batch of N responses laid out as PPO's rollouts (prompt
left-padded ++ response right-padded, rl.experience.action_slice), plus a second one of P
pairs (chosen, rejected, weight) into those rows. The driver (launcher/jobs/dpo) deals rows
to ranks and owns the data order; it hands its state to the policy ranks to be saved
with their checkpoints.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import pyarrow as pa
import torch

from trellis.data_pipeline.rollout import arrow_to_tensors, tensors_to_arrow
from trellis.model.io import load_module
from trellis.parallel import dist
from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.engine_worker import EngineWorker
from trellis.parallel.rng import seed_all
from trellis.rl.dpo_config import DPOConfig
from trellis.rl.dpo_loss import dpo_loss, sequence_logprobs
from trellis.rl.experience import action_slice
from trellis.rl.ppo_math import token_logprobs


class DPOWorker(EngineWorker):
    def __init__(self, rank: int, world_size: int, init_dir: str, dpo: dict, par: dict,
                 optim: dict | None, total_steps: int, rows_per_rank: int, run_dir: str,
                 seed: int = 0, keep_last: int = 2):
        self.dpo = DPOConfig(**dpo)
        seed_all(seed)
        model, self.model_cfg, _ = load_module(init_dir, head="lm")
        par_cfg = ParallelConfig(**par)
        if optim is not None:  # one optimizer step per driver step, no accumulation
            par_cfg = dataclasses.replace(par_cfg, micro_batch_size=rows_per_rank, grad_accum=1)
        self._setup(rank, world_size, model, par_cfg,
                    OptimConfig(**optim) if optim is not None else None, total_steps, run_dir,
                    self.model_cfg.max_seq_len, keep_last)
        self._driver_state: dict[str, Any] = {}

    # The driver's data position travels inside this rank's checkpoints.
    def set_driver_state(self, state: dict[str, Any]) -> None:
        self._driver_state = state

    def driver_state(self) -> dict[str, Any]:
        return self._driver_state

    def data_state(self) -> dict[str, Any]:
        return self._driver_state

    def load_data_state(self, state: dict[str, Any]) -> None:
        self._driver_state = state

    def _seq_logprobs(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) summed (IPO: averaged) log-probs of the responses given their prompts."""
        ids = torch.cat([t["prompt_ids"], t["response_ids"]], 1)
        mask = torch.cat([t["prompt_mask"].long(), t["response_mask"].long()], 1)
        cols = action_slice(t["prompt_ids"].shape[1], t["response_ids"].shape[1])
        logits = self._forward(ids, mask)[:, cols]                        # (N, R, V)
        lp = token_logprobs(logits, t["response_ids"].to(self.device))    # (N, R)
        return sequence_logprobs(lp, t["response_mask"].to(self.device),
                                 average=self.dpo.loss_type == "ipo")

    @torch.no_grad()
    def logprobs(self, seq: pa.RecordBatch) -> pa.RecordBatch:
        t0 = time.perf_counter()
        self.engine.eval()
        lp = self._seq_logprobs(arrow_to_tensors(seq)).float().cpu()
        return tensors_to_arrow({"ref_logps": lp}).replace_schema_metadata(
            {"seconds": f"{time.perf_counter() - t0:.6f}"})

    def _loss(self, seq: pa.RecordBatch, pairs: pa.RecordBatch) -> tuple[torch.Tensor, dict]:
        t, p = arrow_to_tensors(seq), arrow_to_tensors(pairs)
        lp = self._seq_logprobs(t)
        pair_idx = torch.stack([p["chosen"], p["rejected"]], 1).to(self.device)
        d = self.dpo
        return dpo_loss(lp, t["ref_logps"].to(self.device), pair_idx, p["weight"], d.beta,
                        d.loss_type, d.label_smoothing)

    def train_pairs(self, batch: tuple[pa.RecordBatch, pa.RecordBatch]) -> dict[str, float]:
        """One optimizer step on this rank's (responses + ref_logps, pairs); metrics averaged
        over ranks."""
        seq, pairs = batch
        t0 = time.perf_counter()
        self.engine.train()
        loss, stats = self._loss(seq, pairs)
        self.engine.backward(loss)
        info = self.engine.step() or {}
        self.step += 1
        out = dist.all_reduce_mean_dict(stats | {"pairs": float(pairs.num_rows)})
        return out | {"pairs": out["pairs"] * self.world, "lr": info.get("lr", 0.0),
                      "grad_norm": info.get("grad_norm", float("nan")),
                      "step_time": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate_pairs(self, batch: tuple[pa.RecordBatch, pa.RecordBatch]) -> dict[str, float]:
        self.engine.eval()
        return dist.all_reduce_mean_dict(self._loss(*batch)[1])
