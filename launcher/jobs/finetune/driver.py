"""`trellis sft` and `trellis rm`: fine-tuning drivers on the shared training loop.

sft: supervised fine-tuning on demonstrations (prompt + accepted answer), loss on response
     tokens only, from a pretrain run (or trellis / local HF GPT-2 weights).
rm:  a reward model: the SFT trunk with a score head, trained on rankings; afterwards the
     head is normalised so the demonstrations score 0 on average (InstructGPT).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, copy_tokenizer
from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.jobs.finetune.config import RMJobConfig, SFTJobConfig
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, print_result, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)


def prepare_rows(source: str, kind: str, tokenizer: Any, dest: Path) -> Path:
    """An ingested folder as is, or files ingested (once) into `dest` with `tokenizer`."""
    from trellis.data_pipeline.shards import MANIFEST_NAME
    from trellis.data_pipeline.structured import ingest_structured

    src = Path(source)
    if (src / MANIFEST_NAME).is_file():
        return src
    if not src.exists() and not any(ch in source for ch in "*?["):
        raise ConfigError(f"{kind} data '{source}' does not exist")
    ingest_structured(kind, [source], tokenizer, dest)
    return dest


def init_weights(init_from: str, run_dir: Path) -> tuple[Path, Any]:
    """`init_from` materialised into RUN_DIR/init, and the tokenizer it was trained with
    (copied into the run dir); a source without one is a one-line config error."""
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.weights import materialize

    init = materialize(init_from, run_dir / "init")
    tok_file = init / TOKENIZER_FILE
    if not tok_file.is_file():
        raise ConfigError(f"config key 'init_from': '{init_from}' comes without a "
                          f"SentencePiece tokenizer.model; trellis needs the tokenizer it was "
                          f"trained with")
    copy_tokenizer(tok_file, run_dir)
    return init, Tokenizer(tok_file)


def check_split_sizes(cfg: SFTJobConfig, n_train: int, n_val: int, val_given: bool) -> None:
    """Before any worker starts: every rank gets a full training micro-batch and at least one
    held-out row (evaluation batches shrink to fit a small held-out split)."""
    world, mb = cfg.parallel.num_workers, cfg.parallel.micro_batch_size
    if n_train // world < mb:
        raise ConfigError(f"config key 'data.train': {n_train} training rows are too few for "
                          f"{world} ranks x micro-batch {mb} (parallel.micro_batch_size)")
    if (val_given or cfg.data.val_fraction > 0) and n_val // world < 1:
        where = "data.val" if val_given else "data.val_fraction"
        raise ConfigError(f"config key '{where}': {n_val} held-out rows are too few for "
                          f"{world} ranks (at least one row per rank)")


def check_packing(cfg: SFTJobConfig, model_meta: dict[str, Any]) -> None:
    """data.packing needs a GPT (block-diagonal attention, positions per row) whose context
    holds a whole block."""
    if not cfg.data.packing:
        return
    if model_meta.get("arch") != "gpt":
        raise ConfigError(f"config key 'data.packing': packed rows need a GPT model; "
                          f"'{cfg.init_from}' is {model_meta.get('arch')}")
    if cfg.data.block_len > model_meta["max_seq_len"]:
        key = "data.pack_len" if cfg.data.pack_len else "data.max_len"
        raise ConfigError(f"config key '{key}': packed blocks of {cfg.data.block_len} tokens "
                          f"exceed the model's max_seq_len {model_meta['max_seq_len']}")


def truncation_counts(prompt_lens: list[int], response_lens: list[list[int]], max_len: int,
                      max_prompt_len: int) -> tuple[int, int]:
    """(rows whose prompt loses its first tokens, rows whose response (+ EOS) is cut) when
    rows are fitted to max_len tokens keeping the prompt's last max_prompt_len (collate._fit)."""
    cut_prompt = cut_response = 0
    for p, rs in zip(prompt_lens, response_lens):
        kept = min(p, max_prompt_len)
        cut_prompt += p > max_prompt_len
        cut_response += any(kept + r + 1 > max_len for r in rs)
    return cut_prompt, cut_response


