"""Ingest: every input format, named sources, manifest contents, process parallelism,
resume after an interruption, and the `trellis ingest` command. Real SentencePiece, real
Arrow/Parquet files."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trellis.data_pipeline.config import DataConfig, InputSource
from trellis.data_pipeline.corpus import default_corpus_documents, write_default_corpus
from trellis.data_pipeline.ingest import ingest
from trellis.data_pipeline.shards import DataError, load_manifest, open_shard
from trellis.data_pipeline.stream import TokenStream
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from trellis.launcher.cli import main as trellis


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_tokenizer(TokenizerConfig(vocab_size=1000), default_corpus_documents(), out)


def shard_docs(out, manifest) -> list[list[int]]:
    docs = []
    for s in manifest["shards"]:
        a = open_shard(out / s["path"], s["num_documents"], s["num_tokens"])
        docs += [a.values[a.offsets[i]:a.offsets[i + 1]].tolist() for i in range(a.num_docs)]
    return docs


def test_all_formats_and_named_sources(tmp_path, tok):
    raw = tmp_path / "raw"
    (raw / "txt").mkdir(parents=True)
    (raw / "txt" / "a.txt").write_text("First file document.\nSecond line.")
    (raw / "txt" / "b.txt").write_text("Another file.")
    (raw / "blocks.txt").write_text("Block one\nstill one.\n\n\nBlock two.\n  \nBlock three.")
    (raw / "lines.txt").write_text("line a\nline b\n\nline c\n")
    (raw / "d.jsonl").write_text('{"text": "json one"}\n{"body": "x", "text": "json two"}\n')
    pq.write_table(pa.table({"text": ["pq one", "pq two", "pq three"]}), raw / "t.parquet")
    with pa.ipc.new_file(str(raw / "t.arrow"), pa.schema([("content", pa.string())])) as w:
        w.write_batch(pa.record_batch([pa.array(["arrow one"])], names=["content"]))
    sources = [InputSource("files", [str(raw / "txt")]),
               InputSource("blocks", [str(raw / "blocks.txt")], text_mode="blocks"),
               InputSource("lines", [str(raw / "lines.txt")], text_mode="lines"),
               InputSource("json", [str(raw / "*.jsonl")]),
               InputSource("columnar", [str(raw / "t.parquet")]),
               InputSource("ipc", [str(raw / "t.arrow")], text_field="content")]
    out = tmp_path / "out"
    m = ingest(sources, tok, out, shard_tokens=1000, processes=1, verbose=False)
    per = {k: v["num_documents"] for k, v in m["sources"].items()}
    assert per == {"files": 2, "blocks": 3, "lines": 3, "json": 2, "columnar": 3, "ipc": 1}
    assert m["skipped"] == {"empty": 1}            # the blank line in lines.txt, counted
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["vocab_size"] == tok.vocab_size
    assert m["token_dtype"] == "uint16" and m["schema_version"] == 1
    texts = sorted(tok.decode(d) for d in shard_docs(out, m))
    assert "Block one\nstill one." in texts and "First file document.\nSecond line." in texts
    assert {"line a", "line c", "json two", "pq three", "arrow one"} <= set(texts)
    assert m["num_tokens"] == sum(s["num_tokens"] for s in m["shards"])


def test_parallel_equals_serial_and_shard_size(tmp_path, tok):
    paths = write_default_corpus(tmp_path / "corpus")
    m1 = ingest([str(tmp_path / "corpus")], tok, tmp_path / "p1", shard_tokens=15_000,
                processes=1, progress=False)
    m2 = ingest([str(tmp_path / "corpus")], tok, tmp_path / "p2", shard_tokens=15_000,
                processes=2, progress=False)
    assert m1["shards"] == m2["shards"] and m1["num_documents"] == len(paths)
    assert shard_docs(tmp_path / "p1", m1) == shard_docs(tmp_path / "p2", m2)
    assert len(m1["shards"]) > 5
    for s in m1["shards"]:  # a shard closes at the first document that reaches the target
        docs = shard_docs(tmp_path / "p1", {"shards": [s]})
        assert s["num_tokens"] - len(docs[-1]) < 15_000
    assert sorted(map(tuple, shard_docs(tmp_path / "p1", m1))) == sorted(
        tuple(tok.encode(t)) for t in default_corpus_documents())


def test_big_line_file_is_split_and_resume_skips_finished_shards(tmp_path, tok):
    lines = [f"Line {i} of a big file about lists and loops." for i in range(3000)]
    src = tmp_path / "big.txt"
    src.write_text("\n".join(lines) + "\n")
    sources = [InputSource("big", [str(src)], text_mode="lines")]
    ref = ingest(sources, tok, tmp_path / "ref", shard_tokens=4000, processes=2, progress=False)
    assert ref["num_documents"] == 3000
    assert len({s["path"].split("-")[0] for s in ref["shards"]}) > 3  # several tasks (pieces)
    out = tmp_path / "out"
    ingest(sources, tok, out, shard_tokens=4000, processes=1, progress=False)
    # simulate a crash: one task lost its completion record and its last shard
    done = sorted((out / "big").glob("*.done.json"))[1]
    rec = json.loads(done.read_text())
    assert len(rec["shards"]) >= 2
    done.unlink()
    (out / rec["shards"][-1]["path"]).unlink()
    kept = out / rec["shards"][0]["path"]
    before = kept.stat().st_mtime_ns
    os.utime(kept, ns=(before - 10**9, before - 10**9))
    m = ingest(sources, tok, out, shard_tokens=4000, processes=1, progress=False)
    assert kept.stat().st_mtime_ns == before - 10**9        # finished shard not rewritten
    assert m["shards"] == ref["shards"] and shard_docs(out, m) == shard_docs(tmp_path / "ref", ref)
    lines_back = [tok.decode(d) for d in shard_docs(out, m)]
    assert lines_back == lines                               # order kept, nothing lost
    with pytest.raises(DataError, match="different 'settings'"):
        ingest(sources, tok, out, shard_tokens=999, processes=1, progress=False)


def test_ingested_data_streams(tmp_path, tok):
    write_default_corpus(tmp_path / "corpus")
    ingest([str(tmp_path / "corpus")], tok, tmp_path / "d", shard_tokens=20_000, progress=False)
    s = TokenStream(tmp_path / "d", DataConfig(seq_len=64), tokenizer=tok)
    b = next(s.iter_batches(2))
    assert b["input_ids"].shape == (2, 65) and int(b["input_ids"].max()) < tok.vocab_size


@pytest.mark.integration
def test_trellis_ingest_command(tmp_path, tok, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "hello world"}\n{"text": ""}\nnot json\n')
    rc = trellis(["ingest", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"),
                  "--tokenizer", tok.path, "--processes", "1"])
    err = capsys.readouterr()
    # a skipped record fails the command (after the report) unless --max-skipped allows it
    assert rc == 1 and "ingested 1 documents" in err.out
    assert "in.jsonl:3: invalid JSON" in err.err and "bad_json=1" in err.err
    assert "trellis ingest: error: skipped 1 of 3 input records" in err.err
    m = load_manifest(tmp_path / "o")
    assert m["skipped"] == {"bad_json": 1, "empty": 1}
    rc = trellis(["ingest", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"),
                  "--tokenizer", tok.path, "--processes", "1", "--max-skipped", "0.34"])
    assert rc == 0
    rc = trellis(["ingest", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "o2"),
                  "--tokenizer", tok.path])
    assert rc == 2 and "nothing*.txt: no such file" in capsys.readouterr().err
    # no inputs: the default corpus, with a tokenizer trained into the output folder
    rc = trellis(["ingest", "--out", str(tmp_path / "dflt"), "--set", "tokenizer.vocab_size=800"])
    assert rc == 0 and (tmp_path / "dflt" / "tokenizer.model").is_file()
    assert load_manifest(tmp_path / "dflt")["num_documents"] > 90
    assert np.dtype(load_manifest(tmp_path / "dflt")["token_dtype"]) == np.uint16


@pytest.mark.integration
def test_ray_backend_matches_processes(tmp_path, tok):
    ray = pytest.importorskip("ray")
    write_default_corpus(tmp_path / "corpus")
    ref = ingest([str(tmp_path / "corpus")], tok, tmp_path / "p", shard_tokens=20_000,
                 processes=1, progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        m = ingest([str(tmp_path / "corpus")], tok, tmp_path / "r", shard_tokens=20_000,
                   backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert m["shards"] == ref["shards"] and shard_docs(tmp_path / "r", m) == shard_docs(tmp_path / "p", ref)
