"""Raw inputs: expand paths, cut files into pieces of work, and read records from a piece.

Reading yields one item per input record, in a fixed order: either ``Doc(text, where)`` or
``Skip(reason, where, message)``. Ingest counts items to resume (the n-th item of a piece is
the same on every run) and never drops a record without a Skip.

Formats: plain text (one document per file / per blank-line-separated block / per line),
JSONL (a text field per line), Parquet and Arrow IPC (a text column). Line-based files and
JSONL larger than the target piece size are cut at line starts; Parquet by row groups;
Arrow IPC files by record batches; so one big file still spreads over several processes.
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import pyarrow as pa
import pyarrow.parquet as pq

from trellis.data_pipeline.shards import DataError, _first_line

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
              ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


@dataclass(frozen=True)
class Doc:
    text: str
    where: str


@dataclass(frozen=True)
class Skip:
    reason: str
    where: str
    message: str


Item = Union[Doc, Skip]


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input file: bytes [start, end) at line starts, row groups or
    record batches [start, end), or the whole file (start=0, end=-1)."""

    path: str
    fmt: str
    start: int = 0
    end: int = -1
    first_row: int = 0  # 0-based line / row number of the piece's first record


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories (recursive) and globs, sorted, without duplicates.
    A pattern that names nothing is an error (a typo must not yield an empty dataset)."""
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(pat, recursive=True) if Path(q).is_file())
        if not found:
            raise DataError(f"{pat}: no such file, directory or glob match")
        out.extend(found)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def detect_format(path: Path, fmt: str) -> str:
    return EXTENSIONS.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


def plan_pieces(path: Path, fmt: str, text_mode: str, target_bytes: int) -> list[Piece]:
    """Cut one file into pieces of about `target_bytes` each (a file that cannot be opened
    stays one piece; reading it then reports the error as a Skip)."""
    size = path.stat().st_size
    if size <= target_bytes:
        return [Piece(str(path), fmt)]
    if fmt == "jsonl" or (fmt == "text" and text_mode == "lines"):
        return _line_pieces(path, fmt, target_bytes)
    try:
        if fmt == "parquet":
            md = pq.ParquetFile(str(path)).metadata
            sizes = [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
            rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            return _group_pieces(str(path), fmt, sizes, rows, target_bytes)
        if fmt == "arrow":
            with pa.memory_map(str(path)) as src:
                r = pa.ipc.open_file(src)
                batches = [r.get_batch(i) for i in range(r.num_record_batches)]
                sizes = [b.nbytes for b in batches]
                rows = [b.num_rows for b in batches]
            return _group_pieces(str(path), fmt, sizes, rows, target_bytes)
    except (pa.ArrowException, OSError):
        pass
    return [Piece(str(path), fmt)]


def _group_pieces(path: str, fmt: str, sizes: list[int], rows: list[int],
                  target: int) -> list[Piece]:
    pieces, start, acc, row0, row = [], 0, 0, 0, 0
    for i, (sz, n) in enumerate(zip(sizes, rows)):
        acc, row = acc + sz, row + n
        if acc >= target or i == len(sizes) - 1:
            pieces.append(Piece(path, fmt, start, i + 1, row0))
            start, acc, row0 = i + 1, 0, row
    return pieces or [Piece(path, fmt)]


def _line_pieces(path: Path, fmt: str, target: int) -> list[Piece]:
    """Split points at line starts, with the line number of each piece's first line."""
    size = path.stat().st_size
    pieces, start, lines_before = [], 0, 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(start + target - 1)
            f.readline()  # to the start of the line after byte start+target-1
            cut = f.tell()
            if cut >= size:
                break
            pieces.append(Piece(str(path), fmt, start, cut, lines_before))
            f.seek(start)
            left = cut - start
            while left:
                chunk = f.read(min(left, 1 << 22))
                lines_before += chunk.count(b"\n")
                left -= len(chunk)
            start = cut
    pieces.append(Piece(str(path), fmt, start, -1, lines_before))
    return pieces


# -- reading ------------------------------------------------------------------------------------
def _decode(raw: bytes, where: str) -> Item:
    try:
        return Doc(raw.decode("utf-8"), where)
    except UnicodeDecodeError as e:
        return Skip("non_utf8", where, f"{where}: not UTF-8 (invalid byte at offset {e.start})")


def read_piece(piece: Piece, text_mode: str, field: str) -> Iterator[Item]:
    """Every record of `piece` as a Doc or a Skip, in file order."""
    path = Path(piece.path)
    try:
        if piece.fmt == "text" and text_mode == "file":
            yield _decode(path.read_bytes(), str(path))
        elif piece.fmt == "text" and text_mode == "blocks":
            yield from _read_blocks(path)
        elif piece.fmt in ("text", "jsonl"):
            yield from _read_lines(piece, field)
        elif piece.fmt in ("parquet", "arrow"):
            yield from _read_columnar(piece, field)
        else:
            raise DataError(f"{path}: unknown input format '{piece.fmt}'")
    except OSError as e:
        yield Skip("unreadable_file", str(path), f"{path}: cannot read ({e.strerror or e})")


