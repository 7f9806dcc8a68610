"""Exported tokenizer files: transformers' AutoTokenizer on an export encodes to the same ids
as trellis's SentencePiece Tokenizer, decodes the same, and greedy generation through
transformers alone (GPT2LMHeadModel + the exported tokenizer) reproduces trellis's own.

transformers and tokenizers are test dependencies only; the converter
(data_pipeline/hf_tokenizer.py) imports neither.
"""
from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

from trellis.data_pipeline.corpus import default_corpus_documents
from trellis.data_pipeline.hf_tokenizer import (TOKENIZER_CONFIG, TOKENIZER_JSON,
                                                HFTokenizerUnsupported, tokenizer_json,
                                                write_hf_tokenizer)
from trellis.data_pipeline.tokenizer import N_BYTE_PIECES, Tokenizer, TokenizerConfig, train_tokenizer

# Lines trained on besides the English default corpus, so accented, CJK and emoji characters
# are pieces of their own; the characters in BYTE_FALLBACK below are not in any of it.
EXTRA = ["café naïve résumé Ångström über façade déjà vu", "日本語のテキストと中文の文章です。東京と北京",
         "emoji 🙂🚀 and 👩‍👩‍👧 family 🙂🙂", "    indented code\n        more\tindent"] * 20
BYTE_FALLBACK = "ℵ ⅞ Ⅻ 한국어 ไทย ᚠᛇᚻ"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström über",                 # accents
    "日本語のテキストと中文",                             # CJK
    "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",                          # emoji, zero-width joiner
    "multiple   spaces    here     and\ttabs",         # space runs
    "  leading and trailing spaces  ",
    " x", "x ", "  ", " ",
    "line one\nline two\n\n  indented line\n",          # newlines ("\n" is piece 7)
    "\nstarts with a newline", "\n", "\n\n",
    BYTE_FALLBACK,                                      # byte fallback
    "[MASK] at the start, [CLS]inside[SEP] and x[MASK]",  # user-defined symbols
    "literal <s> </s> <pad> <unk> <0x41> text",         # control/byte piece text is just text
    "a\n<s>\n<0x41>\n</s>\n<unk>",                       # ... also as a whole line
    "=========== ----------- *********** ...........",
    "def f(x):\n    return x  # comment\n",
    "\r\n windows line\r\n",
    "tab\tseparated\tvalues\t",
    "",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return default_corpus_documents()


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    train_tokenizer(TokenizerConfig(vocab_size=2000), docs + EXTRA, out)
    return out


@pytest.fixture(scope="module")
def tok(spm_path) -> Tokenizer:
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, spm_path):
    out = tmp_path_factory.mktemp("hf_tok")
    write_hf_tokenizer(spm_path, out, model_max_length=512, padding_side="left")
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


def _mismatches(tok, hf, texts, decode=True) -> list[tuple]:
    bad = []
    for t in texts:
        ours, theirs = tok.encode(t), hf(t)["input_ids"]
        if ours != theirs:
            bad.append(("encode", t, [tok.id_to_piece(i) for i in ours],
                        hf.convert_ids_to_tokens(theirs)))
        elif decode and hf.decode(ours) != tok.decode(ours):
            bad.append(("decode", t, tok.decode(ours), hf.decode(ours)))
    return bad


def test_same_ids_and_round_trip_on_test_strings(tok, hf):
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert _mismatches(tok, hf, TEXTS) == []
    for t in TEXTS:
        assert hf.decode(hf(t)["input_ids"]) == t  # and trellis's round trip is exact
    # The byte-fallback string really goes through byte pieces (ids 8..263).
    assert any(8 <= i < 8 + N_BYTE_PIECES for i in tok.encode(BYTE_FALLBACK))
    assert tok.unk_id not in tok.encode(BYTE_FALLBACK)
    # A batch (what generation pipelines call) gives the same rows.
    assert hf(TEXTS)["input_ids"] == tok.encode_batch(TEXTS)
    # SentencePiece's dummy prefix is its own piece before a leading "\n" or [MASK], and the
    # literal text of control pieces is plain text.
    assert hf.convert_ids_to_tokens(hf("\nx")["input_ids"])[:2] == ["▁", "\n"]
    assert not {0, 1, 2, 3} & set(hf("a\n<s>\n</s>")["input_ids"])
    assert hf("[MASK]")["input_ids"][-1] == 4


