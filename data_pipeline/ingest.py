"""Ingest: raw inputs -> tokenized Arrow shards + manifest.json, in parallel and resumable.

The inputs are cut into *tasks* (consecutive pieces of files of about ``4 * shard_tokens``
bytes). A task tokenizes its records in order and closes a shard ``<source>/<task>-<part>``
whenever it holds ``shard_tokens`` tokens; each shard is written to a temporary file and
renamed, and records in its metadata how many input records the task had consumed. A
finished task writes ``<source>/<task>.done.json`` last. On a rerun finished tasks are
skipped and an interrupted task resumes after its last complete shard. ``plan.json`` pins
the inputs and settings: a rerun with different ones is refused instead of mixing outputs.

Tasks run in a process pool, or as Ray tasks (``backend="ray"``) on an attached cluster
whose nodes share the output filesystem.

Every shard's manifest entry carries its size, xxh3_64 checksum and token-id range (see
data_pipeline.shards). Every skipped input record is counted by reason and listed by
``file:line`` (up to SKIP_LINES per reason per task) in ``out_dir/skipped.txt``; the first
REPORT_LINES are printed and kept in the manifest.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from trellis.data_pipeline.config import InputSource
from trellis.data_pipeline.inputs import Doc, Piece, Skip, detect_format, expand_paths, plan_pieces, read_piece
from trellis.data_pipeline.shards import (MANIFEST_NAME, DataError, atomic_write_bytes,
                                          atomic_write_json, file_integrity, new_manifest,
                                          open_shard, read_shard_meta, token_dtype, write_shard)
from trellis.data_pipeline.tokenizer import Tokenizer, mp_context

BENIGN = {"empty"}        # counted and reported, but never fatal under on_error="fail"
SKIP_LINES = 10_000       # skip messages kept per reason per task (all are counted)
REPORT_LINES = 100        # skip messages printed and kept in the manifest (all: SKIPPED_FILE)
SKIPPED_FILE = "skipped.txt"
# Skips that drop a whole file (its rows are not counted), not one record.
FILE_REASONS = frozenset({"corrupt_file", "unreadable_file", "missing_column",
                          "bad_column_type", "bad_format"})
ENCODE_BATCH = 512


@dataclass(frozen=True)
class Task:
    source: str
    index: int
    pieces: tuple[Piece, ...]
    text_mode: str
    field: str


@dataclass(frozen=True)
class TaskSettings:
    out_dir: str
    shard_tokens: int
    dtype: str
    max_doc_chars: int
    long_docs: str
    on_error: str


def as_sources(sources: Any) -> list[InputSource]:
    """InputSource list, {name: paths} mapping, or a plain list of paths (one source)."""
    if isinstance(sources, dict):
        return [InputSource(name=k, paths=[str(p) for p in ([v] if isinstance(v, (str, Path))
                                                            else v)]) for k, v in sources.items()]
    items = list(sources)
    if items and all(isinstance(s, InputSource) for s in items):
        return items
    return [InputSource(paths=[str(p) for p in items])]


def plan_tasks(sources: Sequence[InputSource], target_bytes: int) -> list[Task]:
    tasks: list[Task] = []
    for src in sources:
        group: list[Piece] = []
        size = 0
        for path in expand_paths(src.paths):
            fmt = detect_format(path, src.format)
            file_size = path.stat().st_size
            pieces = plan_pieces(path, fmt, src.text_mode, target_bytes)
            for piece in pieces:
                group.append(piece)
                byte_range = fmt in ("text", "jsonl") and len(pieces) > 1
                size += ((file_size if piece.end < 0 else piece.end) - piece.start if byte_range
                         else file_size // len(pieces))
                if size >= target_bytes:
                    tasks.append(Task(src.name, len(tasks), tuple(group), src.text_mode,
                                      src.text_field))
                    group, size = [], 0
        if group:
            tasks.append(Task(src.name, len(tasks), tuple(group), src.text_mode, src.text_field))
    return tasks


# -- one task ---------------------------------------------------------------------------------
def _shard_name(task: Task, part: int) -> str:
    return f"{task.source}/{task.index:05d}-{part:03d}.arrow"


def _resume_point(task: Task, out: Path) -> tuple[list[dict], int]:
    """Shards a previous run finished for this task (contiguous from part 0) and the input
    cursor after them. A corrupt part ends the list; it and later parts are redone."""
    done: list[dict] = []
    for part in itertools.count():
        p = out / _shard_name(task, part)
        if not p.is_file():
            break
        try:
            meta = read_shard_meta(p)
        except DataError:
            break
        done.append(meta)
    return done, done[-1]["cursor"] if done else 0


def _shard_entry(out: Path, entry: dict, meta: dict | None = None) -> dict:
    """A shard's manifest entry with its integrity fields; a shard written by an earlier
    run (resume) is hashed from disk, its id range taken from its metadata or scanned."""
    if "checksum" in entry:
        return entry
    path = out / entry["path"]
    meta = meta if meta is not None else read_shard_meta(path)
    lo, hi = meta.get("min_id"), meta.get("max_id")
    if "max_id" not in meta:
        v = open_shard(path).values
        lo, hi = (int(v.min()), int(v.max())) if len(v) else (None, None)
    return {**entry, **file_integrity(path, lo, hi)}


def _records(task: Task, cursor: int) -> Iterable[tuple[int, Doc | Skip]]:
    items = itertools.chain.from_iterable(
        read_piece(p, task.text_mode, task.field) for p in task.pieces)
    return itertools.islice(enumerate(items), cursor, None)


class _TaskRun:
    """Mutable state of one task: the open shard and the counts since the last close."""

    def __init__(self, task: Task, st: TaskSettings, tok: Tokenizer, finished: list[dict]):
        self.task, self.st, self.tok = task, st, tok
        self.out, self.dtype = Path(st.out_dir), np.dtype(st.dtype)
        self.shards = [_shard_entry(self.out, {k: m[k] for k in ("path", "num_documents",
                                                                 "num_tokens")}, m)
                       for m in finished]
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.split = 0
        for m in finished:
            self.skipped.update(m["skipped"])
            self.split += m["split"]
            for r, ex in m["examples"].items():
                self.examples.setdefault(r, []).extend(ex)
        self._reset_open()

    def _reset_open(self) -> None:
        self.docs: list[np.ndarray] = []
        self.n_tokens = 0
        self.open_skipped: Counter = Counter()
        self.open_examples: dict[str, list[str]] = {}
        self.open_split = 0

    def skip(self, s: Skip) -> None:
        if self.st.on_error == "fail" and s.reason not in BENIGN:
            raise DataError(s.message)
        self.open_skipped[s.reason] += 1
        ex = self.open_examples.setdefault(s.reason, [])
        if len(ex) + len(self.examples.get(s.reason, [])) < SKIP_LINES:
            ex.append(s.message)

    def texts_of(self, d: Doc) -> list[str]:
        if not d.text.strip():
            self.skip(Skip("empty", d.where, f"{d.where}: empty document"))
            return []
        n = self.st.max_doc_chars
        if len(d.text) <= n:
            return [d.text]
        if self.st.long_docs == "skip":
            self.skip(Skip("too_long", d.where,
                           f"{d.where}: document of {len(d.text)} characters > max_doc_chars {n}"))
            return []
        self.open_split += 1
        return [d.text[i:i + n] for i in range(0, len(d.text), n)]

    def add(self, ids: list[list[int]], cursor: int) -> None:
        for x in ids:
            self.docs.append(np.asarray(x, dtype=self.dtype))
            self.n_tokens += len(x)
        if self.n_tokens >= self.st.shard_tokens:
            self.close(cursor)

    def close(self, cursor: int) -> None:
        rel = _shard_name(self.task, len(self.shards))
        meta = {"path": rel, "cursor": cursor, "num_documents": len(self.docs),
                "num_tokens": self.n_tokens, "skipped": dict(self.open_skipped),
                "examples": self.open_examples, "split": self.open_split}
        info = write_shard(self.out / rel, self.docs, self.dtype, meta)
        self.shards.append({"path": rel, "num_documents": len(self.docs), **info})
        self._absorb()

    def _absorb(self) -> None:
        self.skipped.update(self.open_skipped)
        self.split += self.open_split
        for r, ex in self.open_examples.items():
            self.examples.setdefault(r, []).extend(ex)
        self._reset_open()

    def finish(self, total: int) -> dict:
        if self.docs:
            self.close(total)
        self._absorb()  # skips after the last shard
        rec = {"source": self.task.source, "task": self.task.index, "shards": self.shards,
               "records": total, "skipped": dict(self.skipped), "examples": self.examples,
               "split": self.split}
        atomic_write_json(self.out / f"{self.task.source}/{self.task.index:05d}.done.json", rec)
        return rec


def run_task(task: Task, st: TaskSettings, tok: Tokenizer) -> dict:
    """Tokenize one task into shards (resuming after finished ones); returns its record."""
    out = Path(st.out_dir)
    done_path = out / f"{task.source}/{task.index:05d}.done.json"
    if done_path.is_file():
        rec = json.loads(done_path.read_text())
        if all((out / s["path"]).is_file() for s in rec["shards"]):
            rec["shards"] = [_shard_entry(out, s) for s in rec["shards"]]  # older records
            return rec
    finished, cursor = _resume_point(task, out)
    run = _TaskRun(task, st, tok, finished)
    window: list[tuple[int, Doc | Skip]] = []
    total = cursor
    for idx, item in _records(task, cursor):
        total = idx + 1
        window.append((idx, item))
        if len(window) >= ENCODE_BATCH:
            _flush(run, window)
            window = []
    _flush(run, window)
    return run.finish(total)


def _flush(run: _TaskRun, window: list[tuple[int, Doc | Skip]]) -> None:
    """Encode a window of records in one call, then add them in order."""
    texts: list[list[str]] = []
    for _, item in window:
        texts.append([] if isinstance(item, Skip) else run.texts_of(item))
    flat = run.tok.encode_batch([t for ts in texts for t in ts])
    k = 0
    for (idx, item), ts in zip(window, texts):
        if isinstance(item, Skip):
            run.skip(item)
            continue
        run.add(flat[k:k + len(ts)], idx + 1)
        k += len(ts)


# -- process pool / Ray fan-out ------------------------------------------------------------
_W: dict[str, Any] = {}


def _init(st: TaskSettings, tok: Tokenizer) -> None:
    _W["st"], _W["tok"] = st, tok


def _pool_task(task: Task) -> dict:
    return run_task(task, _W["st"], _W["tok"])


def _run_all(tasks: list[Task], st: TaskSettings, tok: Tokenizer, processes: int,
             backend: str, progress: bool) -> list[dict]:
    bar = _progress(len(tasks), progress)
    if backend == "ray":
        import ray  # only here: data_pipeline does not need Ray otherwise
        remote = ray.remote(num_cpus=1)(run_task)
        tok_ref = ray.put(tok)
        pending = [remote.remote(t, st, tok_ref) for t in tasks]
        records = ray.get(pending)
        bar.update(len(tasks))
    elif processes <= 1 or len(tasks) <= 1:
        records = []
        for t in tasks:
            records.append(run_task(t, st, tok))
            bar.update(1)
    else:
        with mp_context().Pool(min(processes, len(tasks)), initializer=_init,
                               initargs=(st, tok)) as pool:
            records = []
            for rec in pool.imap_unordered(_pool_task, tasks):
                records.append(rec)
                bar.update(1)
    bar.close()
    return sorted(records, key=lambda r: r["task"])


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="ingest", unit="task", disable=not enabled or total < 2,
                file=sys.stderr)


def _check_plan(out: Path, plan: dict) -> None:
    path = out / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in plan:
            if old.get(key) != plan[key]:
                raise DataError(f"{path}: '{out}' holds an ingest with a different '{key}'; "
                                "use a fresh out_dir (or delete it) to ingest these inputs")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan)


def ingest(sources: Any, tokenizer: Tokenizer | str | Path, out_dir: str | Path,
           shard_tokens: int = 1 << 24, processes: int = 2, *, max_doc_chars: int = 4_000_000,
           long_docs: str = "split", on_error: str = "skip", backend: str = "processes",
           progress: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Tokenize `sources` into shards under `out_dir`; write and return the manifest.

    `sources`: a list of InputSource, a {name: paths} mapping, or a list of paths (files,
    directories, globs; one source named "default"). Skipped inputs are counted by reason in
    the manifest and printed (first examples + totals) unless verbose=False.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    out = Path(out_dir)
    srcs = as_sources(sources)
    tasks = plan_tasks(srcs, target_bytes=max(4 * shard_tokens, 1 << 12))
    dtype = token_dtype(tok.vocab_size)
    st = TaskSettings(str(out), shard_tokens, dtype.name, max_doc_chars, long_docs, on_error)
    _check_plan(out, {"kind": "tokens", "tokenizer_sha256": tok.sha256,
                      "settings": {k: v for k, v in asdict(st).items()
                                   if k not in ("out_dir", "on_error")},
                      "tasks": [[t.source, t.index, t.text_mode, t.field,
                                 [asdict(p) for p in t.pieces]] for t in tasks]})
    records = _run_all(tasks, st, tok, processes, backend, progress)
    lines = sorted((m for r in records for ex in r["examples"].values() for m in ex),
                   key=natural_key)
    manifest = _manifest(records, srcs, tok, dtype, lines)
    write_skip_report(out, lines, sum(manifest["skipped"].values()), manifest)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if verbose:
        report_skips(manifest, str(out / MANIFEST_NAME))
    return manifest


def _manifest(records: list[dict], srcs: list[InputSource], tok: Tokenizer,
              dtype: np.dtype, lines: list[str]) -> dict[str, Any]:
    shards, skipped, split, n_records = [], Counter(), 0, 0
    per_source: dict[str, dict] = {s.name: {"inputs": s.paths, "num_documents": 0,
                                            "num_tokens": 0, "num_shards": 0, "skipped": Counter()}
                                   for s in srcs}
    for rec in records:
        ps = per_source[rec["source"]]
        for s in rec["shards"]:
            shards.append({**s, "source": rec["source"]})
            ps["num_documents"] += s["num_documents"]
            ps["num_tokens"] += s["num_tokens"]
            ps["num_shards"] += 1
        skipped.update(rec["skipped"])
        ps["skipped"].update(rec["skipped"])
        split += rec["split"]
        n_records += rec.get("records", sum(s["num_documents"] for s in rec["shards"])
                             + sum(rec["skipped"].values()))  # records of older ingests
    for ps in per_source.values():
        ps["skipped"] = dict(sorted(ps["skipped"].items()))
    return new_manifest("tokens", tok.sha256, tok.vocab_size, dtype, shards, dict(skipped),
                        lines[:REPORT_LINES], split, tok.path, per_source, tok.eos_id,
                        tok.pad_id, input_records=n_records)


def natural_key(line: str) -> list:
    """Sort key: file names, then line / row numbers as numbers (a.jsonl:9 before :10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", line)]


def write_skip_report(out: Path, lines: list[str], total: int, manifest: dict) -> None:
    """out/SKIPPED_FILE: every kept skip message, one `file:line: why` per line (and how many
    were counted but not kept); removed when nothing was skipped. Notes it in `manifest`."""
    path = out / SKIPPED_FILE
    if not total:
        path.unlink(missing_ok=True)
        return
    text = "".join(f"{line}\n" for line in lines)
    if total > len(lines):
        text += (f"... and {total - len(lines)} more skipped records, counted but not listed "
                 f"(at most {SKIP_LINES} are kept per reason per input task)\n")
    atomic_write_bytes(path, text.encode())
    manifest["skipped_report"] = SKIPPED_FILE


def report_skips(manifest: dict, where: str, file=None) -> None:
    """Print skipped inputs: the first REPORT_LINES `file:line: why` lines, then the totals
    by reason and where the full list is."""
    file = file or sys.stderr
    if not manifest["skipped"] and not manifest.get("long_documents_split"):
        return
    for line in manifest["skipped_examples"]:
        print(f"skipped: {line}", file=file)
    total = sum(manifest["skipped"].values())
    counts = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items())
    report = manifest.get("skipped_report")
    listed = f"; full list: {Path(where).parent / report}" if report else ""
    print(f"ingest {where}: skipped {total} input records ({counts or 'none'}){listed}; "
          f"{manifest.get('long_documents_split', 0)} long documents split", file=file)

