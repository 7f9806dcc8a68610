"""parallel configs through launcher.config, BatchPlan arithmetic, LR schedule, ds_config."""
import math
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.parallel.batch import BatchPlan
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig
from trellis.parallel.schedule import lr_at, lr_factor


@dataclass
class Job:
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def test_defaults_and_yaml_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("parallel:\n  num_workers: 4\n  zero_stage: 3\n  precision: bf16\n"
                    "optim:\n  lr: 1e-4\n  betas: [0.9, 0.99]\n")
    job = load_config(Job, path, ["parallel.offload_params=true", "checkpoint.keep_last=3"])
    assert job.parallel.num_workers == 4 and job.parallel.zero_stage == 3
    assert job.parallel.offload_params and job.parallel.precision == "bf16"
    assert job.optim.lr == 1e-4 and job.optim.betas == [0.9, 0.99]
    assert job.checkpoint.keep_last == 3 and job.checkpoint.resume
    assert load_config(ParallelConfig).cpus_per_worker == 0.4


@pytest.mark.parametrize("override, needle", [
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("parallel.zero_stage=-1", "parallel.zero_stage"),
    ("parallel.offload_params=true", "offload_params"),  # zero_stage 0 by default
    ("parallel.precision=fp8", "parallel.precision"),
    ("parallel.placement=RANDOM", "parallel.placement"),
    ("parallel.backend=mpi", "parallel.backend"),
    ("parallel.num_workers=0", "parallel.num_workers"),
    ("parallel.micro_batch_size=0", "parallel.micro_batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.betas=[0.9]", "betas"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("parallel.zero_stag=1", "parallel.zero_stag"),
])
def test_bad_values_raise_config_error_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(Job, None, [override])


def test_offload_params_needs_stage_three():
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3, got zero_stage 2"):
        load_config(Job, None, ["parallel.zero_stage=2", "parallel.offload_params=true"])
    with pytest.raises(ConfigError, match="offload_optimizer needs zero_stage >= 1"):
        load_config(Job, None, ["parallel.offload_optimizer=true"])
    ok = load_config(Job, None, ["parallel.zero_stage=3", "parallel.offload_params=true",
                                 "parallel.offload_optimizer=true"])
    assert ok.parallel.offload_params and ok.parallel.offload_optimizer


def test_batch_plan_arithmetic_and_log_line():
    plan = BatchPlan.from_config(ParallelConfig(micro_batch_size=8, grad_accum=2), 1024, 4)
    assert (plan.micro_batch, plan.grad_accum, plan.world) == (8, 2, 4)
    assert plan.global_batch_sequences == 64 and plan.tokens_per_step == 65536
    assert plan.describe() == ("batch: 8 seq/micro x 2 accum x 4 ranks = 64 seq x 1024 tokens"
                               " = 65,536 tokens/step")
    assert BatchPlan.from_config(ParallelConfig(num_workers=3), 16).world == 3


def test_batch_plan_derives_accumulation_from_global_batch():
    plan = BatchPlan.from_config(ParallelConfig(micro_batch_size=4), 128, 2,
                                 global_batch_sequences=32)
    assert plan.grad_accum == 4 and plan.global_batch_sequences == 32
    same = BatchPlan.from_config(ParallelConfig(micro_batch_size=4, grad_accum=4), 128, 2, 32)
    assert same == plan


@pytest.mark.parametrize("kwargs, needle", [
    ({"global_batch_sequences": 30}, "not a positive multiple of micro_batch_size 4 x world 2 = 8"),
    ({"global_batch_sequences": 0}, "not a positive multiple"),
    ({"global_batch_sequences": 16, "grad_accum": 3}, "grad_accum 3 disagrees"),
    ({"seq_len": 0}, "seq_len must be a positive integer"),
    ({"world_size": 0}, "world_size must be a positive integer"),
])
def test_batch_plan_rejects_inconsistent_input(kwargs, needle):
    par = ParallelConfig(micro_batch_size=4, grad_accum=kwargs.pop("grad_accum", 1))
    args = {"seq_len": 128, "world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=needle):
        BatchPlan.from_config(par, **args)


def test_batch_plan_checks_micro_batch_rows():
    plan = BatchPlan.from_config(ParallelConfig(micro_batch_size=4), 8, 1)
    plan.check_rows(4)
    with pytest.raises(ValueError, match="got 3 sequences per rank, plan says 4"):
        plan.check_rows(3)


def test_warmup_then_cosine_to_min_ratio():
    opt = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, opt, total_steps=20) for s in range(25)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert all(a > b for a, b in zip(lrs[4:19], lrs[5:20]))  # strictly decaying
    assert lrs[19] == pytest.approx(0.1) and lrs[24] == pytest.approx(0.1)
    assert lrs[4 + 7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lr_factor(0, 0, 1, 0.3) == 1.0  # no warmup, one step: the peak lr


def test_ds_config_follows_our_config_and_batch_plan():
    from trellis.parallel.engine import ds_config
    opt = OptimConfig(lr=1e-3, weight_decay=0.05, grad_clip=0.5, betas=[0.8, 0.9])
    par = ParallelConfig(num_workers=2, zero_stage=3, offload_optimizer=True,
                         offload_params=True, precision="bf16", micro_batch_size=4, grad_accum=3)
    plan = BatchPlan.from_config(par, 64)
    cfg = ds_config(opt, par, plan)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24 == plan.global_batch_sequences
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 0.5
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert (params["lr"], params["weight_decay"], params["betas"]) == (1e-3, 0.05, [0.8, 0.9])
    frozen = ds_config(None, par, plan, trainable=False)
    buckets = {"reduce_bucket_size": par.bucket_elements,
               "allgather_bucket_size": par.bucket_elements}
    assert "optimizer" not in frozen and frozen["zero_optimization"] == {
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}, **buckets,
        "stage3_param_persistence_threshold": 0,  # every parameter partitioned by default
        "stage3_prefetch_bucket_size": par.bucket_elements}
    par2 = ParallelConfig(zero_stage=2)
    assert ds_config(None, par2, BatchPlan.from_config(par2, 8), trainable=False)[
        "zero_optimization"] == {"stage": 0, **buckets}  # ZeRO-1/2 shard optimizer state: none when frozen
    with pytest.raises(ValueError, match="trainable engine needs an OptimConfig"):
        ds_config(None, par2, BatchPlan.from_config(par2, 8))


@pytest.mark.integration
def test_importing_parallel_needs_neither_ray_nor_deepspeed_and_local_group_no_ray(tmp_path):
    code = ("import sys, trellis.parallel, trellis.parallel.engine, trellis.parallel.worker_group\n"
            "import trellis.parallel.checkpoint, trellis.parallel.placement\n"
            "from trellis.parallel import Engine, WorkerGroup, LocalGroup, ParallelConfig\n"
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))\n"
            "class W:\n"
            "    def __init__(self, rank, world_size): self.r = rank\n"
            "    def rank(self): return self.r\n"
            "g = LocalGroup(W, ParallelConfig())\n"
            "print(g.call('rank'), 'ray' in sys.modules)\n")
    # From outside the repo: the folders must not be importable under their bare names.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.split("\n")[:2] == ["[]", "[0] False"], out.stdout
