"""SentencePiece tokenizer: round trips, fixed special ids, save/reload, parallel encode,
bad model files. Real SentencePiece trained on the default corpus."""
from __future__ import annotations

import pytest

from trellis.data_pipeline.corpus import default_corpus_documents, load_default_corpus, write_default_corpus
from trellis.data_pipeline.tokenizer import (Tokenizer, TokenizerConfig, TokenizerError,
                                     train_tokenizer)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_corpus_documents()


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_tokenizer(TokenizerConfig(vocab_size=2000), corpus, out)


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\tand\nnew lines\n\n",
    "café naïve résumé Ångström",
    "日本語のテキストと中文",
    "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
    "",
]


def test_corpus_is_english_and_deterministic():
    docs, skipped = load_default_corpus()
    assert sum(len(d) for d in docs) > 400_000
    assert skipped == {} or all(isinstance(v, str) for v in skipped.values())
    assert load_default_corpus()[0] == docs


def test_round_trip_ascii_and_non_ascii(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # byte fallback: no <unk> for characters never seen in training
    assert tok.unk_id not in tok.encode("日本語 🙂 ℵ")


def test_special_ids_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.mask_id, tok.cls_id, tok.sep_id) == (4, 5, 6)
    assert [tok.id_to_piece(i) for i in range(7)] == [
        "<pad>", "<unk>", "<s>", "</s>", "[MASK]", "[CLS]", "[SEP]"]
    assert tok.special_ids == frozenset(range(7))
    assert tok.encode("[MASK]")[-1] == tok.mask_id
    assert 1000 < tok.vocab_size <= 2000
    # ordinary text never produces a special id other than through the literal strings
    ids = tok.encode_batch(TEXTS)
    assert not any(i in tok.special_ids for seq in ids for i in seq)


def test_saved_model_reloads_identically(tok, corpus, tmp_path):
    again = Tokenizer.load(tok.path)
    assert again.sha256 == tok.sha256 and len(tok.sha256) == 64
    sample = corpus[:20]
    assert again.encode_batch(sample) == tok.encode_batch(sample)
    # retraining on the same text is deterministic: same file bytes
    tok2 = train_tokenizer(TokenizerConfig(vocab_size=2000), corpus, tmp_path / "b.model")
    assert tok2.sha256 == tok.sha256


def test_train_from_files_and_char_model(tmp_path):
    paths = write_default_corpus(tmp_path / "txt")[:30]
    t = train_tokenizer(TokenizerConfig(model_type="char", vocab_size=400), paths,
                        tmp_path / "c.model")
    assert t.decode(t.encode("hello 日本")) == "hello 日本"
    assert all(len(t.id_to_piece(i)) <= 6 for i in t.encode("hello world"))  # single chars


def test_parallel_encode_equals_serial(tok, corpus):
    texts = corpus * 2
    assert tok.encode_parallel(texts, processes=2, chunk_size=16) == tok.encode_batch(texts)


def test_corrupt_model_file_names_the_file(tmp_path, tok):
    bad = tmp_path / "broken.model"
    bad.write_bytes(b"\x00\x01 this is not a protobuf" * 10)
    with pytest.raises(TokenizerError) as e:
        Tokenizer(bad)
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(open(tok.path, "rb").read()[:1000])
    with pytest.raises(TokenizerError, match="truncated.model"):
        Tokenizer(truncated)
    with pytest.raises(TokenizerError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


def test_vocab_too_small_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=100, byte_fallback=True)
    with pytest.raises(TokenizerError, match="raise vocab_size"):
        train_tokenizer(TokenizerConfig(vocab_size=270), corpus, tmp_path / "s.model")
