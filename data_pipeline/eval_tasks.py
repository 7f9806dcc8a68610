"""Evaluation tasks for `trellis eval`: a small YAML per task plus JSONL rows, in the spirit of
lm-evaluation-harness (`doc_to_text` / `doc_to_choice` / `doc_to_target`), and the prompts
built from them: an instruction, k solved examples drawn with a fixed seed, then the row.

    task: mood                         # name (default: the YAML's file stem)
    output_type: multiple_choice       # | generate_until | loglikelihood_rolling
    dataset: mood_test.jsonl           # rows to evaluate (relative to the YAML)
    fewshot_split: mood_train.jsonl    # pool of solved examples; empty = the other rows
    description: "Say the mood."       # the instruction, first in every prompt
    doc_to_text: "Sentence: {text}\nMood:"
    doc_to_choice: ["sad", "happy"]    # or "{options}": a field holding the list
    doc_to_target: "{label}"           # an index or a choice's text; generation: references
    target_delimiter: " "              # between a prompt and its answer
    fewshot_delimiter: "\n\n"          # between examples
    generation_kwargs: {until: ["\n"], max_gen_toks: 16}
    num_fewshot: [0, 1, 4]             # shots evaluated unless `trellis eval --set shots=...`

Templates fill `{field}` from the row (Python format syntax); a template that is exactly
`{field}` yields the field's value as is (a number, a list). Every problem is a DataError of
one line naming the file and row: a field the YAML names that a row lacks, fewer than two
choices, a target outside the choices, a prompt longer than the model's context.
"""
from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.tokenizer import Tokenizer

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")
_KEYS = {"task", "output_type", "dataset", "fewshot_split", "description", "doc_to_text",
         "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter",
         "generation_kwargs", "num_fewshot"}
_WHOLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass
class TaskSpec:
    name: str
    path: Path
    """The YAML file (named in errors)."""
    output_type: str
    dataset: Path
    fewshot_split: Path | None
    doc_to_text: str
    doc_to_target: str
    doc_to_choice: list[str] | str | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: list[str] = field(default_factory=lambda: ["\n"])
    max_gen_toks: int = 32
    num_fewshot: list[int] = field(default_factory=lambda: [0])


@dataclass
class Doc:
    """One row: its text, its choices (multiple choice), its answer(s)."""
    where: str
    text: str
    choices: list[str]
    gold: int
    """multiple_choice: index of the right choice; -1 otherwise."""
    refs: list[str]
    """generate_until: the accepted answers; multiple_choice: [the right choice]."""


def load_task(path: str | Path) -> TaskSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read task YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a task YAML must be a mapping of keys")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_KEYS))})")
    for key in ("output_type", "dataset", "doc_to_text"):
        if key not in raw:
            raise DataError(f"{path}: missing key '{key}'")
    kind = raw["output_type"]
    if kind not in OUTPUT_TYPES:
        raise DataError(f"{path}: output_type '{kind}' is not one of {', '.join(OUTPUT_TYPES)}")
    if kind == "multiple_choice" and "doc_to_choice" not in raw:
        raise DataError(f"{path}: a multiple_choice task needs doc_to_choice")
    if kind != "loglikelihood_rolling" and "doc_to_target" not in raw:
        raise DataError(f"{path}: missing key 'doc_to_target'")
    gen = raw.get("generation_kwargs") or {}
    shots = raw.get("num_fewshot", [0])
    shots = [shots] if isinstance(shots, int) else list(shots)
    rel = lambda p: (path.parent / p) if p else None  # noqa: E731
    return TaskSpec(
        name=str(raw.get("task") or path.stem), path=path, output_type=kind,
        dataset=rel(raw["dataset"]), fewshot_split=rel(raw.get("fewshot_split")),
        doc_to_text=str(raw["doc_to_text"]), doc_to_target=str(raw.get("doc_to_target", "")),
        doc_to_choice=raw.get("doc_to_choice"), description=str(raw.get("description") or ""),
        target_delimiter=str(raw.get("target_delimiter", " ")),
        fewshot_delimiter=str(raw.get("fewshot_delimiter", "\n\n")),
        until=list(gen.get("until", ["\n"])), max_gen_toks=int(gen.get("max_gen_toks", 32)),
        num_fewshot=[int(k) for k in shots])


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for each line of a JSONL file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            out.append((f"{path}:{i}", row))
    return out


def fill(template: str, row: dict, where: str, spec: TaskSpec, key: str) -> Any:
    """Render `template` from `row`; exactly '{field}' returns the field's raw value."""
    whole = _WHOLE.match(template)
    names = [n for _, n, _, _ in string.Formatter().parse(template) if n]
    for n in names:
        if n not in row:
            raise DataError(f"{where}: no field '{n}', which {spec.path} names in {key} "
                            f"(fields: {', '.join(list(row)[:8])})")
    if whole:
        return row[whole.group(1)]
    try:
        return template.format_map(row)
    except (IndexError, KeyError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: {spec.path} {key} cannot be filled ({e})") from None


def make_doc(spec: TaskSpec, where: str, row: dict) -> Doc:
    text = str(fill(spec.doc_to_text, row, where, spec, "doc_to_text"))
    if spec.output_type == "loglikelihood_rolling":
        return Doc(where, text, [], -1, [])
    target = fill(spec.doc_to_target, row, where, spec, "doc_to_target")
    if spec.output_type == "generate_until":
        refs = target if isinstance(target, list) else [target]
        return Doc(where, text, [], -1, [str(r) for r in refs])
    ch = spec.doc_to_choice
    choices = fill(ch, row, where, spec, "doc_to_choice") if isinstance(ch, str) else ch
    if not isinstance(choices, list) or len(choices) < 2:
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise DataError(f"{where}: multiple choice needs at least 2 choices, got {n}")
    choices = [str(c) for c in choices]
    if isinstance(target, int) and not isinstance(target, bool):
        gold = target
    elif str(target) in choices:
        gold = choices.index(str(target))
    elif str(target).isdigit():
        gold = int(str(target))
    else:
        raise DataError(f"{where}: target {target!r} is not one of the choices {choices}")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: target index {gold} is outside the {len(choices)} choices")
    return Doc(where, text, choices, gold, [choices[gold]])


def load_docs(spec: TaskSpec, path: Path, limit: int = 0) -> list[Doc]:
    rows = read_jsonl(path)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{path}: no rows")
    return [make_doc(spec, w, r) for w, r in rows]


def shot_indices(n_pool: int, k: int, seed: int, task: str, doc_index: int,
                 exclude_self: bool) -> list[int]:
    """The k solved examples of a row: the first k of a permutation seeded by (seed, task,
    row), so a row's 1-shot example is also its first of 4; the row itself never shows."""
    rng = random.Random(f"{seed}:{task}:{doc_index}")
    order = [i for i in rng.sample(range(n_pool), n_pool) if not (exclude_self and i == doc_index)]
    if k > len(order):
        raise DataError(f"{task}: {k} shots asked, the few-shot pool has {len(order)} rows")
    return order[:k]


def build_prompt(spec: TaskSpec, doc: Doc, shots: list[Doc]) -> str:
    """instruction, solved examples, then the row's text (its answer goes after it)."""
    parts = [spec.description] if spec.description else []
    parts += [s.text + spec.target_delimiter + s.refs[0] for s in shots]
    return spec.fewshot_delimiter.join(parts + [doc.text])


def encode_continuation(tok: Tokenizer, context: str, delimiter: str, cont: str
                        ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the whole string tokenizes: the split point is the
    end of the context's own ids when they are a prefix of the whole's (lm-eval's rule)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + delimiter + cont)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tok.encode(cont)
