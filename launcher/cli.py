"""The `trellis` command line, built from the job registry (launcher/registry.py). Each
subcommand's module is imported only when it runs, so `trellis --help` stays fast and needs
neither Ray nor DeepSpeed."""
from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also TRELLIS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name in argv:
            cmd.load().add_arguments(p)
    return parser


# Errors that are the user's to fix (config, input data, tokenizer): one line, exit 2; errors
# of a run's own files (a refused or broken checkpoint): one line, exit 1. Looked up in
# sys.modules so the CLI imports no data or engine code to classify: an exception of a
# class whose module was never imported cannot be raised.
_USER_ERRORS = (("trellis.launcher.config_loader", "ConfigError"),
                ("trellis.data_pipeline.shards", "DataError"),
                ("trellis.data_pipeline.tokenizer", "TokenizerError"),
                ("trellis.data_pipeline.stream", "DataStateError"))
_RUN_ERRORS = (("trellis.parallel.checkpoint", "CheckpointError"),
               ("trellis.launcher.jobs.pipeline.report", "FormatGateError"))


def _is(e: BaseException, names: tuple[tuple[str, str], ...]) -> bool:
    types = [getattr(sys.modules.get(m), n, None) for m, n in names]
    return isinstance(e, tuple(t for t in types if isinstance(t, type)))


def exit_code(e: BaseException) -> int | None:
    """2 for the user's config or input, 1 for a run's broken files, None: a bug (traceback)."""
    return 2 if _is(e, _USER_ERRORS) else 1 if _is(e, _RUN_ERRORS) else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    cmd = COMMANDS[args.command]
    debug = args.debug or os.environ.get("TRELLIS_DEBUG", "") not in ("", "0")
    try:
        if getattr(args, "print_config", False) and cmd.config:
            module = cmd.load()  # a command with flags of its own resolves its config itself
            if hasattr(module, "config_from_args"):
                print(dump_yaml_with_docs(module.config_from_args(args)), end="")
            else:
                print_config(cmd.config_class(), args)
            return 0
        return int(cmd.load().run(args) or 0)
    except Exception as e:
        code = exit_code(e)
        if code is None or debug:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"trellis {args.command}: error: {first} (TRELLIS_DEBUG=1 or --debug for the "
              f"traceback)" if code == 1 else f"trellis {args.command}: error: {first}",
              file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
