"""`trellis ingest`: raw text / JSONL / Parquet / Arrow -> tokenized Arrow shards + manifest.

    trellis ingest data/*.jsonl --out runs/data                 # trains a tokenizer first
    trellis ingest corpus/ --out runs/data --tokenizer tok.model --processes 4
    trellis ingest --config ingest.yaml --set shard_tokens=1000000
    trellis ingest prefs.jsonl --kind comparisons --tokenizer tok.model --out runs/rm
    trellis ingest pairs.jsonl --kind translation --tokenizer tok.model --out runs/mt
    trellis ingest --out runs/data                              # the built-in default corpus

Positional inputs form one source named "default" (use a config for several named
sources). Rerunning the same command resumes: finished shards are kept.

Exit status: 0 when every input record was ingested (blank records and long_docs=skip
aside); 1 when nothing was written, a whole input file was skipped, more than
--max-skipped of the records were skipped (after printing them; all are listed in
OUT/skipped.txt and the manifest is written), or the data or tokenizer failed; 2 for a
bad command line or config (an input path that matches nothing, a missing --tokenizer file).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from trellis.launcher.config_loader import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    from trellis.launcher.cli import add_job_arguments
    add_job_arguments(p)
    p.add_argument("inputs", nargs="*", help="files, directories or globs (one source)")
    p.add_argument("--out", help="output folder (config key out_dir)")
    p.add_argument("--tokenizer", help="SentencePiece .model to use (tokenizer.path)")
    p.add_argument("--kind", choices=["tokens", "demonstrations", "comparisons", "prompts",
                                      "dialogue", "translation"],
                   help="what the inputs hold (default tokens)")
    p.add_argument("--format", choices=["auto", "text", "jsonl", "parquet", "arrow"])
    p.add_argument("--text-mode", choices=["file", "blocks", "lines"],
                   help="plain text: a document per file, blank-line block or line")
    p.add_argument("--text-field", help="JSONL field / column with the text (default text)")
    p.add_argument("--shard-tokens", type=int, help="target tokens per shard")
    p.add_argument("--processes", type=int, help="tokenizing processes")
    p.add_argument("--ray", action="store_true", help="run tasks on the attached Ray cluster")
    p.add_argument("--fail-on-error", action="store_true",
                   help="abort at the first bad record instead of skipping and counting")
    p.add_argument("--max-skipped", type=_fraction, metavar="FRACTION",
                   help="fraction of input records that may be skipped before the command "
                        "exits 1 (default 0: any skipped record fails, after the full report; "
                        "blank records and long_docs=skip are not counted; a whole skipped "
                        "file fails unless FRACTION is 1)")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return v


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.overrides)
    for flag, key in (("out", "out_dir"), ("tokenizer", "tokenizer.path"), ("kind", "kind"),
                      ("max_skipped", "max_skipped"),
                      ("shard_tokens", "shard_tokens"), ("processes", "processes")):
        value = getattr(args, flag)
        if value is not None:
            sets.append(f"{key}={value}")
    if args.ray:
        sets.append("backend=ray")
    if args.fail_on_error:
        sets.append("on_error=fail")
    return sets


def config_from_args(args: argparse.Namespace) -> Any:
    """The IngestConfig of --config/--set plus this command's own flags and inputs."""
    from trellis.data_pipeline.config import IngestConfig, InputSource

    cfg = load_config(IngestConfig, args.config, _overrides(args), job="ingest")
    if args.inputs:
        try:
            src = InputSource(name="default", paths=list(args.inputs),
                              format=args.format or "auto", text_mode=args.text_mode or "file",
                              text_field=args.text_field or "text")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cfg.sources = [src]
    return cfg


def check_config(cfg: Any) -> None:
    """ConfigError (exit 2) for what the user named but is not there: input paths that match
    nothing, a tokenizer file that does not exist, a structured kind without tokenizer or
    inputs."""
    from pathlib import Path

    from trellis.data_pipeline.inputs import expand_paths
    from trellis.data_pipeline.shards import DataError
    from trellis.data_pipeline.tokenizer import TOKENIZER_FILE

    for src in cfg.sources:
        try:
            expand_paths(src.paths)
        except DataError as e:
            raise ConfigError(str(e)) from None
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_file():
        raise ConfigError(f"config key 'tokenizer.path': {cfg.tokenizer.path}: no such file")
    if cfg.kind != "tokens":
        if not cfg.sources:
            raise ConfigError(f"ingest of {cfg.kind}: give input files (sources)")
        if not cfg.tokenizer.path and not (Path(cfg.out_dir) / TOKENIZER_FILE).is_file():
            raise ConfigError(f"ingest of {cfg.kind}: give --tokenizer (tokenizer.path), the "
                              "model's tokenizer")


def run(args: argparse.Namespace) -> int:
    from trellis.data_pipeline.ingest_job import ingest_failure, ingest_from_config
    from trellis.data_pipeline.shards import DataError
    from trellis.data_pipeline.tokenizer import TokenizerError

    cfg = config_from_args(args)
    check_config(cfg)
    if cfg.backend == "ray":
        import ray
        ray.init(address="auto", ignore_reinit_error=True)
    try:
        m = ingest_from_config(cfg)
    except (DataError, TokenizerError) as e:
        print(f"trellis ingest: error: {e}", file=sys.stderr)
        return 1
    skipped = sum(m["skipped"].values())
    print(f"ingested {m['num_documents']} {'documents' if m['kind'] == 'tokens' else 'rows'}, "
          f"{m['num_tokens']} tokens in {len(m['shards'])} shards -> {cfg.out_dir}/manifest.json"
          f" (skipped {skipped})")
    failure = ingest_failure(m, cfg.max_skipped, cfg.out_dir)
    if failure:
        print(f"trellis ingest: error: {failure}", file=sys.stderr)
        return 1
    return 0