def _read_blocks(path: Path) -> Iterator[Item]:
    data = path.read_bytes()
    pos, line = 0, 1
    for m in [*_BLANK_LINE.finditer(data), None]:
        end = m.start() if m else len(data)
        block = data[pos:end]
        if block.strip():
            first = line + data.count(b"\n", pos, pos + len(block) - len(block.lstrip()))
            yield _decode(block.strip(b"\n"), f"{path}:{first}")
        if m is None:
            break
        line += data.count(b"\n", pos, m.end())
        pos = m.end()


def _read_lines(piece: Piece, field: str) -> Iterator[Item]:
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        pos, row = piece.start, piece.first_row
        for raw in f:
            if piece.end >= 0 and pos >= piece.end:
                break
            pos += len(raw)
            row += 1
            where = f"{piece.path}:{row}"
            raw = raw.rstrip(b"\r\n")
            yield _decode(raw, where) if piece.fmt == "text" else _json_doc(raw, where, field)


def _json_doc(raw: bytes, where: str, field: str) -> Item:
    item = _decode(raw, where)
    if isinstance(item, Skip):
        return item
    if not item.text.strip():
        return Skip("empty", where, f"{where}: blank line")
    try:
        obj = json.loads(item.text)
    except ValueError as e:
        return Skip("bad_json", where, f"{where}: invalid JSON ({_first_line(e)})")
    if not isinstance(obj, dict):
        return Skip("bad_json", where, f"{where}: expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(list(obj)[:8])
        return Skip("missing_field", where, f"{where}: no field '{field}' (fields: {keys})")
    text = obj[field]
    if not isinstance(text, str):
        return Skip("not_text", where, f"{where}: field '{field}' is {type(text).__name__}, "
                                       "not a string")
    return Doc(text, where)


def _read_columnar(piece: Piece, field: str) -> Iterator[Item]:
    path = piece.path
    try:
        batches, names = _open_columnar(piece, field)
        if field not in names:
            yield Skip("missing_column", path,
                       f"{path}: no column '{field}' (columns: {', '.join(names)})")
            return
        row = piece.first_row
        for batch in batches:
            col = batch.column(field)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                    or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
                yield Skip("bad_column_type", path,
                           f"{path}: column '{field}' has type {col.type}, not string")
                return
            for raw in col.cast(pa.large_binary()).to_pylist():
                where = f"{path}:row {row}"
                row += 1
                yield (Skip("empty", where, f"{where}: null") if raw is None
                       else _decode(raw, where))
    except (pa.ArrowException, OSError, ValueError) as e:
        yield Skip("corrupt_file", path, f"{path}: corrupt or truncated file ({_first_line(e)})")


def _open_columnar(piece: Piece, field: str) -> tuple[Iterator[pa.RecordBatch], list[str]]:
    if piece.fmt == "parquet":
        pf = pq.ParquetFile(piece.path)
        names = pf.schema_arrow.names
        groups = (list(range(pf.num_row_groups)) if piece.end < 0
                  else list(range(piece.start, piece.end)))
        cols = [field] if field in names else None
        return pf.iter_batches(batch_size=8192, row_groups=groups, columns=cols), names
    src = pa.memory_map(piece.path)
    try:
        r = pa.ipc.open_file(src)
        idx = range(r.num_record_batches) if piece.end < 0 else range(piece.start, piece.end)
        return (r.get_batch(i) for i in idx), r.schema.names
    except pa.ArrowInvalid:
        src.seek(0)
        r2 = pa.ipc.open_stream(src)
        return iter(r2), r2.schema.names


# -- structured rows (SFT / RLHF formats) ---------------------------------------------------------
@dataclass(frozen=True)
class Row:
    data: dict
    where: str


def read_rows(path: Path, fmt: str) -> Iterator[Row | Skip]:
    """Each record of a JSONL / Parquet / Arrow file as a Row (a dict) or a Skip."""
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                where = f"{path}:{i}"
                item = _decode(raw.rstrip(b"\r\n"), where)
                if isinstance(item, Skip) or not item.text.strip():
                    yield item if isinstance(item, Skip) else Skip("empty", where, f"{where}: blank line")
                    continue
                try:
                    obj = json.loads(item.text)
                except ValueError as e:
                    yield Skip("bad_json", where, f"{where}: invalid JSON ({_first_line(e)})")
                    continue
                yield (Row(obj, where) if isinstance(obj, dict) else
                       Skip("bad_json", where, f"{where}: expected a JSON object"))
        return
    if fmt not in ("parquet", "arrow"):
        yield Skip("bad_format", str(path), f"{path}: structured inputs must be JSONL, Parquet "
                                            f"or Arrow, not {fmt}")
        return
    try:
        batches, _ = _open_columnar(Piece(str(path), fmt), field="")
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                yield Row(obj, f"{path}:row {row}")
                row += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        yield Skip("corrupt_file", str(path), f"{path}: corrupt or truncated file ({_first_line(e)})")
