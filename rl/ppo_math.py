"""PPO for language models as pure tensor functions: masked statistics, log-probs, KL-shaped
rewards, GAE, the clipped policy and value losses, and their diagnostics.

Shapes: B responses, T response tokens (right-padded), V vocabulary. ``mask`` (B, T) is 1
on generated tokens (EOS included) and 0 on padding; it may be bool, int or float 0/1.
Token t of a response is action a_t taken in state s_t (prompt + tokens < t): logprobs,
values, rewards and advantages at index t all belong to that action. Masked positions may
hold anything (even inf/NaN): every function here reads them only through ``mask``.

Losses are token-level means over the whole batch (every real token weighs the same), as
in OpenRLHF's default, TRL and DeepSpeed-Chat; see ``policy_loss`` and ``value_loss``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

KLKind = Literal["k1", "k2", "k3"]


# -- masked statistics -------------------------------------------------------------------------
def _zeros_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not x * mask: 0 * inf is NaN, and padding may hold -inf log-probs.
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over `dim`, or everything); 0 if none."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    total = _zeros_outside(x, mask).sum() if dim is None else _zeros_outside(x, mask).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1 (a scalar tensor).

    unbiased: Bessel's n/(n-1) correction (as TRL); with fewer than 2 entries it falls back
    to the biased value (0 for one entry) instead of dividing by zero.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = float(mask.float().sum())
    if unbiased and n > 1:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole tensor; positions where mask is
    0 keep their input value. shift_mean=False adds the mean back (scale only; TRL uses it
    to whiten rewards without moving their level)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(mask.bool(), white, x)


# -- log-probs, entropy, KL ------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] in float32: logits (B, T, V) where
    logits[:, t] predicts tokens[:, t] (already aligned), tokens (B, T) -> (B, T).

    Use the temperature the rollout sampled with (model.generate returns log-probs at its
    temperature), or the PPO ratio starts away from 1.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(x, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: (B, T, V) -> (B, T)."""
    x = logits.float()
    logp = F.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating
    KL divergence"), with log r = ref_logp - logp:

    k1 = -log r = logp - ref_logp          unbiased, can be negative per token
    k2 = (log r)^2 / 2                     biased, >= 0
    k3 = (r - 1) - log r                   unbiased, >= 0, lower variance than k1
    """
    log_r = ref_logp.float() - logp.float()
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl kind must be one of k1, k2, k3, not {kind!r}")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last mask == 1 position; ValueError if a row has none."""
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        row = int((~m.any(dim=1)).nonzero()[0])
        raise ValueError(f"response row {row} has no token (mask is all 0)")
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)  # (B, T)
    return torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1)


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                   mask: torch.Tensor, beta: float, kind: KLKind = "k1",
                   score_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token reward: r_t = -beta * KL_t, plus the reward model's score
    (clipped to [-score_clip, score_clip] if given) on each row's last real token.

    scores (B,), logp/ref_logp/mask (B, T) -> (rewards (B, T), kl (B, T)), both 0 on padding.
    kl is the unscaled per-token estimate; kl.sum(1).mean() is what a KL controller tracks.
    """
    if scores.shape != (logp.shape[0],):
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) = ({logp.shape[0]},)")
    kl = _zeros_outside(kl_penalty(logp, ref_logp, kind), mask)  # (B, T)
    s = scores.detach().float()
    if score_clip is not None:
        s = s.clamp(-score_clip, score_clip)
    rewards = -beta * kl
    end = last_index(mask)  # (B,)
    rewards = rewards.scatter_add(1, end[:, None], s[:, None])
    return rewards, kl


# -- GAE -------------------------------------------------------------------------------------
def _check_right_padded(mask: torch.Tensor) -> None:
    m = mask.bool()
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        row = int((m[:, 1:] & ~m[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"response mask row {row} has a token after padding: responses must "
                         f"be right-padded (mask 1...1 0...0)")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over right-padded responses.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1}
    with V(s_{T_i}) = 0 after each row's last real token: the episode ends there (EOS or the
    length cap), so nothing is bootstrapped from padding. returns = A + V (the critic's
    target). rewards, values, mask (B, T) -> (advantages, returns) (B, T), 0 on padding.
    """
    _check_right_padded(mask)
    m = mask.bool()
    r = _zeros_outside(rewards.float(), m)
    v = _zeros_outside(values.float(), m)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_adv = torch.zeros(B, device=r.device)
    next_v = torch.zeros(B, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        next_adv = torch.where(m[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
        next_v = v[:, t]  # 0 on padding: the last real token sees V = 0 next
        adv[:, t] = next_adv
    return adv, _zeros_outside(adv + v, m)


# -- losses ----------------------------------------------------------------------------------
LossAgg = Literal["token_mean", "seq_mean", "seq_sum_norm"]


def aggregate(x: torch.Tensor, mask: torch.Tensor, agg: LossAgg = "token_mean") -> torch.Tensor:
    """A per-token loss (B, T) -> scalar:

    token_mean    mean over all real tokens of the batch (every token weighs the same)
    seq_mean      mean over rows of each row's token mean (GRPO's 1/|o_i|: short answers
                  weigh more per token)
    seq_sum_norm  sum over real tokens / (B * T), T = the response cap (Dr. GRPO: no
                  length normalisation, a constant instead)
    """
    if agg == "token_mean":
        return masked_mean(x, mask)
    if agg == "seq_mean":
        return masked_mean(x, mask, dim=1).mean()
    if agg == "seq_sum_norm":
        return _zeros_outside(x, mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"loss aggregation must be token_mean, seq_mean or seq_sum_norm, not {agg!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2, agg: LossAgg = "token_mean"
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise:

    -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),  rho_t = exp(logp - old_logp)

    averaged over all real tokens of the batch (or as `agg` says, see ``aggregate``).
    Where the clipped term is the smaller one
    the gradient is exactly zero. Stats: clip_fraction (share of tokens where it is),
    approx_kl = k3 estimate of KL(old || new) = mean((rho - 1) - log rho), ratio_mean/max.
    """
    log_ratio = _zeros_outside(logp.float() - old_logp.float(), mask)  # 0 on padding: rho = 1
    ratio = log_ratio.exp()
    adv = _zeros_outside(advantages.float().detach(), mask)
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -aggregate(torch.min(surr, surr_clipped), mask, agg)
    with torch.no_grad():
        stats = {
            "policy_loss": float(loss),
            "clip_fraction": float(masked_mean((surr_clipped < surr).float(), mask)),
            "approx_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "ratio_max": float(_zeros_outside(ratio, mask).max()),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_eps: float | None = 0.2
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (PPO2 / OpenAI baselines):

    0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)

    over all real tokens; 0.5 makes the gradient (V - R). clip_eps=None: plain 0.5 * MSE.
    Stats: value_loss, value_clip_fraction (tokens where the clipped error is the larger
    one: gradient 0 there), values_mean, returns_mean.
    """
    v = values.float()
    ret = returns.float().detach()
    err = (v - ret) ** 2
    if clip_eps is None:
        worst = err
        clipped_share = torch.zeros((), device=v.device)
    else:
        old = old_values.float().detach()
        v_clip = old + (v - old).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - ret) ** 2
        worst = torch.max(err, err_clip)
        clipped_share = masked_mean((err_clip > err).float(), mask)
    loss = 0.5 * masked_mean(worst, mask)
    with torch.no_grad():
        stats = {"value_loss": float(loss), "value_clip_fraction": float(clipped_share),
                 "values_mean": float(masked_mean(v, mask)),
                 "returns_mean": float(masked_mean(ret, mask))}
    return loss, stats


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
            kind: KLKind = "k3", agg: LossAgg = "token_mean", clamp: float = 10.0
            ) -> torch.Tensor:
    """KL(pi || ref) as a loss term on the current policy's log-probs (GRPO: beta times this
    is added to the policy loss instead of shaping the reward). The per-token estimate is
    clamped to [-clamp, clamp] (as veRL's low_var_kl) so one token far from the reference
    cannot dominate a step."""
    kl = kl_penalty(logp, ref_logp.detach(), kind).clamp(-clamp, clamp)
    return aggregate(kl, mask, agg)


def ptx_loss(lm_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx (InstructGPT eq. 2): coef * LM cross-entropy on pretraining data, added to the
    actor's policy loss (lm_loss from model.losses.token_cross_entropy, a token mean)."""
    return coef * lm_loss


# -- diagnostics -----------------------------------------------------------------------------
@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 = perfect critic, 0 = no better than a
    constant, < 0 worse. NaN when the returns do not vary."""
    v, r = values.float(), returns.float()
    var_r = float(masked_var(r, mask))
    if var_r <= 0.0 or math.isnan(var_r):
        return float("nan")
    return 1.0 - float(masked_var(r - v, mask)) / var_r


@torch.no_grad()
def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token entropy of the policy over real tokens (a collapse detector)."""
    return float(masked_mean(entropy_from_logits(logits), mask))


def ensemble_reward(scores: torch.Tensor, reduce: str, lam: float = 1.0) -> torch.Tensor:
    """(B, k) member scores -> (B,) reward: mean, min, or mean - lam * std over members."""
    if reduce == "mean" or scores.shape[1] == 1:
        return scores.mean(1)
    if reduce == "min":
        return scores.min(1).values
    if reduce == "mean_minus_std":
        return scores.mean(1) - lam * scores.std(1, unbiased=False)
    raise ValueError(f"unknown ensemble_reduce {reduce!r} (mean, min, mean_minus_std)")