def test_same_ids_on_corpus_and_random_strings(tok, hf, docs):
    lines = [line for d in docs for line in d.split("\n")]
    assert _mismatches(tok, hf, docs, decode=True) == []
    assert _mismatches(tok, hf, lines, decode=False) == []
    rng = random.Random(0)
    alphabet = [" ", " ", "  ", "a", "e", "th", "▁", "\n", "\t", "é", "中", "🙂", "ℵ", "[MASK]",
                "[SEP]", "-", "=", "==", ".", "<s>", "<0x41>", "x", "\r", "\u200b"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    assert _mismatches(tok, hf, texts) == []


def test_decode_of_generated_ids_matches(tok, hf):
    """Any id sequence without control ids (and whose byte pieces form valid UTF-8, see the
    module docstring of hf_tokenizer) decodes the same; control ids are dropped by both with
    skip_special_tokens=True."""
    rng = random.Random(1)
    normal = [i for i in range(8, tok.vocab_size) if not 8 <= i < 8 + N_BYTE_PIECES]
    chars = "aé中🙂ℵ한"
    for _ in range(2000):
        ids: list[int] = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.15:  # a character as UTF-8 byte pieces
                ids += [8 + b for b in rng.choice(chars).encode()]
            elif r < 0.25:
                ids.append(rng.choice([0, 2, 3, 4, 5, 6, 7]))
            else:
                ids.append(rng.choice(normal))
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(
            [i for i in ids if i not in (4, 5, 6)]), ids
        no_special = [i for i in ids if i not in (0, 1, 2, 3, 4, 5, 6)]
        assert hf.decode(no_special) == tok.decode(no_special), no_special


def test_special_tokens_and_config(tok, hf, hf_dir, spm_path):
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert (hf.mask_token_id, hf.cls_token_id, hf.sep_token_id) == (4, 5, 6)
    assert hf.convert_tokens_to_ids("\n") == 7 and hf.convert_ids_to_tokens(7) == "\n"
    assert hf.model_max_length == 512 and hf.padding_side == "left"
    assert len(hf) == tok.vocab_size
    assert hf.convert_ids_to_tokens(list(range(tok.vocab_size))) == [
        tok.id_to_piece(i) for i in range(tok.vocab_size)]
    # No BOS/EOS added: trellis never prepends BOS.
    assert hf("hello")["input_ids"] == tok.encode("hello")
    assert hf("hello", add_special_tokens=True)["input_ids"][0] != 2
    conf = json.loads((hf_dir / TOKENIZER_CONFIG).read_text())
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert conf["add_bos_token"] is False and conf["clean_up_tokenization_spaces"] is False
    # The tokenizer file alone, through PreTrainedTokenizerFast, with split_special_tokens as
    # tokenizer_config.json sets it.
    fast = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / TOKENIZER_JSON),
                                   split_special_tokens=True, clean_up_tokenization_spaces=False)
    assert _mismatches(tok, fast, TEXTS) == []


def test_char_model_converts_and_unigram_is_refused(tmp_path, docs):
    small = docs[:40] + EXTRA
    char = train_tokenizer(TokenizerConfig(model_type="char", vocab_size=400), small,
                           tmp_path / "char.model")
    write_hf_tokenizer(char.path, tmp_path / "char")
    hf = AutoTokenizer.from_pretrained(tmp_path / "char")
    assert _mismatches(char, hf, TEXTS) == []
    uni = train_tokenizer(TokenizerConfig(model_type="unigram", vocab_size=600), small,
                          tmp_path / "uni.model")
    with pytest.raises(HFTokenizerUnsupported, match="unigram is not converted exactly"):
        write_hf_tokenizer(uni.path, tmp_path / "uni")
    assert not (tmp_path / "uni").exists()
    assert tokenizer_json(uni.path, exact_only=False)["model"]["type"] == "Unigram"


