"""`trellis eval`: score a trellis run, trellis weights or a local HF GPT-2 dir on task YAMLs
(data_pipeline/eval_tasks.py), data-parallel over Ray workers or in this process (--local).

* multiple_choice: summed log-likelihood of each choice after the prompt; acc (argmax) and
  acc_norm (argmax per byte of the choice).
* generate_until: greedy generation cut at the first stop sequence (or EOS); exact match and
  token F1 against the references (SQuAD normalisation).
* loglikelihood_rolling: perplexity over rolling windows, every token scored once.

Prompts: the task's instruction, then k solved examples drawn with a fixed seed from the
few-shot split, then the row, for each k in `shots`. Results: a table (stdout and
RUN_DIR/results.md), RUN_DIR/results.json and RUN_DIR/accuracy_vs_k.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from trellis.data_pipeline import eval_tasks as et
from trellis.data_pipeline.shards import DataError
from trellis.launcher.config_loader import ConfigError
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, resolve_config
from trellis.launcher.jobs.lmeval.config import EvalJobConfig
from trellis.model import task_metrics as tm

PRIMARY = {"multiple_choice": "acc", "generate_until": "exact_match",
           "loglikelihood_rolling": "token_perplexity"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, recovery=False)


@dataclasses.dataclass
class Work:
    """What one (task, k) asks of the model, and how to turn the answers into metrics."""
    task: str
    k: int
    kind: str  # "loglikelihood" or "generate"
    requests: list
    score: Callable[[list], tuple[dict[str, float], list[dict]]]
    """Answers -> (metrics, one record per row)."""
    n_docs: int
    max_new_tokens: int = 0


# ---- requests -------------------------------------------------------------------------------
def _check_len(doc: et.Doc, k: int, n: int, extra: int, max_len: int, what: str) -> None:
    if n + extra > max_len:
        raise DataError(f"{doc.where}: prompt of {n} tokens ({k} shots) + {extra} {what} "
                        f"exceeds the model's context of {max_len} tokens (use fewer shots or "
                        f"shorter text)")


def _shots(spec: et.TaskSpec, docs: list[et.Doc], pool: list[et.Doc] | None, i: int, k: int,
           seed: int) -> list[et.Doc]:
    src = pool if pool is not None else docs
    idx = et.shot_indices(len(src), k, seed, spec.name, i, exclude_self=pool is None)
    return [src[j] for j in idx]


def choice_work(spec, docs, pool, k, tok, max_len, seed) -> Work:
    reqs, owner = [], []
    for i, doc in enumerate(docs):
        prompt = et.build_prompt(spec, doc, _shots(spec, docs, pool, i, k, seed))
        for c in doc.choices:
            ctx, cont = et.encode_continuation(tok, prompt, spec.target_delimiter, c)
            _check_len(doc, k, len(ctx), len(cont) - 1, max_len, "choice tokens")
            reqs.append((ctx, cont))
            owner.append(i)

    def score(res: list) -> tuple[dict[str, float], list[dict]]:
        acc, norm, samples, pos = [], [], [], 0
        for doc in docs:
            ll = [r[0] for r in res[pos:pos + len(doc.choices)]]
            pos += len(doc.choices)
            a, n = tm.choose(ll, doc.choices)
            acc.append(float(a == doc.gold)), norm.append(float(n == doc.gold))
            samples.append({"where": doc.where, "loglik": ll, "pred": a, "pred_norm": n,
                            "gold": doc.gold})
        return {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}, samples
    return Work(spec.name, k, "loglikelihood", reqs, score, len(docs))


def generate_work(spec, docs, pool, k, tok, max_len, seed) -> Work:
    reqs = []
    for i, doc in enumerate(docs):
        ids = tok.encode(et.build_prompt(spec, doc, _shots(spec, docs, pool, i, k, seed)))
        _check_len(doc, k, len(ids), spec.max_gen_toks, max_len, "generated tokens")
        reqs.append(ids)

    def score(res: list) -> tuple[dict[str, float], list[dict]]:
        answers = [cut_at_stop(tok.decode(r), spec.until) for r in res]
        em = [tm.exact_match(a, d.refs) for a, d in zip(answers, docs)]
        f1 = [tm.token_f1(a, d.refs) for a, d in zip(answers, docs)]
        samples = [{"where": d.where, "answer": a, "refs": d.refs, "exact_match": e}
                   for d, a, e in zip(docs, answers, em)]
        return {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1)}, samples
    return Work(spec.name, k, "generate", reqs, score, len(docs), spec.max_gen_toks)


def rolling_work(spec, docs, tok, max_len, stride) -> Work:
    from trellis.model.scoring import rolling_windows
    reqs, counts = [], []
    for doc in docs:
        windows = rolling_windows(tok.encode(doc.text), max_len, stride)
        reqs += windows
        counts.append(len(windows))

    def score(res: list) -> tuple[dict[str, float], list[dict]]:
        ll = sum(r[0] for r in res)
        samples, pos = [], 0
        for doc, n in zip(docs, counts):
            samples.append({"where": doc.where, "loglik": sum(r[0] for r in res[pos:pos + n])})
            pos += n
        tokens = sum(len(c) for _, c in reqs)
        words = sum(len(d.text.split()) for d in docs)
        nbytes = sum(len(d.text.encode()) for d in docs)
        return {"token_perplexity": math.exp(-ll / max(tokens, 1)),
                "word_perplexity": math.exp(-ll / max(words, 1)),
                "bits_per_byte": -ll / max(nbytes, 1) / math.log(2), "tokens": float(tokens)}, samples
    return Work(spec.name, 0, "loglikelihood", reqs, score, len(docs))


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first stop sequence."""
    cut = min([text.find(s) for s in until if s and s in text] or [len(text)])
    return text[:cut].strip()


