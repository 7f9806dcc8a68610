"""Direct preference optimisation as pure tensor functions (Rafailov et al. 2023): the
policy's log-ratio to a frozen reference is an implicit reward r = beta * log(pi / ref).

  logits = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))
  sigmoid  -(1 - eps) log sigma(beta logits) - eps log sigma(-beta logits)   (eps: label
           smoothing, conservative DPO; eps = 0 is DPO)
  ipo      (logits - 1 / (2 beta))^2, with length-averaged log-probs (Azar et al. 2023)

Inputs are per-response sequence log-probs (summed over the response tokens, EOS
included; averaged for IPO): N responses, P pairs (winner row, loser row).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor, average: bool = False
                      ) -> torch.Tensor:
    """(N, T) per-token log-probs -> (N,) their sum (or mean) over mask == 1."""
    m = mask.bool()
    total = torch.where(m, token_lp, torch.zeros_like(token_lp)).sum(1)
    return total / m.sum(1).clamp(min=1) if average else total


def pair_weights(pair_group: torch.Tensor, weighting: Literal["prompt", "pair"]) -> torch.Tensor:
    """(P,) weights summing to 1: each prompt counts once ('prompt') or each pair ('pair')."""
    P = pair_group.shape[0]
    if weighting == "pair":
        return torch.full((P,), 1.0 / max(P, 1))
    _, group, counts = torch.unique(pair_group, return_inverse=True, return_counts=True)
    return 1.0 / counts[group].float() / counts.numel()


def dpo_loss(policy_lp: torch.Tensor, ref_lp: torch.Tensor, pairs: torch.Tensor,
             weights: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """policy_lp, ref_lp (N,) sequence log-probs; pairs (P, 2) (chosen, rejected) rows;
    weights (P,) summing to 1 (the loss is their weighted sum). Returns (loss, stats), the
    stats plain means over pairs: reward_margin (beta * logits), accuracy (share of pairs whose implicit reward ranks the chosen higher; ties count
    wrong), rewards/logps of chosen and rejected. No pairs: a zero loss still attached to
    policy_lp (every rank runs backward) and NaN stats."""
    if pairs.shape[0] == 0:
        nan = float("nan")
        return policy_lp.sum() * 0.0, {"loss": 0.0, "reward_margin": nan, "accuracy": nan,
                                       "chosen_logps": nan, "rejected_logps": nan,
                                       "chosen_rewards": nan, "rejected_rewards": nan}
    c, r = pairs[:, 0].long(), pairs[:, 1].long()
    pi_c, pi_r = policy_lp[c].float(), policy_lp[r].float()
    ref_c, ref_r = ref_lp[c].float().detach(), ref_lp[r].float().detach()
    logits = (pi_c - pi_r) - (ref_c - ref_r)                        # (P,)
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * logits) \
            - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss_type == "ipo":
        per_pair = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss_type must be 'sigmoid' or 'ipo', not {loss_type!r}")
    w = weights.to(per_pair.device).float()
    loss = (per_pair * w).sum()
    with torch.no_grad():
        rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
        stats = {"loss": float(loss), "reward_margin": float((rc - rr).mean()),
                 "accuracy": float((rc > rr).float().mean()),
                 "chosen_logps": float(pi_c.mean()), "rejected_logps": float(pi_r.mean()),
                 "chosen_rewards": float(rc.mean()), "rejected_rewards": float(rr.mean())}
    return loss, stats
