"""SentencePiece model -> Hugging Face fast-tokenizer files (tokenizer.json and friends).

An export directory carries trellis's SentencePiece ``tokenizer.model``; transformers cannot
read it as it is (``AutoTokenizer`` on a GPT-2 config falls back to a byte-level GPT-2
tokenizer with other ids). This module writes the files ``AutoTokenizer.from_pretrained``
reads instead, built from the SentencePiece model alone (no transformers or tokenizers import
at runtime):

* ``tokenizer.json`` in the `tokenizers` JSON format, encoding like
  ``SentencePieceProcessor.encode`` (what ``trellis.data_pipeline.tokenizer.Tokenizer.encode``
  calls) and decoding like its ``decode``;
* ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, trellis's fixed special tokens, no
  BOS/EOS added: trellis never prepends BOS and appends EOS only as a document separator);
* ``special_tokens_map.json`` for transformers versions that still read it.

How SentencePiece's behaviour is reproduced
-------------------------------------------
Converted: trellis's settings (data_pipeline/tokenizer.py train_tokenizer): model_type bpe or
char, normalization "identity", remove_extra_whitespaces false, the dummy prefix on (or off),
byte fallback on (or off), user-defined symbols. Anything else raises HFTokenizerUnsupported,
and so does unigram (see UNIGRAM_INEXACT).

* Normalization runs once over the whole text, as in SentencePiece, which adds its dummy
  prefix "▁" only at the very start (also before a leading "\\n" or [MASK], and also when the
  text starts with a space). For that, the added vocabulary matches nothing before
  normalization: its tokens are the special ones (<pad>, <unk>, <s>, </s> in tokenizer.json;
  transformers adds [MASK], [CLS], [SEP] from tokenizer_config.json) and the config sets
  ``split_special_tokens`` (SentencePiece never matches the text "<s>" either). `tokenizers`
  would otherwise normalize each run between added tokens separately and prefix every run.
* User-defined symbols ([MASK], [CLS], [SEP], "\\n"), which SentencePiece emits whole wherever
  they occur in the text, are isolated by a Split pre-tokenizer and looked up whole
  (``ignore_merges``). That whole lookup is exact only where SentencePiece also encodes the
  run to that one piece: the converter checks with SentencePiece itself that every normal
  piece does, and splits a run that is exactly a control or byte piece's text ("<s>",
  "<0x41>") after its first character, after checking that SentencePiece splits it there too.
* BPE: SentencePiece merges, at each step, the adjacent pair whose concatenation is a piece
  with the highest score (the leftmost on ties). The merges list holds every split of every
  normal piece into two normal pieces, ranked by the merged piece's score. A static rank
  cannot reproduce "leftmost among different splits of the same piece" in every case (only
  periodic pieces such as "aaa" = "a"+"aa" = "aa"+"a" can be affected; tests on the default
  corpus and on 20,000 random strings of repeated characters and spaces found no case).
* Unigram (only with exact_only=False): the same pieces and scores, Viterbi in both. Byte and
  control pieces are not in SentencePiece's lattice; here they get a score no path through
  ordinary pieces reaches, so their text ("<0x41>", "<s>") is never chosen (checked: every
  character of every piece is a piece itself, so the lower unknown-character score this
  implies changes no choice). Not exact on float ties, see UNIGRAM_INEXACT.
* char: a BPE model without merges.
* Decoding: "▁" -> " ", byte pieces -> UTF-8, one leading space dropped. Control pieces decode
  to "" in SentencePiece: in transformers pass ``skip_special_tokens=True`` (which also drops
  [MASK], [CLS], [SEP], kept as text by SentencePiece; <unk>, only produced without byte
  fallback, is " ⁇ " there). Byte pieces that do not form valid UTF-8 become one U+FFFD each
  here; SentencePiece may keep a valid byte that follows an invalid one (only malformed
  generations are affected).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPACE = "\u2581"  # "▁", SentencePiece's escaped space

# SentencePiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
_MODEL_NAMES = {UNIGRAM: "unigram", BPE: "bpe", WORD: "word", CHAR: "char"}

# The transformers attribute for each of trellis's fixed pieces (data_pipeline/tokenizer.py).
_SPECIAL_ROLES = {"<pad>": "pad_token", "<unk>": "unk_token", "<s>": "bos_token",
                  "</s>": "eos_token", "[MASK]": "mask_token", "[CLS]": "cls_token",
                  "[SEP]": "sep_token"}


class HFTokenizerUnsupported(ValueError):
    """The SentencePiece model uses a setting the exported tokenizer.json cannot reproduce
    exactly; str() says which."""


@dataclass
class _Piece:
    piece: str
    score: float
    type: int


@dataclass
class _Spec:
    data: bytes
    pieces: list[_Piece]
    model_type: int
    byte_fallback: bool
    unk_id: int
    unk_piece: str
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    precompiled_charsmap: bytes
    treat_whitespace_as_suffix: bool

    def ids(self, *types: int) -> list[int]:
        return [i for i, p in enumerate(self.pieces) if p.type in types]


def _read_spec(model: bytes | str | os.PathLike) -> _Spec:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the generated module needs protobuf (a ray dependency)
        raise HFTokenizerUnsupported(f"cannot read the SentencePiece model proto ({e})") from None
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    m = pb.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise HFTokenizerUnsupported(f"not a SentencePiece model ({type(e).__name__})") from None
    t, n = m.trainer_spec, m.normalizer_spec
    return _Spec(data=data, pieces=[_Piece(p.piece, float(p.score), int(p.type)) for p in m.pieces],
                 model_type=int(t.model_type), byte_fallback=bool(t.byte_fallback),
                 unk_id=int(t.unk_id), unk_piece=str(t.unk_piece),
                 add_dummy_prefix=bool(n.add_dummy_prefix),
                 remove_extra_whitespaces=bool(n.remove_extra_whitespaces),
                 escape_whitespaces=bool(n.escape_whitespaces),
                 precompiled_charsmap=bytes(n.precompiled_charsmap),
                 treat_whitespace_as_suffix=bool(t.treat_whitespace_as_suffix))


def _processor(s: _Spec):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(s.data)
    return sp


UNIGRAM_INEXACT = (
    "unigram is not converted exactly: SentencePiece's Viterbi sums piece scores in float32, "
    "tokenizers' in float64, so where two segmentations score the same (runs of repeated "
    "pieces such as '=====' or long space runs) they can pick different ones (36 of 16,049 "
    "lines of the default corpus in a test); pass exact_only=False to write it anyway")


def _check(s: _Spec, exact_only: bool = True) -> None:
    """Raise HFTokenizerUnsupported unless the conversion reproduces SentencePiece exactly
    (up to the BPE tie case the module docstring names)."""
    if s.model_type == UNIGRAM and exact_only:
        raise HFTokenizerUnsupported(UNIGRAM_INEXACT)
    if s.model_type not in (BPE, UNIGRAM, CHAR):
        raise HFTokenizerUnsupported(
            f"SentencePiece model_type {_MODEL_NAMES.get(s.model_type, s.model_type)} is not "
            "converted (bpe, unigram and char are)")
    if s.treat_whitespace_as_suffix:
        raise HFTokenizerUnsupported("treat_whitespace_as_suffix is not converted")
    if not s.escape_whitespaces:
        raise HFTokenizerUnsupported("escape_whitespaces=false is not converted")
    # trellis trains with normalization "identity" and remove_extra_whitespaces=false. A
    # character map (nmt_nfkc, nfkc) would be applied here to user-defined symbols too, which
    # SentencePiece leaves alone ("\n" -> " " under nmt_nfkc).
    if s.precompiled_charsmap:
        raise HFTokenizerUnsupported("a normalization rule other than identity is not converted")
    if s.remove_extra_whitespaces:
        raise HFTokenizerUnsupported("remove_extra_whitespaces=true is not converted")
    if s.ids(UNUSED):
        raise HFTokenizerUnsupported("unused pieces (SentencePiece re-segments them) are not "
                                     "converted")
    if not 0 <= s.unk_id < len(s.pieces) or s.pieces[s.unk_id].type != UNKNOWN:
        raise HFTokenizerUnsupported(f"unk_id {s.unk_id} is not the <unk> piece")
    reserved = [s.pieces[i].piece for i in s.ids(CONTROL, UNKNOWN, BYTE)]
    if any(len(k) < 2 for k in reserved):
        raise HFTokenizerUnsupported("a control piece of one character is not converted")
    if s.model_type == UNIGRAM:
        single = {p.piece for p in s.pieces if p.type == NORMAL and len(p.piece) == 1}
        for p in s.pieces:  # user-defined pieces are isolated before the model sees them
            if p.type != USER_DEFINED:
                missing = [c for c in p.piece if c not in single]
                if missing:
                    raise HFTokenizerUnsupported(
                        f"unigram piece {p.piece!r} has the character {missing[0]!r}, which is "
                        "no piece of its own")
    user = _user_defined(s)
    if not user:
        return  # one run per text: no whole-run lookup, nothing more to check
    # Runs between user-defined symbols are tokenized on their own; SentencePiece's own
    # encoding of `anchor + text` shows how it tokenizes such a run (the anchor is frozen).
    sp = _processor(s)
    anchor = user[0]
    head = sp.encode(anchor)

    def run(text: str) -> list[int]:
        ids = sp.encode(anchor + text)
        if ids[:len(head)] != head:
            raise HFTokenizerUnsupported(f"SentencePiece does not keep the user-defined "
                                         f"symbol {anchor!r} whole before {text!r}")
        return ids[len(head):]

    if s.model_type != UNIGRAM:  # whole-run lookup (ignore_merges)
        for i in s.ids(NORMAL):
            text = s.pieces[i].piece.replace(SPACE, " ")
            got = run(text)
            if got != [i]:
                raise HFTokenizerUnsupported(
                    f"SentencePiece encodes the piece {s.pieces[i].piece!r} alone as "
                    f"{[sp.id_to_piece(j) for j in got]}, not as itself")
    for k in reserved:  # such a run is split after its first character
        text = k.replace(SPACE, " ")
        if run(text) != run(text[0]) + run(text[1:]):
            raise HFTokenizerUnsupported(f"SentencePiece does not split the text {k!r} after "
                                         "its first character")


def _user_defined(s: _Spec) -> list[str]:
    return [s.pieces[i].piece for i in s.ids(USER_DEFINED)]


def _onig(text: str) -> str:
    """`text` as a literal in an Oniguruma pattern (what `tokenizers` uses)."""
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


# -- pieces -> JSON ------------------------------------------------------------------------------
def _bpe_merges(pieces: list[_Piece]) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, ranked by the merged piece's
    score (higher first), then its id; within one piece, the longer left part first."""
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-pieces[i].score, i, -k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _model_json(s: _Spec) -> dict:
    if s.model_type == UNIGRAM:
        scores = [p.score for p in s.pieces if p.type == NORMAL]
        longest = max((len(p.piece) for p in s.pieces), default=1)
        # Below every path through ordinary pieces over the same characters.
        unreachable = (min(scores, default=0.0) - 10.0) * (longest + 1) - 1e4
        vocab = [[p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else unreachable]
                 for p in s.pieces]
        return {"type": "Unigram", "unk_id": s.unk_id, "vocab": vocab,
                "byte_fallback": s.byte_fallback}
    vocab = {p.piece: i for i, p in enumerate(s.pieces)}
    merges = _bpe_merges(s.pieces) if s.model_type == BPE else []
    # The "a b" form is read by every tokenizers version; pairs only where a piece has a space
    # (none does when whitespace is escaped, the only setting converted).
    spaced = any(" " in a or " " in b for a, b in merges)
    return {"type": "BPE", "dropout": None, "unk_token": s.unk_piece,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": s.byte_fallback, "ignore_merges": bool(_user_defined(s)),
            "vocab": vocab,
            "merges": [[a, b] for a, b in merges] if spaced else [f"{a} {b}" for a, b in merges]}


