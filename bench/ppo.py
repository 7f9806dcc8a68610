"""PPO iteration throughput and where the time goes (prints, never asserts).

1. trellis PPO (`trellis.launcher.jobs.ppo.driver.ppo`) on the embedded demo task with a tiny random-init GPT
   policy (2 layers, d_model 64) and a random-init reward model (score head) of the same
   trunk; the critic starts from the reward model and the reference from the policy, as in
   `trellis ppo`. Runs in-process (--local, every role world size 1) and on a local Ray
   with 2 workers per role (cpus_per_worker 0.2 each). Reports samples/s per iteration
   (median over the iterations after the first, which pays one-off warm-up) and each
   phase's share of the iteration time, read from RUN_DIR/metrics/ppo.csv:
     generate  actor sampling + old log-probs (wall)
     ref/reward/value  each role's compute seconds (slowest rank); on Ray they run
               concurrently, so their sum can exceed `score` (the wall time of the three)
     train     actor and critic PPO epochs, concurrently (wall)
     other     the rest: driver-side GAE/whitening, Arrow conversion, metrics
2. Optional: TRL's PPOTrainer on the same policy weights exported to Hugging Face format
   (model.hf.save_hf_pretrained), the same batch, epochs, minibatches and response length,
   as a ratio trellis/TRL (goal >= 3x). Skipped with a note when `trl` is not importable.
   That path is untested here (trl is not installed in this environment).

    python bench/ppo.py [--iterations 6] [--prompts 16] [--new-tokens 12] [--no-ray]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TRELLIS_PROGRESS", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Spin-waiting OpenMP threads on 2 shared cores stall on descheduled peers (bench/pretrain.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402
from trellis.launcher.jobs.ppo.driver import ppo  # noqa: E402
from trellis.launcher.loop_config import LoopConfig  # noqa: E402
from trellis.launcher.jobs.ppo.config import FrozenRoleConfig, PPOJobConfig, TrainRoleConfig  # noqa: E402
from trellis.model.build import build_model  # noqa: E402
from trellis.model.config import ModelConfig  # noqa: E402
from trellis.model.io import save_module  # noqa: E402
from trellis.parallel.config import CheckpointConfig, ParallelConfig  # noqa: E402
from trellis.rl.demo_task import DemoTaskConfig, write_demo_data, write_pretrain_corpus  # noqa: E402
from trellis.rl.ppo_config import PPOConfig  # noqa: E402
from trellis.cluster.metrics import MetricsConfig  # noqa: E402

PHASES = ("generate", "ref", "reward", "value", "score_wall", "train")
SEQ = 64  # model context: prompt (<= MAX_PROMPT) + response


# ---- setup -------------------------------------------------------------------------------
def make_assets(root: Path, seed: int = 0) -> dict[str, Path]:
    """Demo prompts, a SentencePiece tokenizer trained on the demo corpus, and random-init
    policy / reward weight dirs (trellis format) each holding that tokenizer."""
    import torch
    data = write_demo_data(root / "data", DemoTaskConfig(n_train_prompts=400, n_eval_prompts=32,
                                                         n_comparison_prompts=10,
                                                         n_demonstrations=10, seed=seed))
    corpus = write_pretrain_corpus(root / "corpus", 2000)
    tok = train_tokenizer(TokenizerConfig(vocab_size=300), [corpus.read_text()],
                          root / "tokenizer.model")
    cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64,
                      max_seq_len=SEQ)
    out = {"prompts": data["prompts_train"], "eval_prompts": data["prompts_eval"],
           "tokenizer": Path(tok.path)}
    for name, head in (("policy", "lm"), ("reward", "score")):
        torch.manual_seed(seed)
        d = save_module(build_model(cfg, head), cfg, head, root / name)
        (d / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
        out[name] = d
    return out


def job_config(assets: dict[str, Path], run_dir: Path, args: argparse.Namespace,
               workers: int) -> PPOJobConfig:
    par = ParallelConfig(num_workers=workers, cpus_per_worker=0.2)
    frozen = ParallelConfig(num_workers=workers, cpus_per_worker=0.2, zero_stage=3)
    return PPOJobConfig(
        run_dir=str(run_dir), actor_init=str(assets["policy"]),
        reward_init=str(assets["reward"]), prompts=str(assets["prompts"]),
        ppo=PPOConfig(prompts_per_iteration=args.prompts,
                      max_new_tokens=args.new_tokens, max_prompt_len=SEQ - args.new_tokens,
                      ppo_epochs=2, minibatches=2, eval_prompts=0),
        actor=TrainRoleConfig(parallel=par), critic=TrainRoleConfig(parallel=par),
        reference=FrozenRoleConfig(parallel=frozen), reward=FrozenRoleConfig(parallel=frozen),
        train=LoopConfig(steps=args.iterations, log_every=1, eval_every=0),
        checkpoint=CheckpointConfig(resume=False), metrics=MetricsConfig(port=-1))


# ---- trellis -----------------------------------------------------------------------------
def read_iterations(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics" / "ppo.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Median samples/s and phase shares over iterations 2.. (all of them if only one)."""
    steady = rows[1:] or rows
    it = sum(r["iteration_seconds"] for r in steady)
    out = {"samples_per_second": statistics.median(r["samples_per_second"] for r in steady),
           "first_samples_per_second": rows[0]["samples_per_second"],
           "iteration_seconds": statistics.median(r["iteration_seconds"] for r in steady),
           "iterations": len(rows)}
    for p in PHASES:
        out[f"share/{p}"] = sum(r.get(f"phase_seconds/{p}", 0.0) for r in steady) / it
    wall = ("generate", "score_wall", "train")
    out["share/other"] = 1.0 - sum(out[f"share/{p}"] for p in wall)
    return out


