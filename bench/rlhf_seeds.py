"""The RLHF demo's claim, on several task seeds (prints, never asserts): for each seed the
whole `trellis pipeline` (pretrain -> SFT -> RM -> PPO) with the shipped defaults of
launcher/configs/pipeline.yaml, then one table of the held-out gold score (the task's own
measure) of SFT, best-of-16 from SFT by the RM, and PPO, with the goal of issue 11 checked
per seed: PPO gold >= SFT gold + 0.10, PPO exact > SFT exact, PPO >= best-of-16 by RM.

    python bench/rlhf_seeds.py [--seeds 0 1 2] [--root runs/rlhf_seeds] [--ray] [--set K=V ...]

Each seed's run dir is ROOT/seed<k> (stages already done there are skipped, so an
interrupted run continues); its results.json holds the full table, curves and samples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRELLIS_PROGRESS", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no spinning threads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="runs/rlhf_seeds")
    ap.add_argument("--ray", action="store_true", help="stages on a local Ray (default: in-process)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from trellis.launcher.config_loader import load_config
    from trellis.launcher.jobs.pipeline.config import PipelineConfig
    from trellis.launcher.jobs.pipeline.driver import pipeline

    summary = {}
    for seed in args.seeds:
        run_dir = Path(args.root) / f"seed{seed}"
        cfg = load_config(PipelineConfig, str(ROOT / "launcher/configs/pipeline.yaml"),
                          [f"run_dir={run_dir}", f"seed={seed}", f"task.seed={seed}",
                           *args.overrides])
        t0 = time.perf_counter()
        res = pipeline(cfg, local=not args.ray)
        summary[seed] = res["policies"] | {"wall_s": time.perf_counter() - t0,
                                           "verdict": res["verdict"]}
    print("\nseed  SFT gold exact | best-of-16 gold | PPO gold exact | PPO-SFT  goal  wall")
    for seed, p in summary.items():
        sft, ppo, bon = p["sft"], p["ppo"], p["bon_16"]
        d = ppo["gold"] - sft["gold"]
        ok = d >= 0.10 and ppo["exact"] > sft["exact"] and ppo["gold"] >= bon["gold"]
        print(f"{seed:>4}  {sft['gold']:.3f} {sft['exact']:>5.0%} | {bon['gold']:>15.3f} | "
              f"{ppo['gold']:.3f} {ppo['exact']:>5.0%} | {d:+.3f}  {'met' if ok else 'MISSED':>6} "
              f"{p['wall_s']:>5.0f}s")
    (Path(args.root) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