def report_truncation(ds: Any, cfg: SFTJobConfig, kind: str, where: str) -> dict[str, int]:
    """Long rows are cut, never silently: print how many lose prompt tokens (from the left:
    a conversation keeps its latest turns) and how many responses are cut."""
    t = ds.table
    prompts = [len(x) for x in t.column("prompt_ids").to_pylist()]
    col = "response_ids" if kind == "demonstrations" else "responses_ids"
    responses = [[len(r)] if kind == "demonstrations" else [len(x) for x in r]
                 for r in t.column(col).to_pylist()]
    d = cfg.data
    cut_p, cut_r = truncation_counts(prompts, responses, d.max_len, d.max_prompt_len)
    if cut_p or cut_r:
        print(f"{where}: {cut_p} of {len(prompts)} rows keep only the last "
              f"data.max_prompt_len={d.max_prompt_len} prompt tokens (cut from the left); "
              f"{cut_r} have a response cut at data.max_len={d.max_len}", flush=True)
    return {"prompt_cut": cut_p, "response_cut": cut_r, "rows": len(prompts)}


def _prepare(cfg: SFTJobConfig, kind: str, head: str) -> tuple[Path, dict[str, Any]]:
    from trellis.data_pipeline.row_stream import split_rows
    from trellis.data_pipeline.structured import StructuredDataset
    from trellis.launcher.weights import write_run_model
    from trellis.model.io import read_meta

    cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init, tok = init_weights(cfg.init_from, run_dir)
    train = prepare_rows(cfg.data.train, kind, tok, run_dir / "data" / "train")
    val = prepare_rows(cfg.data.val, kind, tok, run_dir / "data" / "val") if cfg.data.val else None
    train_rows = val_rows = None
    model_meta = read_meta(init)["model"]
    vocab = model_meta["vocab_size"]  # no row may carry an id the model lacks
    check_packing(cfg, model_meta)
    n_train = len(StructuredDataset(train, tok.sha256, vocab))  # fails now on a bad table
    if val is None:
        train_rows, val_rows = split_rows(n_train, cfg.data.val_fraction, cfg.data.seed)
        n_train, n_val = len(train_rows), len(val_rows)
    else:
        n_val = len(StructuredDataset(val, tok.sha256, vocab))
    check_split_sizes(cfg, n_train, n_val, val_given=val is not None)
    report_truncation(StructuredDataset(train, tok.sha256, vocab), cfg, kind, str(cfg.data.train))
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    write_run_model(run_dir, model_meta, head)
    return run_dir, {"cfg": dataclasses.asdict(cfg), "init_dir": str(init),
                     "train_dir": str(train), "val_dir": str(val) if val else None,
                     "train_rows": train_rows, "val_rows": val_rows, "run_dir": str(run_dir)}


def is_done(cfg: Any) -> bool:
    """Does cfg.run_dir hold the complete checkpoint of the schedule's last step?"""
    from trellis.parallel.checkpoint import is_complete
    return is_complete(cfg.run_dir, cfg.train.steps)


def sft(cfg: SFTJobConfig, local: bool = False, address: str | None = None) -> dict[str, Any]:
    from trellis.launcher.driver_loop import LoopSpec, train_with_recovery

    run_dir, kwargs = _prepare(cfg, "demonstrations", "lm")
    spec = LoopSpec(role="sft", worker="trellis.launcher.jobs.finetune.worker:SFTWorker", worker_kwargs=kwargs)
    return train_with_recovery(cfg, spec, run_dir, local=local, address=address)


def rm(cfg: RMJobConfig, local: bool = False, address: str | None = None) -> dict[str, Any]:
    from trellis.launcher.driver_loop import LoopSpec, train_with_recovery

    run_dir, kwargs = _prepare(cfg, "comparisons", "score")
    normalize_dir = None
    if cfg.normalize_on:
        from trellis.data_pipeline.tokenizer import Tokenizer
        normalize_dir = prepare_rows(cfg.normalize_on, "demonstrations",
                                     Tokenizer(run_dir / TOKENIZER_FILE),
                                     run_dir / "data" / "normalize")

    def finish(group: Any) -> dict[str, Any]:
        if normalize_dir is None:
            return {}
        stats = group.call("normalize", str(normalize_dir))[0]
        group.call("save", cfg.train.steps)  # the normalised head is what later stages load
        print(f"rm: demonstrations scored mean {stats['mean']:.4f} std {stats['std']:.4f}; "
              f"the head now maps them to mean 0, std 1", flush=True)
        return {"norm_mean": stats["mean"], "norm_std": stats["std"]}

    spec = LoopSpec(role="rm", worker="trellis.launcher.jobs.finetune.worker:RMWorker", worker_kwargs=kwargs,
                    finish=finish)
    return train_with_recovery(cfg, spec, run_dir, local=local, address=address)


def run(args: argparse.Namespace) -> int:
    if args.command == "sft":
        result = sft(resolve_config(SFTJobConfig, args), args.local, args.address)
    else:
        result = rm(resolve_config(RMJobConfig, args), args.local, args.address)
    print_result(result)
    return 0
