"""The four PPO roles, one class per WorkerGroup rank (the Ray integration point of rl/):

  ActorWorker      policy (from SFT), trains: samples rollouts, PPO clipped loss (+ ptx)
  CriticWorker     value model (from the RM), trains: values, clipped value loss
  ReferenceWorker  frozen SFT policy (ZeRO-3 inference): reference log-probs
  RewardWorker     frozen reward model (ZeRO-3 inference): scores

Inputs and outputs are Arrow record batches (data_pipeline.rollout.tensors_to_arrow), so
what crosses the Ray object store is flat buffers. The driver (rl/ppo_trainer.py) decides
which rows each rank gets.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import pyarrow as pa
import torch

from trellis.data_pipeline.rollout import arrow_to_tensors, tensors_to_arrow
from trellis.data_pipeline.tokenizer import EOS_ID
from trellis.model.generate import GenerationConfig, generate
from trellis.model.io import load_module
from trellis.parallel import dist
from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.engine_worker import EngineWorker
from trellis.parallel.rng import keyed_generator, seed_all
from trellis.rl.experience import Experience, action_slice, with_eos
from trellis.rl.ppo_config import PPOConfig
from trellis.rl.ppo_math import (ensemble_reward, entropy_from_logits, kl_loss, masked_mean,
                                 policy_loss, ptx_loss, token_logprobs, value_loss)


def _timed(rb: pa.RecordBatch, t0: float) -> pa.RecordBatch:
    """Attach this call's compute seconds (the driver's per-phase timing)."""
    return rb.replace_schema_metadata({"seconds": f"{time.perf_counter() - t0:.6f}"})


def _sequences(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """(ids (B, P+R), mask (B, P+R), the action columns) from prompt/response tensors."""
    ids = torch.cat([t["prompt_ids"], t["response_ids"]], dim=1)
    mask = torch.cat([t["prompt_mask"].long(), t["response_mask"].long()], dim=1)
    return ids, mask, action_slice(t["prompt_ids"].shape[1], t["response_ids"].shape[1])


class _RoleWorker(EngineWorker):
    """One rank of a role: the shared engine worker over the role's model (trainable roles
    get an optimizer), plus the PPO epochs/minibatches loop both trainable roles share."""
    head = "lm"

    def __init__(self, rank: int, world_size: int, init_dir: str, ppo: dict, par: dict,
                 optim: dict | None, total_steps: int, rows_per_rank: int, run_dir: str,
                 seed: int = 0, keep_last: int = 2):
        self.ppo = PPOConfig(**ppo)
        self.seed = seed
        seed_all(seed)
        model = self._load(init_dir)
        par_cfg = ParallelConfig(**par)
        if optim is not None:  # one optimizer step per minibatch
            mb = rows_per_rank // self.ppo.minibatches
            par_cfg = dataclasses.replace(par_cfg, micro_batch_size=max(1, mb), grad_accum=1)
        self._setup(rank, world_size, model, par_cfg,
                    OptimConfig(**optim) if optim is not None else None, total_steps, run_dir,
                    self.model_cfg.max_seq_len, keep_last)

    def _load(self, init_dir: str) -> torch.nn.Module:
        model, self.model_cfg, self.meta = load_module(init_dir, head=self.head)
        return model

    def export_weights(self, out_dir: str, extra: dict[str, Any]) -> str:
        """The current weights as trellis weight files (model/io.py) at out_dir, replaced
        whole (written beside it, then renamed). Collective under ZeRO-3; rank 0 writes."""
        import os
        import shutil
        from pathlib import Path

        from trellis.model.build import build_model
        from trellis.model.io import load_full_state_dict, save_module
        state = self.engine.consolidated_state_dict()
        if self.rank == 0:
            out = Path(out_dir)
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            module = build_model(self.model_cfg, self.head)
            load_full_state_dict(module, state, out_dir)
            save_module(module, self.model_cfg, self.head, tmp, extra)
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        return out_dir

    def _action_outputs(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's outputs at the R action columns: (B, R, ...) in float32."""
        ids, mask, actions = _sequences(t)
        return self._forward(ids, mask)[:, actions].float()

    def _ppo_epochs(self, exp_rb: pa.RecordBatch, iteration: int, salt: int,
                    minibatch_loss: Any) -> dict[str, float]:
        """ppo_epochs passes over this rank's rows in shuffled minibatches, one optimizer step
        each; `minibatch_loss(mb, seq) -> (loss, stats)`. Stats averaged over steps and ranks."""
        exp = Experience.from_arrow(exp_rb)
        self.engine.train()
        stats: dict[str, float] = {}
        n = 0
        for epoch in range(self.ppo.ppo_epochs):
            g = keyed_generator(self.seed, iteration, epoch, self.rank, salt)
            for mb in exp.select(torch.randperm(exp.batch_size, generator=g)).split(self.ppo.minibatches):
                mb = mb.to(self.device)
                seq = {"prompt_ids": mb.prompt_ids, "prompt_mask": mb.prompt_mask,
                       "response_ids": mb.response_ids, "response_mask": mb.response_mask}
                loss, s = minibatch_loss(mb, seq)
                self.engine.backward(loss)
                s |= {k: v for k, v in self.engine.step().items() if k in ("grad_norm", "lr")}
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v
                n += 1
        return dist.all_reduce_mean_dict({k: v / n for k, v in stats.items()})


