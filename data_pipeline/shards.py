"""Token shards and their manifest: the on-disk format between ingest and the reader.

A shard is one Arrow IPC *file* (random access, memory-mappable) holding a single record
batch with one column ``tokens: list<uint16>`` (``uint32`` when the vocabulary exceeds
65,536), one row per document, no EOS stored (the reader adds it). Shard schema metadata
records the ingest cursor so an interrupted ingest resumes after the last finished shard.

``manifest.json`` (schema version MANIFEST_VERSION) lists every shard with its document and
token counts, the tokenizer's sha256 and vocab size, and skipped-input counts by reason.

Integrity: each shard entry also records the file's size (``bytes``), an xxh3_64 checksum of
its bytes (``checksum``, "xxh3_64:<hex>") and its smallest and largest token id (``min_id``,
``max_id``). ``load_manifest`` checks every size (a stat per shard); ``open_shard`` with the
entry checks the checksum on the first open of that file version in the process (cached by
path, size, mtime and inode), and ``check_token_range`` refuses a manifest whose recorded ids
do not fit the vocabulary. Manifests written before these keys are read with what can be
checked (counts; ids scanned on open) and one warning per manifest saying so.
"""
from __future__ import annotations

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """Bad data on disk; str() is one line naming the file (and row where it applies)."""


class UnverifiedDataWarning(UserWarning):
    """A manifest written before shard checksums: its shards' contents cannot be verified."""


