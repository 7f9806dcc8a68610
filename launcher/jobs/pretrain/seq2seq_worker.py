"""One data-parallel rank of `trellis pretrain --set train.objective=seq2seq`: an
encoder-decoder engine, its share of the translation pairs (RowStream, exact resume),
teacher-forced cross-entropy on target tokens; held-out loss, BLEU and chrF (sacrebleu,
corpus-level over every rank's translations) at each evaluation."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from trellis.data_pipeline.row_stream import RowStream
from trellis.data_pipeline.seq2seq_collate import Seq2SeqCollator
from trellis.data_pipeline.structured import StructuredDataset
from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer
from trellis.launcher.config_loader import from_dict
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig
from trellis.launcher.jobs.pretrain.translation_eval import score_translations, translate_rows
from trellis.model.build import build_model
from trellis.model.losses import token_cross_entropy
from trellis.parallel import dist
from trellis.parallel.engine_worker import EngineWorker
from trellis.parallel.rng import seed_all


class Seq2SeqWorker(EngineWorker):
    def __init__(self, rank: int, world_size: int, cfg: dict, train_dir: str,
                 val_dir: str | None, train_rows: list[int] | None, val_rows: list[int] | None,
                 run_dir: str, tokenizer_sha256: str | None = None):
        c = from_dict(PretrainJobConfig, cfg)
        seed_all(c.seed)  # identical init on every rank
        self.cfg = c
        self._setup(rank, world_size, build_model(c.model, "seq2seq"), c.parallel, c.optim,
                    c.train.steps, run_dir, c.data.seq_len, c.checkpoint.keep_last)
        self.train_ds = StructuredDataset(train_dir, tokenizer_sha256, c.model.vocab_size)
        self.val_ds = (StructuredDataset(val_dir, tokenizer_sha256, c.model.vocab_size)
                       if val_dir else self.train_ds)
        self.val_rows = val_rows if val_rows is not None else list(range(len(self.val_ds)))
        self.tok = Tokenizer(Path(run_dir) / TOKENIZER_FILE)
        self.collate = Seq2SeqCollator(c.data.seq_len)
        self.stream = RowStream(self.train_ds, self.plan.micro_batch, rank, world_size,
                                c.data.seed, shuffle=c.data.shuffle, rows=train_rows)
        self._it = iter(self.stream)

    # ---- EngineWorker hooks ----------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate(next(self._it))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        dev = self.engine.device
        logits = self.engine.forward(batch["input_ids"].to(dev),
                                     attention_mask=batch["attention_mask"].to(dev),
                                     decoder_input_ids=batch["decoder_input_ids"].to(dev))
        return token_cross_entropy(logits, batch["labels"].to(dev)), {}

    @staticmethod
    def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
        """Source tokens read plus target tokens predicted."""
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    def data_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._it = iter(self.stream)

    # ---- evaluation --------------------------------------------------------------------------
    def _my_rows(self, n: int) -> list[int]:
        """This rank's share of the first n held-out rows (round-robin)."""
        return self.val_rows[:n][self.rank::self.world]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss (eval_batches micro-batches) and corpus BLEU/chrF of bleu_pairs."""
        self.engine.eval()
        mine = self._my_rows(len(self.val_rows))
        batch = max(1, min(self.plan.micro_batch, len(self.val_rows) // self.world))
        n_batches = min(self.cfg.train.eval_batches, len(self.val_rows) // self.world // batch)
        total = 0.0
        for i in range(n_batches):
            loss, _ = self.loss(self.collate(self.val_ds.rows(mine[i * batch:(i + 1) * batch])))
            total += loss.item()
        out = {"loss": dist.all_reduce_mean(total / max(1, n_batches))}
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        if self.cfg.train.bleu_pairs:
            out |= self._scores(self.cfg.train.bleu_pairs)
        return out

    def _translate(self, n: int) -> tuple[list[dict], list[str]]:
        """Rows and translations of this rank's share of the first n held-out pairs."""
        rows = self.val_ds.rows(self._my_rows(n))
        # Every rank runs the same number of batches and decoding steps (ZeRO-3 gathers).
        per_rank = math.ceil(min(n, len(self.val_rows)) / self.world)
        t = self.cfg.translate
        tcfg = dataclasses.replace(t, stop_early=self.world == 1,
                                   max_new_tokens=min(t.max_new_tokens, self.cfg.data.seq_len))
        mb = self.plan.micro_batch
        hyps = translate_rows(self.engine.module, rows, self.collate, self.tok, tcfg, mb,
                              n_batches=math.ceil(per_rank / mb), device=self.engine.device,
                              filler=self.val_ds[self.val_rows[0]])
        return rows, hyps

    def _scores(self, n: int) -> dict[str, float]:
        rows, hyps = self._translate(n)
        pairs = [(h, r["target"]) for h, r in zip(hyps, rows)]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        return score_translations([h for h, _ in pairs], [r for _, r in pairs])

    def sample_translations(self, n: int) -> list[dict[str, str]]:
        """Source, reference and translation of the first n held-out pairs (rank 0's share
        of them; every rank must call)."""
        self.engine.eval()
        rows, hyps = self._translate(n * self.world)
        return [{"source": r["source"], "reference": r["target"], "translation": h}
                for r, h in zip(rows[:n], hyps)]
