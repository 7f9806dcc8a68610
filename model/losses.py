"""Pretraining objectives as pure tensor functions: causal LM, masked LM, distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE.

    logits (B, T, V), labels (B, T) already aligned (a collator shifts them for CLM); any
    integer dtype (cross_entropy takes int64 targets only: narrower labels are widened here).
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(),
                           ignore_index=IGNORE)


def distillation_loss(
    student_logits: torch.Tensor,   # (B, T, V)
    teacher_logits: torch.Tensor,   # (B, T, V)
    labels: torch.Tensor,           # (B, T) MLM labels, IGNORE where not masked
    student_hidden: torch.Tensor,   # (B, T, C)
    teacher_hidden: torch.Tensor,   # (B, T, C)
    attention_mask: torch.Tensor,   # (B, T) 1 = token
    temperature: float = 2.0,
    alpha_kl: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilBERT's triple loss (Sanh et al. 2019):
    a*KL(teacher/T || student/T)*T^2 + b*MLM + c*(1 - cos(h_s, h_t)), over real tokens.

    The KL is taken at every non-pad position, as DistilBERT does, not only masked ones;
    T^2 keeps its gradient scale independent of T (Hinton et al. 2015).
    """
    keep = attention_mask.bool().flatten()                       # (B*T,)
    s = student_logits.float().flatten(0, 1)[keep] / temperature  # (N, V)
    t = teacher_logits.float().flatten(0, 1)[keep] / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean",
                  log_target=True) * temperature ** 2
    mlm = token_cross_entropy(student_logits, labels)
    hs = student_hidden.float().flatten(0, 1)[keep]               # (N, C)
    ht = teacher_hidden.float().flatten(0, 1)[keep]
    cos = (1.0 - F.cosine_similarity(hs, ht, dim=-1)).mean()
    total = alpha_kl * kl + alpha_mlm * mlm + alpha_cos * cos
    # the parts as detached 0-d tensors: the caller reads them once per step, not per batch
    return total, {"kl": kl.detach(), "mlm": mlm.detach(), "cos": cos.detach()}
