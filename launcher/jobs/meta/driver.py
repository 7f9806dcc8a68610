"""`trellis meta`: the GPT-2/GPT-3 meta-learning demonstration in one command, CPU, offline:

  episodes of a task family (data_pipeline/meta_episodes.py) -> SentencePiece -> Arrow
  -> pretrain a small GPT on them (the pipeline's pretraining stage)
  -> in-context: `trellis eval` of the pretrained model on the held-out tasks with k = 0, 1,
     2, 4, 8 solved examples in the prompt (k = 0: the instruction only)
  -> fine-tuning: `trellis sft` of the same model on n = 8, 64, 512, 4096 labelled rows of
     each of finetune.tasks (launcher/jobs/meta/sweep.py), scored 0-shot on the same rows
  -> RUN_DIR/results.json, results.md (printed) and meta_learning.png.

Training stages whose run dir holds its final checkpoint are skipped; evaluations rerun."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from trellis.launcher.config_loader import ConfigError, from_dict
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, resolve_config
from trellis.launcher.jobs.meta.config import MetaDemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, recovery=False)  # --local: every stage in this process
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker deaths each stage recovers from (overrides max_failures)")


def prepare(cfg: MetaDemoConfig, root: Path) -> dict[str, Path]:
    """Held-out task files, the pretraining episodes, their tokenizer and Arrow shards (each
    made once; a run dir made with another task config is refused)."""
    from trellis.data_pipeline import meta_episodes as me
    from trellis.data_pipeline.config import InputSource
    from trellis.data_pipeline.ingest import ingest
    from trellis.data_pipeline.shards import MANIFEST_NAME
    from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, train_tokenizer

    meta = root / "task" / "heldout.json"
    made = json.loads(meta.read_text())["config"] if meta.is_file() else None
    if made is not None and made != dataclasses.asdict(cfg.task):
        raise ConfigError(f"'{meta}' was made with another task config ({made}); the model "
                          f"there was pretrained on it: use a new run_dir")
    tasks = me.write_heldout_tasks(root / "task", cfg.task, cfg.shots)
    corpus = root / "corpus" / "pretrain.txt"
    if not corpus.is_file() or made is None:
        me.write_pretrain_corpus(corpus.parent, cfg.pretrain_episodes, cfg.task)
    tok = root / TOKENIZER_FILE
    if not tok.is_file():
        train_tokenizer(cfg.tokenizer, corpus.read_text().split("\n\n"), tok)
    data = root / "data"
    if not (data / MANIFEST_NAME).is_file():
        ingest([InputSource(name="episodes", paths=[str(corpus)], text_mode="blocks")],
               str(tok), data, processes=1, progress=False, verbose=False)
    return {"tokenizer": tok, "data": data} | {f"task:{k}": v for k, v in tasks.items()
                                               if k != "meta"}


def _stage(title: str, done: bool, train: Callable[..., Any], job: Any, local: bool,
           address: str | None) -> None:
    print(f"\n=== {title}" + (" (done before; skipped)" if done else "") + " ===", flush=True)
    if not done:
        train(job, local=local, address=address)


def run_demo(cfg: MetaDemoConfig, local: bool = False, address: str | None = None) -> dict:
    from trellis.data_pipeline.meta_episodes import heldout_tasks
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.jobs.lmeval.driver import evaluate
    from trellis.launcher.jobs.meta import report, sweep
    from trellis.launcher.jobs.pipeline import stages
    from trellis.launcher.jobs.pretrain import driver as pretrain

    cpu_defaults()
    t0 = time.perf_counter()
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    p = prepare(cfg, root)
    held = [v for k, v in p.items() if k.startswith("task:")]
    vocab = Tokenizer(p["tokenizer"]).vocab_size  # SentencePiece may stop below the request
    base = root / "pretrain"
    job = stages.pretrain_config(cfg, base, p["data"], p["tokenizer"], vocab)
    job = from_dict(type(job), dataclasses.asdict(dataclasses.replace(  # in order: warm-up first
        job, optim=dataclasses.replace(job.optim, weight_decay=cfg.pretrain_weight_decay),
        data=dataclasses.replace(job.data, shuffle=False))))
    _stage(f"pretrain on {cfg.pretrain_episodes} episodes", pretrain.is_done(job),
           pretrain.pretrain, job, local, address)

    sizes = sorted(set(cfg.finetune.sizes))
    scored = {n: min(n, cfg.task.n_eval) for n in sizes}  # training rows scored (train acc.)
    subsets = {(t, n): sweep.train_subset_task(p[f"task:{t}"], scored[n])
               for t in cfg.finetune.tasks for n in sizes}
    print("\n=== in-context: k examples in the prompt, no gradient step ===", flush=True)
    icl = evaluate(sweep.eval_job(cfg, root / "icl", base, held + sorted(set(subsets.values())),
                                  []), local, address)
    runs = {t: {} for t in cfg.finetune.tasks}
    for t in cfg.finetune.tasks:
        for n in sizes:
            runs[t][str(n)] = finetune_run(cfg, root, p[f"task:{t}"], subsets[t, n], n,
                                           scored[n], icl, local, address)
    shown = {t.name: {str(k): report.key_shown_accuracy(
        p[f"task:{t.name}"], root / "icl" / "samples" / f"{t.name}_{k}shot.jsonl", k,
        cfg.eval_seed) for k in cfg.shots} for t in heldout_tasks(cfg.task) if t.op == "lookup"}
    res = results(cfg, icl, runs, time.perf_counter() - t0) | {"in_context_key_shown": shown}
    report.write(res, root)
    print("\n" + report.table(res), end="")
    print(f"wall time {res['wall_time_s']:.0f} s; results in {root}/results.json, plot "
          f"{root}/meta_learning.png", flush=True)
    return res


def finetune_run(cfg: MetaDemoConfig, root: Path, task: Path, subset: Path, n: int,
                 scored: int, icl: dict, local: bool, address: str | None) -> dict[str, Any]:
    """SFT on the first n labelled rows of `task`, then its exact match 0-shot on the
    evaluation rows (validation) and on its first `scored` training rows (train), before
    (the pretrained model) and after."""
    from trellis.launcher.jobs.finetune import driver as finetune
    from trellis.launcher.jobs.lmeval.driver import evaluate
    from trellis.launcher.jobs.meta import sweep

    ft_dir = root / f"ft_{task.stem}_{n}"
    train, val = sweep.write_demonstrations(task, root / "ft_data" / task.stem, n)
    job = sweep.sft_job(cfg, ft_dir, root / "pretrain", train, val, n)
    _stage(f"fine-tune on {n} labelled rows of {task.stem}", finetune.is_done(job),
           finetune.sft, job, local, address)
    ft = evaluate(sweep.eval_job(cfg, root / f"{ft_dir.name}_eval", ft_dir, [task, subset],
                                 [0]), local, address)
    return {"val_exact": sweep.exact(ft, task.stem), "train_exact": sweep.exact(ft, subset.stem),
            "train_exact_start": sweep.exact(icl, subset.stem), "train_rows_scored": scored,
            "curves": sweep.curves(ft_dir)}


def results(cfg: MetaDemoConfig, icl: dict, runs: dict, wall: float) -> dict[str, Any]:
    from trellis.data_pipeline.meta_episodes import heldout_names

    return {
        "shots": list(cfg.shots), "n_eval": cfg.task.n_eval,
        "held_out": {"tables": f"lookup_heldout0..{len(cfg.task.heldout_tables) - 1}: fixed "
                               f"tables of {cfg.task.heldout_tables} keys -> colours; no pretraining "
                               f"episode's table shares more than one (key, answer) pair "
                               f"with one",
                     "task_types": list(cfg.task.heldout_ops)},
        "in_context": {t: {k: r["exact_match"] for k, r in icl[t].items()}
                       for t in heldout_names(cfg.task)},
        "in_context_f1": {t: {k: r["f1"] for k, r in icl[t].items()}
                          for t in heldout_names(cfg.task)},
        "finetune": {"tasks": list(cfg.finetune.tasks), "steps": cfg.sft.steps,
                     "lr": cfg.sft.lr, "runs": runs},
        "wall_time_s": wall,
    }


def run(args: argparse.Namespace) -> int:
    run_demo(resolve_config(MetaDemoConfig, args), args.local, args.address)
    return 0
