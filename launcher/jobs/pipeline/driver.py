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
from typing import Any

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.job_flags import add_run_arguments, resolve_config
from trellis.launcher.jobs.pipeline.config import PipelineConfig, StageConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, recovery=False)  # --local: every stage in this process


def _stage(s: StageConfig, run_dir: Path, metrics_port: int = -1) -> list[str]:
    return [f"run_dir={run_dir}", f"optim.lr={s.lr}", f"optim.warmup_steps={max(1, s.steps // 10)}",
            f"parallel.micro_batch_size={s.micro_batch_size}",
            f"parallel.num_workers={s.num_workers}", f"parallel.zero_stage={s.zero_stage}",
            f"parallel.cpus_per_worker={0.8 / s.num_workers}",
            f"train.steps={s.steps}", f"train.log_every={max(1, s.steps // 5)}",
            "train.eval_every=0", f"metrics.port={metrics_port}"]


def _done(run_dir: Path, step: int) -> bool:
    from trellis.parallel.checkpoint import step_dir
    return (step_dir(run_dir, step) / "COMPLETE").is_file()


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
    tok = root / "tokenizer.model"
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
    from trellis.launcher.jobs.finetune.driver import rm, sft
    from trellis.launcher.jobs.finetune.config import RMJobConfig, SFTJobConfig
    from trellis.launcher.jobs.pretrain.config import PretrainJobConfig
    from trellis.launcher.jobs.pretrain.driver import pretrain

    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    p = prepare_task(cfg, root)
    dirs = {s: root / s for s in ("pretrain", "sft", "rm", "ppo")}
    from trellis.data_pipeline.tokenizer import Tokenizer
    m = cfg.model
    vocab = Tokenizer(p["tokenizer"]).vocab_size  # SentencePiece may stop below the request
    done = _done(dirs["pretrain"], cfg.pretrain.steps)
    _banner("pretrain", done)
    if not done:
        pretrain(load_config(PretrainJobConfig, None, _stage(cfg.pretrain, dirs["pretrain"]) + [
            f"seed={cfg.seed}", f"model.preset={m.preset}", f"model.vocab_size={vocab}",
            f"model.n_layer={m.n_layer}", f"model.n_head={m.n_head}", f"model.d_model={m.d_model}",
            f"model.max_seq_len={m.max_seq_len}", f"data.path={p['pretrain_data']}",
            f"tokenizer.path={p['tokenizer']}", f"data.seq_len={cfg.seq_len}",
            "data.val_fraction=0.02", "train.sample_tokens=0"]), local=local, address=address)
    rows = [f"data.max_len={cfg.max_len}", f"data.max_prompt_len={cfg.max_prompt_len}",
            f"seed={cfg.seed}"]
    done = _done(dirs["sft"], cfg.sft.steps)
    _banner(f"SFT on {cfg.task.n_demonstrations} demonstrations", done)
    if not done:
        sft(load_config(SFTJobConfig, None, _stage(cfg.sft, dirs["sft"]) + rows + [
            f"init_from={dirs['pretrain']}", f"data.train={p['demonstrations']}"]),
            local=local, address=address)
    comparisons = make_comparisons(cfg, root, dirs["sft"], p)
    done = _done(dirs["rm"], cfg.rm.steps)
    _banner(f"reward model on {cfg.task.n_comparison_prompts} ranked prompts", done)
    if not done:
        rm(load_config(RMJobConfig, None, _stage(cfg.rm, dirs["rm"]) + rows + [
            f"init_from={dirs['sft']}", f"data.train={comparisons}",
            f"normalize_on={p['demonstrations']}"]), local=local, address=address)
    if ppo_stage:
        run_ppo(cfg, dirs, p, local, address)
    return dirs | {"task": root / "task", "tokenizer": p["tokenizer"],
                   "prompts_eval": p["prompts_eval"]}


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


def run_ppo(cfg: PipelineConfig, dirs: dict[str, Path], p: dict, local: bool,
            address: str | None) -> None:
    from trellis.launcher.jobs.ppo.driver import ppo
    from trellis.launcher.jobs.ppo.config import PPOJobConfig

    state = dirs["ppo"] / "state" / f"iter-{cfg.ppo.iterations:06d}.json"
    _banner("PPO", state.is_file())
    if state.is_file():
        return
    w, q = cfg.ppo_workers, cfg.ppo
    over = [f"run_dir={dirs['ppo']}", f"seed={cfg.seed}", f"actor_init={dirs['sft']}",
            f"reward_init={dirs['rm']}", f"prompts={p['prompts_train']}",
            f"placement={cfg.placement}", f"actor.optim.lr={cfg.ppo_actor_lr}",
            f"critic.optim.lr={cfg.ppo_critic_lr}", "metrics.port=-1"]
    over += [f"ppo.{k}={v}" for k, v in vars(q).items() if k != "ptx_data" or v]
    for role in ("actor", "critic", "reference", "reward"):
        over += [f"{role}.parallel.num_workers={w}", f"{role}.parallel.cpus_per_worker={0.2 / w}"]
    ppo(load_config(PPOJobConfig, None, over), local=local, address=address)


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
