"""The `trellis` command line. Each subcommand lives in its own module and is imported
only when it runs, so `trellis --help` stays fast and needs neither Ray nor DeepSpeed."""
from __future__ import annotations

import argparse
import importlib
import sys

from trellis.launcher.config_loader import ConfigError

# name -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("trellis.launcher.jobs.ingest.driver", "tokenize raw text/JSONL/Parquet into Arrow shards + manifest"),
    "pretrain": ("trellis.launcher.jobs.pretrain.driver", "pretrain a GPT (clm), BERT (mlm) or distilled student"),
    "sft": ("trellis.launcher.jobs.finetune.driver", "supervised fine-tuning on demonstrations (prompt + answer)"),
    "rm": ("trellis.launcher.jobs.finetune.driver", "train a reward model on ranked comparisons"),
    "ppo": ("trellis.launcher.jobs.ppo.driver", "RLHF: PPO of a policy against a reward model, KL to a reference"),
    "pipeline": ("trellis.launcher.jobs.pipeline.driver", "pretrain -> SFT -> RM -> PPO -> export on the embedded demo"),
    "export": ("trellis.launcher.jobs.export.driver", "export a checkpoint as Hugging Face safetensors + config.json"),
    "cluster": ("trellis.launcher.commands.cluster", "start/stop/show a local Ray head (loopback, token auth)"),
    "submit": ("trellis.launcher.commands.ray_jobs", "submit a job config to a Ray cluster (Ray Jobs API)"),
    "jobs": ("trellis.launcher.commands.ray_jobs", "list submitted jobs; status, logs or stop one"),
    "plot": ("trellis.launcher.commands.plot", "render PNG curves from a run directory's metrics CSVs"),
}


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by every job subcommand."""
    p.add_argument("--config", help="YAML job config (see launcher/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trellis", description="Train transformer LMs: pretrain, fine-tune, RLHF.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = sys.argv[1:]
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import a subcommand's module only when it is the one being run.
        if name in argv:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args()
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"trellis {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
