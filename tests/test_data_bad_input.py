"""Bad input, one test per case: each gives one line naming the file (and row), and skipped
records are counted in the manifest and printed, never dropped silently."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trellis.data_pipeline.config import DataConfig, InputSource
from trellis.data_pipeline.corpus import default_corpus_documents
from trellis.data_pipeline.ingest import ingest
from trellis.data_pipeline.rollout import read_parquet
from trellis.data_pipeline.shards import DataError, load_manifest, make_token_dataset
from trellis.data_pipeline.stream import TokenStream
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_tokenizer(TokenizerConfig(vocab_size=800), default_corpus_documents()[:30], out)


def one_line(msg: str) -> bool:
    return "\n" not in msg.strip()


def run(tok, tmp_path, sources, capsys=None, **kw):
    m = ingest(sources, tok, tmp_path / "out", shard_tokens=10_000, processes=1,
               progress=False, **kw)
    return m, (capsys.readouterr().err if capsys else "")


def good_parquet(path, n=50):
    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(n)]}), path, row_group_size=10)


def test_truncated_and_corrupt_columnar_inputs(tmp_path, tok, capsys):
    good_parquet(tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])
    (tmp_path / "junk.arrow").write_bytes(b"ARROW1\x00\x00 definitely not arrow")
    m, err = run(tok, tmp_path, [str(tmp_path / p) for p in ("ok.parquet", "cut.parquet",
                                                                "junk.arrow")], capsys)
    assert m["num_documents"] == 50 and m["skipped"] == {"corrupt_file": 2}
    assert "cut.parquet: corrupt or truncated file" in err and "junk.arrow" in err
    assert all(one_line(x) for x in m["skipped_examples"])
    with pytest.raises(DataError, match=r"cut\.parquet: corrupt or truncated"):
        ingest([str(tmp_path / "cut.parquet")], tok, tmp_path / "strict", progress=False,
               processes=1, on_error="fail")


def test_missing_or_misnamed_column_and_field(tmp_path, tok):
    pq.write_table(pa.table({"txt": ["a", "b"]}), tmp_path / "misnamed.parquet")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n{"text": 7}\n')
    m, _ = run(tok, tmp_path, [str(tmp_path / "misnamed.parquet"), str(tmp_path / "rows.jsonl")])
    assert m["skipped"] == {"missing_column": 1, "missing_field": 1, "not_text": 1}
    ex = "\n".join(m["skipped_examples"])
    assert "misnamed.parquet: no column 'text' (columns: txt)" in ex
    assert "rows.jsonl:2: no field 'text'" in ex and "rows.jsonl:3: field 'text' is int" in ex


def test_non_utf8_bytes(tmp_path, tok):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "mixed.txt").write_bytes(b"good line\nbad \xff\xfe line\nanother\n")
    m, _ = run(tok, tmp_path, [InputSource("a", [str(tmp_path / "latin1.txt")]),
                               InputSource("b", [str(tmp_path / "mixed.txt")], text_mode="lines")])
    assert m["skipped"] == {"non_utf8": 2} and m["num_documents"] == 2
    ex = m["skipped_examples"]
    assert any("latin1.txt: not UTF-8 (invalid byte at offset 3)" in e for e in ex)
    assert any("mixed.txt:2: not UTF-8" in e for e in ex)


def test_empty_documents_are_counted(tmp_path, tok):
    for name, text in (("a.txt", "real text"), ("b.txt", ""), ("c.txt", "  \n\t\n")):
        (tmp_path / name).write_text(text)
    pq.write_table(pa.table({"text": ["x", None, ""]}), tmp_path / "n.parquet")
    m, _ = run(tok, tmp_path, [str(tmp_path / p) for p in ("a.txt", "b.txt", "c.txt", "n.parquet")])
    assert m["num_documents"] == 2 and m["skipped"] == {"empty": 4}


def test_overlong_document_split_or_skipped(tmp_path, tok):
    (tmp_path / "long.txt").write_text("word " * 5000)  # 25,000 characters
    (tmp_path / "short.txt").write_text("short one")
    paths = [str(tmp_path / "long.txt"), str(tmp_path / "short.txt")]
    m = ingest(paths, tok, tmp_path / "split", processes=1, progress=False, max_doc_chars=10_000)
    assert m["num_documents"] == 4 and m["long_documents_split"] == 1 and m["skipped"] == {}
    m = ingest(paths, tok, tmp_path / "skip", processes=1, progress=False, max_doc_chars=10_000,
               long_docs="skip")
    assert m["num_documents"] == 1 and m["skipped"] == {"too_long": 1}
    assert "long.txt: document of 25000 characters > max_doc_chars 10000" in m["skipped_examples"][0]


def test_manifest_tokenizer_hash_mismatch(tmp_path, tok):
    (tmp_path / "a.txt").write_text("some text to ingest")
    ingest([str(tmp_path / "a.txt")], tok, tmp_path / "d", processes=1, progress=False)
    other = train_tokenizer(TokenizerConfig(vocab_size=700), default_corpus_documents()[:30],
                            tmp_path / "other.model")
    TokenStream(tmp_path / "d", DataConfig(), tokenizer=tok)  # the right one is fine
    with pytest.raises(DataError, match=r"manifest.json: data was tokenized with tokenizer "
                                        r"sha256 \w+\.\. but the tokenizer in use") as e:
        TokenStream(tmp_path / "d", DataConfig(), tokenizer=other)
    assert "other.model" in str(e.value) and one_line(str(e.value))


def test_shard_listed_in_manifest_but_missing(tmp_path):
    m = make_token_dataset(tmp_path, [[10, 11, 12]] * 10, 4, 1000)
    (tmp_path / m["shards"][1]["path"]).unlink()
    with pytest.raises(DataError, match=r"manifest.json: shard 1 'default/00001-000.arrow' "
                                        r"listed in the manifest is missing"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="is missing"):
        TokenStream(tmp_path, DataConfig())


def test_truncated_shard_and_count_mismatch(tmp_path):
    m = make_token_dataset(tmp_path, [[10, 11, 12]] * 10, 5, 1000)
    shard = tmp_path / m["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:100])
    # the manifest records each shard's size: a truncated shard is refused at open
    with pytest.raises(DataError, match=r"00000-000.arrow: corrupt or truncated Arrow shard"):
        TokenStream(tmp_path, DataConfig(seq_len=4, shuffle=False))
    m = make_token_dataset(tmp_path, [[10, 11, 12]] * 10, 5, 1000)
    m["shards"][1]["num_tokens"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    s2 = TokenStream(tmp_path, DataConfig(seq_len=4, shuffle=False))
    s2.sources[0]._open.clear()
    with pytest.raises(DataError, match=r"00001-000.arrow: holds 5 documents / 15 tokens but "
                                        r"the manifest says 5 / 16"):
        s2.sources[0].arrays(1)


def test_corrupt_rollout_parquet(tmp_path):
    (tmp_path / "r.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(ValueError, match=r"r\.parquet: corrupt or truncated rollout Parquet"):
        read_parquet(tmp_path / "r.parquet")