def plan(cfg: EvalJobConfig, tok: Any, max_len: int) -> list[Work]:
    works = []
    for path in cfg.tasks:
        spec = et.load_task(path)
        docs = et.load_docs(spec, spec.dataset, cfg.limit)
        if spec.output_type == "loglikelihood_rolling":
            works.append(rolling_work(spec, docs, tok, max_len, cfg.rolling_stride))
            continue
        pool = et.load_docs(spec, spec.fewshot_split) if spec.fewshot_split else None
        make = choice_work if spec.output_type == "multiple_choice" else generate_work
        for k in cfg.shots or spec.num_fewshot:
            works.append(make(spec, docs, pool, k, tok, max_len, cfg.seed))
    return works


# ---- running --------------------------------------------------------------------------------
def dispatch(group: Any, world: int, method: str, items: list, batch: int, **kw: Any) -> list:
    """Sort by length (less padding), cut into fixed chunks, deal chunk c to rank c % world
    (every rank the same count: ZeRO-3 forwards are collective), reassemble in input order."""
    size = lambda x: len(x[0]) + len(x[1]) if isinstance(x, tuple) else len(x)  # noqa: E731
    order = sorted(range(len(items)), key=lambda i: -size(items[i]))
    chunks = [[items[i] for i in order[s:s + batch]] for s in range(0, len(order), batch)]
    per_rank = [chunks[r::world] for r in range(world)]
    most = max(len(p) for p in per_rank)
    padded = [p + [chunks[0]] * (most - len(p)) for p in per_rank]
    results = group.call_scatter(method, padded, **kw)
    flat: list = [None] * len(items)
    for c in range(len(chunks)):
        for j, res in enumerate(results[c % world][c // world]):
            flat[order[c * batch + j]] = res
    return flat


def evaluate(cfg: EvalJobConfig, local: bool = False, address: str | None = None) -> dict:
    from trellis.data_pipeline.tokenizer import EOS_ID, TOKENIZER_FILE, Tokenizer
    from trellis.launcher.weights import materialize
    from trellis.model.io import read_meta

    cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = materialize(cfg.model, run_dir / "model")
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ConfigError(f"config key 'model': '{cfg.model}' comes without a SentencePiece "
                          f"tokenizer.model")
    meta = read_meta(model_dir)["model"]
    if meta["arch"] != "gpt":
        raise ConfigError(f"config key 'model': '{cfg.model}' is a {meta['arch']} model; "
                          f"trellis eval scores causal LMs (GPT)")
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    works = plan(cfg, tok, meta["max_seq_len"])  # every bad row fails here, before workers
    group = _group(cfg, str(model_dir), local, address)
    try:
        world = group.world_size
        results: dict[str, dict[str, dict[str, float]]] = {}
        for w in works:
            kw = {"max_new_tokens": w.max_new_tokens, "eos_id": EOS_ID} if w.kind == "generate" else {}
            res = dispatch(group, world, w.kind, w.requests, cfg.batch_size, **kw)
            row, samples = w.score(res)
            row |= {"n": float(w.n_docs)}
            write_samples(run_dir / "samples" / f"{w.task}_{w.k}shot.jsonl", samples)
            results.setdefault(w.task, {})[str(w.k)] = row
            print(f"eval: {w.task} k={w.k}: " + " ".join(f"{m} {v:.4f}" for m, v in row.items()
                                                        if m != "n"), flush=True)
    finally:
        group.shutdown()
    write_results(run_dir, results)
    return results


def _group(cfg: EvalJobConfig, model_dir: str, local: bool, address: str | None) -> Any:
    from trellis.parallel.worker_group import LocalGroup, WorkerGroup, ensure_ray

    kwargs = {"model_dir": model_dir, "parallel": dataclasses.asdict(cfg.parallel),
              "run_dir": cfg.run_dir}
    worker = "trellis.launcher.jobs.lmeval.worker:EvalWorker"
    if local:
        return LocalGroup(worker, cfg.parallel, role="eval", worker_kwargs=kwargs)
    ensure_ray(address)
    return WorkerGroup(worker, cfg.parallel, role="eval", worker_kwargs=kwargs)


# ---- results --------------------------------------------------------------------------------
def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one line per (task, k)."""
    lines = ["| task | k | n | metrics |", "|---|---|---|---|"]
    for task, by_k in results.items():
        for k, row in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            m = " ".join(f"{name} {v:.4f}" for name, v in row.items() if name not in ("n", "tokens"))
            lines.append(f"| {task} | {k} | {int(row['n'])} | {m} |")
    return "\n".join(lines) + "\n"


def write_samples(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in samples))


def write_results(run_dir: Path, results: dict) -> None:
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "results.md").write_text(table(results))
    print(table(results), end="")
    plot_vs_k(results, run_dir / "accuracy_vs_k.png")


def plot_vs_k(results: dict, out: Path) -> Path | None:
    """Each task's first metric (acc or exact match) against the number of shots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {t: sorted((int(k), r.get("acc", r.get("exact_match"))) for k, r in by_k.items())
              for t, by_k in results.items()
              if any("acc" in r or "exact_match" in r for r in by_k.values())}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, pts in series.items():
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=task)
    ax.set_xlabel("examples in the prompt (k)")
    ax.set_ylabel("accuracy / exact match")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(EvalJobConfig, args)
    evaluate(cfg, args.local, args.address)
    print(f"results -> {Path(cfg.run_dir) / 'results.json'}")
    return 0
