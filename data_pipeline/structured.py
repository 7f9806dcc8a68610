"""Structured SFT / RLHF data: ingest into Arrow tables, and read them back as rows.

Input records (JSONL lines or Parquet/Arrow rows) by kind, and the table each becomes:

* demonstrations  {prompt, response}                -> prompt, response, prompt_ids, response_ids
* comparisons     {prompt, responses: [K], ranking: [K]} or {prompt, chosen, rejected}, or
                  {chosen, rejected} whole conversations without a prompt (read as dialogue)
                                                    -> prompt, responses, ranking, prompt_ids,
                                                       responses_ids  (chosen/rejected become
                                                       responses [chosen, rejected], ranking [0, 1])
* prompts         {prompt}                          -> prompt, prompt_ids
* translation     {source, target}                  -> source, target, source_ids, target_ids,
                                                       where (file:line, for errors at training)
* dialogue        {chosen, rejected}: two whole conversations, as text with "\\n\\nHuman:" /
                  "\\n\\nAssistant:" turns (Anthropic HH) or as [{role, content}] lists; the
                  prompt is the shared prefix up to and including the last assistant marker,
                  the responses are what follows -> a comparisons table.

``ranking[i]`` is the rank of ``responses[i]``: smaller is better, equal ranks are ties.
Each input file becomes one shard ``<kind>/<n>.arrow`` under out_dir (a rerun keeps the
finished ones), next to a manifest like the token manifest's (rows counted as documents; each
table's size, xxh3_64 checksum and token-id range recorded, and verified by StructuredDataset
on its first open in a process). Bad records are skipped, counted by reason in the manifest,
printed (the first REPORT_LINES) and all listed in out_dir/skipped.txt, one line each naming
file and row.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from trellis.data_pipeline.ingest import (REPORT_LINES, SKIP_LINES, natural_key,
                                          write_skip_report)
from trellis.data_pipeline.inputs import Row, Skip, detect_format, expand_paths, read_rows
from trellis.data_pipeline.shards import (MANIFEST_NAME, DataError, atomic_write_bytes,
                                          atomic_write_json, bytes_checksum, check_id_range,
                                          check_token_range, check_tokenizer, file_integrity,
                                          id_limit, load_manifest, new_manifest, verify_shard,
                                          warn_unverified)
from trellis.data_pipeline.tokenizer import Tokenizer

KINDS = ("demonstrations", "comparisons", "prompts", "dialogue", "translation")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
ROLE_MARKERS = {"user": HUMAN, "human": HUMAN, "assistant": ASSISTANT, "system": "\n\nSystem:"}
IDS = pa.list_(pa.int32())
SCHEMAS = {
    "demonstrations": pa.schema([("prompt", pa.string()), ("response", pa.string()),
                                 ("prompt_ids", IDS), ("response_ids", IDS)]),
    "comparisons": pa.schema([("prompt", pa.string()), ("responses", pa.list_(pa.string())),
                              ("ranking", pa.list_(pa.int32())), ("prompt_ids", IDS),
                              ("responses_ids", pa.list_(IDS))]),
    "prompts": pa.schema([("prompt", pa.string()), ("prompt_ids", IDS)]),
    "translation": pa.schema([("source", pa.string()), ("target", pa.string()),
                              ("source_ids", IDS), ("target_ids", IDS), ("where", pa.string())]),
}


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise BadRow("missing_field", f"no field '{key}' (fields: {', '.join(list(row)[:8])})")
    v = row[key]
    if not isinstance(v, str):
        raise BadRow("bad_row", f"field '{key}' is {type(v).__name__}, not a string")
    if not v.strip():
        raise BadRow("empty", f"field '{key}' is empty")
    return v


def _render(messages: Any) -> tuple[str, str]:
    """[{role, content}, ...] -> (prompt ending in the assistant marker, last assistant reply)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRow("bad_dialogue", "conversation is neither text nor a list of messages")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    if last < 0:
        raise BadRow("bad_dialogue", "conversation has no assistant turn")
    parts = []
    for m in messages[:last]:
        marker = ROLE_MARKERS.get(str(m.get("role")))
        if marker is None or not isinstance(m.get("content"), str):
            raise BadRow("bad_dialogue", f"message with role {m.get('role')!r} / bad content")
        parts.append(f"{marker} {m['content']}")
    return "".join(parts) + ASSISTANT, str(messages[last].get("content", ""))


def split_dialogue(conv: Any) -> tuple[str, str]:
    """A whole conversation -> (prompt up to and incl. the last assistant marker, response)."""
    if not isinstance(conv, str):
        return _render(conv)
    cut = conv.rfind(ASSISTANT)
    if cut < 0:
        raise BadRow("bad_dialogue", f"conversation has no '{ASSISTANT.strip()}' turn")
    cut += len(ASSISTANT)
    response = conv[cut:]
    return conv[:cut], response[1:] if response.startswith(" ") else response


