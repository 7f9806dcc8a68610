"""Critic-free RL and DPO throughput next to TRL (prints, never asserts).

1. trellis `ppo.algorithm` = ppo, grpo, rloo, reinforce_pp on bench/ppo.py's tiny random-init
   GPT (2 layers, d_model 64) and reward model, in-process (--local), the same prompts,
   group size, response length, epochs and minibatches: samples/s per iteration (median
   over iterations 2..N) and each phase's share (generate / score / train / other).
2. trellis DPO on the demo's ranked comparisons: pairs/s (median over steps 2..N).
3. When `trl` is importable (`pip install -e .[bench]`), TRL's GRPOTrainer and RLOOTrainer
   (no vLLM, CPU) and DPOTrainer on the same weights exported to Hugging Face format, as
   ratios trellis/TRL (goals: GRPO, RLOO >= 2x; DPO >= 1.5x). Run against TRL 1.16; an API
   drift prints a note, never hides trellis's numbers. Without trl the bench says so and
   prints trellis's side only.

    python bench/rl_algorithms.py [--iterations 5] [--prompts 8] [--group 4] [--new-tokens 12]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_ppo", HERE / "ppo.py")
bench_ppo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ppo)  # its environment defaults and tiny-model assets

from trellis.launcher.jobs.ppo.driver import ppo  # noqa: E402

ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp")


def run_rl(assets: dict[str, Path], root: Path, args: argparse.Namespace, algo: str
           ) -> dict[str, float]:
    ns = argparse.Namespace(prompts=args.prompts, new_tokens=args.new_tokens,
                            iterations=args.iterations)
    cfg = bench_ppo.job_config(assets, root / f"run-{algo}", ns, workers=1)
    p = dataclasses.replace(cfg.ppo, algorithm=algo, group_size=args.group)
    cfg = dataclasses.replace(cfg, ppo=p)
    t0 = time.perf_counter()
    ppo(cfg, local=True)
    out = bench_ppo.summarize(bench_ppo.read_iterations(root / f"run-{algo}"))
    return out | {"job_seconds": time.perf_counter() - t0}


def run_dpo(assets: dict[str, Path], root: Path, args: argparse.Namespace) -> dict[str, float]:
    from trellis.launcher.config_loader import load_config
    from trellis.launcher.jobs.dpo.config import DPOJobConfig
    from trellis.launcher.jobs.dpo.driver import dpo
    cfg = load_config(DPOJobConfig, None, [
        f"run_dir={root / 'dpo'}", f"policy_init={assets['policy']}",
        f"data.train={assets['comparisons']}", "data.val_fraction=0", "dpo.eval_rows=0",
        f"dpo.prompts_per_step={args.prompts}", "dpo.max_prompt_len=32",
        "dpo.max_response_len=24", "metrics.port=-1", f"train.steps={args.iterations}",
        "train.log_every=1", "train.eval_every=0", "checkpoint.resume=false",
        "reference.parallel.zero_stage=0"])
    t0 = time.perf_counter()
    dpo(cfg, local=True)
    with open(root / "dpo" / "metrics" / "dpo.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    steady = rows[1:] or rows
    return {"pairs_per_second": statistics.median(r["pairs_per_second"] for r in steady),
            "pairs_per_step": statistics.median(r["pairs"] for r in steady),
            "share/reference": sum(r.get("phase_seconds/reference_wall", 0) for r in steady)
            / sum(r["pairs"] / r["pairs_per_second"] for r in steady),
            "job_seconds": time.perf_counter() - t0}


# ---- TRL (optional; untested here) --------------------------------------------------------
def _hf(assets: dict[str, Path], root: Path) -> tuple[Path, Any]:
    from transformers import LlamaTokenizer

    from trellis.model.hf import save_hf_pretrained
    from trellis.model.io import load_module
    hf_dir = root / "hf-policy"
    if not hf_dir.is_dir():
        module, cfg, _ = load_module(assets["policy"])
        save_hf_pretrained(module, cfg, hf_dir, str(assets["tokenizer"]), bos_id=None, eos_id=3)
    tok = LlamaTokenizer.from_pretrained(str(hf_dir))
    tok.pad_token, tok.padding_side = "<pad>", "left"
    return hf_dir, tok


def _stamps():
    from transformers import TrainerCallback
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())
    return stamps, Stamp()


def _rate(t0: float, stamps: list[float], per_unit: int, steps_per_unit: int = 1) -> float:
    """`per_unit` samples per `steps_per_unit` optimizer steps (GRPO/RLOO: one generation
    then its reuse), median over units after the first."""
    gaps = [b - a for a, b in zip([t0, *stamps], stamps)]
    units = [sum(gaps[i:i + steps_per_unit]) for i in range(0, len(gaps), steps_per_unit)]
    return per_unit / statistics.median(units[1:] or units)


@contextlib.contextmanager
def standalone() -> Iterator[None]:
    """trellis's in-process jobs leave RANK/WORLD_SIZE/LOCAL_RANK set (and a gloo group of
    one, which stays: DeepSpeed caches its groups); with LOCAL_RANK set accelerate wraps TRL's
    model in DDP (find_unused_parameters: an extra autograd pass per step), which a
    standalone TRL run never does."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_tokens(model: Any, n: int) -> Any:
    """TRL scores prompt + decoded completion re-tokenized, which can outgrow the tiny model's
    context (a random policy's pieces re-split): score the first `n` tokens (right-padded)."""
    import torch

    class FirstTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.config = model, model.config  # TRL names the reward by its config

        def forward(self, input_ids: Any, attention_mask: Any, **kw: Any) -> Any:
            return self.model(input_ids=input_ids[:, :n], attention_mask=attention_mask[:, :n])
    return FirstTokens()


