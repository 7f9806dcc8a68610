"""Ranks of the fine-tuning jobs: SFTWorker (loss on response tokens only) and RMWorker
(pairwise ranking loss on a score head; every pair of a prompt's ranking in one batch
element, as InstructGPT does)."""
from __future__ import annotations

import math
from typing import Any

import torch

from trellis.data_pipeline.collate import PairCollator, ScoreCollator, SFTCollator
from trellis.data_pipeline.packed_collate import PackedPairCollator, PackedSFTCollator
from trellis.data_pipeline.row_stream import RowStream
from trellis.data_pipeline.structured import StructuredDataset
from trellis.launcher.config_loader import from_dict
from trellis.parallel.engine_worker import EngineWorker
from trellis.launcher.jobs.finetune.config import RMJobConfig, SFTJobConfig
from trellis.model.io import load_module
from trellis.model.losses import token_cross_entropy
from trellis.parallel import dist
from trellis.parallel.rng import seed_all
from trellis.rl.rm_loss import pairs_from_collator, pairwise_rm_loss


class _RowWorker(EngineWorker):
    """Shared set-up: initial weights, the row streams (train / val rows of the tables)."""
    head = "lm"
    config_cls: type = SFTJobConfig

    def __init__(self, rank: int, world_size: int, cfg: dict, init_dir: str, train_dir: str,
                 val_dir: str | None, train_rows: list[int] | None, val_rows: list[int] | None,
                 run_dir: str):
        c = from_dict(self.config_cls, cfg)
        seed_all(c.seed)
        model, self.model_cfg, _ = load_module(init_dir, head=self.head)
        self.cfg = c
        self._setup(rank, world_size, model, c.parallel, c.optim, c.train.steps, run_dir,
                    c.data.max_len, c.checkpoint.keep_last)
        self.train_ds = StructuredDataset(train_dir)
        self.val_ds = StructuredDataset(val_dir) if val_dir else self.train_ds
        self.val_rows = val_rows
        self.stream = RowStream(self.train_ds, self.plan.micro_batch, rank, world_size,
                                c.data.seed, rows=train_rows)
        self._it = iter(self.stream)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate(next(self._it))

    def _model_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """attention_mask, and for packed batches (data.packing) the segment ids and the
        RM's score positions, on the engine's device."""
        keys = ("attention_mask", "segment_ids", "score_index")
        return {k: batch[k].to(self.engine.device) for k in keys if k in batch}

    @staticmethod
    def _fill(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Packed batches only: the share of block positions holding a token (1 - padding)."""
        if "segment_ids" not in batch:
            return {}
        return {"block_fill": float(batch["attention_mask"].float().mean())}

    def data_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._it = iter(self.stream)

    def _val_batches(self):
        if self.val_rows is not None and not self.val_rows:
            return []
        n = len(self.val_rows) if self.val_rows is not None else len(self.val_ds)
        # A small held-out split is evaluated in smaller batches (same count on every rank).
        batch = max(1, min(self.plan.micro_batch, n // self.world))
        stream = RowStream(self.val_ds, batch, self.rank, self.world,
                           seed=0, shuffle=False, infinite=False, rows=self.val_rows)
        return [self.collate(rows) for _, rows in zip(range(self.cfg.train.eval_batches), stream)]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        per_batch = [self.loss(batch)[1] for batch in self._val_batches()]
        keys = per_batch[0] if per_batch else {}
        local = {k: float(torch.tensor([s[k] for s in per_batch], dtype=torch.float64).nanmean())
                 for k in keys}
        return dist.all_reduce_mean_dict(local)


class SFTWorker(_RowWorker):
    head, config_cls = "lm", SFTJobConfig

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        d = self.cfg.data
        if d.packing:
            return PackedSFTCollator(d.max_len, d.max_prompt_len, d.block_len)(rows)
        return SFTCollator(max_len=d.max_len, max_prompt_len=d.max_prompt_len)(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        dev = self.engine.device
        logits = self.engine.forward(batch["input_ids"].to(dev), **self._model_kwargs(batch))
        loss = token_cross_entropy(logits, batch["labels"].to(dev))  # response tokens only
        return loss, {"loss": loss.item()} | self._fill(batch)

    @staticmethod
    def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())


class RMWorker(_RowWorker):
    head, config_cls = "score", RMJobConfig

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        d = self.cfg.data
        if d.packing:
            return PackedPairCollator(d.max_len, d.max_prompt_len, d.block_len)(rows)
        return PairCollator(max_len=d.max_len, max_prompt_len=d.max_prompt_len)(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        dev = self.engine.device
        scores = self.engine.forward(batch["input_ids"].to(dev),
                                     **self._model_kwargs(batch))  # (N,) sequences
        pairs, group = pairs_from_collator(batch)
        loss, acc = pairwise_rm_loss(scores, pairs.to(dev), group.to(dev), self.cfg.weighting)
        # Always both keys (accuracy NaN when a batch holds only ties): ranks must agree on
        # what they reduce.
        return loss, {"loss": loss.item(), "accuracy": acc} | self._fill(batch)

    @torch.no_grad()
    def normalize(self, demo_dir: str, max_rows: int = 512) -> dict[str, float]:
        """Score demonstrations (prompt + accepted response) and set the head's normalisation
        so they score 0 on average with unit spread; returns the raw mean and std."""
        ds = StructuredDataset(demo_dir)
        n, mb = min(len(ds), max_rows), self.plan.micro_batch
        rows = ds.rows(list(range(self.rank, n, self.world)))
        d = self.cfg.data
        # Scored as in training: prompt + response + EOS, read at the EOS.
        collate = ScoreCollator(max_len=d.max_len, max_prompt_len=d.max_prompt_len)
        module = self.engine.module
        module.norm_mean.fill_(0.0), module.norm_std.fill_(1.0)
        self.engine.eval()
        total = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count
        # The same number of forwards on every rank (ZeRO-3 gathers are collective).
        for i in range(math.ceil(math.ceil(n / self.world) / mb)):
            chunk = rows[i * mb:(i + 1) * mb]
            b = collate(chunk or ds.rows([0]))
            s = self.engine.forward(b["input_ids"].to(self.engine.device),
                                    attention_mask=b["attention_mask"].to(self.engine.device))
            s = s.double().cpu()[:len(chunk)]
            total += torch.stack([s.sum(), (s * s).sum(), torch.tensor(float(s.numel()))])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        mean = float(total[0] / total[2])
        std = math.sqrt(max(float(total[1] / total[2]) - mean * mean, 1e-12))
        module.set_normalization(mean, std)
        return {"mean": mean, "std": std}
