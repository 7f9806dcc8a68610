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
"""
from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from trellis.data_pipeline.config import InputSource
from trellis.data_pipeline.inputs import Doc, Piece, Skip, detect_format, expand_paths, plan_pieces, read_piece
from trellis.data_pipeline.shards import (MANIFEST_NAME, DataError, atomic_write_json, new_manifest,
                                  read_shard_meta, token_dtype, write_shard)
from trellis.data_pipeline.tokenizer import Tokenizer, mp_context

BENIGN = {"empty"}        # counted and reported, but never fatal under on_error="fail"
EXAMPLES_PER_REASON = 5   # skip messages kept per reason per task (all are counted)
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


def _records(task: Task, cursor: int) -> Iterable[tuple[int, Doc | Skip]]:
    items = itertools.chain.from_iterable(
        read_piece(p, task.text_mode, task.field) for p in task.pieces)
    return itertools.islice(enumerate(items), cursor, None)


class _TaskRun:
    """Mutable state of one task: the open shard and the counts since the last close."""

    def __init__(self, task: Task, st: TaskSettings, tok: Tokenizer, finished: list[dict]):
        self.task, self.st, self.tok = task, st, tok
        self.out, self.dtype = Path(st.out_dir), np.dtype(st.dtype)
        self.shards = [{k: m[k] for k in ("path", "num_documents", "num_tokens")} for m in finished]
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
        if len(ex) + len(self.examples.get(s.reason, [])) < EXAMPLES_PER_REASON:
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
        write_shard(self.out / rel, self.docs, self.dtype, meta)
        self.shards.append({k: meta[k] for k in ("path", "num_documents", "num_tokens")})
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
               "skipped": dict(self.skipped), "examples": self.examples, "split": self.split}
        atomic_write_json(self.out / f"{self.task.source}/{self.task.index:05d}.done.json", rec)
        return rec


def run_task(task: Task, st: TaskSettings, tok: Tokenizer) -> dict:
    """Tokenize one task into shards (resuming after finished ones); returns its record."""
    out = Path(st.out_dir)
    done_path = out / f"{task.source}/{task.index:05d}.done.json"
    if done_path.is_file():
        rec = json.loads(done_path.read_text())
        if all((out / s["path"]).is_file() for s in rec["shards"]):
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
    manifest = _manifest(records, srcs, tok, dtype)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if verbose:
        report_skips(manifest, str(out / MANIFEST_NAME))
    return manifest


def _manifest(records: list[dict], srcs: list[InputSource], tok: Tokenizer,
              dtype: np.dtype) -> dict[str, Any]:
    shards, skipped, examples, split = [], Counter(), [], 0
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
        for ex in rec["examples"].values():
            examples.extend(ex)
    for ps in per_source.values():
        ps["skipped"] = dict(sorted(ps["skipped"].items()))
    return new_manifest("tokens", tok.sha256, tok.vocab_size, dtype, shards, dict(skipped),
                        examples[:100], split, tok.path, per_source, tok.eos_id, tok.pad_id)


def report_skips(manifest: dict, where: str, file=None) -> None:
    """Print skipped inputs: the kept example lines, then one total line per reason."""
    file = file or sys.stderr
    if not manifest["skipped"] and not manifest.get("long_documents_split"):
        return
    for line in manifest["skipped_examples"]:
        print(f"skipped: {line}", file=file)
    counts = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items())
    print(f"ingest {where}: skipped {sum(manifest['skipped'].values())} input records "
          f"({counts or 'none'}); {manifest.get('long_documents_split', 0)} long documents "
          "split", file=file)

