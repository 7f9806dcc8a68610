"""The `trellis` command line, built from the job registry (launcher/registry.py). Each
subcommand's module is imported only when it runs, so `trellis --help` stays fast and needs
neither Ray nor DeepSpeed."""
from __future__ import annotations

import argparse
import sys

from trellis.launcher.config_loader import ConfigError, dump_yaml_with_docs
from trellis.launcher.job_flags import add_job_arguments, print_config
from trellis.launcher.registry import COMMANDS

__all__ = ["COMMANDS", "add_job_arguments", "build_parser", "main", "version"]


def version() -> str:
    """The installed trellis version, or 'unknown' when it runs from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("trellis")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in `argv` (default sys.argv[1:]) gets its
    arguments, which imports its module."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="trellis", description="Train transformer LMs: pretrain, fine-tune, RLHF.")
    parser.add_argument("--version", action="version", version=f"trellis {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name in argv:
            cmd.load().add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        if getattr(args, "print_config", False) and cmd.config:
            module = cmd.load()  # a command with flags of its own resolves its config itself
            if hasattr(module, "config_from_args"):
                print(dump_yaml_with_docs(module.config_from_args(args)), end="")
            else:
                print_config(cmd.config_class(), args)
            return 0
        return int(cmd.load().run(args) or 0)
    except ConfigError as e:
        print(f"trellis {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
