"""Token shards and their manifest: the on-disk format between ingest and the reader.

A shard is one Arrow IPC *file* (random access, memory-mappable) holding a single record
batch with one column ``tokens: list<uint16>`` (``uint32`` when the vocabulary exceeds
65,536), one row per document, no EOS stored (the reader adds it). Shard schema metadata
records the ingest cursor so an interrupted ingest resumes after the last finished shard.

``manifest.json`` (schema version MANIFEST_VERSION) lists every shard with its document and
token counts, the tokenizer's sha256 and vocab size, and skipped-input counts by reason.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """Bad data on disk; str() is one line naming the file (and row where it applies)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def write_shard(path: Path, docs: Sequence[np.ndarray], dtype: np.dtype,
                meta: dict[str, Any] | None = None) -> int:
    """Write `docs` (1-D integer arrays) as one shard, atomically. Returns the token count."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 1 << 31:
        raise DataError(f"{path}: shard would hold {offsets[-1]} tokens (limit 2^31); "
                        "lower shard_tokens")
    values = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
    arr = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    schema = pa.schema([pa.field("tokens", arr.type)],
                       metadata={"trellis": json.dumps(meta or {})})
    batch = pa.record_batch([arr], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(batch)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers never see half a shard
    return int(offsets[-1])


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The ingest metadata of a shard; DataError if the file is not a readable shard."""
    try:
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            meta = reader.schema.metadata or {}
            return json.loads(meta.get(b"trellis", b"{}"))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated Arrow shard ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


@dataclass
class ShardArrays:
    """A memory-mapped shard: document i is ``values[offsets[i]:offsets[i + 1]]``."""

    path: Path
    values: np.ndarray   # (num_tokens,) uint16/uint32, a view of the mapped file
    offsets: np.ndarray  # (num_docs + 1,) int32

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


def open_shard(path: Path, expect_docs: int | None = None,
               expect_tokens: int | None = None) -> ShardArrays:
    """Map a shard without copying; checks its schema and (optionally) the manifest counts."""
    if not path.is_file():
        raise DataError(f"{path}: shard is missing")
    try:
        mm = pa.memory_map(str(path))
        reader = pa.ipc.open_file(mm)
        if reader.num_record_batches != 1:
            raise DataError(f"{path}: expected 1 record batch, found {reader.num_record_batches}")
        batch = reader.get_batch(0)
        col = batch.column("tokens") if "tokens" in batch.schema.names else None
        if col is None or not pa.types.is_list(col.type):
            raise DataError(f"{path}: no list column 'tokens' (columns: {batch.schema.names})")
        values = col.values.to_numpy(zero_copy_only=True)
        offsets = col.offsets.to_numpy(zero_copy_only=True)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated Arrow shard ({_first_line(e)})") from None
    if offsets[0] != 0:  # a sliced array: rebase so document i starts at offsets[i]
        values, offsets = values[offsets[0]:], offsets - offsets[0]
    docs, tokens = len(offsets) - 1, int(offsets[-1])
    if expect_docs is not None and (docs, tokens) != (expect_docs, expect_tokens):
        raise DataError(f"{path}: holds {docs} documents / {tokens} tokens but the manifest "
                        f"says {expect_docs} / {expect_tokens}")
    return ShardArrays(path, values, offsets)


# -- manifest -----------------------------------------------------------------------------------
def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a manifest; every listed shard must exist (DataError otherwise)."""
    mp = manifest_path(path)
    if not mp.is_file():
        raise DataError(f"{mp}: manifest not found (run `trellis ingest` first)")
    try:
        m = json.loads(mp.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{mp}: unreadable manifest ({_first_line(e)})") from None
    for key in ("schema_version", "kind", "tokenizer", "shards"):
        if key not in m:
            raise DataError(f"{mp}: manifest lacks key '{key}'")
    if m["schema_version"] != MANIFEST_VERSION:
        raise DataError(f"{mp}: schema_version {m['schema_version']} is not supported "
                        f"(this reader reads {MANIFEST_VERSION})")
    root = mp.parent
    for i, s in enumerate(m["shards"]):
        if not (root / s["path"]).is_file():
            raise DataError(f"{mp}: shard {i} '{s['path']}' listed in the manifest is missing")
    m["root"] = str(root)
    return m


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any) -> None:
    """Refuse a manifest made with a different tokenizer (a Tokenizer or its sha256)."""
    if tokenizer is None:
        return
    sha = tokenizer if isinstance(tokenizer, str) else tokenizer.sha256
    have = manifest["tokenizer"].get("sha256")
    if have != sha:
        where = "" if isinstance(tokenizer, str) else f" ({tokenizer.path})"
        raise DataError(f"{manifest_path(manifest['root'])}: data was tokenized with tokenizer "
                        f"sha256 {str(have)[:12]}.. but the tokenizer in use{where} is "
                        f"{sha[:12]}..; re-ingest or use the matching tokenizer")


def make_token_dataset(out_dir: str | Path, docs: Sequence[Sequence[int]], docs_per_shard: int,
                       vocab_size: int, tokenizer_sha256: str = "synthetic",
                       source: str = "default") -> dict[str, Any]:
    """Write already-tokenized documents as shards + manifest (tests, benchmarks, tools)."""
    out = Path(out_dir)
    dtype = token_dtype(vocab_size)
    shards = []
    for k, i in enumerate(range(0, len(docs), docs_per_shard)):
        part = [np.asarray(d, dtype=dtype) for d in docs[i:i + docs_per_shard]]
        rel = f"{source}/{k:05d}-000.arrow"
        n_tok = write_shard(out / rel, part, dtype)
        shards.append({"path": rel, "source": source, "num_documents": len(part),
                       "num_tokens": n_tok})
    manifest = new_manifest("tokens", tokenizer_sha256, vocab_size, dtype, shards, {}, [], 0)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def new_manifest(kind: str, sha: str, vocab_size: int, dtype: np.dtype | None,
                 shards: list[dict], skipped: dict[str, int], examples: list[str],
                 split_docs: int, tokenizer_path: str = "", sources: dict | None = None,
                 eos_id: int = 3, pad_id: int = 0) -> dict[str, Any]:
    return {
        "schema_version": MANIFEST_VERSION,
        "kind": kind,
        "tokenizer": {"sha256": sha, "vocab_size": vocab_size, "path": tokenizer_path,
                      "eos_id": eos_id, "pad_id": pad_id},
        "tokenizer_path": tokenizer_path,
        "token_dtype": None if dtype is None else np.dtype(dtype).name,
        "num_documents": sum(s["num_documents"] for s in shards),
        "num_tokens": sum(s.get("num_tokens", 0) for s in shards),
        "shards": shards,
        "sources": sources or {},
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "long_documents_split": split_docs,
    }
