"""`trellis pretrain` on real Ray actors and DeepSpeed engines (gloo, world size 2), tiny models.

One Ray instance and one tokenized corpus serve the whole module; runs are shared between
tests where one run answers several questions (the uninterrupted ZeRO-2 run is the baseline
for exact resume and for fault recovery)."""
from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from trellis.launcher.config_loader import load_config
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig
from trellis.launcher.jobs.pretrain.driver import pretrain
from trellis.launcher.jobs.pretrain.data import prepare_data

pytestmark = pytest.mark.integration

STEPS = 20


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from trellis.parallel.worker_group import ensure_ray
    ensure_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The embedded corpus, tokenized once (vocab 512) and ingested for every run here."""
    root = tmp_path_factory.mktemp("corpus")
    cfg = load_config(PretrainJobConfig, None, [f"run_dir={root}", "tokenizer.vocab_size=512",
                                                "data.val_fraction=0.05"])
    data = prepare_data(cfg, root)
    return {"path": str(data.train_dir), "tok": str(data.tokenizer_path)}


def job(tmp_path: Path, corpus: dict, *overrides: str, arch: str = "gpt") -> PretrainJobConfig:
    preset = "gpt-tiny" if arch == "gpt" else "bert-tiny"
    base = [f"run_dir={tmp_path}", f"model.preset={preset}", "model.vocab_size=512",
            "model.max_seq_len=64", f"data.path={corpus['path']}", f"tokenizer.path={corpus['tok']}",
            "data.seq_len=32", "data.val_fraction=0.05", "parallel.micro_batch_size=4",
            "parallel.cpus_per_worker=0.4", "optim.lr=3e-3", "optim.warmup_steps=2",
            f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=2", "train.sample_tokens=0", "metrics.port=-1"]
    return load_config(PretrainJobConfig, None, base + list(overrides))


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics" / "train.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics" / "train.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, corpus, ray_local):
    run_dir = tmp_path_factory.mktemp("zero2")
    cfg = job(run_dir, corpus, "parallel.num_workers=2", "parallel.zero_stage=2",
              "checkpoint.every=5", "checkpoint.keep_last=5")
    result = pretrain(cfg)
    return run_dir, result, losses(run_dir)


def test_zero2_lowers_loss_and_writes_checkpoints(zero2_run):
    run_dir, result, curve = zero2_run
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.5, curve
    assert "val_loss" in result and result["val_loss"] < curve[1]
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done == ["step_10", "step_15", "step_20", "step_5"]


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train_through_the_job(tmp_path, corpus, ray_local, stage):
    """The job trains at ZeRO-1 and ZeRO-3 too (the partition sizes of each stage are checked
    on the engine itself in test_parallel_workers.py)."""
    cfg = job(tmp_path, corpus, "parallel.num_workers=2", f"parallel.zero_stage={stage}",
              "train.steps=10")
    result = pretrain(cfg)
    curve = losses(tmp_path)
    assert curve[10] < curve[1] - 0.3, curve
    assert result["step"] == 10


def test_resume_is_exact(tmp_path, corpus, ray_local, zero2_run):
    """10 steps, stop, resume for 10 more == 20 straight, loss for loss (data order included)."""
    _, _, straight = zero2_run
    cfg = job(tmp_path, corpus, "parallel.num_workers=2", "parallel.zero_stage=2",
              "checkpoint.every=5", "train.stop_after=10")
    first = pretrain(cfg)
    assert first["step"] == 10
    resumed_cfg = job(tmp_path, corpus, "parallel.num_workers=2", "parallel.zero_stage=2",
                      "checkpoint.every=5")
    pretrain(resumed_cfg)
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(resumed[step] - straight[step]) <= 1e-6, (step, resumed[step], straight[step])


def test_worker_sigkill_recovers_to_same_final_loss(tmp_path, corpus, ray_local, zero2_run):
    import ray

    _, _, straight = zero2_run
    cfg = job(tmp_path, corpus, "parallel.num_workers=2", "parallel.zero_stage=2",
              "checkpoint.every=5", "train.max_failures=1")
    killed: list[int] = []

    def killer() -> None:  # SIGKILL rank 1's process once training passes step 10
        csv_path = tmp_path / "metrics" / "train.csv"
        deadline = time.time() + 3600  # ends the thread only; the kill is an event
        while time.time() < deadline and not killed:
            if csv_path.exists() and max(losses(tmp_path), default=0) >= 10:
                pid = ray.get(ray.get_actor("pretrain/rank1").pid.remote())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = pretrain(cfg)
    t.join(timeout=5)
    assert killed, "the worker was never killed"
    assert result["step"] == STEPS and result["recoveries"] == 1
    assert abs(result["loss"] - straight[STEPS]) <= 1e-6


def test_failures_beyond_budget_fail_clearly(tmp_path, corpus, ray_local):
    import ray

    cfg = job(tmp_path, corpus, "parallel.num_workers=2", "train.max_failures=0",
              "train.steps=200")

    def killer() -> None:
        for _ in range(600):
            try:
                pid = ray.get(ray.get_actor("pretrain/rank0").pid.remote(), timeout=10)
                os.kill(pid, signal.SIGKILL)
                return
            except Exception:
                time.sleep(0.1)

    threading.Thread(target=killer, daemon=True).start()
    with pytest.raises(SystemExit, match="pretrain/rank0 died.*max_failures=0"):
        pretrain(cfg)


def test_export_after_zero3_matches_transformers(tmp_path, corpus, ray_local):
    from transformers import GPT2LMHeadModel

    from trellis.launcher.jobs.export.driver import export
    from trellis.launcher.jobs.pretrain.driver import pretrain_spec
    from trellis.launcher.driver_loop import make_group

    cfg = job(tmp_path, corpus, "parallel.num_workers=2", "parallel.zero_stage=3",
              "train.steps=5", "parallel.precision=fp32")  # live logits == export's at 1e-5
    pretrain(cfg)
    out = export(tmp_path, tmp_path / "hf")
    ids = [[5, 17, 99, 3, 250, 41, 8, 300], [9, 9, 100, 200, 301, 7, 1, 2]]
    group = make_group(cfg, pretrain_spec(cfg), local=False, address=None)
    try:
        group.call("resume", str(tmp_path / "checkpoints" / "step_5"))
        ours = group.call("logits", ids)[0]  # (B, T, V) from the ZeRO-3-sharded engine
    finally:
        group.shutdown()
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits
    assert (out / "tokenizer.model").is_file()
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_local_equals_one_worker_ray_group(tmp_path, corpus, ray_local):
    # fp32: bf16 matmuls round differently with the thread layout (2e-5 apart)
    local_cfg = job(tmp_path / "local", corpus, "train.steps=6", "parallel.precision=fp32")
    ray_cfg = job(tmp_path / "ray", corpus, "train.steps=6", "parallel.precision=fp32")
    pretrain(local_cfg, local=True)
    pretrain(ray_cfg, local=False)
    a, b = losses(tmp_path / "local"), losses(tmp_path / "ray")
    assert sorted(a) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_mlm_then_distill_lower_losses(tmp_path, corpus, ray_local):
    from trellis.launcher.jobs.export.driver import export
    from trellis.model.hf import load_hf_pretrained

    teacher_dir = tmp_path / "teacher"
    mlm = job(teacher_dir, corpus, "train.objective=mlm", "parallel.num_workers=2",
              "parallel.zero_stage=1", "model.n_layer=4", arch="bert")
    pretrain(mlm)
    curve = losses(teacher_dir)
    assert curve[STEPS] < curve[1] - 0.5, curve
    export(teacher_dir, tmp_path / "teacher_hf")

    student_dir = tmp_path / "student"
    distill = job(student_dir, corpus, "train.objective=distill",
                  f"distill.teacher={tmp_path / 'teacher_hf'}", "optim.lr=1e-3", arch="bert")
    pretrain(distill, local=True)
    # The student starts as every other teacher layer, so KL and MLM start near the teacher's;
    # what distillation must pull down is the hidden-state (cosine) gap that dropping layers
    # opened, while the KL stays small.
    parts = metric_rows(student_dir)
    cos = [float(r["cos"]) for r in parts]
    assert sum(cos[-5:]) < 0.7 * sum(cos[:5]), cos
    assert max(float(r["kl"]) for r in parts) < 0.5
    export(student_dir, tmp_path / "student_hf")
    student, scfg = load_hf_pretrained(tmp_path / "student_hf")
    teacher, tcfg = load_hf_pretrained(tmp_path / "teacher_hf")
    assert scfg.n_layer * 2 == tcfg.n_layer == 4