def convert(kind: str, row: dict, tok: Tokenizer, where: str = "") -> dict:
    """One input record (read at `where`) -> one table row (raises BadRow)."""
    if kind == "translation":
        s, t = _text(row, "source"), _text(row, "target")
        return {"source": s, "target": t, "source_ids": tok.encode(s),
                "target_ids": tok.encode(t), "where": where}
    if kind == "prompts":
        # A dialogue comparison row ({chosen, rejected}, HH-RLHF) gives its shared prompt.
        p = _text(row, "prompt") if "prompt" in row or "chosen" not in row \
            else split_dialogue(row["chosen"])[0]
        return {"prompt": p, "prompt_ids": tok.encode(p)}
    if kind == "demonstrations":
        p, r = _text(row, "prompt"), _text(row, "response")
        return {"prompt": p, "response": r, "prompt_ids": tok.encode(p), "response_ids": tok.encode(r)}
    if kind == "dialogue" or (kind == "comparisons" and "prompt" not in row and "chosen" in row):
        # Whole conversations (HH-RLHF): the RM job reads them as comparisons too.
        for key in ("chosen", "rejected"):
            if key not in row:
                raise BadRow("missing_field", f"no field '{key}' (fields: {', '.join(list(row)[:8])})")
        (pc, c), (pr, r) = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
        if pc != pr:
            raise BadRow("prompt_mismatch", "chosen and rejected conversations differ before "
                                            "the last assistant turn")
        if not pc.strip() or not c.strip() or not r.strip():
            raise BadRow("empty", "empty prompt or response")
        responses, ranking, p = [c, r], [0, 1], pc
    else:
        p = _text(row, "prompt")
        if "responses" in row or "ranking" in row:
            responses, ranking = row.get("responses"), row.get("ranking")
            if (not isinstance(responses, list) or not isinstance(ranking, list)
                    or len(responses) != len(ranking) or len(responses) < 2):
                raise BadRow("bad_ranking", "'responses' and 'ranking' must be lists of equal "
                                            "length >= 2")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
                raise BadRow("bad_ranking", "'ranking' must hold integer ranks")
            if not all(isinstance(x, str) and x.strip() for x in responses):
                raise BadRow("empty", "a response is empty or not a string")
        else:
            responses, ranking = [_text(row, "chosen"), _text(row, "rejected")], [0, 1]
    return {"prompt": p, "responses": responses, "ranking": ranking,
            "prompt_ids": tok.encode(p), "responses_ids": tok.encode_batch(responses)}


