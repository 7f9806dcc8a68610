"""Generated text for the meta-learning demo (GPT-2/GPT-3): tasks of one family appear as
episodes of solved examples, so a small GPT pretrained on them can learn to do a task from
the examples in its prompt (in-context, no gradient step), and can be fine-tuned on one.

An episode is one document (episodes are separated by a blank line):

    name the colour of the capitalised word:    <- instruction, with probability instruction_prob
     Kiwi blue                                  <- k examples: "input answer" (lookup) ...
     pear fig Lime red
     Kiwi blue

    reverse the words:
     kiwi fig pear -> pear fig kiwi             <- ... or "input -> answer" (the other rules)

Example lines start with a space so every word is the same SentencePiece piece ("▁Kiwi")
wherever it stands (an episode without its instruction drops that space: the tokenizer's
dummy prefix adds it back); the eval task YAMLs (`write_heldout_tasks`) build their prompts
in exactly this format.

The family (each rule maps a list of 1..max_items words to an answer):
  copy, reverse, sort (alphabetical), first, last, count (a number word), and
  lookup: the colour of the input's one capitalised word (its last; the words before it are
  lowercase distractors) in the episode's own table, an injective map of min_table..
  max_table keys to n_colours colours, drawn fresh for every episode, so only the episode's
  own examples say what a key maps to: the case in-context learning exists for, like a
  few-shot classifier with made-up labels. The capital marks where the input ends, so the
  answer follows its key with no separator in between: the in-context lookup is then the
  plain "induction" match (find the key earlier, copy what followed it); with an arrow
  between key and answer (a two-token gap) 2- and 3-layer GPTs had mostly not learned it by
  2,500 steps (measured on CPU). What the demo's 2-layer GPT learns is narrower than that
  match: teacher-forced on fresh 4-key episodes, it answers a key seen before in the episode
  0.99-1.00 of the time while the episode has shown 1-2 distinct keys, 0.61-0.67 at 3 and
  0.47-0.48 at 4 (4 colours and 6,000 steps: 0.70-0.75 and 0.51-0.60; 3 layers or d_model
  128 did no better on the held-out tables): it tells two keys apart, not four.

Held out, never in the pretraining text:
  * lookup tables: the held-out tables are drawn first, and a pretraining table that shares
    more than one (key, answer) pair with any of them is drawn again, so no pretraining
    episode shows two pairs of a held-out table (single pairs do occur: there are only
    n_colours answers, so without the prompt's examples a key's answer is a guess).
  * task types (`heldout_ops`, default swap: the first and last words exchanged): no
    pretraining episode applies them, and their instruction line never appears.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trellis.data_pipeline.shards import atomic_write_bytes

WORDS = ("apple", "fig", "pear", "kiwi", "lime", "plum", "date", "grape", "melon", "peach",
         "mango", "lemon", "olive", "berry", "cat", "dog", "cow", "pig", "owl", "bee", "ant",
         "fox", "hen", "elk")
COLOURS = ("red", "blue", "green", "gold", "pink", "grey", "black", "white", "brown", "orange",
           "purple", "silver")
"""The lookup answers (a table's keys map to distinct colours among the first n_colours)."""
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INSTRUCTIONS = {
    "copy": "copy the words:", "reverse": "reverse the words:", "sort": "sort the words:",
    "first": "say the first word:", "last": "say the last word:",
    "count": "count the words:", "lookup": "name the colour of the capitalised word:",
    "swap": "swap the first and last words:",
}
TRAIN_OPS = ("copy", "reverse", "sort", "first", "last", "count", "lookup")


@dataclass
class MetaTaskConfig:
    seed: int = 0
    """Seed of every random choice (tables, episodes, held-out rows)."""
    n_words: int = field(default=24, metadata={"min": 8, "max": len(WORDS)})
    """How many of the built-in words the tasks use."""
    max_items: int = field(default=4, metadata={"min": 2, "max": len(NUMBERS)})
    """Most words in an example's input (the fewest is 1)."""
    n_colours: int = field(default=12, metadata={"min": 2, "max": len(COLOURS)})
    """How many colours the lookup answers use: 12 puts a guess at 1/12, so what the examples
    add is visible (with 4, a guess among the unshown colours scored 0.25-0.33)."""
    min_table: int = field(default=2, metadata={"min": 1, "max": len(COLOURS)})
    """Fewest keys of a pretraining lookup table."""
    max_table: int = field(default=4, metadata={"min": 1, "max": len(COLOURS)})
    """Most keys of a pretraining lookup table (held-out tables have this many)."""
    min_examples: int = field(default=4, metadata={"min": 1})
    """Fewest examples in a pretraining episode."""
    max_examples: int = field(default=10, metadata={"min": 1})
    """Most examples in a pretraining episode (keep it above the largest k evaluated: the
    prompt is then no longer than the episodes the model saw)."""
    instruction_prob: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Share of pretraining episodes that start with their instruction line; the others
    must be solved from their examples alone."""
    lookup_share: float = field(default=0.8, metadata={"min": 0.0, "max": 1.0})
    """Share of pretraining episodes that are lookup episodes (the rest: the other rules
    alike)."""
    lookup_single: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Share of pretraining lookup examples (after the warm-up) whose input is the key alone;
    the others have 1..max_items-1 lowercase distractors before it."""
    warmup_share: float = field(default=0.35, metadata={"min": 0.0, "max": 1.0})
    """Share of the pretraining episodes, written first (the corpus is read in order), that
    are warm-up lookups: keys alone, no other rule. The in-context lookup forms there
    quickly; with distractors and the other rules from the start it often had not formed
    within the step budget."""
    heldout_tables: list[int] = field(default_factory=lambda: [2, 4])
    """Keys of each held-out lookup table (lookup_heldout0, 1, ...: one fixed table each)."""
    heldout_ops: list[str] = field(default_factory=lambda: ["swap"])
    """Task types never pretrained on, evaluated in-context only."""
    n_eval: int = field(default=100, metadata={"min": 1})
    """Evaluation rows per held-out task."""
    n_pool: int = field(default=4096, metadata={"min": 1})
    """Labelled rows per held-out task, disjoint from its evaluation rows: the few-shot
    examples are drawn from them and fine-tuning trains on their first n."""

    def __post_init__(self) -> None:
        if self.min_table > self.max_table:
            raise ValueError(f"min_table {self.min_table} > max_table {self.max_table}")
        if self.max_table > self.n_colours:
            raise ValueError(f"max_table {self.max_table} > n_colours {self.n_colours}: a "
                             f"table maps its keys to distinct colours")
        bad = [n for n in self.heldout_tables if not 1 <= n <= min(self.n_colours, self.n_words)]
        if bad:
            raise ValueError(f"heldout_tables: a table of {bad[0]} keys; each needs 1.."
                             f"{min(self.n_colours, self.n_words)} (n_colours, n_words)")
        if self.max_table > self.n_words:
            raise ValueError(f"max_table {self.max_table} > n_words {self.n_words}")
        if self.min_examples > self.max_examples:
            raise ValueError(f"min_examples {self.min_examples} > max_examples "
                             f"{self.max_examples}")
        bad = [op for op in self.heldout_ops if op not in INSTRUCTIONS or op in TRAIN_OPS]
        if bad:
            held = sorted(set(INSTRUCTIONS) - set(TRAIN_OPS))
            raise ValueError(f"heldout_ops: {bad[0]!r} is not a held-out task type "
                             f"(allowed: {', '.join(held)})")


@dataclass
class Episode:
    op: str
    examples: list[tuple[list[str], list[str]]]
    """(input words, output words) per example."""
    table: dict[str, str] = field(default_factory=dict)
    """lookup: the episode's table (capitalised key -> colour)."""
    instruction: bool = True


def _rng(seed: int, part: str) -> random.Random:
    # A string seed is hashed by random.Random (SHA-512): stable across runs and machines.
    return random.Random(f"trellis-meta/{seed}/{part}")


def vocabulary(cfg: MetaTaskConfig) -> tuple[str, ...]:
    return WORDS[:cfg.n_words]


def key(word: str) -> str:
    """A word as a lookup key: capitalised, a piece of its own that only keys use."""
    return word.capitalize()


def draw_table(rng: random.Random, cfg: MetaTaskConfig, size: int) -> dict[str, str]:
    """An injective map of `size` keys (capitalised words) to colours."""
    return dict(zip(map(key, rng.sample(vocabulary(cfg), size)), rng.sample(COLOURS[:cfg.n_colours], size)))


def shared_pairs(table: dict[str, str], other: dict[str, str]) -> int:
    return sum(other.get(k) == a for k, a in table.items())


def apply(op: str, words: list[str], table: dict[str, str] | None = None) -> list[str]:
    """The rule's answer for one input."""
    if op == "copy":
        return list(words)
    if op == "reverse":
        return words[::-1]
    if op == "sort":
        return sorted(words)
    if op == "first":
        return words[:1]
    if op == "last":
        return words[-1:]
    if op == "count":
        return [NUMBERS[len(words) - 1]]
    if op == "lookup":
        return [table[words[-1]]]
    if op == "swap":
        return words[-1:] + words[1:-1] + words[:1] if len(words) > 1 else list(words)
    raise ValueError(f"unknown task type {op!r}")


def draw_input(rng: random.Random, op: str, cfg: MetaTaskConfig,
               table: dict[str, str] | None = None, single: float = 0.0) -> list[str]:
    """1..max_items distinct words of the vocabulary; lookup: a key of its table, after
    lowercase distractors (none with probability `single`)."""
    n = rng.randint(1, cfg.max_items)
    if op != "lookup":
        return rng.sample(vocabulary(cfg), n)
    n = 1 if rng.random() < single else n
    last = rng.choice(sorted(table))
    return rng.sample([w for w in vocabulary(cfg) if key(w) != last], n - 1) + [last]


def separator(op: str) -> str:
    """Between an input and its answer: a lookup's capitalised key already ends its input."""
    return " " if op == "lookup" else " -> "


def example_line(op: str, words: list[str], answer: list[str]) -> str:
    return f" {' '.join(words)}{separator(op)}{' '.join(answer)}"


def render(ep: Episode) -> str:
    lines = [example_line(ep.op, i, o) for i, o in ep.examples]
    if not ep.instruction:  # the tokenizer's dummy prefix stands for the first line's space
        return "\n".join([lines[0][1:]] + lines[1:])
    return "\n".join([INSTRUCTIONS[ep.op]] + lines)


def draw_episode(rng: random.Random, cfg: MetaTaskConfig, held: list[dict[str, str]],
                 warmup: bool = False) -> Episode:
    """One pretraining episode: lookup with probability lookup_share (a table sharing at most
    one pair with each held-out table of `held`), else another trained op; a warm-up
    episode is a lookup whose inputs are keys alone."""
    others = [op for op in TRAIN_OPS if op != "lookup"]
    op = "lookup" if warmup or rng.random() < cfg.lookup_share else rng.choice(others)
    table: dict[str, str] = {}
    if op == "lookup":
        size = rng.randint(cfg.min_table, cfg.max_table)
        table = draw_table(rng, cfg, size)
        while any(shared_pairs(table, h) > 1 for h in held):
            table = draw_table(rng, cfg, size)
    examples = []
    for _ in range(rng.randint(cfg.min_examples, cfg.max_examples)):
        words = draw_input(rng, op, cfg, table, 1.0 if warmup else cfg.lookup_single)
        examples.append((words, apply(op, words, table)))
    return Episode(op, examples, table, rng.random() < cfg.instruction_prob)


def pretrain_episodes(n: int, cfg: MetaTaskConfig) -> list[Episode]:
    """n episodes in training order: round(n * warmup_share) warm-up lookups, then the rest."""
    held = [t.table for t in heldout_tasks(cfg) if t.table]
    rng = _rng(cfg.seed, "pretrain")
    warm = round(n * cfg.warmup_share)
    return [draw_episode(rng, cfg, held, i < warm) for i in range(n)]


def write_pretrain_corpus(out_dir: str | Path, n_episodes: int, cfg: MetaTaskConfig) -> Path:
    """out_dir/pretrain.txt: n_episodes episodes separated by blank lines; ingest it with
    text_mode "blocks" so every episode is one document ending in EOS."""
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    text = "\n\n".join(render(ep) for ep in pretrain_episodes(n_episodes, cfg)) + "\n"
    return _write(Path(out_dir) / "pretrain.txt", text)


# -- held-out tasks ----------------------------------------------------------------------------
@dataclass
class HeldoutTask:
    name: str
    op: str
    table: dict[str, str]
    """lookup: the held-out table; {} for a held-out task type."""

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.op]


