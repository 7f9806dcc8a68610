"""SentencePiece tokenizer: train one from text, load it, encode/decode (serial or multi-process).

Every model trained here has the same fixed special ids, so collators and models can rely
on them without asking the tokenizer:

    pad=0  unk=1  bos=2 (<s>)  eos=3 (</s>)  mask=4 ([MASK])  cls=5 ([CLS])  sep=6 ([SEP])

and "\\n" is piece 7, so documents keep their line breaks; runs of spaces (indentation) may
be single pieces. Normalization is the identity (no NFKC, whitespace kept as is) and byte
fallback is on by default, so ``decode(encode(text)) == text`` for any Unicode text
(accents, CJK and emoji included). The literal strings "[MASK]", "[CLS]", "[SEP]" in raw
text encode to their special ids.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID, NEWLINE_ID = range(8)
USER_SYMBOLS = ["[MASK]", "[CLS]", "[SEP]", "\n"]
N_BYTE_PIECES = 256
TOKENIZER_FILE = "tokenizer.model"
"""The file name a run dir, weight dir or export dir keeps its SentencePiece model under."""
spm.set_min_log_level(2)  # SentencePiece logs every training step to stderr otherwise


class TokenizerError(ValueError):
    """A tokenizer could not be trained or loaded; str() is one line naming the file."""


@dataclass
class TokenizerConfig:
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    """SentencePiece algorithm."""
    vocab_size: int = field(default=2000, metadata={"min": 16})
    """Pieces in the vocabulary, specials and the 256 byte pieces included. A small corpus may
    yield fewer (the limit is soft); too small a value for the corpus fails with a message."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as UTF-8 byte pieces instead of <unk>."""
    character_coverage: float = field(default=0.9995, metadata={"min": 0.0, "max": 1.0})
    """Fraction of characters covered by character pieces; the rarest rest go to bytes/unk."""
    max_sentence_length: int = field(default=16384, metadata={"min": 16})
    """Longest training line in bytes; longer lines are cut into pieces of this size."""
    num_threads: int = field(default=2, metadata={"min": 1})
    """Threads SentencePiece trains with."""
    path: str = ""
    """An existing .model file to load instead of training a new one."""

    def __post_init__(self) -> None:
        need = len(USER_SYMBOLS) + 4 + (N_BYTE_PIECES if self.byte_fallback else 0)
        if self.vocab_size < need:
            raise ValueError(f"vocab_size {self.vocab_size} is below the {need} fixed pieces "
                             f"(specials{' + 256 bytes' if self.byte_fallback else ''})")


class Tokenizer:
    """A loaded SentencePiece model with trellis' fixed special ids."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer model ({e.strerror})") from None
        self._proto = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = _processor_from_bytes(data, self.path)
        self._check_specials()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(path)

    def _check_specials(self) -> None:
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>",
                    MASK_ID: "[MASK]", CLS_ID: "[CLS]", SEP_ID: "[SEP]"}
        n = self._sp.get_piece_size()
        for i, piece in expected.items():
            got = self._sp.id_to_piece(i) if i < n else None
            if got != piece:
                raise TokenizerError(f"{self.path}: id {i} is {got!r}, expected {piece!r} "
                                     "(not a trellis tokenizer; train one with train_tokenizer)")

    # -- ids ---------------------------------------------------------------------------------
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    mask_id, cls_id, sep_id = MASK_ID, CLS_ID, SEP_ID
    special_ids = frozenset({PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID})

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and each piece's [begin, end) byte span in text's UTF-8 (extractive QA maps
        answer spans to tokens with them)."""
        pieces = self._sp.encode(text, out_type="proto").pieces
        return [p.id for p in pieces], [(p.begin, p.end) for p in pieces]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def encode_parallel(self, texts: Sequence[str], processes: int = 2,
                        chunk_size: int = 256) -> list[list[int]]:
        """Encode in `processes` worker processes; the result equals ``encode_batch(texts)``."""
        texts = list(texts)
        if processes <= 1 or len(texts) <= chunk_size:
            return self.encode_batch(texts)
        chunks = [texts[i:i + chunk_size] for i in range(0, len(texts), chunk_size)]
        with mp_context().Pool(processes, initializer=_init_worker,
                               initargs=(self._proto, self.path)) as pool:
            parts = pool.map(_encode_chunk, chunks)  # map keeps chunk order
        return [ids for part in parts for ids in part]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

    def __getstate__(self) -> dict:  # picklable (Ray, multiprocessing): ship the bytes
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path, self._proto = state["path"], state["proto"]
        self.sha256 = hashlib.sha256(self._proto).hexdigest()
        self._sp = _processor_from_bytes(self._proto, self.path)


