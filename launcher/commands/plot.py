"""`trellis plot RUN_DIR [--out DIR]`: PNG curves from the run's metrics CSVs.

A pipeline run dir (results.json, no metrics/) gets gold_vs_kl.png instead: the task's gold
score and the reward model's score against sqrt(KL) for the PPO evaluations and for
best-of-n from SFT (n = 1..16, with best-of-n by gold as the ceiling), as in Gao et al.
2022, "Scaling Laws for Reward Model Overoptimization".

Reads RUN_DIR/metrics/<kind>.csv (the driver's files written by cluster.metrics) and
writes one PNG per column to RUN_DIR/plots/ (or --out): <kind>_<column>.png, e.g.
train_loss.png, train_lr.png, train_tokens_per_second.png, ppo_reward_mean.png, ppo_kl.png,
ppo_clip_fraction.png. PPO's per-phase seconds (columns phase_seconds/<phase>) share one
plot, <kind>_phase_seconds.png. train_loss.png also shows eval loss when eval.csv has it.
Empty cells (a key not logged at that step) are gaps; any other non-number is an error
naming the file, row and column.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

SKIP = ("step", "time")
PHASE = "phase_seconds/"


class PlotError(ValueError):
    """Unreadable metrics; str() names the file, row and column."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (has metrics/*.csv)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    try:
        written = plot_run(args.run_dir, args.out)
    except PlotError as e:
        print(f"trellis plot: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Columns of one metrics CSV as float lists (NaN for empty cells)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise PlotError(f"{path}: empty file (no header)")
    header = rows[0]
    if "step" not in header:
        raise PlotError(f"{path}: header has no 'step' column: {','.join(header)}")
    cols: dict[str, list[float]] = {h: [] for h in header}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise PlotError(f"{path}:{n}: {len(row)} cells, header has {len(header)}")
        for h, cell in zip(header, row):
            try:
                cols[h].append(float(cell) if cell != "" else math.nan)
            except ValueError:
                raise PlotError(f"{path}:{n}: column '{h}': {cell!r} is not a number") from None
    return cols


def _slug(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]+", "_", name).strip("_")


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _series(steps: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    pts = [(s, y) for s, y in zip(steps, ys) if not math.isnan(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_kind(kind: str, cols: dict[str, list[float]], out: Path,
              extra: dict[str, dict[str, list[float]]] | None = None) -> list[Path]:
    """One PNG per column of `cols` (phases together). `extra` = other kinds' columns to
    overlay on the same-named curve (eval loss on train loss)."""
    steps, written = cols["step"], []
    names = [c for c in cols if c not in SKIP and not c.startswith(PHASE)]
    for name in names:
        xs, ys = _series(steps, cols[name])
        if not xs:
            continue  # column exists but was never logged (all cells empty)
        fig, ax = _figure(f"{kind} {name}", name)
        ax.plot(xs, ys, label=kind, marker="." if len(xs) < 50 else None)
        for other, ocols in (extra or {}).items():
            if name in ocols:
                ox, oy = _series(ocols["step"], ocols[name])
                ax.plot(ox, oy, label=other, marker="o")
        if name == "lr" or (ys and min(ys) > 0 and max(ys) / min(ys) > 1e3):
            ax.set_yscale("log")
        if extra and any(name in o for o in extra.values()):
            ax.legend()
        written.append(_save(fig, out / f"{kind}_{_slug(name)}.png"))
    phases = [c for c in cols if c.startswith(PHASE)]
    if phases:
        fig, ax = _figure(f"{kind} seconds per phase", "seconds")
        for c in phases:
            ax.plot(*_series(steps, cols[c]), label=c[len(PHASE):])
        ax.legend()
        written.append(_save(fig, out / f"{kind}_phase_seconds.png"))
    return written


def plot_gold_vs_kl(res: dict, path: Path) -> Path:
    """Gold and RM score against sqrt(KL): each RL algorithm's evaluations (validation
    prompts, greedy answers, KL to SFT on them) and best-of-n from SFT (analytic KL
    log n - (n-1)/n)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    bon = res.get("bon_curve", [])
    # one curve per RL algorithm of the pipeline (older results: PPO's alone)
    curves = {a: r["curve"] for a, r in res.get("rl", {}).items()} or \
        {"ppo": res.get("ppo_curve", [])}
    sq = lambda rows: [math.sqrt(max(r["kl"], 0.0)) for r in rows]
    for i, key in enumerate(("gold", "rm")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.set_title(f"{'gold (the task' + chr(39) + 's score)' if key == 'gold' else 'reward model score (proxy)'}")
        ax.set_xlabel("sqrt(KL to SFT)")
        ax.grid(True, alpha=0.3)
        for alg, rows in curves.items():
            if rows and all(key in r for r in rows):
                ax.plot(sq(rows), [r[key] for r in rows], marker="o",
                        label=f"{alg.upper()} evaluations (validation prompts)")
        if bon and all(key in r for r in bon):
            ax.plot(sq(bon), [r[key] for r in bon], marker="s", label="best-of-n by RM")
        if key == "gold" and bon and all("gold_by_gold" in r for r in bon):
            ax.plot(sq(bon), [r["gold_by_gold"] for r in bon], marker="^", linestyle="--",
                    label="best-of-n by gold (ceiling)")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Render every driver metrics CSV of `run_dir` (or a pipeline's results.json); returns
    the PNG paths."""
    import json

    mdir = Path(run_dir) / "metrics"
    files = sorted(p for p in mdir.glob("*.csv") if "." not in p.stem)
    results = Path(run_dir) / "results.json"
    if not files and results.is_file():
        out_dir = Path(out) if out else Path(run_dir) / "plots"
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            res = json.loads(results.read_text())
        except json.JSONDecodeError as e:
            raise PlotError(f"{results}: not JSON ({e})") from None
        return [plot_gold_vs_kl(res, out_dir / "gold_vs_kl.png")]
    if not files:
        raise PlotError(f"{mdir}: no metrics CSV files (is '{run_dir}' a run directory?)")
    out_dir = Path(out) if out else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {p.stem: read_metrics(p) for p in files}
    written: list[Path] = []
    for kind, cols in data.items():
        if not cols["step"]:
            print(f"trellis plot: {mdir / (kind + '.csv')}: header only, no rows; skipped",
                  file=sys.stderr)
            continue
        extra = {"eval": data["eval"]} if kind == "train" and "eval" in data else None
        written += plot_kind(kind, cols, out_dir, extra)
    return written
