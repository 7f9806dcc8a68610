"""`trellis pipeline`: the InstructGPT path on the embedded demo task, in one command:

  task data -> pretrain (task-format text) -> SFT (a few demonstrations) -> comparisons
  (K SFT samples ranked by the simulated labeler) -> reward model -> PPO (or each of
  rl_algorithms: GRPO, RLOO, REINFORCE++, DPO) -> HF export of the best

Each stage is skipped when its run dir already holds its final checkpoint. At the end a
table compares the pretrained, SFT and RL policies on held-out prompts."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from trellis.data_pipeline.tokenizer import TOKENIZER_FILE
from trellis.launcher.config_loader import ConfigError
from trellis.launcher.job_flags import add_run_arguments, resolve_config
from trellis.launcher.jobs.pipeline.config import PipelineConfig
from trellis.launcher.jobs.pipeline.report import (check_format, evaluate, print_report,
                                                   selected_policy)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, recovery=False)  # --local: every stage in this process
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker deaths each stage recovers from (overrides max_failures)")


def _banner(name: str, skipped: bool = False) -> None:
    print(f"\n=== {name}" + (" (done before; skipped)" if skipped else "") + " ===", flush=True)


def prepare_task(cfg: PipelineConfig, root: Path) -> dict[str, Path]:
    """Task data, the tokenizer trained on task text, and the ingested pretraining corpus."""
    from trellis.data_pipeline.config import InputSource
    from trellis.data_pipeline.ingest import ingest
    from trellis.data_pipeline.shards import MANIFEST_NAME
    from trellis.data_pipeline.tokenizer import train_tokenizer
    from trellis.rl.demo_task import write_demo_data, write_pretrain_corpus

    task = root / "task"
    meta = task / "demo_task.json"
    if meta.is_file():
        made_with = json.loads(meta.read_text())["config"]
        if made_with != dataclasses.asdict(cfg.task):
            raise ConfigError(f"'{meta}' was made with another task config ({made_with}); later "
                              f"stages were trained on it: use a new run_dir")
        paths = {n: task / f"{n}.jsonl" for n in ("demonstrations", "comparisons",
                                                  "prompts_train", "prompts_val", "prompts_eval")}
    else:
        paths = write_demo_data(task, cfg.task)
    tok = root / TOKENIZER_FILE
    corpus = root / "corpus" / "pretrain.txt"
    if not corpus.is_file():
        write_pretrain_corpus(corpus.parent, cfg.pretrain_lines, cfg.task)
    if not tok.is_file():
        train_tokenizer(cfg.tokenizer, [corpus.read_text()], tok)
    data = root / "data" / "pretrain"
    if not (data / MANIFEST_NAME).is_file():
        ingest([InputSource(name="task", paths=[str(corpus)], text_mode="lines")], str(tok),
               data, processes=1, progress=False, verbose=False)
    return paths | {"tokenizer": tok, "pretrain_data": data}


def run_stages(cfg: PipelineConfig, local: bool = False, address: str | None = None,
               ppo_stage: bool = True) -> dict[str, Any]:
    """Run each stage that is not done yet (each job says whether its run dir is). The RL
    stages' run dirs are under "rl", by algorithm."""
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.jobs.finetune import driver as finetune
    from trellis.launcher.jobs.pipeline import stages
    from trellis.launcher.jobs.pretrain import driver as pretrain

    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    p = prepare_task(cfg, root)
    dirs: dict[str, Any] = {s: root / s for s in ("pretrain", "sft", "rm")} | {"rl": {}}
    vocab = Tokenizer(p["tokenizer"]).vocab_size  # SentencePiece may stop below the request
    job = stages.pretrain_config(cfg, dirs["pretrain"], p["pretrain_data"], p["tokenizer"], vocab)
    _run_stage("pretrain", pretrain.is_done(job), pretrain.pretrain, job, local, address)
    gate = check_format(cfg, dirs["pretrain"], p["tokenizer"], p["prompts_val"]) \
        if cfg.format_gate > 0 else None
    job = stages.sft_config(cfg, dirs["sft"], dirs["pretrain"], p["demonstrations"])
    _run_stage(f"SFT on {cfg.task.n_demonstrations} demonstrations", finetune.is_done(job),
               finetune.sft, job, local, address)
    comparisons = [make_comparisons(cfg, root, dirs["sft"], p)]
    policy = dirs["sft"]
    for r in range(1, cfg.rlhf_rounds + 1):
        # Round r > 1 (iterated RLHF): new comparisons ranked on the current policy's own
        # samples, an RM retrained on every round's comparisons, PPO continued from the policy.
        sfx = "" if r == 1 else f"_round{r}"
        if r > 1:
            comparisons.append(policy_comparisons(cfg, root, policy, p, r))
        data = comparisons[0] if r == 1 else _concat(comparisons, root / f"task_round{r}" / "all.jsonl")
        rms = [root / f"rm{sfx}"] + [root / f"rm_{i}{sfx}" for i in range(1, cfg.rm_ensemble)]
        heldout = root / f"rm_heldout{sfx}" if cfg.rm_heldout else None
        for i, rm_dir in enumerate(rms + ([heldout] if heldout else [])):
            offset = 100 if rm_dir == heldout else i
            job = stages.rm_config(cfg, rm_dir, dirs["sft"], data, p["demonstrations"], offset)
            name = "held-out reward model" if rm_dir == heldout else \
                f"reward model {i + 1} of {cfg.rm_ensemble}" if cfg.rm_ensemble > 1 else "reward model"
            _run_stage(f"{name} on {cfg.task.n_comparison_prompts * r} ranked prompts"
                       + (f" (round {r})" if cfg.rlhf_rounds > 1 else ""),
                       finetune.is_done(job), finetune.rm, job, local, address)
        dirs["rm"] = rms[0]
        if not ppo_stage:
            break
        from trellis.launcher.jobs.dpo import driver as dpo
        from trellis.launcher.jobs.ppo import driver as ppo
        for alg in cfg.algorithms:  # every algorithm from the same policy and reward models
            dirs["rl"][alg] = root / f"{alg}{sfx}"
            if alg == "dpo":  # offline: the RM's comparisons, no reward model in the loop
                job = stages.dpo_config(cfg, dirs["rl"][alg], dirs["sft"], data)
                _run_stage(f"DPO on {cfg.task.n_comparison_prompts} ranked prompts",
                           dpo.is_done(job), dpo.dpo, job, local, address)
                continue
            job = stages.ppo_config(cfg, dirs["rl"][alg], policy, rms, p["prompts_train"],
                                    p["prompts_val"], heldout, reference=dirs["sft"],
                                    algorithm=alg)
            g = job.ppo.group_size
            _run_stage(alg.upper() + (f" ({job.ppo.prompts_per_iteration} prompts x {g} "
                                      f"responses per iteration)" if g > 1 else "")
                       + (f" (round {r} of {cfg.rlhf_rounds})" if cfg.rlhf_rounds > 1 else ""),
                       ppo.is_done(job), ppo.ppo, job, local, address)
        policy = selected_policy(dirs["rl"][cfg.algorithms[0]])  # rounds > 1: one algorithm
    return dirs | {"task": root / "task", "tokenizer": p["tokenizer"],
                   "prompts_eval": p["prompts_eval"], "prompts_val": p["prompts_val"],
                   "format_gate": gate}


