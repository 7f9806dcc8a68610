"""Shard integrity: the manifest records each shard's size, xxh3_64 checksum and token-id range;
readers verify them (the checksum once per process per file version) and refuse corruption
with one line naming the shard. Unit tests: real Arrow files, no processes."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from trellis.data_pipeline import shards
from trellis.data_pipeline.config import DataConfig, InputSource
from trellis.data_pipeline.corpus import default_corpus_documents
from trellis.data_pipeline.ingest import ingest
from trellis.data_pipeline.shards import (DataError, UnverifiedDataWarning, make_token_dataset,
                                          open_shard)
from trellis.data_pipeline.stream import TokenStream
from trellis.data_pipeline.structured import StructuredDataset, ingest_structured
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer

VOCAB = 1000
MARK = [500, 501, 502, 503]  # a run of ids found once in the data, to flip a byte in


@pytest.fixture(autouse=True)
def fresh_cache():
    shards.clear_verified()  # each test sees a process that verified nothing yet
    yield
    shards.clear_verified()


def dataset(tmp_path, docs_per_shard=5):
    docs = [[10 + i, 11 + i, 12 + i] for i in range(20)]
    docs[7] = MARK + [999]  # shard 1 holds the largest id, 999
    return make_token_dataset(tmp_path, docs, docs_per_shard, VOCAB)


def read_all(path, **kw) -> list[int]:
    s = TokenStream(path, DataConfig(seq_len=8, shuffle=False), infinite=False, **kw)
    return [t for b in s.iter_batches(2) for t in b["input_ids"].flatten().tolist()]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg.strip(), msg
    return msg


def test_manifest_records_size_checksum_and_id_range(tmp_path):
    m = dataset(tmp_path)
    for s in m["shards"]:
        p = tmp_path / s["path"]
        assert s["bytes"] == p.stat().st_size
        assert s["checksum"] == shards.file_checksum(p) and s["checksum"].startswith("xxh3_64:")
        v = open_shard(p).values
        assert (s["min_id"], s["max_id"]) == (int(v.min()), int(v.max()))
    assert m["shards"][1]["max_id"] == 999


def test_clean_shards_open_without_warning(tmp_path):
    dataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = read_all(tmp_path, vocab_size=VOCAB)
    assert 999 in ids and max(ids) < VOCAB


def test_flipped_byte_that_stays_a_valid_id_names_the_shard(tmp_path):
    m = dataset(tmp_path)
    shard = tmp_path / m["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    at = bytes(data).find(np.asarray(MARK, dtype=np.uint16).tobytes())
    assert at > 0
    data[at] ^= 0x01  # 500 -> 501: still a valid id, same size, same counts
    shard.write_bytes(bytes(data))
    assert MARK[0] not in read_all(tmp_path, verify=False)  # unchecked, it would train
    with pytest.raises(DataError, match=r"00001-000\.arrow: corrupt shard: checksum xxh3_64:\w+ "
                                        r"does not match the manifest's xxh3_64:\w+") as e:
        read_all(tmp_path)
    assert str(shard) in one_line(e)


def test_truncated_shard_names_it(tmp_path):
    m = dataset(tmp_path)
    shard = tmp_path / m["shards"][2]["path"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"00002-000\.arrow: corrupt or truncated Arrow shard "
                                        r"\(\d+ bytes, the manifest says \d+\)") as e:
        TokenStream(tmp_path, DataConfig(seq_len=8))
    one_line(e)
    # truncated after the manifest was loaded: caught when the shard is first opened
    entry = json.loads((tmp_path / "manifest.json").read_text())["shards"][2]
    with pytest.raises(DataError, match=r"00002-000\.arrow: corrupt or truncated"):
        open_shard(shard, entry=entry)


def test_id_beyond_the_model_vocabulary_names_the_shard(tmp_path):
    dataset(tmp_path)
    with pytest.raises(DataError, match=r"00001-000\.arrow: holds token id 999 but the model's "
                                        r"vocabulary has 900 ids \(0\.\.899\)") as e:
        TokenStream(tmp_path, DataConfig(seq_len=8), vocab_size=900)
    one_line(e)
    TokenStream(tmp_path, DataConfig(seq_len=8), vocab_size=VOCAB)  # exactly fits


def test_id_beyond_the_tokenizer_vocabulary_is_refused_without_a_model_size(tmp_path):
    m = dataset(tmp_path)
    m["tokenizer"]["vocab_size"] = 999  # what a shard of the wrong tokenizer looks like
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"00001-000\.arrow: holds token id 999 but the "
                                        r"tokenizer's vocabulary has 999 ids"):
        TokenStream(tmp_path, DataConfig(seq_len=8))


def strip_integrity(tmp_path) -> dict:
    """Rewrite the manifest as an ingest from before checksums would have written it."""
    m = json.loads((tmp_path / "manifest.json").read_text())
    for s in m["shards"]:
        for k in ("bytes", "checksum", "min_id", "max_id"):
            s.pop(k)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return m


def test_old_manifest_warns_once_and_still_bounds_ids(tmp_path):
    dataset(tmp_path)
    strip_integrity(tmp_path)
    with pytest.warns(UnverifiedDataWarning, match=r"manifest.json: written before shard "
                                                   r"checksums") as rec:
        ids = read_all(tmp_path)
        read_all(tmp_path)  # a second stream in the same process: no second warning
    assert len([w for w in rec if issubclass(w.category, UnverifiedDataWarning)]) == 1
    assert 999 in ids
    # no recorded range: the ids are scanned when the shard is first opened
    s = TokenStream(tmp_path, DataConfig(seq_len=8, shuffle=False), vocab_size=900,
                    infinite=False)
    with pytest.raises(DataError, match=r"00001-000\.arrow: holds token id 999 but the model's "
                                        r"vocabulary has 900 ids"):
        list(s.iter_batches(2))


def test_checksum_is_verified_once_per_process_not_per_batch(tmp_path, monkeypatch):
    m = dataset(tmp_path, docs_per_shard=4)
    calls: list[str] = []
    real = shards.file_checksum

    def counting(path, algo="xxh3_64"):
        calls.append(str(path))
        return real(path, algo)

    monkeypatch.setattr(shards, "file_checksum", counting)
    s = TokenStream(tmp_path, DataConfig(seq_len=4, shuffle_buffer=3))
    it = s.iter_batches(2)
    for _ in range(60):  # several epochs of 5 shards
        next(it)
    assert s.epoch >= 2
    read_all(tmp_path)   # another stream (e.g. the next evaluation) in the same process
    assert sorted(calls) == sorted(str(tmp_path / x["path"]) for x in m["shards"])
    shard = tmp_path / m["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes())  # a new file version: verified again
    calls.clear()
    read_all(tmp_path)
    assert calls == [str(shard)]


def test_ingest_records_integrity_and_resume_keeps_it(tmp_path):
    tok = train_tokenizer(TokenizerConfig(vocab_size=800), default_corpus_documents()[:30],
                          tmp_path / "sp.model")
    (tmp_path / "a.txt").write_text("".join(f"line {i} about lists\n" for i in range(200)))
    src = [InputSource("default", [str(tmp_path / "a.txt")], text_mode="lines")]
    m = ingest(src, tok, tmp_path / "d", shard_tokens=300, processes=1, progress=False,
               verbose=False)
    assert len(m["shards"]) > 1 and m["num_input_records"] == 200
    for s in m["shards"]:
        assert s["checksum"] == shards.file_checksum(tmp_path / "d" / s["path"])
        assert 0 <= s["min_id"] <= s["max_id"] < tok.vocab_size
    # a rerun whose task records predate checksums fills them in from the files
    for done in (tmp_path / "d" / "default").glob("*.done.json"):
        rec = json.loads(done.read_text())
        rec["shards"] = [{k: s[k] for k in ("path", "num_documents", "num_tokens")}
                         for s in rec["shards"]]
        done.write_text(json.dumps(rec))
    again = ingest(src, tok, tmp_path / "d", shard_tokens=300, processes=1, progress=False,
                   verbose=False)
    assert again["shards"] == m["shards"]


def test_structured_table_checksum_and_vocab(tmp_path):
    tok = train_tokenizer(TokenizerConfig(vocab_size=800), default_corpus_documents()[:30],
                          tmp_path / "sp.model")
    rows = [{"prompt": f"Question {i}: what is a tuple?", "response": f"An immutable {i}."}
            for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = ingest_structured("demonstrations", [str(tmp_path / "d.jsonl")], tok, tmp_path / "sft",
                          verbose=False)
    s = m["shards"][0]
    assert s["checksum"].startswith("xxh3_64:") and s["max_id"] < tok.vocab_size
    assert len(StructuredDataset(tmp_path / "sft", tok, vocab_size=tok.vocab_size)) == 6
    with pytest.raises(DataError, match=r"00000\.arrow: holds token id \d+ but the model's "
                                        r"vocabulary has 10 ids"):
        StructuredDataset(tmp_path / "sft", vocab_size=10)
    table = tmp_path / "sft" / s["path"]
    data = bytearray(table.read_bytes())
    at = bytes(data).find(b"immutable 3")
    data[at] = ord("I")  # one character of a response: same size, still a valid table
    table.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"demonstrations/00000\.arrow: corrupt shard: "
                                        r"checksum") as e:
        StructuredDataset(tmp_path / "sft")
    one_line(e)