def mp_context() -> mp.context.BaseContext:
    """forkserver on Linux, spawn elsewhere; never a plain fork: this process has threads
    (torch, pyarrow, Ray's), and a fork copies the locks they hold (seen: a forked encoder
    child hung on a futex in a process where Ray had run). The server preloads the encoder
    and ingest modules, so each child starts in ~ms."""
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["trellis.data_pipeline.tokenizer", "trellis.data_pipeline.ingest"])
    return ctx


def _processor_from_bytes(data: bytes, name: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if "ParseFromArray" in detail:
            detail = "protobuf does not parse: corrupt or truncated"
        raise TokenizerError(f"{name}: not a valid SentencePiece model ({detail})") from None
    return sp


_WORKER_SP: spm.SentencePieceProcessor | None = None


def _init_worker(proto: bytes, name: str) -> None:
    global _WORKER_SP
    _WORKER_SP = _processor_from_bytes(proto, name)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _WORKER_SP is not None
    return _WORKER_SP.encode(texts)


# -- training ----------------------------------------------------------------------------------
def _is_path_list(items: list) -> bool:
    return bool(items) and all(isinstance(x, os.PathLike) or
                               (isinstance(x, str) and "\n" not in x and len(x) < 4096
                                and os.path.isfile(x)) for x in items)


def _read_files(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    for p in paths:
        try:
            yield Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{p}: cannot read training text ({e})") from None


def sentence_iterator(documents: Iterable[str], max_bytes: int = 16384) -> Iterator[str]:
    """Training lines for SentencePiece: each document's non-blank lines, cut to `max_bytes`."""
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            raw = line.encode("utf-8")
            if len(raw) <= max_bytes:
                yield line
                continue
            for i in range(0, len(raw), max_bytes):  # decode drops a split character's bytes
                yield raw[i:i + max_bytes].decode("utf-8", errors="ignore")


def train_tokenizer(cfg: TokenizerConfig, inputs: Iterable[str] | Sequence[str | os.PathLike],
                    out_path: str | Path) -> Tokenizer:
    """Train a SentencePiece model on `inputs` and write it to `out_path` (.model).

    `inputs` is either file paths (os.PathLike objects, or strings naming existing files: one
    document per file) or the document texts themselves. If ``cfg.path`` is set, that model is
    loaded instead and nothing is trained or written.
    """
    if cfg.path:
        return Tokenizer(cfg.path)
    items = list(inputs)
    docs: Iterable[str] = _read_files(items) if _is_path_list(items) else items
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentence_iterator(docs, cfg.max_sentence_length), model_writer=buf,
            model_type=cfg.model_type, vocab_size=cfg.vocab_size, hard_vocab_limit=False,
            byte_fallback=cfg.byte_fallback, character_coverage=cfg.character_coverage,
            max_sentence_length=cfg.max_sentence_length, num_threads=cfg.num_threads,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=USER_SYMBOLS, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        if "smaller than required_chars" in msg:
            msg = msg[msg.index("Vocabulary"):].split(". Inc")[0] + "; raise vocab_size"
        raise TokenizerError(f"{out_path}: SentencePiece training failed: {msg}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)  # atomic: a reader never sees half a model
    return Tokenizer(out)


def copy_tokenizer(src: str | Path, dest_dir: str | Path) -> Path:
    """Copy a SentencePiece model into `dest_dir` as TOKENIZER_FILE (skipped when it is the
    same file); returns the destination path."""
    src, dst = Path(src), Path(dest_dir) / TOKENIZER_FILE
    if src.resolve() != dst.resolve():
        dst.write_bytes(src.read_bytes())
    return dst