def _replace(pattern: str, content: str) -> dict:
    return {"type": "Replace", "pattern": {"String": pattern}, "content": content}


def _normalizer_json(s: _Spec) -> dict:
    # Identity normalization: whitespace escaping, then the dummy prefix. An empty text stays
    # empty (Prepend skips it, as does SentencePiece).
    seq: list[dict] = [_replace(" ", SPACE)]
    if s.add_dummy_prefix:
        seq.append({"type": "Prepend", "prepend": SPACE})
    return {"type": "Sequence", "normalizers": seq}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
            "invert": False}


def _pre_tokenizer_json(s: _Spec) -> dict | None:
    user = _user_defined(s)
    if not user:
        return None
    # 1. user-defined symbols, longest first (SentencePiece's longest match)
    symbols = "|".join(_onig(u) for u in sorted(user, key=len, reverse=True))
    # 2. a run that is exactly a control or byte piece's text: its first character alone
    by_first: dict[str, list[str]] = {}
    for i in s.ids(CONTROL, UNKNOWN, BYTE):
        k = s.pieces[i].piece
        by_first.setdefault(k[0], []).append(k[1:])
    reserved = "|".join(f"\\A{_onig(c)}(?=(?:{'|'.join(_onig(r) for r in rests)})\\z)"
                        for c, rests in sorted(by_first.items()))
    steps = [_split(symbols)] + ([_split(reserved)] if reserved else [])
    return {"type": "Sequence", "pretokenizers": steps}