def test_converter_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, trellis.data_pipeline.hf_tokenizer as h; "
            "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- an export: config.json + weights + tokenizer files, read by transformers alone -----------
def _tiny_gpt(vocab: int):
    from trellis.model import GPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=vocab, n_layer=2, n_head=4, d_model=48,
                      max_seq_len=64, dropout=0.0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # spread logits: no near-ties for the argmax to flip on
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        # Specials and byte pieces are never the argmax (tied embedding rows at zero), so the
        # generated text has no malformed UTF-8 to decode.
        model.wte.weight[:8 + N_BYTE_PIECES] = 0.0
    return model.eval(), cfg


def test_export_generates_like_trellis_through_transformers(tmp_path, spm_path, tok):
    from trellis.launcher.jobs.export.driver import export_weights
    from trellis.model.generate import GenerationConfig, generate
    from trellis.model.io import save_module

    model, cfg = _tiny_gpt(tok.vocab_size)
    weights = save_module(model, cfg, "lm", tmp_path / "weights")
    out = export_weights(weights, tmp_path / "hf", spm_path)
    assert {"config.json", "model.safetensors", "tokenizer.model", TOKENIZER_JSON,
            TOKENIZER_CONFIG, "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    conf = json.loads((out / "config.json").read_text())
    assert conf["bos_token_id"] is None and conf["eos_token_id"] == 3 and conf["pad_token_id"] == 0

    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf_model.generation_config.bos_token_id is None
    # transformers read our tokenizer.json, not a conversion of tokenizer.model of its own
    ours = json.loads((out / TOKENIZER_JSON).read_text())
    assert json.loads(hf_tok.backend_tokenizer.to_str())["pre_tokenizer"] == ours["pre_tokenizer"]

    prompts = ["The quick brown fox", "café au lait and 日本語", "def f(x):\n    return",
               "  two leading spaces", "emoji 🙂 then"]
    n = 12
    gen_cfg = GenerationConfig(max_new_tokens=n, eos_id=3, pad_id=0)
    for p in prompts:
        ids = tok.encode(p)
        enc = hf_tok(p, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == ids
        want = generate(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                        gen_cfg).tokens[0].tolist()
        got = hf_model.generate(**enc, do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
        assert got == want, p
        assert hf_tok.decode(got, skip_special_tokens=True) == tok.decode(want), p
    # A left-padded batch, padded by the exported tokenizer (padding_side left, pad id 0).
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"][:, -1].ne(0).all() and batch["attention_mask"][:, 0].eq(0).any()
    want = generate(model, batch["input_ids"], batch["attention_mask"], gen_cfg).tokens
    got = hf_model.generate(**batch, do_sample=False, max_new_tokens=n)[:, batch["input_ids"].shape[1]:]
    assert got.tolist() == want[:, :got.shape[1]].tolist()


def test_unigram_export_leaves_tokenizer_json_out_with_a_note(tmp_path, docs, capsys):
    from trellis.launcher.jobs.export.driver import write_tokenizer_files

    uni = train_tokenizer(TokenizerConfig(model_type="unigram", vocab_size=600), docs[:40] + EXTRA,
                          tmp_path / "uni.model")
    out = tmp_path / "hf"
    out.mkdir()
    (out / TOKENIZER_JSON).write_text("{}")  # a stale one from an earlier export
    (out / "tokenizer.model").write_bytes(open(uni.path, "rb").read())
    written = write_tokenizer_files(uni.path, out, 128, "gpt")
    assert {p.name for p in written} == {TOKENIZER_CONFIG, "special_tokens_map.json"}
    assert not (out / TOKENIZER_JSON).exists()
    assert "tokenizer.json not written: unigram" in capsys.readouterr().err
    # transformers 5 then builds its own tokenizer from tokenizer.model with trellis's
    # specials, not GPT-2's byte-level one (4.x cannot: loading fails, loudly).
    if int(transformers.__version__.split(".")[0]) < 5:
        return
    hf = AutoTokenizer.from_pretrained(out)
    assert len(hf) == uni.vocab_size and hf.eos_token_id == 3 and hf.pad_token_id == 0
    assert hf("The quick brown fox")["input_ids"] == uni.encode("The quick brown fox")