class ActorWorker(_RoleWorker):
    head = "lm"

    def __init__(self, *args: Any, ptx_dir: str | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.ptx = None
        if self.ppo.ptx_coef > 0:
            from trellis.data_pipeline.config import DataConfig
            from trellis.data_pipeline.stream import TokenStream
            seq = min(self.model_cfg.max_seq_len, 128)
            self.ptx_stream = TokenStream(ptx_dir, DataConfig(seq_len=seq, seed=self.seed),
                                          rank=self.rank, world_size=self.world)
            self.ptx = self.ptx_stream.iter_batches(self.plan.micro_batch)

    # The PPO-ptx stream position is saved with the actor's checkpoints, so a resumed run
    # continues the pretraining data where it was instead of replaying it.
    def data_state(self) -> dict[str, Any]:
        return {"ptx": self.ptx_stream.state_dict()} if self.ptx is not None else {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        if self.ptx is not None and "ptx" in state:
            self.ptx_stream.load_state_dict(state["ptx"])
            self.ptx = self.ptx_stream.iter_batches(self.plan.micro_batch)

    def _gen_cfg(self, greedy: bool) -> GenerationConfig:
        p = self.ppo
        return GenerationConfig(max_new_tokens=p.max_new_tokens, do_sample=not greedy,
                                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                stop_early=self.world == 1 or self.engine.zero_stage < 3)

    @torch.no_grad()
    def generate(self, prompts: pa.RecordBatch, iteration: int, greedy: bool = False
                 ) -> pa.RecordBatch:
        """Sample one response per prompt; old log-probs recomputed by a full forward (the
        same computation training uses, at the sampling temperature)."""
        t0 = time.perf_counter()
        t = arrow_to_tensors(prompts)
        ids, mask = t["prompt_ids"].to(self.device), t["prompt_mask"].to(self.device)
        self.engine.eval()
        g = None if greedy else keyed_generator(self.seed, iteration, self.rank)
        gen = generate(self.engine.module, ids, mask.long(), self._gen_cfg(greedy), generator=g)
        R = self.ppo.max_new_tokens
        resp = torch.zeros(ids.shape[0], R, dtype=torch.long)
        rmask = torch.zeros(ids.shape[0], R, dtype=torch.bool)
        resp[:, :gen.tokens.shape[1]] = gen.tokens.cpu()
        rmask[:, :gen.mask.shape[1]] = gen.mask.bool().cpu()
        out = {"prompt_ids": t["prompt_ids"], "prompt_mask": t["prompt_mask"].bool(),
               "response_ids": resp, "response_mask": rmask}
        out["logprobs"] = self._logprobs(out)[0].cpu() if not greedy else torch.zeros(resp.shape)
        return _timed(tensors_to_arrow(out), t0)

    def _logprobs(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(a_t) (B, R), logits (B, R, V)) at the rollout temperature."""
        logits = self._action_outputs(t) / self.ppo.temperature
        return token_logprobs(logits, t["response_ids"].to(self.device)), logits

    @torch.no_grad()
    def token_logprobs(self, seq: pa.RecordBatch, temperature: float) -> pa.RecordBatch:
        """log pi(a_t) of given responses (e.g. greedy ones, for the KL to the reference)."""
        self.engine.eval()
        lp = self._logprobs(arrow_to_tensors(seq))[0].cpu()
        return tensors_to_arrow({"logprobs": lp})

    def train(self, exp_rb: pa.RecordBatch, iteration: int, kl_coef: float = 0.0
              ) -> dict[str, float]:
        """ppo_epochs of the clipped policy loss (+ ptx); with kl_coef > 0 (GRPO's KL in the
        loss) plus kl_coef * the KL to the reference's log-probs of the rollout."""
        agg = self.ppo.policy_loss_agg

        def minibatch_loss(mb: Experience, seq: dict) -> tuple[torch.Tensor, dict[str, float]]:
            logp, logits = self._logprobs(seq)
            loss, s = policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask,
                                  self.ppo.clip_eps, agg)
            s["entropy"] = float(masked_mean(entropy_from_logits(logits.detach()),
                                             mb.response_mask))
            if kl_coef > 0:
                kl = kl_loss(logp, mb.ref_logprobs, mb.response_mask, self.ppo.kl_loss_kind, agg)
                loss = loss + kl_coef * kl
                s["kl_loss"] = float(kl.detach())
            if self.ptx is not None:
                lm = self._ptx_loss()
                loss = loss + ptx_loss(lm, self.ppo.ptx_coef)
                s["ptx_loss"] = float(lm.detach())
            return loss, s
        stats = self._ppo_epochs(exp_rb, iteration, 0, minibatch_loss)
        return {f"actor/{k}": v for k, v in stats.items()}

    def _ptx_loss(self) -> torch.Tensor:
        from trellis.data_pipeline.collate import clm_collate
        from trellis.model.losses import token_cross_entropy
        b = clm_collate(next(self.ptx))
        logits = self._forward(b["input_ids"], b["attention_mask"])
        return token_cross_entropy(logits, b["labels"].to(self.device).long())


class ReferenceWorker(_RoleWorker):
    head = "lm"

    @torch.no_grad()
    def logprobs(self, seq: pa.RecordBatch, temperature: float) -> pa.RecordBatch:
        t0 = time.perf_counter()
        t = arrow_to_tensors(seq)
        logits = self._action_outputs(t) / temperature
        lp = token_logprobs(logits, t["response_ids"].to(self.device)).cpu()
        return _timed(tensors_to_arrow({"ref_logprobs": lp}), t0)


class RewardWorker(_RoleWorker):
    """The reward model, or an ensemble: init_dir plus `members` score every row (B, k) and
    the reward is their ppo.ensemble_reduce; with `heldout`, the last member is scored but
    left out of the reward (an independent judge for checkpoint selection)."""
    head = "score"
    eos_id = EOS_ID

    def __init__(self, *args: Any, members: tuple[str, ...] = (), heldout: bool = False,
                 **kw: Any):
        self.members, self.heldout = list(members), heldout
        super().__init__(*args, **kw)

    def _load(self, init_dir: str) -> torch.nn.Module:
        from trellis.model.heads import ScoreEnsemble
        first = super()._load(init_dir)
        return ScoreEnsemble([first] + [load_module(d, head="score")[0] for d in self.members])

    @torch.no_grad()
    def scores(self, seq: pa.RecordBatch) -> pa.RecordBatch:
        """Scores read at each response's EOS, as the RM was trained; a response cut by
        max_new_tokens gets an EOS appended (its text is judged, not a mid-answer position)
        and ppo.missing_eos_penalty subtracted."""
        t0 = time.perf_counter()
        t = arrow_to_tensors(seq)
        resp, rmask = with_eos(t["response_ids"], t["response_mask"].bool(), self.eos_id)
        ids, mask, _ = _sequences(t | {"response_ids": resp, "response_mask": rmask})
        members = self._forward(ids, mask).float().cpu()                # (B, k)
        out = {}
        if self.heldout:
            out["scores_heldout"], members = members[:, -1], members[:, :-1]
        s = ensemble_reward(members, self.ppo.ensemble_reduce, self.ppo.ensemble_lambda)
        cut = rmask.sum(1) > t["response_mask"].sum(1)                  # (B,) EOS appended
        out["scores"] = s - self.ppo.missing_eos_penalty * cut.float()
        if members.shape[1] > 1:
            out["scores_std"] = members.std(1, unbiased=False)
        return _timed(tensors_to_arrow(out), t0)


class CriticWorker(_RoleWorker):
    head = "value"

    def _values(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._action_outputs(t)  # (B, R): V(s_t), the state before action t

    @torch.no_grad()
    def values(self, seq: pa.RecordBatch) -> pa.RecordBatch:
        t0 = time.perf_counter()
        self.engine.eval()
        return _timed(tensors_to_arrow({"values": self._values(arrow_to_tensors(seq)).cpu()}), t0)

    def train(self, exp_rb: pa.RecordBatch, iteration: int) -> dict[str, float]:
        def minibatch_loss(mb: Experience, seq: dict) -> tuple[torch.Tensor, dict[str, float]]:
            return value_loss(self._values(seq), mb.values, mb.returns, mb.response_mask,
                              self.ppo.value_clip_eps)
        stats = self._ppo_epochs(exp_rb, iteration, 1, minibatch_loss)
        return {f"critic/{k}": v for k, v in stats.items() if k != "lr"}