def run_trl_online(assets: dict[str, Path], root: Path, args: argparse.Namespace,
                   which: str) -> dict[str, float]:
    """TRL GRPOTrainer / RLOOTrainer: same prompts, group, response length; each generation
    trained as trellis does, 2 epochs x 2 minibatches (4 optimizer steps)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    hf_dir, tok = _hf(assets, root)
    rm = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    rm.config.pad_token_id = 0
    rm = _first_tokens(rm, bench_ppo.SEQ)
    prompts = [json.loads(line)["prompt"] for line in open(assets["prompts"])]
    ds = Dataset.from_dict({"prompt": prompts})
    Config, Trainer = (trl.GRPOConfig, trl.GRPOTrainer) if which == "grpo" else \
        (trl.RLOOConfig, trl.RLOOTrainer)
    rows = args.prompts * args.group
    targs = Config(output_dir=str(root / f"trl-{which}"), per_device_train_batch_size=rows // 2,
                   steps_per_generation=2, num_generations=args.group, max_completion_length=args.new_tokens,
                   num_iterations=2, max_steps=args.iterations * 4, use_cpu=True,
                   report_to="none", save_strategy="no", logging_steps=10 ** 6, seed=0,
                   bf16=False)
    stamps, cb = _stamps()
    trainer = Trainer(model=str(hf_dir), reward_funcs=rm, args=targs, train_dataset=ds,
                      processing_class=tok, reward_processing_classes=tok, callbacks=[cb])
    t0 = time.perf_counter()
    trainer.train()
    return {"samples_per_second": _rate(t0, stamps, rows, steps_per_unit=4),
            "job_seconds": time.perf_counter() - t0}


def run_trl_dpo(assets: dict[str, Path], root: Path, args: argparse.Namespace,
                per_step: int) -> dict[str, float]:
    import trl
    from datasets import Dataset
    hf_dir, tok = _hf(assets, root)
    pairs = []
    for line in open(assets["comparisons"]):
        r = json.loads(line)
        order = sorted(range(len(r["responses"])), key=lambda i: r["ranking"][i])
        pairs += [{"prompt": r["prompt"], "chosen": r["responses"][a], "rejected": r["responses"][b]}
                  for i, a in enumerate(order) for b in order[i + 1:]
                  if r["ranking"][a] < r["ranking"][b]]
    # 56 = trellis's max_prompt_len 32 + max_response_len 24 (run_dpo), inside the context
    targs = trl.DPOConfig(output_dir=str(root / "trl-dpo"), per_device_train_batch_size=per_step,
                          max_length=56, truncation_mode="keep_start",
                          max_steps=args.iterations, use_cpu=True, report_to="none",
                          save_strategy="no", logging_steps=10 ** 6, seed=0, bf16=False)
    stamps, cb = _stamps()
    trainer = trl.DPOTrainer(model=str(hf_dir), args=targs, train_dataset=Dataset.from_list(pairs),
                             processing_class=tok, callbacks=[cb])
    t0 = time.perf_counter()
    trainer.train()
    return {"pairs_per_second": _rate(t0, stamps, per_step), "job_seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration / DPO step")
    ap.add_argument("--group", type=int, default=4, help="responses per prompt (all algorithms)")
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args()
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"{args.prompts} prompts x {args.group} responses, {args.new_tokens} new tokens, "
          f"{args.iterations} iterations, 2 epochs x 2 minibatches, fp32; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="trellis-bench-rl-", dir="/tmp") as tmp:
        root = Path(tmp)
        assets = bench_ppo.make_assets(root)
        from trellis.rl.demo_task import DemoTaskConfig, write_demo_data
        assets["comparisons"] = write_demo_data(root / "cmp", DemoTaskConfig(
            n_comparison_prompts=max(64, args.prompts * (args.iterations + 1)),
            n_train_prompts=10, n_eval_prompts=10, n_demonstrations=10))["comparisons"]
        res = {a: run_rl(assets, root, args, a) for a in ALGOS}
        print(f"\n{'trellis':<14}{'samples/s':>10}{'s/it':>7}  generate  score    train    other")
        for a, r in res.items():
            score = r["share/score_wall"]
            print(f"{a:<14}{r['samples_per_second']:>10.1f}{r['iteration_seconds']:>7.2f}  "
                  f"{100 * r['share/generate']:>7.1f}% {100 * score:>6.1f}% "
                  f"{100 * r['share/train']:>6.1f}% {100 * r['share/other']:>6.1f}%")
        d = run_dpo(assets, root, args)
        print(f"{'dpo':<14}{d['pairs_per_second']:>10.1f} pairs/s (reference share "
              f"{100 * d['share/reference']:.1f}%)")
        if importlib.util.find_spec("trl") is None:
            print("\nTRL: not installed (pip install -e .[bench]); no trellis/TRL ratios")
            return 0
        for which, goal in (("grpo", 2.0), ("rloo", 2.0)):
            try:
                with standalone():
                    t = run_trl_online(assets, root, args, which)
                print(f"{which}: trellis / TRL samples/s {res[which]['samples_per_second'] / t['samples_per_second']:.2f}x "
                      f"(TRL {t['samples_per_second']:.1f}; goal >= {goal}x)")
            except Exception as e:  # an API drift in TRL must not hide trellis's numbers
                print(f"TRL {which}: failed ({type(e).__name__}: {e}); no ratio")
        try:
            with standalone():  # a batch of trellis's pairs per step
                t = run_trl_dpo(assets, root, args, round(d["pairs_per_step"]))
            print(f"dpo: trellis / TRL pairs/s {d['pairs_per_second'] / t['pairs_per_second']:.2f}x "
                  f"(TRL {t['pairs_per_second']:.1f}; goal >= 1.5x)")
        except Exception as e:
            print(f"TRL dpo: failed ({type(e).__name__}: {e}); no ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
