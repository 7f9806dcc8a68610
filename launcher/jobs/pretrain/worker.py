"""One data-parallel rank of `trellis pretrain`: its model engine, its own slice of the token
stream, the objective's loss (clm, mlm or distill). The driver only coordinates; the same
class runs in a Ray actor or in-process (--local)."""
from __future__ import annotations

import itertools
from typing import Any, Generator

import torch

from trellis.data_pipeline.collate import MLMCollator, clm_collate
from trellis.data_pipeline.loader import batches
from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.stream import TokenStream
from trellis.launcher.config_loader import from_dict
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig
from trellis.model.build import build_model
from trellis.model.generate import GenerationConfig, generate
from trellis.model.losses import distillation_loss, token_cross_entropy
from trellis.parallel import dist
from trellis.parallel.engine_worker import EngineWorker
from trellis.parallel.rng import seed_all


def ids_on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host token ids (int32 from the stream) on `dev` as int64: the narrow copy crosses to
    the device and is widened there, right before the model and the loss."""
    return t.to(dev).long()


def _mask_or_none(batch: dict[str, torch.Tensor], dev: torch.device) -> torch.Tensor | None:
    """The batch's attention mask on `dev`, or None when it has no padding (packed blocks,
    all but the end of a finite epoch), so attention takes SDPA's causal kernel instead of an
    explicit (B, 1, T, T) mask. Checked on the host copy: no device sync."""
    mask = batch["attention_mask"]
    return None if bool(mask.all()) else mask.to(dev)


class PretrainWorker(EngineWorker):
    def __init__(self, rank: int, world_size: int, cfg: dict, data_dir: str,
                 val_dir: str | None, run_dir: str, tokenizer_sha256: str | None = None,
                 teacher_dir: str | None = None):
        c = from_dict(PretrainJobConfig, cfg)
        seed_all(c.seed)  # identical init on every rank
        self.teacher = self._load_teacher(teacher_dir) if teacher_dir else None
        model = self._build_student(c) if self.teacher is not None else \
            build_model(c.model, "lm" if c.train.objective == "clm" else "mlm")
        self.cfg = c
        self._setup(rank, world_size, model, c.parallel, c.optim, c.train.steps, run_dir,
                    c.data.seq_len, c.checkpoint.keep_last)
        if c.train.compile:
            self.engine.compile()
        # The manifest must have been made by the tokenizer this job uses.
        # ... and hold no token id the model's embedding lacks (checked against the manifest;
        # each shard's checksum is verified on its first open in this process).
        self.vocab_size = self.teacher_cfg.vocab_size if self.teacher is not None \
            else c.model.vocab_size
        self.stream = TokenStream(data_dir, c.data, rank=rank, world_size=world_size,
                                  tokenizer=tokenizer_sha256, vocab_size=self.vocab_size)
        self.val_dir, self.tokenizer_sha256 = val_dir, tokenizer_sha256
        # Dynamic masking: the mask is a function of (seed, epoch, consumer, step) that the
        # stream's batches carry, so it is fresh every epoch and identical after a resume.
        self.mlm = None if c.train.objective == "clm" else \
            MLMCollator(vocab_size=c.model.vocab_size, mask_prob=c.train.mask_prob, seed=c.seed)
        self._it: Generator[dict[str, torch.Tensor], None, None] | None = None
        self._open_batches()

    def _open_batches(self) -> None:
        """(Re)start reading collated micro-batches at the stream's position: in this process
        (data.loader_workers = 0) or from that many DataLoader worker processes, which start
        at the first next_batch. The stream records what was handed over, for data_state."""
        if self._it is not None:
            self._it.close()  # stops the previous DataLoader's workers
        collate = self.mlm if self.mlm is not None else clm_collate
        self._it = iter(batches(self.stream, self.plan.micro_batch, collate))

    # ---- models --------------------------------------------------------------------------
    def _load_teacher(self, teacher_dir: str) -> torch.nn.Module:
        from trellis.model.io import load_module

        teacher, self.teacher_cfg, _ = load_module(teacher_dir)
        return teacher.eval().requires_grad_(False)

    def _build_student(self, c: PretrainJobConfig) -> torch.nn.Module:
        """DistilBERT: half the teacher's depth, initialised from every other teacher layer."""
        from trellis.model.distill import init_student_from_teacher

        return init_student_from_teacher(self.teacher, self.teacher_cfg, c.model.dropout)

    # ---- EngineWorker hooks ----------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        return next(self._it)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        dev = self.engine.device
        ids, labels = ids_on(batch["input_ids"], dev), ids_on(batch["labels"], dev)
        if self.teacher is None:
            logits = self.engine.forward(ids, attention_mask=_mask_or_none(batch, dev))
            return token_cross_entropy(logits, labels), {}  # logits (B, T, V)
        mask = batch["attention_mask"].to(dev)
        module = self.engine.module
        with torch.no_grad():
            t_hidden = self.teacher.hidden_states(ids, attention_mask=mask)  # (B, T, C)
            t_logits = self.teacher.head(t_hidden)
        s_hidden = module.hidden_states(ids, attention_mask=mask)
        s_logits = module.head(s_hidden)
        d = self.cfg.distill
        return distillation_loss(s_logits, t_logits, labels, s_hidden, t_hidden, mask,
                                 d.temperature, d.alpha_kl, d.alpha_mlm, d.alpha_cos)

    def data_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._open_batches()

    def _val_blocks(self):
        """This rank's held-out micro-batches (the same blocks at every evaluation)."""
        stream = TokenStream(self.val_dir, self.cfg.data, rank=self.rank, world_size=self.world,
                             split="val", infinite=False, tokenizer=self.tokenizer_sha256,
                             vocab_size=self.vocab_size)
        return itertools.islice(stream.iter_batches(self.plan.micro_batch),
                                self.cfg.train.eval_batches)

    def validate(self) -> None:
        """Every rank has at least one held-out batch (checked before the first step)."""
        if not self.val_dir:
            return
        has = next(iter(self._val_blocks()), None) is not None
        if dist.all_reduce_mean(float(not has)) > 0:
            raise DataError(f"validation split of '{self.val_dir}' is too small for one batch "
                            f"of {self.plan.micro_batch} x {self.cfg.data.seq_len} tokens on "
                            f"each of {self.world} ranks (data.val_fraction, data.val_path)")

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # train.compile: no extra graphs for eval shapes
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first eval_batches micro-batches of this rank's validation split."""
        if not self.val_dir:
            return {}
        # The same held-out blocks and (for MLM) the same masks at every evaluation.
        self.engine.eval()
        # summed on the device, read once
        total, n = torch.zeros((), dtype=torch.float64, device=self.engine.device), 0
        for batch in self._val_blocks():
            batch = self.mlm(batch) if self.mlm is not None else clm_collate(batch)
            ids = ids_on(batch["input_ids"], self.engine.device)
            logits = self.engine.forward(ids, attention_mask=_mask_or_none(batch, ids.device))
            total += token_cross_entropy(logits, ids_on(batch["labels"], ids.device))
            n += 1
        loss = dist.all_reduce_mean(float(total) / n)
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}

    @torch.compiler.set_stance("force_eager")  # a KV cache's growing shapes would recompile
    def sample(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy continuation of one prompt (GPT only)."""
        ids = torch.tensor([prompt_ids], device=self.engine.device)
        gen = generate(self.engine.module, ids, torch.ones_like(ids),
                       GenerationConfig(max_new_tokens=max_new_tokens, eos_id=eos_id,
                                        stop_early=self.world == 1))
        return gen.tokens[0][gen.mask[0].bool()].tolist()