def heldout_names(cfg: MetaTaskConfig) -> list[str]:
    """lookup_heldout<i> (one fixed held-out table each), then the held-out task types."""
    return [f"lookup_heldout{i}" for i in range(len(cfg.heldout_tables))] + list(cfg.heldout_ops)


def heldout_tasks(cfg: MetaTaskConfig) -> list[HeldoutTask]:
    rng = _rng(cfg.seed, "heldout-tables")
    tables = [draw_table(rng, cfg, n) for n in cfg.heldout_tables]
    return [HeldoutTask(f"lookup_heldout{i}", "lookup", t) for i, t in enumerate(tables)] + \
        [HeldoutTask(op, op, {}) for op in cfg.heldout_ops]


def heldout_rows(task: HeldoutTask, cfg: MetaTaskConfig) -> tuple[list[dict], list[dict]]:
    """(evaluation rows, labelled pool): {input, output} rows with distinct inputs."""
    rng = _rng(cfg.seed, f"rows/{task.name}")
    want, seen, rows = cfg.n_eval + cfg.n_pool, set(), []
    misses = 0
    while len(rows) < want and misses < 20_000:  # that many in a row: the space is exhausted
        words = draw_input(rng, task.op, cfg, task.table, cfg.lookup_single)  # as pretrained
        if tuple(words) in seen:
            misses += 1
            continue
        misses = 0
        seen.add(tuple(words))
        answer = apply(task.op, words, task.table)
        rows.append({"input": " ".join(words), "output": " ".join(answer)})
    if len(rows) < want:
        raise ValueError(f"{task.name}: only {len(rows)} distinct inputs exist, {want} asked "
                         f"(n_eval + n_pool): lower them or raise max_items / heldout_tables")
    return rows[:cfg.n_eval], rows[cfg.n_eval:]


