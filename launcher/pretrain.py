"""`trellis pretrain`: prepare the data, then run the shared training loop (launcher/train_loop)
over PretrainWorker ranks: Ray actors, or one in-process worker with --local."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from launcher.cli import add_job_arguments
from launcher.config import ConfigError, dump_yaml, load_config
from launcher.job_config import PretrainJobConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    add_run_arguments(p)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every training job shares (pretrain, sft, rm)."""
    p.add_argument("--local", action="store_true",
                   help="run one worker in this process, without Ray (debuggers work)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker deaths to recover from (overrides train.max_failures)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even when the run dir has a checkpoint")


def resolve_config(cls: type, args: argparse.Namespace) -> Any:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.max_failures is not None:
        overrides.append(f"train.max_failures={args.max_failures}")
    if args.no_resume:
        overrides.append("checkpoint.resume=false")
    cfg = load_config(cls, args.config, overrides)
    if args.local and cfg.parallel.num_workers != 1:
        raise ConfigError(f"config key 'parallel.num_workers': --local runs one worker, "
                          f"got {cfg.parallel.num_workers}")
    return cfg


def cpu_defaults() -> None:
    """Without CUDA, tell DeepSpeed it is on CPU (else it probes and warns) and keep Ray on
    loopback; explicit settings in the environment win."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pretrain(cfg: PretrainJobConfig, local: bool = False,
             address: str | None = None) -> dict[str, Any]:
    """Prepare the data, train, and return the final metrics (step, loss, val_*, sample)."""
    from launcher.train_loop import train_with_recovery

    return train_with_recovery(cfg, pretrain_spec(cfg), Path(cfg.run_dir), local=local,
                               address=address)


def pretrain_spec(cfg: PretrainJobConfig) -> Any:
    """Prepare the run dir (data, tokenizer, teacher, config) and describe the workers."""
    from launcher.pretrain_data import prepare_data
    from launcher.run_model import materialize, write_run_model
    from launcher.train_loop import LoopSpec
    from model.flops import flops_per_token

    cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, run_dir)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than "
                          f"the tokenizer's vocabulary ({data.vocab_size}, {data.tokenizer_path})")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    model_cfg, head = cfg.model, ("lm" if cfg.train.objective == "clm" else "mlm")
    kwargs = {"cfg": dataclasses.asdict(cfg), "data_dir": str(data.train_dir),
              "val_dir": str(data.val_dir) if data.val_dir else None, "run_dir": str(run_dir),
              "tokenizer_sha256": data.tokenizer_sha256}
    if cfg.train.objective == "distill":
        from model.distill import student_config
        from model.io import read_meta
        from model.config import ModelConfig
        teacher = materialize(cfg.distill.teacher, run_dir / "teacher")
        kwargs["teacher_dir"] = str(teacher)
        model_cfg = student_config(ModelConfig(**read_meta(teacher)["model"]), cfg.model.dropout)
    write_run_model(run_dir, dataclasses.asdict(model_cfg), head)
    return LoopSpec(role="pretrain", worker="launcher.pretrain_worker:PretrainWorker",
                    worker_kwargs=kwargs,
                    flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len),
                    finish=_sampler(cfg, data) if cfg.model.arch == "gpt" else None)


def _sampler(cfg: PretrainJobConfig, data: Any):
    def finish(group: Any) -> dict[str, Any]:
        if not cfg.train.sample_tokens:
            return {}
        from data_pipeline.tokenizer import Tokenizer
        tok = Tokenizer(data.tokenizer_path)
        out = group.call("sample", tok.encode(data.sample_prompt), cfg.train.sample_tokens,
                         tok.eos_id)[0]
        return {"sample": data.sample_prompt + tok.decode(out)}
    return finish


def print_result(result: dict[str, Any]) -> None:
    loss = result["loss"]
    extra = " ".join(f"{k} {v:.4f}" for k, v in result.items()
                     if k.startswith("val_") and isinstance(v, float))
    print(f"final: step {result['step']} "
          + (f"train loss {loss:.4f}" if loss == loss else "(nothing left to train)")
          + (f" {extra}" if extra else ""))
    if result.get("sample"):
        print("sample:", result["sample"])


def run(args: argparse.Namespace) -> int:
    print_result(pretrain(resolve_config(PretrainJobConfig, args), local=args.local,
                          address=args.address))
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m launcher.pretrain
    from launcher.cli import main as cli_main
    return cli_main(["pretrain", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
