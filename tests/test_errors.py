"""Errors reach the user as one line with a distinct exit code, from any process: the CLI
classifies, WorkerGroup hands a worker's own exception to the driver, and a SIGTERM stops a
job at a step boundary with a checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trellis.data_pipeline.shards import DataError
from trellis.launcher.cli import exit_code, main
from trellis.launcher.config_loader import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "cluster_tiny.yaml"


def test_exit_codes_by_kind_of_error():
    from trellis.data_pipeline.tokenizer import TokenizerError
    from trellis.parallel.checkpoint import CheckpointError
    assert exit_code(ConfigError("k")) == 2 and exit_code(DataError("d")) == 2
    assert exit_code(TokenizerError("t")) == 2
    assert exit_code(CheckpointError("c")) == 1
    assert exit_code(RuntimeError("bug")) is None  # a bug keeps its traceback


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a trellis run directory" in err, err
    with pytest.raises(ConfigError):
        main(["--debug", "export", str(tmp_path), "--out", str(tmp_path / "o")])


class _Raiser:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def fail(self) -> None:
        raise DataError(f"shard 'x.arrow' is corrupt (rank {self.rank})")


@pytest.mark.integration
def test_an_error_inside_a_ray_worker_reaches_the_driver_as_itself():
    import ray

    from trellis.parallel.config import ParallelConfig
    from trellis.parallel.worker_group import WorkerGroup, ensure_ray
    ensure_ray(num_cpus=2, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors can't import us
    try:
        group = WorkerGroup(_Raiser, ParallelConfig(num_workers=2, cpus_per_worker=0.5),
                            role="raiser")
        try:
            with pytest.raises(DataError, match=r"shard 'x.arrow' is corrupt \(rank \d\)") as e:
                group.call("fail")
            assert exit_code(e.value) == 2
            assert any("raised in worker raiser/rank" in n for n in e.value.__notes__)
        finally:
            group.shutdown()
    finally:
        ray.shutdown()


def _rows(csv_path: Path) -> int:
    return max(0, len(csv_path.read_text().splitlines()) - 1) if csv_path.is_file() else 0


@pytest.mark.integration
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    """A preemption (SIGTERM) ends the job with exit 0 after a checkpoint; a rerun resumes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trellis.launcher.cli", "pretrain", "--config", str(TINY),
           "--local", "--run-dir", str(run), "--set", "train.steps=100000",
           "--set", "metrics.port=-1", "--set", "metrics.linger_s=0"]
    env = {**os.environ, "TRELLIS_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 3600
    while _rows(run / "metrics" / "train.csv") < 3 and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    line = next(x for x in out.splitlines() if "stopped after step" in x)
    step = int(line.split("stopped after step ")[1].split()[0])
    assert "on SIGTERM (checkpointed); run the same command again to resume" in line
    assert (run / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
    again = subprocess.run(cmd[:-6] + ["--set", f"train.steps=100000",
                                       "--set", f"train.stop_after={step + 2}",
                                       "--set", "metrics.port=-1"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in again.stdout
    assert f"stopped after step {step + 2} of 100000 (train.stop_after)" in again.stdout
