"""Reward-model loss on ranked comparisons (InstructGPT, section 3.5):

    loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l)} [log sigmoid(r(x, y_w) - r(x, y_l))]

All of a prompt's comparisons are kept together in one batch (one forward per response,
not per pair) so the reward model does not overfit from seeing a response in many separate
batch elements.

Weighting (``weighting="prompt"``, the default): each prompt counts once and its pairs
share its weight equally, i.e. a prompt with p strict pairs weighs each by 1/p. With no
ties p = C(K,2), exactly InstructGPT's normalisation; ties (equal ranks) make no pair
(``data_pipeline.collate.ranking_pairs``), and dividing by the pairs actually present keeps
a prompt with ties from weighing less than one without. This is the same weight as
``PairCollator``'s ``pair_weight``. ``weighting="pair"`` is a plain mean over pairs (as
OpenRLHF's PairWiseLoss on chosen/rejected data, where every prompt has one pair).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def pairwise_rm_loss(scores: torch.Tensor, pairs: torch.Tensor, pair_group: torch.Tensor,
                     weighting: Literal["prompt", "pair"] = "prompt",
                     margin: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """scores (N,): the reward model's score of each response in the batch; pairs (P, 2):
    (winner row, loser row) into scores; pair_group (P,): the prompt each pair belongs to.

    Returns (loss, accuracy): the weighted mean of -log sigmoid(r_w - r_l [- margin]) and
    the share of pairs with r_w > r_l (ties count wrong). A batch without pairs (all ties)
    returns a zero loss still attached to `scores` (every data-parallel rank must run
    backward) and accuracy NaN.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got {tuple(scores.shape)}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (P, 2) (winner, loser) indices, got {tuple(pairs.shape)}")
    if pair_group.shape != (pairs.shape[0],):
        raise ValueError(f"pair_group {tuple(pair_group.shape)} must be (P,) = ({pairs.shape[0]},)")
    if weighting not in ("prompt", "pair"):
        raise ValueError(f"weighting must be 'prompt' or 'pair', not {weighting!r}")
    P = pairs.shape[0]
    if P == 0:
        return scores.sum() * 0.0, float("nan")
    pairs = pairs.long()
    if int(pairs.min()) < 0 or int(pairs.max()) >= scores.shape[0]:
        raise ValueError(f"pair index out of range for {scores.shape[0]} scores")
    gap = scores[pairs[:, 0]].float() - scores[pairs[:, 1]].float()  # (P,) r_w - r_l
    per_pair = -F.logsigmoid(gap if margin is None else gap - margin.float())  # (P,)
    if weighting == "pair":
        loss = per_pair.mean()
    else:
        _, group, counts = torch.unique(pair_group, return_inverse=True, return_counts=True)
        weight = 1.0 / counts[group].float()  # (P,) 1 / pairs of its prompt
        loss = (per_pair * weight).sum() / counts.numel()
    accuracy = float((gap.detach() > 0).float().mean())
    return loss, accuracy


def pairs_from_collator(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs (P, 2), pair_group (P,)) from a ``PairCollator`` batch."""
    return (torch.stack([batch["chosen_index"], batch["rejected_index"]], dim=1),
            batch["pair_prompt"])
