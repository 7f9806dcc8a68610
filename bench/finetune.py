"""SFT and reward-model training throughput next to TRL (prints, never asserts).

1. trellis `sft` and `rm` (launcher/jobs/finetune) in-process (local=True) on bench/ppo.py's
   tiny random-init GPT (2 layers, d_model 64), the demo task's demonstrations and its ranked
   comparisons: tokens/s = non-pad tokens fed to the model in a step (the rows of that step,
   found by replaying the job's RowStream and collators) / the wall time between logged
   steps, median over steps 2..N (with the job's worker-side step_time beside it). The
   sft/rm metrics hold no phases (a step is one training phase), so no per-phase share.
2. When `trl` is importable (`pip install -e .[bench]`), TRL's SFTTrainer and RewardTrainer
   on the same weights exported to Hugging Face format, fed the token ids trellis trained on,
   cut as trellis cuts them, in its order (sequential sampler): the same rows per optimizer
   step, fp32, no gradient checkpointing (TRL defaults it on), the same torch threads (one
   process; not DDP-wrapped, as when run standalone); tokens/s = non-pad tokens fed / the
   gap between step ends, median over steps 2..N. Ratios trellis/TRL (goal >= 1.3x); an
   API drift prints a note, never hides trellis's side. Rounds interleave the two; the load
   average is printed before and after.

What "the same work" means here:
- SFT: loss on response tokens (+ EOS) on both sides. trellis feeds each row without its
  last token (it has no target); TRL feeds it too: one more token per row on TRL's side.
- RM: trellis scores each of a prompt's K responses once and forms all its C(K,2) pairs
  from those scores (InstructGPT); TRL's RewardTrainer takes (chosen, rejected) pairs, so
  the same prompts are B*C(K,2) pairs, 2*C(K,2)/K times the sequences (3x at K=4). Each
  side's tokens are what it feeds; ms/step compares the same comparisons learned per step.
  A prompt with tied ranks has fewer pairs, which a fixed TRL batch cannot follow: the
  bench keeps the tie-free comparisons (for both sides).

    python bench/finetune.py [--steps 30] [--batch 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' and datasets' bars
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
_spec = importlib.util.spec_from_file_location("bench_rl", HERE / "rl_algorithms.py")
bench_rl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_rl)  # bench/ppo.py's environment defaults, assets and TRL helpers
bench_ppo = bench_rl.bench_ppo

from trellis.data_pipeline.collate import PairCollator, SFTCollator, _fit, ranking_pairs  # noqa: E402
from trellis.data_pipeline.row_stream import RowStream  # noqa: E402
from trellis.data_pipeline.structured import StructuredDataset  # noqa: E402
from trellis.launcher.config_loader import load_config  # noqa: E402
from trellis.launcher.jobs.finetune.config import RMJobConfig, SFTJobConfig  # noqa: E402
from trellis.launcher.jobs.finetune.driver import rm, sft  # noqa: E402
from trellis.launcher.jobs.finetune.worker import RMWorker, SFTWorker  # noqa: E402
from trellis.rl.demo_task import DemoTaskConfig, write_demo_data  # noqa: E402

MAX_LEN = bench_ppo.SEQ - 1  # TRL's SFT rows carry one token more, inside the 64 context
MAX_PROMPT = 32
KINDS = {"sft": (sft, SFTJobConfig, SFTWorker, "demonstrations"),
         "rm": (rm, RMJobConfig, RMWorker, "comparisons")}


def demo_files(root: Path, rows: int) -> dict[str, Path]:
    d = write_demo_data(root / "ft", DemoTaskConfig(n_demonstrations=rows,
                                                    n_comparison_prompts=3 * rows,
                                                    n_train_prompts=10, n_eval_prompts=10))
    tie_free = [r for r in map(json.loads, open(d["comparisons"]))
                if len(set(r["ranking"])) == len(r["ranking"])]
    out = root / "ft" / "comparisons_tie_free.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in tie_free))
    return {"demonstrations": d["demonstrations"], "comparisons": out}


def _median_rate(tokens: list[int], seconds: list[float]) -> float:
    """Median per-step tokens/s over steps 2..N (step 1 pays one-off warm-up)."""
    rates = [t / s for t, s in zip(tokens, seconds)]
    return statistics.median(rates[1:] or rates)


# ---- trellis -----------------------------------------------------------------------------
def run_trellis(kind: str, assets: dict[str, Path], data: Path, run_dir: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    job, config_cls, worker, _ = KINDS[kind]
    cfg = load_config(config_cls, None, [
        f"run_dir={run_dir}", f"init_from={assets['policy']}", f"data.train={data}",
        "data.val_fraction=0", f"data.max_len={MAX_LEN}", f"data.max_prompt_len={MAX_PROMPT}",
        f"parallel.micro_batch_size={args.batch}", "metrics.port=-1",
        f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
        "checkpoint.resume=false"])
    job(cfg, local=True)
    with open(run_dir / "metrics" / "train.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)}
                for r in csv.DictReader(f)]
    # The rows of each step: the worker's RowStream replayed (one rank, data.seed 0, no
    # held-out rows); the job's own token count checks the replay.
    it = iter(RowStream(StructuredDataset(run_dir / "data" / "train"), args.batch, seed=0))
    collate = (SFTCollator if kind == "sft" else PairCollator)(MAX_LEN, MAX_PROMPT)
    steps = [next(it) for _ in rows]
    batches = [collate(s) for s in steps]
    fed = [int(b["attention_mask"].sum()) for b in batches]
    replayed = all(round(r["tokens_per_second"] * r["step_time"]) == worker.batch_tokens(b)
                   for r, b in zip(rows, batches))
    # Wall time between logged steps (the CSV's `time`, ms resolution), as TRL's side is
    # timed: the driver loop's own work counts; step_time (worker-side) is shown beside.
    t = [r["time"] for r in rows]
    wall = [rows[0]["step_time"], *(b - a for a, b in zip(t, t[1:]))]
    return {"tokens_per_second": _median_rate(fed, wall), "rows": steps, "replayed": replayed,
            "step_time_tokens_per_second": _median_rate(fed, [r["step_time"] for r in rows]),
            "ms_per_step": 1e3 * statistics.median(wall[1:] or wall)}


# ---- TRL (optional) ----------------------------------------------------------------------
def trl_rows(kind: str, steps: list[list[dict]]) -> list[dict[str, list[int]]]:
    """trellis's rows, cut as its collators cut them (collate._fit), as TRL's pre-tokenized
    columns: SFT input_ids + completion_mask; RM every strict pair of each ranking."""
    out = []
    for row in (r for step in steps for r in step):
        if kind == "sft":
            p, resp = _fit(row["prompt_ids"], row["response_ids"], MAX_LEN, MAX_PROMPT)
            out.append({"input_ids": p + resp, "completion_mask": [0] * len(p) + [1] * len(resp)})
            continue
        cut = [_fit(row["prompt_ids"], r, MAX_LEN - 1, MAX_PROMPT) for r in row["responses_ids"]]
        seqs = [p + resp for p, resp in cut]
        out += [{"chosen_ids": seqs[i], "rejected_ids": seqs[j]}
                for i, j in ranking_pairs(row["ranking"])]
    return out


def run_trl(kind: str, assets: dict[str, Path], root: Path, steps: list[list[dict]]
            ) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    hf_dir, tok = bench_rl._hf(assets, root)
    rows = trl_rows(kind, steps)
    per_step = len(rows) // len(steps)  # tie-free rankings: the same pairs every step
    common = dict(output_dir=str(root / f"trl-{kind}"), per_device_train_batch_size=per_step,
                  max_steps=len(steps), learning_rate=1e-4, train_sampling_strategy="sequential",
                  activation_checkpointing=False, bf16=False, use_cpu=True, report_to="none",
                  save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, seed=0,
                  include_num_input_tokens_seen="non_padding")
    if kind == "sft":
        targs = trl.SFTConfig(max_length=MAX_LEN + 1, completion_only_loss=True, **common)
        Trainer, fed = trl.SFTTrainer, [len(r["input_ids"]) for r in rows]
    else:
        targs = trl.RewardConfig(max_length=MAX_LEN, **common)
        Trainer, fed = trl.RewardTrainer, [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    stamps, cb = bench_rl._stamps()
    trainer = Trainer(model=str(hf_dir), args=targs, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[cb])
    t0 = time.perf_counter()
    trainer.train()
    gaps = [b - a for a, b in zip([t0, *stamps], stamps)]
    tokens = [sum(fed[i:i + per_step]) for i in range(0, len(fed), per_step)]
    return {"tokens_per_second": _median_rate(tokens, gaps),
            "ms_per_step": 1e3 * statistics.median(gaps[1:] or gaps),
            "counted": trainer.state.num_input_tokens_seen == sum(tokens),
            "distributed": str(trainer.accelerator.distributed_type).split(".")[-1]}


def measure(kind: str, assets: dict[str, Path], data: Path, root: Path, rnd: int,
            args: argparse.Namespace, has_trl: bool, notes: list[str]
            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One round of one kind: trellis, then TRL on the rows trellis trained on."""
    ours = run_trellis(kind, assets, data, root / f"{kind}-{rnd}", args)
    if not ours["replayed"]:
        notes.append(f"{kind} round {rnd}: replayed rows differ from the job's token counts")
    if not has_trl:
        return ours, None
    try:
        with bench_rl.standalone():
            t = run_trl(kind, assets, root, ours["rows"])
    except Exception as e:  # an API drift in TRL must not hide trellis's numbers
        notes.append(f"TRL {kind} round {rnd}: failed ({type(e).__name__}: {e}); no ratio")
        return ours, None
    if not t["counted"]:
        notes.append(f"TRL {kind} round {rnd}: Trainer's token count differs from the rows fed")
    if t["distributed"] != "NO":
        notes.append(f"TRL {kind} round {rnd}: accelerate ran {t['distributed']}")
    return ours, t


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_table(ours: dict[str, list], theirs: dict[str, list]) -> None:
    print(f"\n{'':<4}{'trellis tok/s':>14}{'TRL tok/s':>11}{'ratio':>8}"
          f"{'trellis ms/step':>17}{'TRL ms/step':>13}{'goal':>9}")
    for kind in KINDS:
        tps, ms = _median(ours[kind], "tokens_per_second"), _median(ours[kind], "ms_per_step")
        trl = f"{'-':>11}{'-':>8}{ms:>17.1f}{'-':>13}"
        if theirs[kind]:
            t_tps, t_ms = _median(theirs[kind], "tokens_per_second"), _median(theirs[kind], "ms_per_step")
            trl = f"{t_tps:>11,.0f}{tps / t_tps:>7.2f}x{ms:>17.1f}{t_ms:>13.1f}"
        print(f"{kind:<4}{tps:>14,.0f}{trl}{'>= 1.3x':>9}")
    per_round = {k: " ".join(f"{a['tokens_per_second'] / b['tokens_per_second']:.2f}"
                             for a, b in zip(ours[k], theirs[k])) for k in KINDS if theirs[k]}
    if per_round:  # the spread says how much the load moved the medians
        print("ratio per round: " + "; ".join(f"{k} {v}" for k, v in per_round.items()))
    print("trellis tok/s by the job's step_time (worker side, no driver loop): "
          + ", ".join(f"{k} {_median(ours[k], 'step_time_tokens_per_second'):,.0f}" for k in KINDS))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8,
                    help="rows per optimizer step: demonstrations (SFT), ranked prompts (RM)")
    ap.add_argument("--rounds", type=int, default=2, help="trellis/TRL alternations per kind")
    args = ap.parse_args()
    import torch
    has_trl = importlib.util.find_spec("trl") is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"{args.batch} rows/step, {args.steps} steps, {args.rounds} rounds, max_len {MAX_LEN} "
          f"(prompt {MAX_PROMPT}), fp32; load average {os.getloadavg()[0]:.1f}", flush=True)
    if not has_trl:
        print("TRL: not installed (pip install -e .[bench]); trellis's side only, no ratios")
    ours: dict[str, list] = {k: [] for k in KINDS}
    theirs: dict[str, list] = {k: [] for k in KINDS}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="trellis-bench-ft-", dir="/tmp") as tmp:
        root = Path(tmp)
        assets = bench_ppo.make_assets(root)
        data = demo_files(root, max(200, args.batch * args.steps))
        for rnd in range(args.rounds):
            for kind, (*_, source) in KINDS.items():
                r, t = measure(kind, assets, data[source], root, rnd, args, has_trl, notes)
                ours[kind].append(r)
                theirs[kind] += [t] if t else []
    print_table(ours, theirs)
    print("\n".join(notes + [f"load average after: {os.getloadavg()[0]:.1f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
