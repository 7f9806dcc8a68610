"""Packed fine-tuning batches (opt-in: `data.packing` of sft and rm).

The padded collators give every row of a micro-batch the longest row's width, so a batch of
short and long rows computes mostly padding. Packed, the same rows are laid end to end in
blocks of at most `block_len` tokens (first-fit decreasing, at the block width that computes
the fewest positions), and `segment_ids` (P, W) tell the model which tokens belong
together: 1, 2, ... per sequence of a block, 0 on padding.
The model attends within a sequence only, with positions from 0 (model/packed.py).

The packed batch is made from the padded collator's own output, so tokens, labels, cuts and
pairs are the same by construction, and the loss equals the padded path's up to float
rounding (tests/test_packed_finetune.py).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch

from trellis.data_pipeline.collate import IGNORE, PairCollator, SFTCollator
from trellis.data_pipeline.tokenizer import PAD_ID


def first_fit_decreasing(lengths: Sequence[int], block_len: int,
                         names: Sequence[str] | None = None) -> list[list[int]]:
    """Sequence indices per block: longest first, each into the first block with room, no
    block over block_len tokens. A sequence longer than block_len is a one-line error naming
    it (names[i], default 'sequence i')."""
    for i, n in enumerate(lengths):
        if n > block_len:
            name = names[i] if names is not None else f"sequence {i}"
            raise ValueError(f"{name} has {n} tokens, more than the packing block of "
                             f"{block_len} (data.pack_len)")
    blocks: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # stable: ties keep order
        b = next((k for k, r in enumerate(room) if r >= lengths[i]), len(blocks))
        if b == len(blocks):
            blocks.append([]), room.append(block_len)
        blocks[b].append(i)
        room[b] -= lengths[i]
    return blocks or [[]]


def best_blocks(lengths: Sequence[int], block_len: int,
                names: Sequence[str] | None = None) -> list[list[int]]:
    """The first-fit-decreasing packing that computes the fewest positions (blocks x the
    fullest block) among budgets block_len and the sums of the k longest sequences (k = 1,
    2, ...; those that fit): rows of like length fill a narrow block better than a wide one,
    and at the longest sequence's budget (one a block at least) it computes no more than
    padding does. Ties go to the narrower blocks (less attention)."""
    top = sorted(lengths, reverse=True)
    budgets = {block_len} | {b for b in itertools.accumulate(top) if 0 < b <= block_len}
    best, cost = None, None
    for b in sorted(budgets):
        blocks = first_fit_decreasing(lengths, b, names)
        c = len(blocks) * max(sum(lengths[i] for i in m) for m in blocks)
        if cost is None or c < cost:
            best, cost = blocks, c
    return best


def pack_padded(tokens: dict[str, torch.Tensor], lens: torch.Tensor, block_len: int,
                pads: dict[str, int], names: Sequence[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded per-token tensors (N, L) whose row i holds lens[i] real tokens -> the
    same tokens in packed blocks (P, W) (best_blocks; W = the fullest block), padded with
    pads[key] (0 if not given), plus segment_ids (P, W). Also returns (N,) the flat index
    p * W + t of each sequence's first token in the blocks."""
    n_tok = lens.tolist()
    blocks = best_blocks(n_tok, block_len, names)
    width = max(1, max(sum(n_tok[i] for i in b) for b in blocks))
    out = {k: torch.full((len(blocks), width), pads.get(k, 0), dtype=v.dtype)
           for k, v in tokens.items()}  # (P, W) each
    segments = torch.zeros((len(blocks), width), dtype=torch.long)  # (P, W)
    start = torch.zeros(len(n_tok), dtype=torch.long)  # (N,)
    for p, members in enumerate(blocks):
        t = 0
        for s, i in enumerate(members, start=1):
            n = n_tok[i]
            for k, v in tokens.items():
                out[k][p, t:t + n] = v[i, :n]
            segments[p, t:t + n] = s
            start[i] = p * width + t
            t += n
    return out | {"segment_ids": segments}, start


def _row_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """'row i (prompt start)' for errors: the micro-batch position and what it says."""
    return [f"row {i} ({str(r.get('prompt', ''))[:40]!r})" for i, r in enumerate(rows)]


class PackedSFTCollator:
    """SFTCollator's batch, packed: input_ids/labels/attention_mask/segment_ids (P, W)."""

    def __init__(self, max_len: int = 512, max_prompt_len: int | None = None,
                 block_len: int | None = None, pad_id: int = PAD_ID):
        self.padded = SFTCollator(max_len, max_prompt_len, pad_id)
        self.block_len, self.pad_id = block_len or max_len, pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = self.padded(rows)
        tokens = {k: b[k] for k in ("input_ids", "labels", "attention_mask")}  # (B, L)
        packed, _ = pack_padded(tokens, b["attention_mask"].sum(1), self.block_len,
                                {"input_ids": self.pad_id, "labels": IGNORE}, _row_names(rows))
        return packed


class PackedPairCollator:
    """PairCollator's batch, packed: input_ids/attention_mask/segment_ids (P, W), every
    response of the batch once; score_index (N,) = flat index p * W + t of response n's last
    token (its EOS unless cut), where its score is read; the pair keys as PairCollator's."""

    def __init__(self, max_len: int = 512, max_prompt_len: int | None = None,
                 block_len: int | None = None, pad_id: int = PAD_ID):
        self.padded = PairCollator(max_len, max_prompt_len, pad_id)
        self.block_len, self.pad_id = block_len or max_len, pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = self.padded(rows)
        names = [f"{row} response {k}" for row, r in zip(_row_names(rows), rows)
                 for k in range(len(r["responses_ids"]))]
        lens = b["attention_mask"].sum(1)  # (N,)
        tokens = {k: b[k] for k in ("input_ids", "attention_mask")}
        packed, start = pack_padded(tokens, lens, self.block_len, {"input_ids": self.pad_id},
                                    names)
        pairs = {k: b[k] for k in ("chosen_index", "rejected_index", "pair_prompt", "pair_weight")}
        return packed | pairs | {"score_index": start + lens - 1}
