"""`trellis plot` on a finished run: a PNG per expected curve, clear errors on bad CSVs."""
import csv
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from trellis.cluster.metrics import MetricsConfig, MetricsLogger
from trellis.launcher.commands.plot import PlotError, plot_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _write_run(run_dir: Path) -> None:
    """A finished run as the metrics logger writes it: train, eval and PPO kinds."""
    with MetricsLogger(run_dir, MetricsConfig(port=-1)) as m:
        for step in range(1, 31):
            m.log(step, {"loss": 8.0 * math.exp(-step / 10), "lr": 3e-4 * min(1, step / 5),
                         "tokens_per_second": 1000.0 + step, "grad_norm": 1.0 / step})
            if step % 10 == 0:
                m.log(step, {"loss": 7.0 * math.exp(-step / 12)}, kind="eval")
            m.log(step, {"reward_mean": step / 30, "kl": 0.01 * step, "clip_fraction": 0.1},
                  kind="ppo", phases={"generate": 1.0, "train": 0.5 + step / 100})


def test_plot_writes_png_per_curve(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    proc = subprocess.run([sys.executable, "-m", "trellis.launcher.cli", "plot", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = ["train_loss", "train_lr", "train_tokens_per_second", "train_grad_norm",
                "eval_loss", "ppo_reward_mean", "ppo_kl", "ppo_clip_fraction",
                "ppo_phase_seconds"]
    listed = {Path(line).stem for line in proc.stdout.split()}
    for name in expected:
        png = run / "plots" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 2000, name
        assert _png_size(png) == (640, 400)
        assert name in listed


def test_new_key_midway_keeps_rows_and_plots(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, MetricsConfig(port=-1)) as m:
        m.log(1, {"loss": 3.0})
        m.log(2, {"loss": 2.0, "mfu": 0.4})   # new key: header widens, row 1 keeps its loss
        m.log(3, {"mfu": 0.5})                # key missing: empty cell, not a shifted column
    cols = read_metrics(run / "metrics" / "train.csv")
    assert cols["step"] == [1, 2, 3]
    assert cols["loss"][:2] == [3.0, 2.0] and math.isnan(cols["loss"][2])
    assert math.isnan(cols["mfu"][0]) and cols["mfu"][1:] == [0.4, 0.5]
    written = {p.name for p in plot_run(run)}
    assert written == {"train_loss.png", "train_mfu.png"}


def test_bad_cell_names_file_row_and_column(tmp_path):
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    with open(mdir / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["step", "time", "loss"], [1, 0.0, 2.5], [2, 0.1, "oops"]])
    with pytest.raises(PlotError, match=r"train\.csv:3: column 'loss': 'oops'"):
        plot_run(tmp_path)


def test_truncated_row_is_an_error(tmp_path):
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    (mdir / "train.csv").write_text("step,time,loss\n1,0.0,2.5\n2,0.1\n")
    with pytest.raises(PlotError, match=r"train\.csv:3: 2 cells, header has 3"):
        plot_run(tmp_path)


def test_not_a_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trellis.launcher.cli", "plot", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no metrics CSV files" in proc.stderr and str(tmp_path) in proc.stderr


def test_pipeline_results_give_the_gold_vs_kl_figure(tmp_path):
    import json
    from trellis.rl.best_of_n import bon_kl
    res = {"bon_curve": [{"n": n, "kl": bon_kl(n), "rm": 0.1 * n, "gold": 0.5,
                          "gold_by_gold": 0.5 + 0.02 * n} for n in (1, 2, 4, 8, 16)],
           "ppo_curve": [{"iteration": i, "kl": 0.5 * i, "rm": 0.2 * i, "gold": 0.5 + 0.01 * i}
                         for i in range(0, 30, 5)]}
    (tmp_path / "results.json").write_text(json.dumps(res))
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["gold_vs_kl.png"]
    w, h = _png_size(written[0])
    assert w > h > 100
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(PlotError, match="results.json: not JSON"):
        plot_run(tmp_path)