def run_trellis(assets: dict[str, Path], root: Path, args: argparse.Namespace, local: bool,
                workers: int) -> dict[str, float]:
    name = "local" if local else f"ray-{workers}"
    run_dir = root / f"run-{name}"
    cfg = job_config(assets, run_dir, args, workers)
    t0 = time.perf_counter()
    if not local:
        from trellis.parallel.worker_group import ensure_ray
        ensure_ray(num_cpus=2, log_to_driver=False)
    try:
        ppo(cfg, local=local)
    finally:
        if not local:
            import ray
            ray.shutdown()
    out = summarize(read_iterations(run_dir))
    out["job_seconds"] = time.perf_counter() - t0
    return out


# ---- TRL (optional; untested here) --------------------------------------------------------
def run_trl(assets: dict[str, Path], root: Path, args: argparse.Namespace) -> dict[str, float]:
    """TRL PPOTrainer, same weights/batch/epochs; seconds between successive PPO updates."""
    import torch
    try:
        from trl import PPOConfig as TRLConfig, PPOTrainer
    except ImportError:  # newer TRL keeps PPO under trl.experimental
        from trl.experimental.ppo import PPOConfig as TRLConfig, PPOTrainer
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              LlamaTokenizer, TrainerCallback)

    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.model.hf import save_hf_pretrained
    from trellis.model.io import load_module

    hf_dir = root / "hf-policy"
    module, cfg, _ = load_module(assets["policy"])
    save_hf_pretrained(module, cfg, hf_dir, str(assets["tokenizer"]), bos_id=None, eos_id=3)  # trellis adds no BOS
    hf_tok = LlamaTokenizer.from_pretrained(str(hf_dir))
    hf_tok.pad_token, hf_tok.padding_side = "<pad>", "left"
    tok = Tokenizer(assets["tokenizer"])  # prompt ids exactly as trellis tokenizes them
    import json
    prompts = [json.loads(line)["prompt"] for line in open(assets["prompts"])]
    ds = Dataset.from_dict({"input_ids": [tok.encode(p) for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir)
    # No HF architecture for trellis's score head: a GPT2ForSequenceClassification on the
    # policy trunk with a random score layer (throughput does not need trained weights).
    rm = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    vm = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    for m in (policy, ref, rm, vm):
        m.config.pad_token_id = 0
    mb = 2
    targs = TRLConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts // mb,
                      gradient_accumulation_steps=1, num_mini_batches=mb, num_ppo_epochs=2,
                      total_episodes=args.prompts * args.iterations,
                      response_length=args.new_tokens, temperature=1.0, learning_rate=1e-5,
                      num_sample_generations=0, report_to="none", save_strategy="no",
                      use_cpu=True, seed=0, logging_steps=10 ** 6)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:  # once per PPO update (iteration)
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(args=targs, processing_class=hf_tok, model=policy, ref_model=ref,
                         reward_model=rm, value_model=vm, train_dataset=ds, callbacks=[Stamp()])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trainer.train()
    gaps = [b - a for a, b in zip([t0, *stamps], stamps)]
    steady = gaps[1:] or gaps
    return {"samples_per_second": args.prompts / statistics.median(steady),
            "first_samples_per_second": args.prompts / gaps[0], "iterations": len(gaps),
            "iteration_seconds": statistics.median(steady), "job_seconds": time.perf_counter() - t0}


# ---- report ------------------------------------------------------------------------------
def print_table(results: dict[str, dict[str, float]]) -> None:
    cols = ("generate", "ref", "reward", "value", "score_wall", "train", "other")
    print(f"\n{'variant':<14}{'samples/s':>10}{'it 1':>8}{'s/it':>7}{'job s':>7}  "
          + "".join(f"{c[:8]:>9}" for c in cols))
    for name, r in results.items():
        shares = "".join(f"{100 * r[f'share/{c}']:>8.1f}%" if f"share/{c}" in r else f"{'-':>9}"
                         for c in cols)
        print(f"{name:<14}{r['samples_per_second']:>10.1f}{r['first_samples_per_second']:>8.1f}"
              f"{r['iteration_seconds']:>7.2f}{r['job_seconds']:>7.1f}  {shares}")
    print("samples/s: median over iterations 2..N; 'it 1': the first iteration; phase shares "
          "of the iteration time (ref/reward/value overlap inside score_wall on Ray).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray (2 workers/role) run")
    args = ap.parse_args()
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"{args.prompts} prompts/iteration, {args.new_tokens} new tokens, {args.iterations} "
          f"iterations, ppo_epochs 2, minibatches 2; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="trellis-bench-ppo-", dir="/tmp") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        assets = make_assets(root)
        print(f"setup (data, tokenizer, weights): {time.perf_counter() - t0:.1f} s", flush=True)
        results["trellis-local"] = run_trellis(assets, root, args, local=True, workers=1)
        if not args.no_ray:
            results["trellis-ray-2x4"] = run_trellis(assets, root, args, local=False, workers=2)
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL: skipped (trl is not importable; no trellis/TRL ratio)")
        else:
            try:
                results["trl"] = run_trl(assets, root, args)
            except Exception as e:  # an API drift in TRL must not hide trellis's numbers
                print(f"TRL: failed ({type(e).__name__}: {e}); no ratio")
        print_table(results)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (other users share the cores)")
        if "trl" in results:
            ratio = results["trellis-local"]["samples_per_second"] / results["trl"]["samples_per_second"]
            print(f"trellis-local / TRL samples/s: {ratio:.2f}x (goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
