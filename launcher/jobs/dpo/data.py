"""DPO batches from ranked comparisons: every response of a row once, laid out as PPO's
rollouts (prompt left-padded ++ response + EOS right-padded), and every strict pair of the
row's ranking (data_pipeline.collate.ranking_pairs: K-way rankings give all their pairs,
ties none), as Arrow record batches for the worker groups."""
from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import torch

from trellis.data_pipeline.collate import PromptCollator, ranking_pairs
from trellis.data_pipeline.rollout import tensors_to_arrow
from trellis.data_pipeline.tokenizer import EOS_ID, PAD_ID


class IndexedRows:
    """A structured table whose rows carry their own index ('row'): the key of precomputed
    reference log-probs. Serves RowStream like the table itself."""

    def __init__(self, ds: Any):
        self.ds, self.manifest = ds, ds.manifest

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, indices: Sequence[int]) -> list[dict]:
        return [r | {"row": int(i)} for r, i in zip(self.ds.rows(indices), indices)]


def response_counts(rows: Sequence[dict]) -> list[int]:
    return [len(r["responses_ids"]) for r in rows]


def dpo_batch(rows: Sequence[dict], max_prompt_len: int, max_response_len: int,
              weighting: str = "prompt") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(responses (N rows: prompt_ids/prompt_mask (N, P), response_ids/response_mask (N, R)),
    pairs (P rows: chosen, rejected, weight)). weighting 'prompt': a row's pairs share one
    unit; 'pair': one each; the weights of the batch sum to 1."""
    prompts, responses, chosen, rejected, group = [], [], [], [], []
    for pi, r in enumerate(rows):
        base = len(responses)
        for resp in r["responses_ids"]:
            prompts.append({"prompt_ids": r["prompt_ids"]})
            responses.append((list(resp) + [EOS_ID])[:max_response_len])
        for i, j in ranking_pairs(r["ranking"]):
            chosen.append(base + i), rejected.append(base + j), group.append(pi)
    p = PromptCollator(max_prompt_len)(prompts)
    width = max(len(x) for x in responses)
    ids = torch.full((len(responses), width), PAD_ID, dtype=torch.long)
    for i, x in enumerate(responses):
        ids[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
    lens = torch.tensor([len(x) for x in responses])
    seq = {"prompt_ids": p["input_ids"], "prompt_mask": p["attention_mask"].bool(),
           "response_ids": ids, "response_mask": torch.arange(width)[None, :] < lens[:, None]}
    g = torch.tensor(group, dtype=torch.long)
    from trellis.rl.dpo_loss import pair_weights
    pairs = {"chosen": torch.tensor(chosen, dtype=torch.long),
             "rejected": torch.tensor(rejected, dtype=torch.long),
             "weight": pair_weights(g, weighting).float()}
    return seq, pairs


def chunks(rows: Sequence[dict], n: int) -> list[list[dict]]:
    """n equal consecutive slices (the caller checked divisibility)."""
    k = len(rows) // n
    return [list(rows[i * k:(i + 1) * k]) for i in range(n)]


def to_arrow(t: dict[str, torch.Tensor]) -> pa.RecordBatch:
    return tensors_to_arrow(t)
