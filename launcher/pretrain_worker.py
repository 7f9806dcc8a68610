"""One data-parallel rank of `trellis pretrain`: its model engine, its own slice of the token
stream, the objective's loss. The driver (launcher/pretrain.py) only coordinates; the same
class runs in a Ray actor or in-process (--local)."""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.collate import MLMCollator, clm_collate
from data_pipeline.stream import TokenStream
from launcher.config import from_dict
from launcher.job_config import PretrainJobConfig
from model.build import build_model
from model.generate import GenerationConfig, generate
from model.losses import distillation_loss, token_cross_entropy
from parallel import checkpoint, dist
from parallel.batch import BatchPlan
from parallel.engine import Engine
from parallel.rng import seed_all


class PretrainWorker:
    def __init__(self, rank: int, world_size: int, cfg: dict, data_dir: str,
                 val_dir: str | None, run_dir: str, tokenizer_sha256: str | None = None):
        self.cfg = c = from_dict(PretrainJobConfig, cfg)
        self.rank, self.world = rank, world_size
        self.run_dir = Path(run_dir)
        seed_all(c.seed)  # identical init on every rank
        self.plan = BatchPlan.from_config(c.parallel, c.data.seq_len, world_size)
        self.teacher = self._load_teacher() if c.train.objective == "distill" else None
        model = self._build_student() if self.teacher is not None else \
            build_model(c.model, "lm" if c.train.objective == "clm" else "mlm")
        self.engine = Engine(model, c.optim, c.parallel, total_steps=c.train.steps, plan=self.plan)
        # The manifest must have been made by the tokenizer this job uses.
        self.stream = TokenStream(data_dir, c.data, rank=rank, world_size=world_size,
                                  tokenizer=tokenizer_sha256)
        self._it = self.stream.iter_batches(self.plan.micro_batch)
        self.val_dir, self.tokenizer_sha256 = val_dir, tokenizer_sha256
        # Dynamic masking: the mask is a function of (seed, epoch, consumer, step) that the
        # stream's batches carry, so it is fresh every epoch and identical after a resume.
        self.mlm = None if c.train.objective == "clm" else \
            MLMCollator(vocab_size=c.model.vocab_size, mask_prob=c.train.mask_prob, seed=c.seed)
        self.step = 0

    # ---- model set-up -------------------------------------------------------------------
    def _load_teacher(self) -> torch.nn.Module:
        from model.hf import load_hf_pretrained

        teacher, tcfg = load_hf_pretrained(self.cfg.distill.teacher)
        self.teacher_cfg = tcfg
        return teacher.eval().requires_grad_(False)

    def _build_student(self) -> torch.nn.Module:
        """DistilBERT: half the teacher's depth, initialised from every other teacher layer."""
        from model.distill import init_student_from_teacher

        return init_student_from_teacher(self.teacher, self.teacher_cfg, self.cfg.model.dropout)

    # ---- one step ----------------------------------------------------------------------
    def _batch(self) -> dict[str, torch.Tensor]:
        blocks = next(self._it)  # (B, T+1) ids with the stream's epoch/step metadata
        return self.mlm(blocks) if self.mlm is not None else clm_collate(blocks)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        dev = self.engine.device
        ids = batch["input_ids"].to(dev)
        mask = batch["attention_mask"].to(dev)
        labels = batch["labels"].to(dev)
        if self.teacher is None:
            logits = self.engine.forward(ids, attention_mask=mask)  # (B, T, V)
            return token_cross_entropy(logits, labels), {}
        module = self.engine.module
        with torch.no_grad():
            t_hidden = self.teacher.hidden_states(ids, attention_mask=mask)  # (B, T, C)
            t_logits = self.teacher.head(t_hidden)
        s_hidden = module.hidden_states(ids, attention_mask=mask)
        s_logits = module.head(s_hidden)
        d = self.cfg.distill
        return distillation_loss(s_logits, t_logits, labels, s_hidden, t_hidden, mask,
                                 d.temperature, d.alpha_kl, d.alpha_mlm, d.alpha_cos)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches); metrics averaged over ranks."""
        t0 = time.perf_counter()
        self.engine.train()
        losses, parts, tokens, info = [], {}, 0, {}
        for _ in range(self.plan.grad_accum):
            batch = self._batch()
            loss, extra = self._loss(batch)
            self.engine.backward(loss)
            info = self.engine.step() or info
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            for k, v in extra.items():
                parts[k] = parts.get(k, 0.0) + v / self.plan.grad_accum
        self.step += 1
        out = {"loss": dist.all_reduce_mean(sum(losses) / len(losses)),
               "lr": info.get("lr", 0.0), "grad_norm": info.get("grad_norm", float("nan")),
               "tokens": tokens * self.world, "step_time": time.perf_counter() - t0}
        out.update({k: dist.all_reduce_mean(v) for k, v in parts.items()})
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first eval_batches micro-batches of this rank's validation split."""
        if not self.val_dir:
            return {}
        c = self.cfg
        # The same held-out blocks and (for MLM) the same masks at every evaluation.
        stream = TokenStream(self.val_dir, c.data, rank=self.rank, world_size=self.world,
                             split="val", infinite=False, tokenizer=self.tokenizer_sha256)
        self.engine.eval()
        total, n = 0.0, 0
        for batch in itertools.islice(stream.iter_batches(self.plan.micro_batch),
                                      c.train.eval_batches):
            batch = self.mlm(batch) if self.mlm is not None else clm_collate(batch)
            ids, mask = batch["input_ids"].to(self.engine.device), batch["attention_mask"]
            logits = self.engine.forward(ids, attention_mask=mask.to(ids.device))
            total += token_cross_entropy(logits, batch["labels"].to(ids.device)).item()
            n += 1
        if dist.all_reduce_mean(float(n == 0)) > 0:
            raise ValueError(f"validation split of '{self.val_dir}' is too small for one batch "
                             f"of {self.plan.micro_batch} x {c.data.seq_len} tokens per rank")
        loss = dist.all_reduce_mean(total / n)
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}

    # ---- checkpoints -------------------------------------------------------------------
    def save(self, step: int) -> str:
        state = {"data": self.stream.state_dict(), "step": step}
        path = checkpoint.save_checkpoint(self.run_dir, step, {"model": self.engine}, state,
                                          keep_last=self.cfg.checkpoint.keep_last)
        return str(path)

    def resume(self, path: str | None) -> int:
        """Load `path` (a complete checkpoint) if given; returns the step to continue from."""
        if not path:
            return 0
        restored = checkpoint.load_checkpoint(path, {"model": self.engine})
        self.stream.load_state_dict(restored.state["data"])
        self._it = self.stream.iter_batches(self.plan.micro_batch)
        self.step = restored.step
        return restored.step

    # ---- inspection --------------------------------------------------------------------
    def sample(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy continuation of one prompt (GPT only)."""
        module = self.engine.module
        ids = torch.tensor([prompt_ids], device=self.engine.device)
        gen = generate(module, ids, torch.ones_like(ids),
                       GenerationConfig(max_new_tokens=max_new_tokens, eos_id=eos_id))
        return gen.tokens[0][gen.mask[0].bool()].tolist()

    @torch.no_grad()
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        """Logits (B, T, V) of the current weights, on CPU (collective under ZeRO-3)."""
        self.engine.eval()
        ids = torch.tensor(input_ids, device=self.engine.device)
        return self.engine.forward(ids).float().cpu()

    def param_numel(self) -> dict[str, int]:
        return {"local": self.engine.local_param_numel(), "global": self.engine.global_param_numel(),
                "zero_stage": self.engine.zero_stage}

    def pid(self) -> int:
        import os

        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {"plan": self.plan.describe(), "device": str(self.engine.device)}