def _run_stage(title: str, done: bool, train: Callable[..., Any], job: Any, local: bool,
               address: str | None) -> None:
    _banner(title, done)
    if not done:
        train(job, local=local, address=address)


def make_comparisons(cfg: PipelineConfig, root: Path, sft_dir: Path, p: dict) -> Path:
    """K responses per comparison prompt, ranked by the simulated labeler (ties allowed)."""
    if cfg.comparisons_from == "corrupt":
        return p["comparisons"]
    return _sampled_comparisons(cfg, root, sft_dir, p, root / "task_sft", cfg.task, "sft")


def policy_comparisons(cfg: PipelineConfig, root: Path, policy_dir: Path, p: dict,
                       round_: int) -> Path:
    """Iterated RLHF: comparisons on new train-split prompts, ranked on samples of the
    policy of round `round_` - 1 (mixed with corrupted answers unless comparisons_from=sft)."""
    task = dataclasses.replace(cfg.task, seed=cfg.task.seed + 1000 * round_)
    return _sampled_comparisons(cfg, root, policy_dir, p, root / f"task_round{round_}", task,
                                f"round{round_}_policy")


def _concat(files: list[Path], out: Path) -> Path:
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f.read_text() for f in files))
    return out


def _sampled_comparisons(cfg: PipelineConfig, root: Path, policy_dir: Path, p: dict,
                         out_dir: Path, task: Any, name: str) -> Path:
    out = out_dir / "comparisons.jsonl"
    if out.is_file():
        return out
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.weights import materialize
    from trellis.model.io import load_module
    from trellis.rl.demo_task import corrupt, write_demo_data
    from trellis.rl.policy_eval import sample_k

    policy, _, _ = load_module(materialize(policy_dir, root / "eval" / name))
    tok = Tokenizer(p["tokenizer"])
    rng = random.Random(f"{cfg.seed}/{name}")

    def sample_fn(prompts: list[str], k: int) -> list[list[str]]:
        n = k if cfg.comparisons_from == "sft" else (k + 1) // 2
        groups = sample_k(policy, tok, prompts, n, cfg.ppo.max_new_tokens, seed=cfg.seed)
        # mixed: the rest are the rule's answer with 0, 1, ... edits, so every prompt also
        # has clear gradations next to the policy's own (on-distribution) answers.
        return [g + [corrupt(pr, level, rng, cfg.task.n_words) for level in range(k - n)]
                for pr, g in zip(prompts, groups)]

    write_demo_data(out.parent, task, sample_fn)
    return out


def pipeline(cfg: PipelineConfig, local: bool = False, address: str | None = None) -> dict:
    from trellis.launcher.jobs.export.driver import export, export_weights
    from trellis.model.io import is_module_dir
    from trellis.launcher.job_flags import cpu_defaults

    cpu_defaults()
    t0 = time.perf_counter()
    dirs = run_stages(cfg, local, address)
    res = evaluate(cfg, dirs, dirs["format_gate"])
    (Path(cfg.run_dir) / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    out = Path(cfg.run_dir) / "export"
    policy = selected_policy(dirs["rl"][res["algorithm"]])  # the verdict's (best) algorithm
    if is_module_dir(policy):  # the selected iteration's weight files
        export_weights(policy, out, policy / TOKENIZER_FILE, source=policy)
    else:
        export(policy, out)
    print(f"exported the {res['algorithm'].upper()} policy to {out} (Hugging Face GPT-2 "
          f"format); pipeline wall time {time.perf_counter() - t0:.0f} s; results in "
          f"{cfg.run_dir}/results.json")
    return res


def run(args: argparse.Namespace) -> int:
    pipeline(resolve_config(PipelineConfig, args), args.local, args.address)
    return 0
