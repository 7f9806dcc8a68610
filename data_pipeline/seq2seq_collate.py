"""Translation pairs -> encoder-decoder batches, and the length check that runs before training.

A row {source_ids, target_ids} becomes (all right-padded, padding = PAD):

    input_ids          source + EOS            (B, S)   attention_mask 1 on them
    decoder_input_ids  BOS + target            (B, T)
    labels             target + EOS            (B, T)   IGNORE (-100) at padding

so the decoder learns to end its translation. Nothing is cut: a pair longer than the context
is an error naming its file and line (`check_pair_lengths` finds it before the first step).
"""
from __future__ import annotations

from typing import Any, Sequence

import pyarrow.compute as pc
import torch

from trellis.data_pipeline.collate import IGNORE
from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.structured import StructuredDataset
from trellis.data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def _too_long(row: dict[str, Any], side: str, n: int, max_len: int) -> DataError:
    where = row.get("where") or "a row"
    return DataError(f"{where}: {side} of {n} tokens + EOS exceeds the context of {max_len} "
                     f"tokens (data.seq_len); shorten the pair or raise data.seq_len and "
                     f"model.max_seq_len")


class Seq2SeqCollator:
    """Translation rows -> input_ids, attention_mask, decoder_input_ids, labels (see module)."""

    def __init__(self, max_len: int, pad_id: int = PAD_ID, bos_id: int = BOS_ID,
                 eos_id: int = EOS_ID):
        self.max_len, self.pad_id, self.bos_id, self.eos_id = max_len, pad_id, bos_id, eos_id

    def sources(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Only the encoder side: input_ids (B, S) and attention_mask (B, S)."""
        src = []
        for r in rows:
            if len(r["source_ids"]) + 1 > self.max_len:
                raise _too_long(r, "source", len(r["source_ids"]), self.max_len)
            src.append(list(r["source_ids"]) + [self.eos_id])
        ids = _pad(src, self.pad_id)
        mask = _pad([[1] * len(s) for s in src], 0)
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = self.sources(rows)
        for r in rows:
            if len(r["target_ids"]) + 1 > self.max_len:
                raise _too_long(r, "target", len(r["target_ids"]), self.max_len)
        out["decoder_input_ids"] = _pad([[self.bos_id] + list(r["target_ids"]) for r in rows],
                                        self.pad_id)
        out["labels"] = _pad([list(r["target_ids"]) + [self.eos_id] for r in rows], IGNORE)
        return out


def check_pair_lengths(ds: StructuredDataset, max_len: int) -> None:
    """DataError naming the first pair whose source or target (+ EOS) exceeds max_len."""
    if ds.kind != "translation":
        raise DataError(f"{ds.manifest.get('root', 'table')}: holds '{ds.kind}' rows, "
                        f"not translation pairs (trellis ingest --kind translation)")
    for side in ("source", "target"):
        lengths = pc.list_value_length(ds.table.column(f"{side}_ids"))
        over = pc.indices_nonzero(pc.greater(lengths, max_len - 1))
        if len(over):
            row = ds[int(over[0].as_py())]
            raise _too_long(row, side, len(row[f"{side}_ids"]), max_len)
