"""TaskCollator: task-table rows (data_pipeline/task_rows.py) -> a right-padded batch.

Right padding keeps GPT's last real token where transformers' GPT2ForSequenceClassification
looks for it (the last token that is not the pad id)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from trellis.data_pipeline.tokenizer import PAD_ID


class TaskCollator:
    def __init__(self, pad_id: int = PAD_ID):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """input_ids / token_type_ids / attention_mask (B, T); label (B,) float; start, end (B,)."""
        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        types = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            types[i, :n] = torch.tensor(r["token_type_ids"])
            mask[i, :n] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
                "label": torch.tensor([float(r["label"]) for r in rows]),
                "start": torch.tensor([int(r["start"]) for r in rows]),
                "end": torch.tensor([int(r["end"]) for r in rows])}
