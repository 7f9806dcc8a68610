"""Critic-free advantage estimators as pure tensor functions: GRPO (and Dr. GRPO), RLOO and
REINFORCE++. They replace the critic + GAE of PPO; the policy loss stays PPO's clipped
ratio (rl.ppo_math.policy_loss) over several epochs/minibatches, as in the references.

Groups: a rollout batch holds G consecutive responses per prompt (rows i*G .. i*G + G - 1
answer prompt i), so a (B,) vector of rewards views as (B / G, G).

  GRPO        A_i = (R_i - mean_g R) / (std_g R + eps)        (Shao et al. 2024, eq. 3)
  Dr. GRPO    A_i =  R_i - mean_g R                            (Liu et al. 2025; no std)
  RLOO        A_i =  R_i - 1/(G-1) sum_{j != i} R_j           (Ahmadian et al. 2024)
  REINFORCE++ A_t = whiten_batch(sum_{t' >= t} gamma^(t'-t) r_t'), r_t = -beta KL_t
              (+ score at the last token)                      (Hu 2025)

The sequence-level estimators (GRPO, RLOO) give every token of a response the same
advantage. std is Bessel-corrected (torch.std's default, as OpenRLHF, veRL and TRL). A group
whose rewards are all equal gets advantage 0 (never NaN); so does a batch of equal returns.
"""
from __future__ import annotations

import torch

from trellis.rl.ppo_math import _check_right_padded, masked_whiten


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / G, G): row i holds the G responses of prompt i."""
    if x.dim() != 1:
        raise ValueError(f"rewards must be (B,), got {tuple(x.shape)}")
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} responses do not form groups of {group_size}")
    return x.float().view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """(B,) sequence rewards -> (B,) group-relative advantages; scale_by_std=False is
    Dr. GRPO's (mean-centred only)."""
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 responses per prompt, got group_size {group_size}")
    g = grouped(rewards, group_size)                       # (P, G)
    adv = g - g.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) sequence rewards -> (B,) rewards minus the mean of the other G - 1 of the group."""
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 responses per prompt, got group_size {group_size}")
    g = grouped(rewards, group_size)                       # (P, G)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
                       ) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over right-padded responses; (B, T) -> (B, T), 0 on padding."""
    _check_right_padded(mask)
    m = mask.bool()
    r = torch.where(m, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], device=r.device)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(m, out, torch.zeros_like(out))


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor,
                            gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: (advantages, returns) (B, T): discounted returns of the per-token rewards,
    whitened over every real token of the batch (the global normalisation that stands in
    for a critic's baseline). Padding is 0 in both."""
    returns = discounted_returns(token_rewards, mask, gamma)
    adv = masked_whiten(returns, mask)
    return torch.where(mask.bool(), adv, torch.zeros_like(adv)), returns


def per_token(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T) on every real token, 0 on padding."""
    return torch.where(mask.bool(), adv.float()[:, None].expand(mask.shape),
                       torch.zeros(mask.shape, device=adv.device))


@torch.no_grad()
def group_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Diagnostics: the mean within-group std of the rewards and the share of groups whose
    rewards are all equal (no learning signal from them)."""
    if group_size < 2:
        return {}
    g = grouped(rewards, group_size)
    std = g.std(1)
    return {"group_reward_std": float(std.mean()),
            "zero_std_groups": float((std <= 1e-8).float().mean())}
