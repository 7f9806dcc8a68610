"""Scoring text with a causal LM, pure torch: the log-likelihood of a continuation given a
context (multiple choice, perplexity), and the rolling windows that let a document longer
than the context be scored with every token predicted exactly once."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]],
                   pad_id: int = 0) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation token | all before
    it), whether every continuation token is the argmax). One right-padded batch; the model
    reads (context + continuation)[:-1]. `model(ids, attention_mask=)` -> (B, T, V)."""
    seqs = [list(c) + list(x) for c, x in requests]
    T = max(len(s) for s in seqs) - 1
    dev = next(model.parameters()).device
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s) - 1] = torch.tensor(s[:-1])
        mask[i, :len(s) - 1] = 1
    logp = F.log_softmax(model(ids.to(dev), attention_mask=mask.to(dev)).float(), -1).cpu()
    out = []
    for i, (ctx, cont) in enumerate(requests):
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))  # predicting cont tokens
        target = torch.tensor(cont)
        rows = logp[i, pos]  # (n, V)
        out.append((float(rows.gather(1, target[:, None]).sum()),
                    bool((rows.argmax(-1) == target).all())))
    return out


def rolling_windows(tokens: Sequence[int], max_len: int, stride: int = 0
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering tokens[1:] exactly once, each pair at most
    max_len + 1 tokens (the model reads max_len). Predicted tokens come in chunks of `stride`
    (default max_len: disjoint windows); each chunk sees as much preceding context as fits.
    The first token has no context and is not scored (as in the training loss)."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride {stride} must be in 1..max_len {max_len}")
    out = []
    for a in range(1, len(tokens), stride):
        b = min(a + stride, len(tokens))
        s = max(0, b - 1 - max_len)  # the model reads tokens[s:b-1]: at most max_len
        out.append((list(tokens[s:a]), list(tokens[a:b])))
    return out
