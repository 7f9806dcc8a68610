"""What every job subcommand shares: its flags, turning them into a config, and the CPU
environment defaults. One place, so the jobs cannot drift apart."""
from __future__ import annotations

import argparse
import os
from typing import Any

from trellis.launcher.config_loader import ConfigError, dump_yaml_with_docs, load_config


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """--config, --set and --print-config: every job subcommand has them."""
    p.add_argument("--config", help="YAML job config (see launcher/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, each key's doc as a comment) and exit")


def add_run_arguments(p: argparse.ArgumentParser, recovery: bool = True) -> None:
    """--config/--set plus --local/--run-dir/--address; `recovery` adds the driver loop's
    --max-failures and --no-resume (pretrain, sft, rm, ppo)."""
    add_job_arguments(p)
    p.add_argument("--local", action="store_true",
                   help="run in this process, without Ray (debuggers work)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    if recovery:
        p.add_argument("--max-failures", type=int, default=None,
                       help="worker deaths to recover from (overrides train.max_failures)")
        p.add_argument("--no-resume", action="store_true",
                       help="start from scratch even when the run dir has a checkpoint")


def resolve_config(cls: type, args: argparse.Namespace) -> Any:
    """The job's config from --config/--set and the flags of add_run_arguments."""
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if getattr(args, "max_failures", None) is not None:  # the driver loop's, where it has one
        key = "train.max_failures" if "train" in _field_names(cls) else "max_failures"
        overrides.append(f"{key}={args.max_failures}")
    if getattr(args, "no_resume", False):
        overrides.append("checkpoint.resume=false")
    cfg = load_config(cls, args.config, overrides, job=getattr(args, "command", None))
    par = getattr(cfg, "parallel", None)
    if getattr(args, "local", False) and par is not None and par.num_workers != 1:
        raise ConfigError(f"config key 'parallel.num_workers': --local runs one worker, "
                          f"got {par.num_workers}")
    return cfg


def _field_names(cls: type) -> set[str]:
    import dataclasses
    return {f.name for f in dataclasses.fields(cls)}


def print_config(cls: type, args: argparse.Namespace) -> None:
    """--print-config: the config the job would run with, as YAML with each key's doc."""
    if hasattr(args, "run_dir"):  # the flags of add_run_arguments
        cfg = resolve_config(cls, args)
    else:
        cfg = load_config(cls, args.config, args.overrides, job=getattr(args, "command", None))
    print(dump_yaml_with_docs(cfg), end="")


def cpu_defaults() -> None:
    """Without CUDA, tell DeepSpeed it is on CPU (else it probes and warns) and keep Ray on
    loopback; explicit settings in the environment win."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def print_result(result: dict[str, Any]) -> None:
    loss = result["loss"]
    extra = " ".join(f"{k} {v:.4f}" for k, v in result.items()
                     if k.startswith("val_") and isinstance(v, float))
    print(f"final: step {result['step']} "
          + (f"train loss {loss:.4f}" if loss == loss else "(nothing left to train)")
          + (f" {extra}" if extra else ""))
    if result.get("sample"):
        print("sample:", result["sample"])