CHECKSUM_ALGOS = ("xxh3_64", "xxh64")
_VERIFIED: dict[tuple, str] = {}              # file version -> checksum verified in this process
_SCANNED: dict[tuple, tuple[int, int]] = {}   # file version -> (min, max) id scanned on open
_WARNED: set[str] = set()                     # manifests already warned about in this process


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
                meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `docs` (1-D integer arrays) as one shard, atomically. Returns its manifest
    integrity fields: num_tokens, bytes, checksum, min_id, max_id (the id range is also
    stored in the shard's metadata, so a resumed ingest finds it there)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 1 << 31:
        raise DataError(f"{path}: shard would hold {offsets[-1]} tokens (limit 2^31); "
                        "lower shard_tokens")
    values = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
    lo, hi = (int(values.min()), int(values.max())) if len(values) else (None, None)
    arr = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    meta = {**(meta or {}), "min_id": lo, "max_id": hi}
    schema = pa.schema([pa.field("tokens", arr.type)], metadata={"trellis": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch([arr], schema=schema))
    buf = sink.getvalue()
    atomic_write_bytes(path, buf)  # readers never see half a shard
    return {"num_tokens": int(offsets[-1]), "bytes": buf.size,
            "checksum": bytes_checksum(buf), "min_id": lo, "max_id": hi}


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


# -- integrity ----------------------------------------------------------------------------------
def bytes_checksum(data: Any, algo: str = "xxh3_64") -> str:
    """"<algo>:<hex>" of a bytes-like object."""
    import xxhash
    fn = {"xxh3_64": xxhash.xxh3_64_hexdigest, "xxh64": xxhash.xxh64_hexdigest}[algo]
    return f"{algo}:{fn(data)}"


def file_checksum(path: Path, algo: str = "xxh3_64") -> str:
    """"<algo>:<hex>" of a file's bytes (memory-mapped: ~20 GB/s from the page cache)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return bytes_checksum(b"", algo)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return bytes_checksum(mm, algo)


def file_integrity(path: Path, min_id: int | None, max_id: int | None) -> dict[str, Any]:
    """The manifest integrity fields of a shard already on disk (a resumed ingest)."""
    return {"bytes": path.stat().st_size, "checksum": file_checksum(path),
            "min_id": min_id, "max_id": max_id}


def _version(path: Path, st: os.stat_result) -> tuple:
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def verify_shard(path: Path, entry: dict[str, Any]) -> None:
    """Check a shard file against its manifest entry: size, then checksum. The checksum is
    computed once per process per file version (path, size, mtime, inode); DataError names
    the file. Entries without these keys (older manifests) are not checked here."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: shard is missing") from None
    want_size = entry.get("bytes")
    if want_size is not None and st.st_size != want_size:
        raise DataError(f"{path}: corrupt or truncated Arrow shard ({st.st_size} bytes, the "
                        f"manifest says {want_size}); re-ingest it")
    want = entry.get("checksum")
    if want is None:
        return
    key = _version(path, st)
    if _VERIFIED.get(key) == want:
        return
    algo = want.split(":", 1)[0]
    if algo not in CHECKSUM_ALGOS:
        raise DataError(f"{path}: unknown checksum algorithm '{algo}' in the manifest "
                        f"(known: {', '.join(CHECKSUM_ALGOS)})")
    have = file_checksum(path, algo)
    if have != want:
        raise DataError(f"{path}: corrupt shard: checksum {have} does not match the manifest's "
                        f"{want}; re-ingest it")
    _VERIFIED[key] = want


def clear_verified() -> None:
    """Forget which shards this process verified (tests, benchmarks)."""
    _VERIFIED.clear()
    _SCANNED.clear()
    _WARNED.clear()


def id_limit(manifest: dict[str, Any], vocab_size: int | None = None) -> tuple[int, str]:
    """(exclusive upper bound for token ids, what it is): the model's vocabulary when given,
    else (or when smaller) the tokenizer's recorded in the manifest."""
    tok_v = manifest["tokenizer"].get("vocab_size")
    limits = [(int(v), what) for v, what in ((vocab_size, "the model's vocabulary"),
                                              (tok_v, "the tokenizer's vocabulary"))
              if v is not None]
    return min(limits) if limits else (1 << 32, "uint32")


def check_id_range(path: Any, lo: int | None, hi: int | None, limit: tuple[int, str]) -> None:
    """DataError naming `path` unless ids lo..hi lie in [0, limit) (None: no ids)."""
    n, what = limit
    if hi is not None and hi >= n:
        raise DataError(f"{path}: holds token id {hi} but {what} has {n} ids (0..{n - 1}); "
                        "the shard is corrupt or was made with another tokenizer")
    if lo is not None and lo < 0:
        raise DataError(f"{path}: holds negative token id {lo}; the shard is corrupt")


def check_token_range(manifest: dict[str, Any], vocab_size: int | None = None) -> None:
    """Refuse a manifest whose recorded token ids (or special ids) do not fit below
    `vocab_size` (the model's) and the tokenizer's vocabulary; cheap: no shard is read."""
    limit = id_limit(manifest, vocab_size)
    root = Path(manifest["root"])
    for key in ("eos_id", "pad_id"):
        v = manifest["tokenizer"].get(key)
        if v is not None and v >= limit[0]:
            raise DataError(f"{manifest_path(root)}: tokenizer {key} {v} is not below "
                            f"{limit[1]} ({limit[0]})")
    for s in manifest["shards"]:
        check_id_range(root / s["path"], s.get("min_id"), s.get("max_id"), limit)


def warn_unverified(manifest: dict[str, Any]) -> bool:
    """Warn once per process per manifest whose shards carry no checksum; True if it has none."""
    if all("checksum" in s for s in manifest["shards"]):
        return False
    mp = str(manifest_path(manifest["root"]))
    if mp not in _WARNED:
        _WARNED.add(mp)
        warnings.warn(f"{mp}: written before shard checksums; sizes, counts and token ids are "
                      "checked but shard contents cannot be verified (re-ingest to add "
                      "checksums)", UnverifiedDataWarning, stacklevel=3)
    return True


@dataclass
class ShardArrays:
    """A memory-mapped shard: document i is ``values[offsets[i]:offsets[i + 1]]``."""

    path: Path
    values: np.ndarray   # (num_tokens,) uint16/uint32, a view of the mapped file
    offsets: np.ndarray  # (num_docs + 1,) int32

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


def open_shard(path: Path, expect_docs: int | None = None, expect_tokens: int | None = None,
               *, entry: dict[str, Any] | None = None, verify: bool = True,
               limit: tuple[int, str] | None = None) -> ShardArrays:
    """Map a shard without copying; checks its schema and (optionally) the manifest counts.

    `entry`: its manifest entry: counts, and with `verify` size and checksum (verify_shard).
    `limit`: (id bound, what it is) from id_limit; a shard whose entry records no id range
    (an older manifest) has its ids scanned once per process instead."""
    if entry is not None:
        expect_docs, expect_tokens = entry["num_documents"], entry["num_tokens"]
        if verify:
            verify_shard(path, entry)
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
    if limit is not None and (entry is None or entry.get("max_id") is None):
        check_id_range(path, *_scan_ids(path, values), limit)
    return ShardArrays(path, values, offsets)


def _scan_ids(path: Path, values: np.ndarray) -> tuple[int | None, int | None]:
    """(min, max) of a shard's ids, once per process per file version."""
    key = _version(path, path.stat())
    got = _SCANNED.get(key)
    if got is None:
        got = (int(values.min()), int(values.max())) if len(values) else (None, None)
        _SCANNED[key] = got
    return got


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
        p = root / s["path"]
        try:
            size = p.stat().st_size
        except OSError:
            raise DataError(f"{mp}: shard {i} '{s['path']}' listed in the manifest is missing") \
                from None
        if s.get("bytes") is not None and size != s["bytes"]:
            raise DataError(f"{p}: corrupt or truncated Arrow shard ({size} bytes, the manifest "
                            f"says {s['bytes']}); re-ingest it")
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
        info = write_shard(out / rel, part, dtype)
        shards.append({"path": rel, "source": source, "num_documents": len(part), **info})
    manifest = new_manifest("tokens", tokenizer_sha256, vocab_size, dtype, shards, {}, [], 0)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def new_manifest(kind: str, sha: str, vocab_size: int, dtype: np.dtype | None,
                 shards: list[dict], skipped: dict[str, int], examples: list[str],
                 split_docs: int, tokenizer_path: str = "", sources: dict | None = None,
                 eos_id: int = 3, pad_id: int = 0,
                 input_records: int | None = None) -> dict[str, Any]:
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
        "num_input_records": input_records,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "long_documents_split": split_docs,
    }
