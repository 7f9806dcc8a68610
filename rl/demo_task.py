"""The embedded RLHF demo: a task trellis generates itself, whose answers a rule can check,
so the whole InstructGPT pipeline (pretrain -> SFT -> reward model -> PPO) runs offline.

Tasks (``DemoTaskConfig.kind``):

* ``sort`` (default): ``sort: pear fig apple =`` -> ``apple fig pear``: the prompt's words
  in alphabetical order; 3-5 words from 16 fruit names by default.
* ``add``: ``add: 12+7 =`` -> ``19``.

Responses carry no leading space: the tokenizer's SentencePiece dummy prefix already puts
one at the start of an encoded response, so ``encode(prompt) + encode(response)`` matches
``encode(prompt + " " + response)``, the pretraining line.

Score (the "true" reward the simulated labeler ranks by) gives partial credit so rankings
have gradations: answer words in the right relative order (sort: longest common
subsequence) or right digits (add), divided by the longer of response and answer (missing
and extra items cost); an empty or (for add) non-numeric response is 0.

Data (``write_demo_data``), like InstructGPT's three prompt datasets, from disjoint prompts:
a SMALL set of demonstrations (the expensive human-written part), comparison prompts with
K responses ranked by ``simulated_labeler`` (ties allowed, optional label noise), PPO
prompts, held-out validation prompts (RL checkpoint selection) and held-out eval prompts
(the final table). The three use disjoint item *sets* (``split_of``), so held-out prompts
are unseen combinations, not just unseen orders.

Pretraining (``write_pretrain_corpus``) teaches the format, not the answer: each line is a
train-split prompt followed by a random permutation of its words (sort) or a random number
(add). A model pretrained on it copies the prompt's words in a random order; SFT on a few
demonstrations teaches some ordering; RLHF has the rest to gain.

Measured (sort, pipeline defaults: GPT 4 layers, d_model 128, BPE vocab 512; 2 CPU cores):
pretraining must see one line per row (``packing: false``) at lr 1e-3, batch 64: after 1000
steps 64% of its greedy answers are a permutation of the prompt's words (packed blocks, or
lr 3e-3, stay at 0-16%: the answer-token loss never leaves ln 16). SFT on 20 demonstrations
forgets the copying (13% of answers) and PPO cannot restore it (gold 0.58 -> 0.64); with 30,
SFT reaches gold 0.69-0.70 and PPO adds about +0.1; with 40, SFT 0.78-0.81.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

WORDS = ("apple", "fig", "pear", "kiwi", "lime", "plum", "date", "grape", "melon", "peach",
         "mango", "lemon", "olive", "guava", "berry", "cherry")
_SORT = re.compile(r"^sort: ([a-z]+(?: [a-z]+)*) =$")
_ADD = re.compile(r"^add: (\d+)\+(\d+) =$")
SampleFn = Callable[[list[str], int], list[list[str]]]


@dataclass
class DemoTaskConfig:
    kind: Literal["sort", "add"] = "sort"
    """sort: order a few words alphabetically; add: sum two small numbers."""
    seed: int = 0
    """Seed of every random choice (prompts, corruptions, label noise)."""
    n_words: int = field(default=16, metadata={"min": 4, "max": len(WORDS)})
    """sort: how many of the built-in words prompts draw from."""
    min_items: int = field(default=3, metadata={"min": 2})
    """sort: fewest words in a prompt."""
    max_items: int = field(default=5, metadata={"min": 2})
    """sort: most words in a prompt."""
    max_operand: int = field(default=99, metadata={"min": 9})
    """add: operands are 0..max_operand."""
    eval_fraction: float = field(default=0.1, metadata={"min": 0.01, "max": 0.5})
    """Share of item sets (sort) / operand pairs (add) held out: half for validation (RL
    checkpoint selection), half for the final evaluation."""
    n_demonstrations: int = field(default=200, metadata={"min": 1})
    """SFT demonstrations (prompt + the rule's answer). Small on purpose: demonstrations are
    the expensive data; comparisons are cheaper, which is what RLHF exploits."""
    n_comparison_prompts: int = field(default=400, metadata={"min": 1})
    """Prompts with k_responses ranked responses each, for the reward model."""
    k_responses: int = field(default=4, metadata={"min": 2, "max": 9})
    """Responses per comparison prompt (InstructGPT: 4 to 9)."""
    n_train_prompts: int = field(default=2000, metadata={"min": 1})
    """PPO prompts (no answers)."""
    n_eval_prompts: int = field(default=200, metadata={"min": 1})
    """Held-out prompts for measuring the policy's score (the final table)."""
    n_val_prompts: int = field(default=200, metadata={"min": 1})
    """Held-out prompts of other item sets, for choosing RL checkpoints (never the table's);
    fewer make the choice noisier (the selected iteration's validation score overstates it)."""
    label_noise: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Probability the simulated labeler judges a response by a random score instead."""

    def __post_init__(self) -> None:
        if self.min_items > self.max_items:
            raise ValueError(f"min_items {self.min_items} > max_items {self.max_items}")
        if self.max_items > self.n_words:
            raise ValueError(f"max_items {self.max_items} > n_words {self.n_words}")


# -- prompts ---------------------------------------------------------------------------------
def _rng(seed: int | random.Random, part: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and machines.
    return seed if isinstance(seed, random.Random) else random.Random(f"trellis-demo/{seed}/{part}")


Split = Literal["train", "val", "eval"]


def split_of(prompt: str, eval_fraction: float = 0.1) -> Split:
    """train, val or eval, by a stable hash of the prompt's item set (order-free), so every
    ordering of a held-out set is held out too. The held-out share `eval_fraction` is halved:
    val (checkpoint selection during RL) and eval (the final table) share no item set."""
    kind, items = parse(prompt)
    key = f"{kind}:" + " ".join(sorted(str(x) for x in items))
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    u = h / 2 ** 64
    return "train" if u >= eval_fraction else ("val" if u < eval_fraction / 2 else "eval")


def _random_prompt(cfg: DemoTaskConfig, rng: random.Random) -> str:
    if cfg.kind == "sort":
        n = rng.randint(cfg.min_items, cfg.max_items)
        return "sort: " + " ".join(rng.sample(WORDS[:cfg.n_words], n)) + " ="
    return f"add: {rng.randint(0, cfg.max_operand)}+{rng.randint(0, cfg.max_operand)} ="


def make_prompts(n: int, seed: int | random.Random, split: Split,
                 cfg: DemoTaskConfig | None = None,
                 exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """n distinct prompts of `split` (not in `exclude`), deterministic given the seed."""
    cfg = cfg or DemoTaskConfig()
    if split not in ("train", "val", "eval"):
        raise ValueError(f"split must be 'train', 'val' or 'eval', not {split!r}")
    rng = _rng(seed, f"prompts/{split}")
    out: list[str] = []
    seen = set(exclude)
    misses, patience = 0, 20_000  # that many misses in a row: the space is (nearly) exhausted
    while len(out) < n and misses < patience:
        p = _random_prompt(cfg, rng)
        if p not in seen and split_of(p, cfg.eval_fraction) == split:
            seen.add(p)
            out.append(p)
            misses = 0
        else:
            misses += 1
    if len(out) == n:
        return out
    raise ValueError(f"found only {len(out)} of {n} distinct {split} prompts for task "
                     f"'{cfg.kind}': ask for fewer or widen the task (n_words/max_items/max_operand)")


# -- the rule --------------------------------------------------------------------------------
def parse(prompt: str) -> tuple[str, list]:
    """('sort', words) or ('add', [a, b]); ValueError for anything else."""
    m = _SORT.match(prompt)
    if m:
        return "sort", m.group(1).split(" ")
    m = _ADD.match(prompt)
    if m:
        return "add", [int(m.group(1)), int(m.group(2))]
    raise ValueError(f"not a demo-task prompt: {prompt!r} (expected 'sort: w1 w2 ... =' "
                     f"or 'add: a+b =')")


def answer(prompt: str) -> str:
    """The rule's demonstration for `prompt`."""
    kind, items = parse(prompt)
    return " ".join(sorted(items)) if kind == "sort" else str(items[0] + items[1])


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def score(prompt: str, response: str) -> float:
    """Partial credit in [0, 1], divided by max(len(response), len(answer)) so missing and
    extra items both cost:
    sort: answer words the response has in the right relative order (longest common
    subsequence), so "fig apple pear" (one word misplaced) beats "pear fig apple";
    add: right digits, aligned from the right. Empty, or non-numeric for add, is 0."""
    kind, _ = parse(prompt)
    target = answer(prompt)
    if not isinstance(response, str):
        return 0.0
    if kind == "sort":
        got, want = response.split(), target.split()
        right = _lcs(got, want)
    else:
        text = response.strip()
        if not text.isdigit():
            return 0.0
        got, want = list(reversed(text)), list(reversed(target))
        right = sum(g == w for g, w in zip(got, want))
    if not got:
        return 0.0
    return right / max(len(got), len(want))


def uses_prompt_items(prompt: str, response: str) -> bool:
    """The format, not the rule: sort: the response is a permutation of the prompt's words;
    add: the response is a number. A base model that copies the prompt's words is what SFT
    and RL can build on (the pipeline's "format learned" gate)."""
    kind, items = parse(prompt)
    if kind == "sort":
        return sorted(response.split()) == sorted(items)
    return response.strip().isdigit()


def mean_score(prompts: Sequence[str], responses: Sequence[str],
               exact: bool = False) -> float:
    """The policy's average true score (the demo's evaluation metric); exact=True: the
    share of responses that are exactly right."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many prompts and responses (> 0), got "
                         f"{len(prompts)} and {len(responses)}")
    scores = [score(p, r) for p, r in zip(prompts, responses)]
    return sum(s == 1.0 if exact else s for s in scores) / len(prompts)


def corrupt(prompt: str, level: int, rng: random.Random, n_words: int = len(WORDS)) -> str:
    """The rule's answer damaged by `level` random edits (fallback comparison responses):
    sort: swap two words / replace one by another word / drop one / repeat one;
    add: change a digit / drop a digit / add a digit."""
    kind, _ = parse(prompt)
    if kind == "sort":
        words = answer(prompt).split()
        for _ in range(level):
            op = rng.randrange(4) if len(words) > 1 else 1
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            if op == 0:
                words[i], words[j] = words[j], words[i]
            elif op == 1:
                words[i] = rng.choice(WORDS[:n_words])
            elif op == 2:
                del words[i]
            else:
                words.insert(i, words[j])
        return " ".join(words)
    digits = list(answer(prompt))
    for _ in range(level):
        op = rng.randrange(3) if len(digits) > 1 else rng.choice((0, 2))
        i = rng.randrange(len(digits))
        if op == 0:
            digits[i] = str(rng.randrange(10))
        elif op == 1:
            del digits[i]
        else:
            digits.insert(i, str(rng.randrange(10)))
    return "".join(digits)


def simulated_labeler(prompt: str, responses: Sequence[str], rng: random.Random | None = None,
                      noise: float = 0.0) -> list[int]:
    """Rank per response, 0 = best, equal scores share a rank (D > C > A = B gives
    [2, 2, 1, 0]). With probability `noise` a response is judged by a uniform random score
    instead of its true one (a careless label; needs `rng`)."""
    if noise > 0 and rng is None:
        raise ValueError("simulated_labeler needs an rng when noise > 0")
    judged = []
    for r in responses:
        s = score(prompt, r)
        if noise > 0 and rng.random() < noise:
            s = rng.random()
        judged.append(round(s, 9))  # k/n fractions compare exactly
    levels = sorted(set(judged), reverse=True)
    return [levels.index(s) for s in judged]


# -- files -----------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def _fallback_responses(prompts: list[str], k: int, cfg: DemoTaskConfig) -> list[list[str]]:
    rng = _rng(cfg.seed, "corrupt")
    out = []
    for p in prompts:
        group = [corrupt(p, level, rng, cfg.n_words) for level in range(k)]  # never empty
        rng.shuffle(group)  # file order says nothing about quality
        out.append(group)
    return out


def write_demo_data(out_dir: str | Path, cfg: DemoTaskConfig,
                    sample_fn: SampleFn | None = None) -> dict[str, Path]:
    """Write demonstrations.jsonl {prompt, response}, comparisons.jsonl {prompt, responses,
    ranking}, prompts_train.jsonl / prompts_eval.jsonl {prompt} and demo_task.json (config
    and counts) under out_dir; returns their paths by name.

    Comparison responses come from `sample_fn(prompts, k) -> k responses per prompt`
    (sampling the SFT policy, as InstructGPT); without one, the fallback makes them by
    corrupting the rule's answer with 0..k-1 edits (documented stand-in, not a policy).
    Responses are written as produced: an empty one makes ingest skip that row (counted in
    demo_task.json as empty_responses).
    """
    out = Path(out_dir)
    n_train_side = cfg.n_demonstrations + cfg.n_comparison_prompts + cfg.n_train_prompts
    pool = make_prompts(n_train_side, cfg.seed, "train", cfg)
    demos = pool[:cfg.n_demonstrations]
    comp_prompts = pool[cfg.n_demonstrations:cfg.n_demonstrations + cfg.n_comparison_prompts]
    ppo_prompts = pool[cfg.n_demonstrations + cfg.n_comparison_prompts:]
    eval_prompts = make_prompts(cfg.n_eval_prompts, cfg.seed, "eval", cfg)
    val_prompts = make_prompts(cfg.n_val_prompts, cfg.seed, "val", cfg)
    k = cfg.k_responses
    responses = (sample_fn(comp_prompts, k) if sample_fn is not None
                 else _fallback_responses(comp_prompts, k, cfg))
    if len(responses) != len(comp_prompts) or any(len(g) != k for g in responses):
        raise ValueError(f"sample_fn must return {k} responses for each of "
                         f"{len(comp_prompts)} prompts")
    label_rng = _rng(cfg.seed, "labeler")
    comparisons = [{"prompt": p, "responses": list(g),
                    "ranking": simulated_labeler(p, g, label_rng, cfg.label_noise)}
                   for p, g in zip(comp_prompts, responses)]
    paths = {
        "demonstrations": _write_jsonl(out / "demonstrations.jsonl",
                                       [{"prompt": p, "response": answer(p)} for p in demos]),
        "comparisons": _write_jsonl(out / "comparisons.jsonl", comparisons),
        "prompts_train": _write_jsonl(out / "prompts_train.jsonl", [{"prompt": p} for p in ppo_prompts]),
        "prompts_eval": _write_jsonl(out / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts]),
        "prompts_val": _write_jsonl(out / "prompts_val.jsonl", [{"prompt": p} for p in val_prompts]),
    }
    meta = {"config": asdict(cfg), "sampled": sample_fn is not None,
            "empty_responses": sum(not r.strip() for g in responses for r in g),
            "tied_comparisons": sum(len(set(c["ranking"])) < k for c in comparisons),
            "mean_comparison_score": sum(score(p, r) for p, g in zip(comp_prompts, responses)
                                         for r in g) / (len(comp_prompts) * k)}
    paths["meta"] = out / "demo_task.json"
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def pretrain_line(prompt: str, rng: random.Random, max_operand: int = 99) -> str:
    """The prompt with a well-formed but random answer (format, not the rule)."""
    kind, items = parse(prompt)
    if kind == "sort":
        return prompt + " " + " ".join(rng.sample(items, len(items)))
    return f"{prompt} {rng.randint(0, 2 * max_operand)}"


def write_pretrain_corpus(out_dir: str | Path, n_lines: int,
                          cfg: DemoTaskConfig | None = None) -> Path:
    """out_dir/pretrain.txt: n_lines lines of train-split prompts with random answers; ingest
    it with text_mode "lines" so every line is a document ending in EOS."""
    cfg = cfg or DemoTaskConfig()
    if n_lines < 1:
        raise ValueError(f"n_lines must be >= 1, got {n_lines}")
    rng = _rng(cfg.seed, "pretrain")
    lines = []
    while len(lines) < n_lines:
        p = _random_prompt(cfg, rng)
        if split_of(p, cfg.eval_fraction) == "train":
            lines.append(pretrain_line(p, rng, cfg.max_operand))
    path = Path(out_dir) / "pretrain.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
