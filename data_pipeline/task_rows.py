"""Labelled task rows for fine-tuning (`trellis finetune`): JSONL / Parquet / Arrow records ->
one Arrow IPC table of model inputs, the same for every rank.

Record forms (field names are configurable, TaskFieldsConfig):

* classification  {text, [text_pair], label}   label: a class name (string) or index
* regression      {text, [text_pair], label}   label: a number
* qa (extractive) {question, context, answer}  answer: {"text", "start"} (start = character
                                               offset in context) or a string found in it

Sequences, GPT-1 / BERT style (special ids from the tokenizer's fixed table):

* bert: [CLS] a [SEP] (b [SEP]); token types 0 for a, 1 for b; the head reads [CLS].
* gpt:  a ([SEP] b) [CLS]; the last token is GPT-1's "extract" token the head reads.
* qa:   the question first (so a causal model reads it before the context), then the context.

Table columns: input_ids list<int32>, token_type_ids list<int8>, label float64 (class index
or value), start / end int32 (answer tokens, inclusive; -1 outside QA).

Any bad record is a DataError, one line naming the file and row: a missing field, a label
outside the label set, an answer not inside its context, a row longer than max_len (unless
`truncate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.ipc as ipc

from trellis.data_pipeline.inputs import Row, Skip, detect_format, expand_paths, read_rows
from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.tokenizer import CLS_ID, SEP_ID, Tokenizer

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())),
                    ("label", pa.float64()), ("start", pa.int32()), ("end", pa.int32())])


@dataclass
class TaskFieldsConfig:
    kind: Literal["classification", "regression", "qa"] = "classification"
    """classification: a class per row; regression: a number; qa: an answer span."""
    text_field: str = "text"
    """Field of the (first) sentence."""
    pair_field: str = ""
    """Field of the second sentence of a sentence-pair task; empty = single sentences."""
    label_field: str = "label"
    """Field of the class (name or index) or regression target."""
    labels: list[str] = field(default_factory=list)
    """Class names in index order; empty = the sorted distinct labels of the training rows."""
    question_field: str = "question"
    """qa: field of the question."""
    context_field: str = "context"
    """qa: field of the passage holding the answer."""
    answer_field: str = "answer"
    """qa: field of the answer: {"text", "start"} or a string that occurs in the context."""


def _rows(source: str) -> Iterator[Row]:
    files = expand_paths([source])
    if not files:
        raise DataError(f"{source}: no such file")
    for path in files:
        for item in read_rows(path, detect_format(path, "auto")):
            if isinstance(item, Skip):
                raise DataError(item.message)
            yield item


def _field(row: Row, key: str) -> Any:
    if key not in row.data:
        raise DataError(f"{row.where}: no field '{key}' (fields: {', '.join(list(row.data)[:8])})")
    return row.data[key]


def _text(row: Row, key: str) -> str:
    v = _field(row, key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{row.where}: field '{key}' must be a non-empty string")
    return v


def read_task_rows(source: str, f: TaskFieldsConfig) -> list[Row]:
    """Every record of `source` (a file, folder or glob), checked to hold its fields."""
    rows = list(_rows(source))
    if not rows:
        raise DataError(f"{source}: no rows")
    keys = ([f.question_field, f.context_field, f.answer_field] if f.kind == "qa" else
            [f.text_field, f.label_field] + ([f.pair_field] if f.pair_field else []))
    for r in rows:
        for k in keys:
            _field(r, k)
    return rows


def label_names(rows: list[Row], f: TaskFieldsConfig) -> list[str]:
    """The class names: configured, or the sorted distinct labels of `rows`."""
    if f.labels:
        return list(f.labels)
    return sorted({str(r.data[f.label_field]) for r in rows})


def _label(row: Row, f: TaskFieldsConfig, names: list[str]) -> float:
    v = row.data[f.label_field]
    if f.kind == "regression":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{row.where}: field '{f.label_field}' must be a number, got {v!r}")
        return float(v)
    if str(v) in names:
        return float(names.index(str(v)))
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
        return float(v)
    raise DataError(f"{row.where}: label {v!r} is not one of the {len(names)} labels "
                    f"({', '.join(names[:8])})")


def _fit(a: list[int], b: list[int], room: int, truncate: bool, where: str,
         max_len: int) -> tuple[list[int], list[int]]:
    """Cut the longer segment's end until both fit in `room` tokens, or fail."""
    if len(a) + len(b) <= room:
        return a, b
    if not truncate:
        raise DataError(f"{where}: {len(a) + len(b) + (max_len - room)} tokens exceed "
                        f"data.max_len {max_len} (raise it, or set data.truncate=true)")
    a, b = list(a), list(b)
    while len(a) + len(b) > room:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def encode_pair(a: list[int], b: list[int] | None, arch: str, max_len: int, truncate: bool,
                where: str) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) of one or two segments, laid out for `arch`."""
    extra = (2 if arch == "bert" else 1) + (1 if b is not None else 0)
    a, b2 = _fit(a, b or [], max_len - extra, truncate, where, max_len)
    if arch == "bert":
        ids = [CLS_ID] + a + [SEP_ID] + (b2 + [SEP_ID] if b is not None else [])
        types = [0] * (len(a) + 2) + ([1] * (len(b2) + 1) if b is not None else [])
        return ids, types
    ids = a + ([SEP_ID] + b2 if b is not None else []) + [CLS_ID]
    return ids, [0] * len(ids)


def _answer_bytes(row: Row, f: TaskFieldsConfig, context: str) -> tuple[int, int]:
    """The answer's [begin, end) byte span in the context's UTF-8."""
    ans = row.data[f.answer_field]
    if isinstance(ans, str):
        text, start = ans, context.find(ans)
    elif isinstance(ans, dict) and isinstance(ans.get("text"), str):
        text, start = ans["text"], ans.get("start", context.find(ans["text"]))
    else:
        raise DataError(f"{row.where}: field '{f.answer_field}' must be a string or "
                        f"{{\"text\", \"start\"}}")
    if not text or not isinstance(start, int) or start < 0 or \
            context[start:start + len(text)] != text:
        raise DataError(f"{row.where}: answer {text!r} is not in the context at {start}")
    b0 = len(context[:start].encode())
    return b0, b0 + len(text.encode())


def encode_qa(row: Row, f: TaskFieldsConfig, tok: Tokenizer, arch: str, max_len: int,
              truncate: bool) -> tuple[list[int], list[int], int, int]:
    """(ids, types, start, end): question then context; the answer's first/last token."""
    q = tok.encode(_text(row, f.question_field))
    context = _text(row, f.context_field)
    c, spans = tok.encode_with_offsets(context)
    b0, b1 = _answer_bytes(row, f, context)
    inside = [i for i, (s, e) in enumerate(spans) if e > b0 and s < b1 and e > s]
    ids, types = encode_pair(q, c, arch, max_len, truncate, row.where)
    offset = len(q) + (2 if arch == "bert" else 1)  # [CLS] q [SEP] | q [SEP]
    kept = len(ids) - offset - 1  # context tokens left before the closing [SEP] / [CLS]
    if not inside or inside[-1] >= kept:
        raise DataError(f"{row.where}: the answer lies beyond data.max_len {max_len} "
                        f"after truncation")
    return ids, types, offset + inside[0], offset + inside[-1]


def encode_rows(rows: list[Row], f: TaskFieldsConfig, tok: Tokenizer, arch: str,
                max_len: int, truncate: bool, names: list[str]) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in SCHEMA.names}
    for r in rows:
        if f.kind == "qa":
            ids, types, s, e = encode_qa(r, f, tok, arch, max_len, truncate)
            label = 0.0
        else:
            b = tok.encode(_text(r, f.pair_field)) if f.pair_field else None
            ids, types = encode_pair(tok.encode(_text(r, f.text_field)), b, arch, max_len,
                                     truncate, r.where)
            label, s, e = _label(r, f, names), -1, -1
        for k, v in zip(SCHEMA.names, (ids, types, label, s, e)):
            cols[k].append(v)
    return pa.table(cols, schema=SCHEMA)


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    tmp.replace(path)
    return path


def read_table(path: str | Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return ipc.open_file(src).read_all()
