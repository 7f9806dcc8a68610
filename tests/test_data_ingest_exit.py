"""`trellis ingest` loses nothing silently: it exits 1 when nothing was written, when a whole
file was skipped, or when more records were skipped than --max-skipped allows (after listing
every one by file:line), and 2 for a bad command line. Real SentencePiece and Arrow."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trellis.data_pipeline.config import IngestConfig, InputSource
from trellis.data_pipeline.corpus import default_corpus_documents
from trellis.data_pipeline.ingest_job import ingest_failure, ingest_from_config
from trellis.data_pipeline.shards import DataError, load_manifest
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from trellis.launcher.cli import main as trellis


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_tokenizer(TokenizerConfig(vocab_size=800), default_corpus_documents()[:30], out)


def manifest(docs: int, skipped: dict, records: int | None = None, kind: str = "tokens") -> dict:
    return {"kind": kind, "num_documents": docs, "skipped": skipped,
            "num_input_records": records, "skipped_report": "skipped.txt"}


# -- the verdict (unit) -------------------------------------------------------------------------
def test_clean_and_benign_skips_pass():
    assert ingest_failure(manifest(10, {}, 10), 0.0, "o") is None
    # blank records and long_docs=skip are reported but not counted
    assert ingest_failure(manifest(10, {"empty": 3, "too_long": 1}, 14), 0.0, "o") is None


def test_any_skipped_record_fails_by_default():
    msg = ingest_failure(manifest(9, {"bad_json": 1}, 10), 0.0, "o")
    assert msg == ("skipped 1 of 10 input records (10.0%: bad_json=1) > --max-skipped 0; "
                   "listed in o/skipped.txt; the 9 documents read were written (rerun with "
                   "--max-skipped 0.1 to accept)")
    assert ingest_failure(manifest(9, {"bad_json": 1}, 10), 0.1, "o") is None
    assert ingest_failure(manifest(9, {"bad_json": 1}, 10), 0.05, "o") is not None


def test_a_whole_skipped_file_fails_below_one():
    m = manifest(50, {"corrupt_file": 1}, 51)
    msg = ingest_failure(m, 0.5, "o")
    assert msg.startswith("1 whole input file skipped (corrupt_file=1; listed in o/skipped.txt)")
    assert ingest_failure(m, 1.0, "o") is None


def test_nothing_written_fails_even_when_skips_are_allowed():
    msg = ingest_failure(manifest(0, {"bad_json": 2}, 2), 1.0, "o")
    assert msg == ("nothing was ingested: 0 documents written to o (skipped 2 input records "
                   "(bad_json=2); see o/skipped.txt)")
    assert "the inputs hold no records" in ingest_failure(manifest(0, {}, 0, "prompts"), 1.0, "o")


def test_empty_input_without_tokenizer_is_one_trellis_line(tmp_path):
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "b.jsonl").write_text('{"txt": "wrong field"}\n\n')
    cfg = IngestConfig(sources=[InputSource(paths=[str(tmp_path / "e.txt"),
                                                   str(tmp_path / "b.jsonl")])],
                       out_dir=str(tmp_path / "o"))
    with pytest.raises(DataError) as e:
        ingest_from_config(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "INTERNAL" not in msg and "SentencePiece" not in msg
    assert msg.startswith(f"{tmp_path / 'e.txt'}, {tmp_path / 'b.jsonl'}: no text to train a "
                          "tokenizer on (every record is empty or skipped, e.g. ")
    assert "b.jsonl:1: no field 'text'" in msg and msg.endswith("or --tokenizer (tokenizer.path)")


def test_skipped_rows_all_listed_in_the_report(tmp_path, tok):
    lines = [f'{{"text": "row {i}"}}' if i % 7 else "not json" for i in range(1, 40)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    cfg = IngestConfig(sources=[InputSource(paths=[str(tmp_path / "in.jsonl")])],
                       out_dir=str(tmp_path / "o"), processes=1)
    cfg.tokenizer.path = tok.path
    m = ingest_from_config(cfg, progress=False)
    bad = [i for i in range(1, 40) if i % 7 == 0]
    report = (tmp_path / "o" / "skipped.txt").read_text().splitlines()
    assert report == [f"{tmp_path / 'in.jsonl'}:{i}: invalid JSON (Expecting value: line 1 "
                      "column 1 (char 0))" for i in bad]
    assert m["num_input_records"] == 39 and m["skipped"] == {"bad_json": len(bad)}


# -- the command (integration: whole `trellis ingest` runs) -------------------------------------
def ingest_cmd(tmp_path, tok, *inputs, out="o", extra=()):
    return trellis(["ingest", *map(str, inputs), "--out", str(tmp_path / out), "--tokenizer",
                    tok.path, "--processes", "1", *extra])


@pytest.mark.integration
def test_whole_file_skipped_exits_1(tmp_path, tok, capsys):
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(20)]}), tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])
    rc = ingest_cmd(tmp_path, tok, tmp_path / "ok.parquet", tmp_path / "cut.parquet")
    out = capsys.readouterr()
    assert rc == 1 and "ingested 20 documents" in out.out
    assert "skipped: " + str(tmp_path / "cut.parquet") + ": corrupt or truncated file" in out.err
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("trellis ingest: error: 1 whole input file skipped (corrupt_file=1")
    rc = ingest_cmd(tmp_path, tok, tmp_path / "ok.parquet", tmp_path / "cut.parquet",
                    extra=("--max-skipped", "1"))
    assert rc == 0


@pytest.mark.integration
def test_nothing_written_exits_1(tmp_path, tok, capsys):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n[1, 2]\n')
    rc = ingest_cmd(tmp_path, tok, tmp_path / "bad.jsonl", extra=("--max-skipped", "1"))
    err = capsys.readouterr().err
    assert rc == 1 and "bad.jsonl:1: no field 'text'" in err and "bad.jsonl:2: expected" in err
    assert err.strip().splitlines()[-1] == (
        f"trellis ingest: error: nothing was ingested: 0 documents written to {tmp_path / 'o'} "
        f"(skipped 2 input records (bad_json=1, missing_field=1); see "
        f"{tmp_path / 'o' / 'skipped.txt'})")
    (tmp_path / "e.txt").write_text("")
    rc = ingest_cmd(tmp_path, tok, tmp_path / "e.txt", out="o2")
    assert rc == 1 and "nothing was ingested" in capsys.readouterr().err


@pytest.mark.integration
def test_skipped_rows_exit_1_unless_allowed(tmp_path, tok, capsys):
    rows = [f'{{"text": "row {i}"}}' for i in range(8)] + ['{"text": 5}', "{oops"]
    (tmp_path / "in.jsonl").write_text("\n".join(rows) + "\n")
    rc = ingest_cmd(tmp_path, tok, tmp_path / "in.jsonl")
    err = capsys.readouterr().err
    assert rc == 1
    assert "in.jsonl:9: field 'text' is int" in err and "in.jsonl:10: invalid JSON" in err
    assert "trellis ingest: error: skipped 2 of 10 input records (20.0%" in err
    assert load_manifest(tmp_path / "o")["num_documents"] == 8  # written, nothing lost
    assert ingest_cmd(tmp_path, tok, tmp_path / "in.jsonl", extra=("--max-skipped", "0.2")) == 0


@pytest.mark.integration
def test_structured_skips_exit_1(tmp_path, tok, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n{"prompt": ""}\n{"q": 1}\n')
    rc = ingest_cmd(tmp_path, tok, tmp_path / "p.jsonl", extra=("--kind", "prompts"))
    err = capsys.readouterr().err
    assert rc == 1 and "p.jsonl:3: no field 'prompt'" in err
    assert "skipped 1 of 3 input records" in err  # the empty prompt is reported, not counted


@pytest.mark.integration
def test_empty_input_without_tokenizer_exits_1(tmp_path, capsys):
    (tmp_path / "e.txt").write_text("   \n")
    rc = trellis(["ingest", str(tmp_path / "e.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "INTERNAL" not in err
    assert err.startswith(f"trellis ingest: error: {tmp_path / 'e.txt'}: no text to train a "
                          "tokenizer on (every document is empty)")


@pytest.mark.integration
def test_bad_command_line_exits_2(tmp_path, tok, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    with pytest.raises(SystemExit) as e:
        ingest_cmd(tmp_path, tok, tmp_path / "p.jsonl", extra=("--max-skipped", "2"))
    assert e.value.code == 2 and "not a fraction between 0 and 1" in capsys.readouterr().err
    rc = trellis(["ingest", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"),
                  "--tokenizer", str(tmp_path / "missing.model")])
    assert rc == 2 and "config key 'tokenizer.path': " in capsys.readouterr().err
    rc = trellis(["ingest", str(tmp_path / "p.jsonl"), "--kind", "prompts", "--out",
                  str(tmp_path / "o")])
    assert rc == 2 and "give --tokenizer" in capsys.readouterr().err