def _decoder_json(s: _Spec) -> dict:
    seq: list[dict] = [_replace(SPACE, " ")]
    if s.byte_fallback:
        seq.append({"type": "ByteFallback"})
    seq.append({"type": "Fuse"})
    if s.add_dummy_prefix:
        # SentencePiece drops the "▁" that starts the decoded text; Strip works per token,
        # hence after Fuse.
        seq.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": seq}


def _added_token(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def _special_ids(s: _Spec) -> list[int]:
    """Control and unknown pieces, and user-defined ones with a transformers role ([MASK],
    [CLS], [SEP]); not "\\n", which decodes as text even with skip_special_tokens."""
    return [i for i, p in enumerate(s.pieces) if p.type in (CONTROL, UNKNOWN) or
            (p.type == USER_DEFINED and p.piece in _SPECIAL_ROLES)]


def tokenizer_json(model: bytes | str | os.PathLike, exact_only: bool = True) -> dict:
    """tokenizer.json content (a dict) for a SentencePiece model (its bytes or path).
    Raises HFTokenizerUnsupported where the result would not encode like SentencePiece (with
    exact_only=False, a unigram model is converted all the same: see UNIGRAM_INEXACT)."""
    s = _read_spec(model)
    _check(s, exact_only)
    # Only control/unknown pieces are added tokens here: with split_special_tokens (set in
    # tokenizer_config.json) they are never matched in text; transformers adds [MASK], [CLS],
    # [SEP] from the config the same way. [MASK] etc. in text are found by the pre-tokenizer.
    added = [_added_token(i, s.pieces[i].piece) for i in s.ids(CONTROL, UNKNOWN)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": _normalizer_json(s), "pre_tokenizer": _pre_tokenizer_json(s),
            "post_processor": None, "decoder": _decoder_json(s), "model": _model_json(s)}


def tokenizer_config(model: bytes | str | os.PathLike, model_max_length: int | None = None,
                     padding_side: str | None = None) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) contents for a SentencePiece model."""
    s = _read_spec(model)
    roles: dict[str, str] = {}
    decoder: dict[str, dict] = {}
    for i in _special_ids(s):
        t = _added_token(i, s.pieces[i].piece)
        decoder[str(i)] = {k: v for k, v in t.items() if k != "id"}
        if t["content"] in _SPECIAL_ROLES:
            roles[_SPECIAL_ROLES[t["content"]]] = t["content"]
    conf: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        # trellis encodes without BOS or EOS (Tokenizer.encode); EOS only ends documents.
        "add_bos_token": False, "add_eos_token": False,
        # SentencePiece never matches the text of <s>, </s>, <pad>, <unk>; [MASK], [CLS],
        # [SEP] in text are found by the pre-tokenizer, not by transformers' special-token
        # matching (which would tokenize the text around them apart).
        "split_special_tokens": True,
        # Decoding must keep spaces before punctuation ("a ." stays "a .").
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
    }
    if model_max_length is not None:
        conf["model_max_length"] = int(model_max_length)
    if padding_side is not None:
        conf["padding_side"] = padding_side
    return conf, dict(roles)


def _write_json(out: Path, files: list[tuple[str, object]]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, obj in files:
        path = out / name
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        text = json.dumps(obj, ensure_ascii=False, indent=None if name == TOKENIZER_JSON else 2)
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def write_hf_tokenizer(spm_path: str | os.PathLike, out_dir: str | os.PathLike,
                       model_max_length: int | None = None, padding_side: str | None = None,
                       exact_only: bool = True) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for the
    SentencePiece model at `spm_path` into `out_dir`; returns the paths written. Raises
    HFTokenizerUnsupported (and writes nothing) when the model cannot be converted exactly."""
    data = Path(spm_path).read_bytes()
    content = tokenizer_json(data, exact_only)
    conf, special_map = tokenizer_config(data, model_max_length, padding_side)
    return _write_json(Path(out_dir), [(TOKENIZER_JSON, content), (TOKENIZER_CONFIG, conf),
                                       (SPECIAL_TOKENS_MAP, special_map)])


def write_tokenizer_config(spm_path: str | os.PathLike, out_dir: str | os.PathLike,
                           model_max_length: int | None = None,
                           padding_side: str | None = None) -> list[Path]:
    """Only tokenizer_config.json and special_tokens_map.json (for a model tokenizer.json
    cannot reproduce: transformers then converts tokenizer.model itself)."""
    conf, special_map = tokenizer_config(Path(spm_path).read_bytes(), model_max_length,
                                         padding_side)
    return _write_json(Path(out_dir), [(TOKENIZER_CONFIG, conf), (SPECIAL_TOKENS_MAP, special_map)])


__all__ = ["HFTokenizerUnsupported", "UNIGRAM_INEXACT", "tokenizer_json", "tokenizer_config",
           "write_hf_tokenizer", "write_tokenizer_config", "TOKENIZER_JSON", "TOKENIZER_CONFIG",
           "SPECIAL_TOKENS_MAP"]