def task_yaml(task: HeldoutTask, dataset: str, pool: str, max_gen_toks: int,
              shots: list[int]) -> dict:
    """A `trellis eval` task (data_pipeline/eval_tasks.py) whose prompts are episodes."""
    sep = separator(task.op)
    return {"task": task.name, "output_type": "generate_until", "dataset": dataset,
            "fewshot_split": pool, "description": task.instruction,
            "doc_to_text": " {input}" + sep.rstrip(), "doc_to_target": "{output}",
            "target_delimiter": " ", "fewshot_delimiter": "\n",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks},
            "num_fewshot": list(shots)}


def write_task_yaml(path: Path, spec: dict) -> Path:
    # JSON values are valid YAML and keep "\n" readable.
    return _write(path, "".join(f"{k}: {json.dumps(v)}\n" for k, v in spec.items()))


def write_heldout_tasks(out_dir: str | Path, cfg: MetaTaskConfig,
                        shots: list[int] = (0,)) -> dict[str, Path]:
    """Per held-out task: <name>.yaml (evaluated with `shots` examples in the prompt),
    <name>_eval.jsonl and <name>_pool.jsonl; the YAML paths by task name, plus "meta":
    heldout.json (the config and the held-out tables)."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for task in heldout_tasks(cfg):
        ev, pool = heldout_rows(task, cfg)
        write_jsonl(out / f"{task.name}_eval.jsonl", ev)
        write_jsonl(out / f"{task.name}_pool.jsonl", pool)
        spec = task_yaml(task, f"{task.name}_eval.jsonl", f"{task.name}_pool.jsonl",
                         cfg.max_items + 2, list(shots))
        paths[task.name] = write_task_yaml(out / f"{task.name}.yaml", spec)
    meta = {"config": asdict(cfg), "tasks": [asdict(t) for t in heldout_tasks(cfg)]}
    paths["meta"] = _write(out / "heldout.json", json.dumps(meta, indent=2) + "\n")
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _write(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))  # a reader never sees half a file
    return path