def ingest_structured(kind: str, inputs: Sequence[str], tokenizer: Tokenizer | str | Path,
                      out_dir: str | Path, on_error: str = "skip", verbose: bool = True) -> dict:
    """Ingest SFT/RLHF records of `kind` (see module docstring) into out_dir; returns the
    manifest. Finished files are kept on a rerun (resumable per input file)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    table_kind = "comparisons" if kind == "dialogue" else kind
    out = Path(out_dir)
    shards, skipped, lines, n_records = [], Counter(), [], 0
    for i, path in enumerate(expand_paths(list(inputs))):
        rel = f"{kind}/{i:05d}.arrow"
        done = out / f"{kind}/{i:05d}.done.json"
        rec = json.loads(done.read_text()) if done.is_file() else None
        if not (rec and rec["input"] == str(path) and rec["tokenizer"] == tok.sha256
                and (out / rel).is_file()):
            rec = _ingest_file(kind, table_kind, path, tok, out / rel, on_error)
            rec.update(input=str(path), tokenizer=tok.sha256)
            atomic_write_json(done, rec)  # written last: the file is finished
        integrity = {k: rec[k] for k in ("bytes", "checksum", "min_id", "max_id") if k in rec}
        if "checksum" not in integrity:  # finished by an older version: hash it now
            integrity = file_integrity(out / rel, *_id_range(_read_table(out / rel)))
        shards.append({"path": rel, "source": kind, "num_documents": rec["rows"],
                       "num_tokens": rec["tokens"], **integrity})
        skipped.update(rec["skipped"])
        n_records += rec["rows"] + sum(rec["skipped"].values())
        lines.extend(rec["examples"])
    lines.sort(key=natural_key)
    manifest = new_manifest(table_kind, tok.sha256, tok.vocab_size, None, shards, dict(skipped),
                            lines[:REPORT_LINES], 0, tok.path, {kind: {"inputs": list(inputs)}},
                            tok.eos_id, tok.pad_id, input_records=n_records)
    write_skip_report(out, lines, sum(skipped.values()), manifest)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if verbose:
        for line in manifest["skipped_examples"]:
            print(f"skipped: {line}", file=sys.stderr)
        if skipped:
            print(f"ingest {out}: skipped {sum(skipped.values())} records "
                  f"({', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}); full list: "
                  f"{out / manifest['skipped_report']}", file=sys.stderr)
    return manifest


def _ingest_file(kind: str, table_kind: str, path: Path, tok: Tokenizer, dest: Path,
                 on_error: str) -> dict:
    """One input file -> one Arrow table at `dest`; returns its counts."""
    rows: list[dict] = []
    skipped: Counter = Counter()
    examples: list[str] = []
    for item in read_rows(path, detect_format(path, "auto")):
        if isinstance(item, Row):
            try:
                rows.append(convert(kind, item.data, tok, item.where))
                continue
            except BadRow as e:
                item = Skip(e.reason, item.where, f"{item.where}: {e}")
        if on_error == "fail" and item.reason != "empty":
            raise DataError(item.message)
        skipped[item.reason] += 1
        if len(examples) < SKIP_LINES:
            examples.append(item.message)
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[table_kind])
    size, checksum = _write_table(dest, table)
    lo, hi = _id_range(table)
    tokens = sum(len(r.get("prompt_ids", ())) + len(r.get("response_ids", ())) +
                 len(r.get("source_ids", ())) + len(r.get("target_ids", ())) +
                 sum(len(x) for x in r.get("responses_ids", ())) for r in rows)
    return {"rows": len(rows), "tokens": tokens, "bytes": size, "checksum": checksum,
            "min_id": lo, "max_id": hi, "skipped": dict(skipped), "examples": examples}


def _write_table(path: Path, table: pa.Table) -> tuple[int, str]:
    """Write `table` as an Arrow IPC file atomically; returns (bytes, checksum)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    buf = sink.getvalue()
    atomic_write_bytes(path, buf)
    return buf.size, bytes_checksum(buf)


def _read_table(path: Path) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated Arrow table ({e})") from None


def _id_range(table: pa.Table) -> tuple[int | None, int | None]:
    """Smallest and largest token id in a table's *_ids columns (None, None when empty)."""
    lo = hi = None
    for name in ("prompt_ids", "response_ids", "responses_ids", "source_ids", "target_ids"):
        if name not in table.column_names:
            continue
        col = table.column(name)
        while pa.types.is_list(col.type):
            col = pc.list_flatten(col)
        mm = pc.min_max(col).as_py()
        if mm["min"] is not None:
            lo = mm["min"] if lo is None else min(lo, mm["min"])
            hi = mm["max"] if hi is None else max(hi, mm["max"])
    return lo, hi


class StructuredDataset(torch.utils.data.Dataset):
    """Rows of an ingested structured table (memory-mapped), as dicts of Python values, ready
    for SFTCollator / PairCollator / PromptCollator."""

    def __init__(self, path: str | Path, tokenizer: Any = None, vocab_size: int | None = None,
                 verify: bool = True):
        """`tokenizer`: a Tokenizer or sha256 the manifest must match; `vocab_size`: the
        model's (recorded ids must be below it and the tokenizer's vocabulary); `verify`:
        check each table's size and checksum (once per process per file version)."""
        m = load_manifest(path)
        check_tokenizer(m, tokenizer)
        if m["kind"] not in SCHEMAS:
            raise DataError(f"{path}: manifest kind '{m['kind']}' is not a structured table")
        check_token_range(m, vocab_size)
        if verify:
            warn_unverified(m)
        limit = id_limit(m, vocab_size)
        self.kind, self.manifest = m["kind"], m
        tables = []
        for s in m["shards"]:
            p = Path(m["root"]) / s["path"]
            if verify:
                verify_shard(p, s)
            tables.append(_read_table(p))
            if s.get("max_id") is None:  # an older manifest: no recorded range, so scan
                check_id_range(p, *_id_range(tables[-1]), limit)
        self.table = pa.concat_tables(tables) if tables else SCHEMAS[self.kind].empty_table()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self.table.slice(int(i), 1).to_pylist()[0]

    def rows(self, indices: Sequence[int]) -> list[dict]:
        return self.table.take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()


def rank_indices(n: int, rank: int, world_size: int, seed: int, epoch: int,
                 shuffle: bool = True) -> list[int]:
    """Row indices for one data-parallel rank: a (seed, epoch) permutation dealt round-robin,
    so ranks never overlap and together cover all n rows (they differ by at most one)."""
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
    return order[rank::world_size].tolist()
