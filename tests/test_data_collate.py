"""Collators: causal LM shift, RoBERTa masking statistics, SFT response mask, comparison
pairs with ties, left-padded prompts."""
from __future__ import annotations

import numpy as np
import torch

from trellis.data_pipeline.collate import (IGNORE, MLMCollator, PairCollator, PromptCollator,
                                   SFTCollator, clm_collate, ranking_pairs)
from trellis.data_pipeline.config import DataConfig
from trellis.data_pipeline.shards import make_token_dataset
from trellis.data_pipeline.stream import TokenStream

EOS, MASK = 3, 4


def test_clm_collate_shifts_and_masks_padding():
    blocks = [{"input_ids": torch.tensor([5, 6, 7, 8, 9]), "num_tokens": 5},
              {"input_ids": torch.tensor([9, 10, 11, 0, 0]), "num_tokens": 3}]
    b = clm_collate(blocks)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert b["labels"].tolist() == [[6, 7, 8, 9], [10, 11, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_mlm_statistics_over_100k_tokens(tmp_path):
    rng = np.random.default_rng(0)
    vocab = 1000
    docs = [rng.integers(7, vocab, int(rng.integers(20, 200))).tolist() for _ in range(1500)]
    make_token_dataset(tmp_path, docs, 500, vocab_size=vocab)
    stream = TokenStream(tmp_path, DataConfig(seq_len=128, shuffle_buffer=64))
    coll = MLMCollator(vocab_size=vocab, seed=3)
    it = stream.iter_batches(32)
    chosen = masked = swapped = kept = candidates = specials_hit = 0
    first_epoch_mask = None
    while candidates < 110_000:
        batch = next(it)
        out = coll(batch)
        x = batch["input_ids"][:, :-1]
        sel = out["labels"] != IGNORE
        special = x <= 6
        specials_hit += int((sel & special).sum())
        candidates += int((~special).sum())
        chosen += int(sel.sum())
        masked += int((sel & (out["input_ids"] == MASK)).sum())
        kept += int((sel & (out["input_ids"] == x)).sum())
        swapped += int((sel & (out["input_ids"] != MASK) & (out["input_ids"] != x)).sum())
        assert torch.equal(out["labels"][sel], x[sel])
        assert (out["input_ids"][~sel] == x[~sel]).all()
        if first_epoch_mask is None:
            first_epoch_mask = sel
    assert specials_hit == 0 and (x == EOS).any()
    assert abs(chosen / candidates - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(swapped / chosen - 0.1) < 0.02 and abs(kept / chosen - 0.1) < 0.02
    # same batch, same (epoch, step) -> same mask; another epoch -> a fresh mask
    batch0 = next(TokenStream(tmp_path, DataConfig(seq_len=128, shuffle_buffer=64)).iter_batches(32))
    assert torch.equal(coll(batch0)["labels"] != IGNORE, first_epoch_mask)
    other = coll(batch0, epoch=1)["labels"] != IGNORE
    assert not torch.equal(other, first_epoch_mask)


def test_sft_mask_covers_exactly_the_response():
    rows = [{"prompt_ids": [10, 11, 12], "response_ids": [20, 21]},
            {"prompt_ids": [13], "response_ids": [22, 23, 24, 25]}]
    b = SFTCollator(max_len=16)(rows)
    assert b["input_ids"].tolist()[0][:5] == [10, 11, 12, 20, 21]
    for r, row in enumerate(rows):
        targets = b["labels"][r][b["labels"][r] != IGNORE].tolist()
        assert targets == row["response_ids"] + [EOS]
        first = len(row["prompt_ids"]) - 1  # position whose target is the first response token
        assert b["labels"][r, first] == row["response_ids"][0]
        assert (b["labels"][r, :first] == IGNORE).all()
    assert b["attention_mask"].sum(1).tolist() == [5, 5]
    cut = SFTCollator(max_len=6, max_prompt_len=2)([{"prompt_ids": [1, 2, 10, 11],
                                                     "response_ids": list(range(20, 30))}])
    assert cut["input_ids"].tolist() == [[10, 11, 20, 21, 22, 23]]
    assert cut["labels"].tolist() == [[IGNORE, 20, 21, 22, 23, 24]]


def test_ranking_with_tie_makes_the_right_pairs():
    # response 0 best, 1 and 2 tied, 3 worst
    assert sorted(ranking_pairs([0, 1, 1, 2])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert ranking_pairs([1, 1]) == []
    rows = [{"prompt_ids": [10], "responses_ids": [[20], [21, 22], [23]], "ranking": [2, 0, 1]},
            {"prompt_ids": [11, 12], "responses_ids": [[24], [25]], "ranking": [0, 1]}]
    b = PairCollator(max_len=8)(rows)
    assert b["input_ids"].shape[0] == 5  # every response once
    pairs = list(zip(b["chosen_index"].tolist(), b["rejected_index"].tolist()))
    assert pairs == [(1, 0), (1, 2), (2, 0), (3, 4)]
    assert b["pair_prompt"].tolist() == [0, 0, 0, 1]
    assert torch.allclose(b["pair_weight"], torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert b["input_ids"][1].tolist()[:4] == [10, 21, 22, EOS]
    assert b["last_index"].tolist() == [2, 3, 2, 3, 3]


def test_prompts_are_left_padded():
    b = PromptCollator(max_prompt_len=4)([{"prompt_ids": [5, 6]}, {"prompt_ids": [1, 7, 8, 9, 10]}])
    assert b["input_ids"].tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
