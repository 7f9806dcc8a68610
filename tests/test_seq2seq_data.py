"""Translation data: the generated language pair, `trellis ingest --kind translation`, the
seq2seq collator, and bad input (missing field, a pair longer than the context) as one-line
errors naming the file and line, from `trellis ingest` and from `trellis pretrain`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trellis.data_pipeline.seq2seq_collate import Seq2SeqCollator, check_pair_lengths
from trellis.data_pipeline.structured import StructuredDataset, ingest_structured
from trellis.data_pipeline.tokenizer import BOS_ID, EOS_ID, TokenizerConfig, train_tokenizer
from trellis.data_pipeline.translation_pair import (ADJ_SUFFIX, VERB_SUFFIX, Lexicon,
                                                    write_language_pair)
from trellis.launcher.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    train, val = write_language_pair(root / "pairs", n_train=400, n_val=40, seed=1)
    texts = [t for line in train.read_text().splitlines()
             for t in json.loads(line).values()]
    tok = train_tokenizer(TokenizerConfig(vocab_size=500), texts, root / "tok.model")
    return {"train": train, "val": val, "tok": Path(tok.path), "root": root}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_language_pair_is_deterministic_and_follows_its_rules(pair, tmp_path):
    again, _ = write_language_pair(tmp_path, n_train=400, n_val=40, seed=1)
    assert again.read_bytes() == pair["train"].read_bytes()
    train, val = rows(pair["train"]), rows(pair["val"])
    assert not {r["source"] for r in val} & {r["source"] for r in train}
    lex = Lexicon.build(1)
    for r in train[:200]:
        src, tgt = r["source"].split(), r["target"].split()
        # SOV: the verb is last, inflected for its subject's number ("-s" = singular).
        verb = next(v for v in lex.verbs if any(w in (v, v + "s", v + "es") for w in src))
        plural = verb in src
        assert tgt[-1] == lex.verbs[verb] + VERB_SUFFIX[plural]
        # Agreement: an adjective takes its noun's gender/number suffix; it follows the noun.
        for adj, stem in lex.adjectives.items():
            if adj in src:
                noun = next(w for w in src[src.index(adj) + 1:] if w.rstrip("s") in lex.nouns
                            or w in ("children", "cities"))
                base = {"children": "child", "cities": "city"}.get(noun, noun.rstrip("s"))
                gender = lex.nouns[base][1]
                forms = {stem + ADJ_SUFFIX[(gender, p)] for p in (False, True)}
                assert forms & set(tgt), (r, adj, noun)


def test_ingest_translation_and_collate(pair, tmp_path):
    m = ingest_structured("translation", [str(pair["train"])], pair["tok"], tmp_path / "t",
                          verbose=False)
    assert m["kind"] == "translation" and m["num_documents"] == 400
    ds = StructuredDataset(tmp_path / "t")
    first = ds[0]
    assert first["where"] == f"{pair['train']}:1"
    batch = Seq2SeqCollator(max_len=64)(ds.rows([0, 1, 2]))
    for i, r in enumerate(ds.rows([0, 1, 2])):
        n_src, n_tgt = len(r["source_ids"]), len(r["target_ids"])
        assert batch["input_ids"][i, :n_src + 1].tolist() == r["source_ids"] + [EOS_ID]
        assert int(batch["attention_mask"][i].sum()) == n_src + 1
        assert batch["decoder_input_ids"][i, :n_tgt + 1].tolist() == [BOS_ID] + r["target_ids"]
        assert batch["labels"][i, :n_tgt + 1].tolist() == r["target_ids"] + [EOS_ID]
        assert (batch["labels"][i, n_tgt + 1:] == -100).all()
    assert batch["decoder_input_ids"].shape == batch["labels"].shape
    check_pair_lengths(ds, 64)  # fits


def bad_file(tmp_path: Path, pair: dict, line: dict, at: int = 3) -> Path:
    good = rows(pair["train"])[:20]
    good.insert(at - 1, line)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    return path


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    return err[0]


def test_ingest_missing_field_names_file_and_line(pair, tmp_path, capsys):
    path = bad_file(tmp_path, pair, {"source": "the dog sees a cat"}, at=3)
    code = main(["ingest", str(path), "--kind", "translation", "--tokenizer", str(pair["tok"]),
                 "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{path}:3: no field 'target'" in err


def pretrain_argv(tmp_path: Path, pair: dict, data: Path, *extra: str) -> list[str]:
    sets = ["train.objective=seq2seq", "model.arch=seq2seq", "model.vocab_size=500",
            f"tokenizer.path={pair['tok']}", f"data.path={data}", f"data.val_path={pair['val']}",
            "model.max_seq_len=32", "data.seq_len=32", "train.steps=1", "metrics.port=-1",
            *extra]
    return ["pretrain", "--local", "--run-dir", str(tmp_path / "run"),
            *[a for s in sets for a in ("--set", s)]]


def test_pretrain_missing_field_is_one_line_naming_file_and_line(pair, tmp_path, capsys):
    path = bad_file(tmp_path, pair, {"target": "ke pesu"}, at=5)
    assert main(pretrain_argv(tmp_path, pair, path)) == 2
    line = one_line_error(capsys)
    assert line.startswith("trellis pretrain: error: ") and f"{path}:5: no field 'source'" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("side", ["source", "target"])
def test_pretrain_pair_longer_than_context_is_one_line_naming_file_and_line(
        pair, tmp_path, capsys, side):
    long = " ".join(["the big old dog"] * 12)
    bad = {"source": "a cat sees a dog", "target": "ke pesu"} | {side: long}
    path = bad_file(tmp_path, pair, bad, at=7)
    assert main(pretrain_argv(tmp_path, pair, path)) == 2
    line = one_line_error(capsys)
    assert f"{path}:7: {side} of " in line and "exceeds the context of 32 tokens" in line


def test_ingested_folder_of_another_kind_is_refused(pair, tmp_path, capsys):
    demo = tmp_path / "demos.jsonl"
    demo.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    ingest_structured("demonstrations", [str(demo)], pair["tok"], tmp_path / "d", verbose=False)
    assert main(pretrain_argv(tmp_path, pair, tmp_path / "d")) == 2
    assert "not translation pairs" in one_line_error(capsys)


def test_seq2seq_objective_needs_seq2seq_arch(tmp_path, capsys):
    assert main(["pretrain", "--local", "--set", "train.objective=seq2seq",
                 "--run-dir", str(tmp_path)]) == 2
    assert "needs model.arch=seq2seq" in one_line_error(capsys)


def test_collator_refuses_long_rows_with_where():
    with pytest.raises(Exception, match="f.jsonl:9: source of 5 tokens"):
        Seq2SeqCollator(max_len=4)([{"source_ids": [9] * 5, "target_ids": [9], "where": "f.jsonl:9"}])
    assert torch.equal(Seq2SeqCollator(max_len=6).sources(
        [{"source_ids": [9, 9], "target_ids": []}])["input_ids"], torch.tensor([[9, 9, EOS_ID]]))
