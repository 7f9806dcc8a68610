"""Experience: one PPO rollout batch as typed tensors, and the driver's step that turns raw
rollout results (tokens, log-probs, values, scores) into KL-shaped rewards, GAE advantages
and returns.

Layout (B prompts with one response each, P prompt columns, R response columns):

    full sequence = prompt (left-padded) ++ response (right-padded)      (B, P + R)
    logits[:, P - 1 + t] predict response token t -> ``action_slice``

so a forward on ``sequences()`` followed by ``logits[:, exp.action_slice]`` gives the
(B, R, V) logits of the actions, and the critic's ``values[:, exp.action_slice]`` are
V(s_t), the value of the state before token t (as DeepSpeed-Chat and OpenRLHF).

Arrow: ``to_arrow``/``from_arrow`` use data_pipeline.rollout's schema (zero-copy) plus one
extra column, ``scores`` (float32, one per row), which that schema lacks; rollout's own
``from_arrow`` ignores the extra column, so both readers accept the batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from trellis.data_pipeline.rollout import RolloutBatch, from_arrow, to_arrow
from trellis.rl.ppo_math import KLKind, gae, masked_mean, masked_whiten, shaped_rewards

SCORES_COLUMN = "scores"


def action_slice(P: int, R: int) -> slice:
    """Columns of a full-sequence (B, P + R) output that predict the R response tokens:
    the output at column P - 1 + t predicts response token t."""
    return slice(P - 1, P - 1 + R)
_PROMPT = ("prompt_ids", "prompt_mask")


def with_eos(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_id: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses (B, R) with an EOS after the last token of every row that has none (one
    more column): what a reward model trained on complete answers must score."""
    B, R = response_ids.shape
    lens = response_mask.sum(1)                                            # (B,)
    last = response_ids.gather(1, (lens - 1).clamp(min=0)[:, None])[:, 0]
    missing = (lens == 0) | (last != eos_id)
    ids = torch.cat([response_ids, torch.zeros(B, 1, dtype=response_ids.dtype)], 1)
    mask = torch.cat([response_mask, torch.zeros(B, 1, dtype=response_mask.dtype)], 1)
    rows = missing.nonzero()[:, 0]
    ids[rows, lens[rows]] = eos_id
    mask[rows, lens[rows]] = True
    return ids, mask


@dataclass
class Experience:
    prompt_ids: torch.Tensor     # (B, P) int64, left-padded
    prompt_mask: torch.Tensor    # (B, P) bool/int, 1 = token
    response_ids: torch.Tensor   # (B, R) int64, right-padded (pad after EOS)
    response_mask: torch.Tensor  # (B, R) bool/int, 1 = generated token incl. EOS
    logprobs: torch.Tensor       # (B, R) float32, actor log pi_old(a_t | s_t) at rollout
    ref_logprobs: torch.Tensor   # (B, R) float32, reference (SFT) model
    values: torch.Tensor         # (B, R) float32, critic V_old(s_t) at rollout
    rewards: torch.Tensor        # (B, R) float32, KL-shaped per-token rewards
    advantages: torch.Tensor     # (B, R) float32, GAE (whitened over the batch)
    returns: torch.Tensor        # (B, R) float32, GAE returns = raw advantages + values
    scores: torch.Tensor         # (B,) float32, reward-model score (before clipping)

    def __post_init__(self) -> None:
        B, P = self.prompt_ids.shape
        R = self.response_ids.shape[1]
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            want = (B, P) if f.name in _PROMPT else (B,) if f.name == "scores" else (B, R)
            if tuple(t.shape) != want:
                raise ValueError(f"experience field '{f.name}': expected shape {want}, got "
                                 f"{tuple(t.shape)}")

    # -- shape helpers ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def action_slice(self) -> slice:
        """Columns of a full-sequence output that belong to the R actions."""
        return action_slice(self.prompt_ids.shape[1], self.response_ids.shape[1])

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) (B, P + R) of prompt ++ response."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)
        return ids, mask

    # -- batching --------------------------------------------------------------------------
    def _map(self, fn) -> "Experience":
        return Experience(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Experience":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, index: torch.Tensor | list[int]) -> "Experience":
        """Rows `index` (e.g. a permutation for shuffled minibatches)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return self._map(lambda t: t[idx.to(t.device)])

    def split(self, n: int) -> list["Experience"]:
        """n equal minibatches of consecutive rows; B must divide by n."""
        B = self.batch_size
        if n < 1 or B % n:
            raise ValueError(f"cannot split an experience batch of {B} into {n} equal minibatches")
        k = B // n
        return [self._map(lambda t, i=i: t[i * k:(i + 1) * k]) for i in range(n)]

    @staticmethod
    def concat(parts: list["Experience"]) -> "Experience":
        """Rows of all parts (same P and R) in order."""
        if not parts:
            raise ValueError("concat needs at least one experience batch")
        return Experience(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                             for f in dataclasses.fields(Experience)})

    # -- rollout / Arrow -------------------------------------------------------------------
    def to_rollout(self) -> RolloutBatch:
        """data_pipeline's RolloutBatch (CPU, its dtypes); `scores` is not part of it."""
        kw = {}
        for f in dataclasses.fields(RolloutBatch):
            t = getattr(self, f.name).detach().cpu()
            t = t.bool() if f.name.endswith("_mask") else t.long() if f.name.endswith("_ids") \
                else t.float()
            kw[f.name] = t.contiguous()
        return RolloutBatch(**kw)

    @classmethod
    def from_rollout(cls, batch: RolloutBatch, scores: torch.Tensor) -> "Experience":
        return cls(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(RolloutBatch)},
                   scores=scores.float())

    def to_arrow(self) -> pa.RecordBatch:
        """Rollout record batch (shares memory with the CPU tensors) + a `scores` column."""
        rb = to_arrow(self.to_rollout())
        s = self.scores.detach().cpu().float().contiguous().numpy()
        schema = rb.schema.append(pa.field(SCORES_COLUMN, pa.float32()))
        return pa.record_batch(list(rb.columns) + [pa.array(s)], schema=schema)

    @classmethod
    def from_arrow(cls, rb: pa.RecordBatch | pa.Table) -> "Experience":
        """Inverse of to_arrow; tensors view Arrow's read-only buffers (clone to write)."""
        if SCORES_COLUMN not in rb.schema.names:
            raise ValueError(f"rollout batch lacks the '{SCORES_COLUMN}' column "
                             f"(written by data_pipeline.rollout, not Experience.to_arrow?)")
        col = rb.column(SCORES_COLUMN)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        scores = torch.from_numpy(np.asarray(col.to_numpy(zero_copy_only=False),
                                             dtype=np.float32).copy())
        return cls.from_rollout(from_arrow(rb), scores)


