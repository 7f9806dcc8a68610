"""Best-of-n (rejection sampling): n samples per prompt, the reward model picks one. The
baseline every RL result should beat at equal KL (Gao et al. 2022; InstructGPT and Llama-2
also use it to build fine-tuning sets). Its KL to the sampling policy is analytic:
KL(best-of-n || policy) = log n - (n - 1) / n (Stiennon et al. 2020, appendix)."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def bon_kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


def pick(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(P,) index of the best of the first n samples of each prompt by `scores` (P, K)."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {scores.shape[1]} samples per prompt")
    return scores[:, :n].argmax(1)


def best_of_n_curve(rm: torch.Tensor, gold: torch.Tensor | None,
                    ns: Sequence[int] = (1, 2, 4, 8, 16)) -> list[dict[str, float]]:
    """For each n: mean RM score and gold of the RM's pick, and the gold of the gold's own
    pick (the ceiling a perfect reward model reaches), from (P, K) scores of K samples."""
    rows = []
    P = rm.shape[0]
    for n in ns:
        by_rm = pick(rm, n)
        row = {"n": n, "kl": bon_kl(n), "rm": float(rm[torch.arange(P), by_rm].mean())}
        if gold is not None:
            row["gold"] = float(gold[torch.arange(P), by_rm].mean())
            row["exact"] = float((gold[torch.arange(P), by_rm] == 1.0).float().mean())
            row["gold_by_gold"] = float(gold[:, :n].max(1).values.mean())
        rows.append(row)
    return rows


def rm_gold_agreement(rm: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """How well the RM ranks a policy's own samples: pairwise accuracy over sample pairs of
    a prompt whose gold differs, and the mean within-prompt Pearson correlation (prompts
    whose samples all score alike are skipped)."""
    dr = rm[:, :, None] - rm[:, None, :]                          # (P, K, K)
    dg = gold[:, :, None] - gold[:, None, :]
    pairs = dg > 0
    acc = float(((dr > 0) & pairs).sum() / pairs.sum().clamp(min=1))
    rc, gc = rm - rm.mean(1, keepdim=True), gold - gold.mean(1, keepdim=True)
    den = (rc.pow(2).sum(1) * gc.pow(2).sum(1)).sqrt()
    ok = den > 1e-12
    corr = float(((rc * gc).sum(1)[ok] / den[ok]).mean()) if ok.any() else math.nan
    return {"pairwise_accuracy": acc, "within_prompt_corr": corr, "pairs": int(pairs.sum())}
