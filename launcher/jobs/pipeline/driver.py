"""`trellis pipeline`: the InstructGPT path on the embedded demo task, in one command:

  task data -> pretrain (task-format text) -> SFT (a few demonstrations) -> comparisons
  (K SFT samples ranked by the simulated labeler) -> reward model -> PPO -> HF export

Each stage is skipped when its run dir already holds its final checkpoint. At the end a
table compares the pretrained, SFT and PPO policies on held-out prompts."""
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
                                                  "prompts_train", "prompts_eval")}
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
               ppo_stage: bool = True) -> dict[str, Path]:
    """Run each stage that is not done yet (each job says whether its run dir is)."""
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.jobs.finetune import driver as finetune
    from trellis.launcher.jobs.pipeline import stages
    from trellis.launcher.jobs.pretrain import driver as pretrain

    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    p = prepare_task(cfg, root)
    dirs = {s: root / s for s in ("pretrain", "sft", "rm", "ppo")}
    vocab = Tokenizer(p["tokenizer"]).vocab_size  # SentencePiece may stop below the request
    job = stages.pretrain_config(cfg, dirs["pretrain"], p["pretrain_data"], p["tokenizer"], vocab)
    _run_stage("pretrain", pretrain.is_done(job), pretrain.pretrain, job, local, address)
    job = stages.sft_config(cfg, dirs["sft"], dirs["pretrain"], p["demonstrations"])
    _run_stage(f"SFT on {cfg.task.n_demonstrations} demonstrations", finetune.is_done(job),
               finetune.sft, job, local, address)
    comparisons = make_comparisons(cfg, root, dirs["sft"], p)
    job = stages.rm_config(cfg, dirs["rm"], dirs["sft"], comparisons, p["demonstrations"])
    _run_stage(f"reward model on {cfg.task.n_comparison_prompts} ranked prompts",
               finetune.is_done(job), finetune.rm, job, local, address)
    if ppo_stage:
        from trellis.launcher.jobs.ppo import driver as ppo
        job = stages.ppo_config(cfg, dirs["ppo"], dirs["sft"], dirs["rm"], p["prompts_train"])
        _run_stage("PPO", ppo.is_done(job), ppo.ppo, job, local, address)
    return dirs | {"task": root / "task", "tokenizer": p["tokenizer"],
                   "prompts_eval": p["prompts_eval"]}


def _run_stage(title: str, done: bool, train: Callable[..., Any], job: Any, local: bool,
               address: str | None) -> None:
    _banner(title, done)
    if not done:
        train(job, local=local, address=address)


def make_comparisons(cfg: PipelineConfig, root: Path, sft_dir: Path, p: dict) -> Path:
    """K responses per comparison prompt, ranked by the simulated labeler (ties allowed)."""
    if cfg.comparisons_from == "corrupt":
        return p["comparisons"]
    out = root / "task_sft" / "comparisons.jsonl"
    if out.is_file():
        return out
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.weights import materialize
    from trellis.model.io import load_module
    from trellis.rl.demo_task import corrupt, write_demo_data
    from trellis.rl.policy_eval import sample_k

    policy, _, _ = load_module(materialize(sft_dir, root / "eval" / "sft"))
    tok = Tokenizer(p["tokenizer"])
    rng = random.Random(cfg.seed)

    def sample_fn(prompts: list[str], k: int) -> list[list[str]]:
        n = k if cfg.comparisons_from == "sft" else (k + 1) // 2
        groups = sample_k(policy, tok, prompts, n, cfg.ppo.max_new_tokens, seed=cfg.seed)
        # mixed: the rest are the rule's answer with 0, 1, ... edits, so every prompt also
        # has clear gradations next to the policy's own (on-distribution) answers.
        return [g + [corrupt(pr, level, rng, cfg.task.n_words) for level in range(k - n)]
                for pr, g in zip(prompts, groups)]

    write_demo_data(out.parent, cfg.task, sample_fn)
    return out


def evaluate(cfg: PipelineConfig, dirs: dict[str, Path]) -> dict[str, Any]:
    """The results table: each policy's held-out task score and RM reward, PPO's KL."""
    import json as _json

    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.weights import materialize
    from trellis.model.io import load_module
    from trellis.rl.demo_task import mean_score
    from trellis.rl.policy_eval import kl_to_reference, respond, rm_scores

    root = Path(cfg.run_dir)
    tok = Tokenizer(dirs["tokenizer"])
    prompts = [_json.loads(line)["prompt"] for line in
               open(dirs["prompts_eval"])][:cfg.eval_prompts]
    load = lambda src, name: load_module(materialize(src, root / "eval" / name))[0]
    reward = load(dirs["rm"], "rm")
    sft_policy = load(dirs["sft"], "sft")
    rows = {}
    for name, src in (("pretrained", dirs["pretrain"]), ("SFT", dirs["sft"]),
                      ("PPO", dirs["ppo"] / "actor")):
        policy = sft_policy if name == "SFT" else load(src, name.lower())
        resp = respond(policy, tok, prompts, cfg.ppo.max_new_tokens, max_prompt_len=cfg.max_prompt_len)
        rows[name] = {"task_score": mean_score(prompts, resp),
                      "exact": mean_score(prompts, resp, exact=True),
                      "rm_reward": float(rm_scores(reward, tok, prompts, resp).mean()),
                      "kl_to_sft": kl_to_reference(policy, sft_policy, tok, prompts, resp),
                      "samples": list(zip(prompts[:cfg.samples_shown], resp[:cfg.samples_shown]))}
    return rows


def print_table(rows: dict[str, Any], n_prompts: int) -> None:
    print(f"\nheld-out prompts: {n_prompts}")
    print(f"{'policy':<11} {'task score':>10} {'exact':>7} {'RM reward':>10} {'KL to SFT':>10}")
    for name, r in rows.items():
        print(f"{name:<11} {r['task_score']:>10.3f} {r['exact']:>7.1%} {r['rm_reward']:>10.3f} "
              f"{r['kl_to_sft']:>10.3f}")
    for name, r in rows.items():
        print(f"\n{name} answers:")
        for prompt, resp in r["samples"]:
            print(f"  {prompt} {resp}")


def pipeline(cfg: PipelineConfig, local: bool = False, address: str | None = None) -> dict:
    from trellis.launcher.jobs.export.driver import export
    from trellis.launcher.job_flags import cpu_defaults

    cpu_defaults()
    t0 = time.perf_counter()
    dirs = run_stages(cfg, local, address)
    out = Path(cfg.run_dir) / "export"
    if not (out / "model.safetensors").is_file():
        export(dirs["ppo"] / "actor", out)
    rows = evaluate(cfg, dirs)
    print_table(rows, min(cfg.eval_prompts, sum(1 for _ in open(dirs["prompts_eval"]))))
    print(f"\nexported the PPO policy to {out} (Hugging Face GPT-2 format); "
          f"pipeline wall time {time.perf_counter() - t0:.0f} s")
    (Path(cfg.run_dir) / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def run(args: argparse.Namespace) -> int:
    pipeline(resolve_config(PipelineConfig, args), args.local, args.address)
    return 0