# -- the driver's math -------------------------------------------------------------------------
@torch.no_grad()
def make_experience(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor,
                    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                    scores: torch.Tensor, beta: float, gamma: float = 1.0, lam: float = 0.95,
                    kl_kind: KLKind = "k1", score_clip: float | None = None,
                    whiten_advantages: bool = True) -> tuple[Experience, dict[str, float]]:
    """Rollout results -> Experience: r_t = -beta KL_t (+ clipped score at the last token),
    GAE(gamma, lam) advantages and returns, advantages whitened over the batch's real
    tokens. Stats: kl (mean summed KL per response: feed it to the KL controller), score,
    reward (mean summed shaped reward), response_length, advantage/return means.
    """
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, response_mask, beta,
                                 kl_kind, score_clip)
    adv, returns = gae(rewards, values, response_mask, gamma, lam)
    if whiten_advantages:
        adv = masked_whiten(adv, response_mask)  # padding stays 0
    exp = Experience(prompt_ids, prompt_mask, response_ids, response_mask, logprobs.float(),
                     ref_logprobs.float(), values.float(), rewards, adv, returns, scores.float())
    m = response_mask
    stats = {"kl": float(kl.sum(1).mean()), "score": float(scores.float().mean()),
             "reward": float(rewards.sum(1).mean()),
             "response_length": float(m.float().sum(1).mean()),
             "returns_mean": float(masked_mean(returns, m)),
             "values_mean": float(masked_mean(values.float(), m))}
    return exp, stats


@torch.no_grad()
def make_critic_free_experience(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                response_ids: torch.Tensor, response_mask: torch.Tensor,
                                logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                                scores: torch.Tensor, algorithm: str, group_size: int,
                                beta: float, kl_in_reward: bool, gamma: float = 1.0,
                                kl_kind: KLKind = "k1", score_clip: float | None = None,
                                scale_by_std: bool = True, eps: float = 1e-6
                                ) -> tuple[Experience, dict[str, float]]:
    """Rollout results -> Experience without a critic (values 0). Rows are groups of
    `group_size` responses per prompt (rl.advantages).

    grpo / rloo: the sequence reward R = clipped score - beta * summed KL (the KL term only
    when kl_in_reward) goes through the group estimator; every token gets its response's
    advantage; returns = advantages. reinforce_pp: r_t = -beta KL_t (+ clipped score at the
    last token), discounted returns whitened over the batch. Stats as make_experience's, plus
    the group diagnostics."""
    from trellis.rl.advantages import (grpo_advantages, group_stats, per_token,
                                       reinforce_pp_advantages, rloo_advantages)
    m = response_mask
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, m,
                                 beta if kl_in_reward else 0.0, kl_kind, score_clip)
    if algorithm == "reinforce_pp":
        adv, returns = reinforce_pp_advantages(rewards, m, gamma)
        seq_reward = rewards.sum(1)
    elif algorithm in ("grpo", "rloo"):
        seq_reward = rewards.sum(1)  # (B,) clipped score - beta * summed KL
        seq_adv = grpo_advantages(seq_reward, group_size, scale_by_std, eps) \
            if algorithm == "grpo" else rloo_advantages(seq_reward, group_size)
        adv = per_token(seq_adv, m)
        returns = adv
    else:
        raise ValueError(f"no critic-free estimator {algorithm!r} (grpo, rloo, reinforce_pp)")
    values = torch.zeros_like(adv)
    exp = Experience(prompt_ids, prompt_mask, response_ids, response_mask, logprobs.float(),
                     ref_logprobs.float(), values, rewards, adv, returns, scores.float())
    stats = {"kl": float(kl.sum(1).mean()), "score": float(scores.float().mean()),
             "reward": float(seq_reward.mean()),
             "response_length": float(m.float().sum(1).mean()),
             "returns_mean": float(masked_mean(returns, m)),
             "advantage_abs_mean": float(masked_mean(adv.abs(), m))}
    return exp, stats | group_stats(seq_reward, group_size)
