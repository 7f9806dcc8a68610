"""Task metrics, pure functions: classification (accuracy, macro F1), regression (Pearson,
Spearman), answers (SQuAD's exact match and token F1 after normalisation), and picking the
best of several choices by log-likelihood (acc, acc_norm)."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold))) if len(gold) else float("nan")


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class absent from both counts as F1 1)."""
    p, g = np.asarray(pred), np.asarray(gold)
    scores = []
    for c in range(n_classes):
        tp = int(((p == c) & (g == c)).sum())
        fp, fn = int(((p == c) & (g != c)).sum()), int(((p != c) & (g == c)).sum())
        scores.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def normalize_answer(s: str) -> str:
    """SQuAD: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, refs: Sequence[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(r) for r in refs))


def token_f1(pred: str, refs: Sequence[str]) -> float:
    """Best over references of the F1 of normalised tokens (SQuAD)."""
    best = 0.0
    p = normalize_answer(pred).split()
    for r in refs:
        g = normalize_answer(r).split()
        if not p or not g:
            best = max(best, float(p == g))
            continue
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def choose(loglik: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of summed log-likelihood, argmax of log-likelihood per UTF-8 byte of the
    choice): lm-evaluation-harness's acc and acc_norm picks."""
    ll = np.asarray(loglik, dtype=np.float64)
    lengths = np.asarray([max(1, len(c.encode())) for c in choices], dtype=np.float64)
    return int(ll.argmax()), int((ll / lengths).argmax())
