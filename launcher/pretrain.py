"""`trellis pretrain`: the driver. It prepares the data, starts a worker group (Ray actors, or
one in-process worker with --local), steps it, logs, checkpoints, evaluates, and restarts the
group from the latest complete checkpoint when a worker dies (--max-failures)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from launcher.cli import add_job_arguments
from launcher.config import ConfigError, dump_yaml, load_config
from launcher.job_config import PretrainJobConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    p.add_argument("--local", action="store_true",
                   help="run one worker in this process, without Ray (debuggers work)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker deaths to recover from (overrides train.max_failures)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even when the run dir has a checkpoint")


def resolve_config(args: argparse.Namespace) -> PretrainJobConfig:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.max_failures is not None:
        overrides.append(f"train.max_failures={args.max_failures}")
    if args.no_resume:
        overrides.append("checkpoint.resume=false")
    cfg = load_config(PretrainJobConfig, args.config, overrides)
    if args.local and cfg.parallel.num_workers != 1:
        raise ConfigError(f"config key 'parallel.num_workers': --local runs one worker, "
                          f"got {cfg.parallel.num_workers}")
    return cfg


def _cpu_defaults() -> None:
    """Without CUDA, tell DeepSpeed it is on CPU (else it probes and warns) and keep Ray on
    loopback; explicit settings in the environment win."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pretrain(cfg: PretrainJobConfig, local: bool = False,
             address: str | None = None) -> dict[str, Any]:
    """Prepare the data, train, and return the final metrics (step, loss, val_loss, sample)."""
    from launcher.pretrain_data import prepare_data
    from launcher.pretrain_loop import train_with_recovery

    _cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, run_dir)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than "
                          f"the tokenizer's vocabulary ({data.vocab_size}, {data.tokenizer_path})")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return train_with_recovery(cfg, data, run_dir, local=local, address=address)


def run(args: argparse.Namespace) -> int:
    result = pretrain(resolve_config(args), local=args.local, address=args.address)
    loss = result["loss"]
    print(f"final: step {result['step']} "
          + (f"train loss {loss:.4f}" if loss == loss else "(nothing left to train)")
          + (f" val loss {result['val_loss']:.4f} ppl {result['val_ppl']:.2f}"
             if "val_loss" in result else ""))
    if result.get("sample"):
        print("sample:", result["sample"])
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m launcher.pretrain
    from launcher.cli import main as cli_main
    return cli_main(["pretrain", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
