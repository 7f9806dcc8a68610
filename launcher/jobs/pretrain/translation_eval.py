"""Held-out translation quality: decode rows with a Seq2Seq model and score the corpus with
sacrebleu (BLEU with its default 13a tokenisation, and chrF), the figures MT papers report."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from trellis.model.seq2seq_generate import TranslateConfig, translate


def translate_rows(model: nn.Module, rows: Sequence[dict[str, Any]],
                   collate: Callable[..., dict[str, torch.Tensor]], tok: Any,
                   cfg: TranslateConfig, batch_size: int, n_batches: int | None = None,
                   device: torch.device | str = "cpu",
                   filler: dict[str, Any] | None = None) -> list[str]:
    """Translations (text) of `rows`, in order, batch_size at a time. With n_batches above
    what the rows need, the extra batches decode `filler` (or the first row) and are thrown
    away: ranks of one ZeRO-3 model must run equally many forwards."""
    needed = math.ceil(len(rows) / batch_size)
    n_batches = needed if n_batches is None else n_batches
    if n_batches < needed:
        raise ValueError(f"{len(rows)} rows need {needed} batches of {batch_size}, "
                         f"got n_batches={n_batches}")
    spare = filler if filler is not None else (rows[0] if rows else None)
    out: list[str] = []
    for i in range(n_batches):
        chunk = list(rows[i * batch_size:(i + 1) * batch_size])
        if not chunk and spare is None:
            raise ValueError("no rows to decode and no filler row for the padding batches")
        src = collate.sources(chunk or [spare])
        ids = translate(model, src["input_ids"].to(device), src["attention_mask"].to(device), cfg)
        out += [tok.decode(t) for t in ids[:len(chunk)]]
    return out


def score_translations(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) of hypotheses against one reference each."""
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} translations but {len(refs)} references")
    if not hyps:
        return {}
    return {"bleu": float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score),
            "chrf": float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)}
