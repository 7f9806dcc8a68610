"""Structured SFT/RLHF ingest (demonstrations, comparisons, prompts, dialogue pairs) into
Arrow tables, read back and collated; rollout batches Arrow <-> torch <-> Parquet."""
from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trellis.data_pipeline.collate import IGNORE, PairCollator, SFTCollator
from trellis.data_pipeline.corpus import default_corpus_documents
from trellis.data_pipeline.rollout import RolloutBatch, from_arrow, read_parquet, to_arrow, write_parquet
from trellis.data_pipeline.structured import StructuredDataset, ingest_structured, rank_indices
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_tokenizer(TokenizerConfig(vocab_size=1000), default_corpus_documents()[:40], out)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_demonstrations_and_prompts(tmp_path, tok):
    rows = [{"prompt": f"Question {i}: what is a list?", "response": f"A sequence {i}."}
            for i in range(5)] + [{"prompt": "no response"}]
    m = ingest_structured("demonstrations", [write_jsonl(tmp_path / "d.jsonl", rows)], tok,
                          tmp_path / "sft", verbose=False)
    assert m["num_documents"] == 5 and m["skipped"] == {"missing_field": 1}
    assert "d.jsonl:6" in m["skipped_examples"][0]
    ds = StructuredDataset(tmp_path / "sft", tokenizer=tok)
    assert len(ds) == 5 and tok.decode(ds[2]["response_ids"]) == "A sequence 2."
    shard = tmp_path / "sft" / m["shards"][0]["path"]
    mtime = shard.stat().st_mtime_ns
    again = ingest_structured("demonstrations", [str(tmp_path / "d.jsonl")], tok, tmp_path / "sft",
                              verbose=False)
    assert again == m and shard.stat().st_mtime_ns == mtime   # rerun keeps finished files
    batch = SFTCollator(max_len=64)(ds.rows([0, 1]))
    targets = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert targets == ds[0]["response_ids"] + [tok.eos_id]
    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi there", "x": 1}]), tmp_path / "p.parquet")
    pm = ingest_structured("prompts", [str(tmp_path / "p.parquet")], tok, tmp_path / "pr",
                           verbose=False)
    assert pm["num_documents"] == 1 and StructuredDataset(tmp_path / "pr")[0]["prompt"] == "Hi there"


def test_comparisons_ranking_and_chosen_rejected(tmp_path, tok):
    rows = [{"prompt": "Explain loops.", "responses": ["Good.", "Okay.", "Bad."], "ranking": [0, 1, 1]},
            {"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "Broken", "responses": ["a", "b"], "ranking": [0]}]
    m = ingest_structured("comparisons", [write_jsonl(tmp_path / "c.jsonl", rows)], tok,
                          tmp_path / "rm", verbose=False)
    assert m["num_documents"] == 2 and m["skipped"] == {"bad_ranking": 1}
    ds = StructuredDataset(tmp_path / "rm")
    assert ds[1]["responses"] == ["Hello!", "Go away."] and ds[1]["ranking"] == [0, 1]
    b = PairCollator(max_len=32)(ds.rows([0, 1]))
    # prompt 0: 0 > 1, 0 > 2 (1 and 2 tie); prompt 1: chosen > rejected
    assert list(zip(b["chosen_index"].tolist(), b["rejected_index"].tolist())) == [(0, 1), (0, 2), (3, 4)]


def test_dialogue_pairs_hh_text_and_messages(tmp_path, tok):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Blue.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: No."}
    msgs = {"chosen": [{"role": "user", "content": "Add 2+2"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "Add 2+2"}, {"role": "assistant", "content": "5"}]}
    bad = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
    m = ingest_structured("dialogue", [write_jsonl(tmp_path / "hh.jsonl", [hh, msgs, bad])], tok,
                          tmp_path / "hh", verbose=False)
    assert m["kind"] == "comparisons" and m["skipped"] == {"prompt_mismatch": 1}
    ds = StructuredDataset(tmp_path / "hh")
    assert ds[0]["prompt"].endswith("Name a colour.\n\nAssistant:")
    assert ds[0]["responses"] == ["Blue.", "No."]
    assert ds[1]["prompt"] == "\n\nHuman: Add 2+2\n\nAssistant:" and ds[1]["responses"] == ["4", "5"]


def test_rank_indices_partition():
    parts = [rank_indices(103, r, 4, seed=1, epoch=0) for r in range(4)]
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert rank_indices(103, 0, 4, 1, 1) != parts[0]


def rollout(B=3, P=5, R=7, seed=0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    floats = ["logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"]
    return RolloutBatch(prompt_ids=torch.randint(0, 1000, (B, P), generator=g),
                        prompt_mask=torch.rand(B, P, generator=g) > 0.3,
                        response_ids=torch.randint(0, 1000, (B, R), generator=g),
                        response_mask=torch.rand(B, R, generator=g) > 0.3,
                        **{n: torch.randn(B, R, generator=g) for n in floats})


def assert_same(a: RolloutBatch, b: RolloutBatch) -> None:
    for f in dataclasses.fields(RolloutBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and torch.equal(x, y), f.name


def test_rollout_round_trip_zero_copy_and_parquet(tmp_path):
    b = rollout()
    rb = to_arrow(b)
    assert rb.schema.metadata[b"response_len"] == b"7" and rb.num_rows == 3
    back = from_arrow(rb)
    assert_same(b, back)
    assert back.values.data_ptr() == b.values.data_ptr()          # zero-copy both ways
    assert back.response_mask.data_ptr() == b.response_mask.data_ptr()
    sink = pa.BufferOutputStream()                                 # as Ray ships it: IPC
    with pa.ipc.new_stream(sink, rb.schema) as w:
        w.write_batch(rb)
    assert_same(b, from_arrow(pa.ipc.open_stream(sink.getvalue()).read_next_batch()))
    p = write_parquet(b, tmp_path / "rollouts" / "step-000001.parquet")
    assert_same(b, read_parquet(p))
    with pytest.raises(ValueError, match="rollout field 'values'"):
        RolloutBatch(**{**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)},
                        "values": torch.zeros(3, 6)})
