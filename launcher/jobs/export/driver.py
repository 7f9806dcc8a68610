"""`trellis export RUN_DIR [--step N] --out DIR`: consolidate a checkpoint's ZeRO shards (any
stage, DeepSpeed's own consolidation) and write Hugging Face safetensors + config.json + the
tokenizer, loadable by transformers with no trellis code. Score and value models (RM, critic)
have no HF architecture; `--format trellis` writes trellis's own weight files for any head.

The tokenizer goes in twice: trellis's SentencePiece tokenizer.model, and tokenizer.json +
tokenizer_config.json converted from it (data_pipeline/hf_tokenizer.py), which
``AutoTokenizer.from_pretrained`` reads and which encode to the same ids as trellis. Where the
conversion would not be exact (a unigram tokenizer) tokenizer.json is left out with a note.
config.json declares no BOS id: trellis never puts BOS before a sequence, so a BOS a user
added would be a token the model never saw.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer
from trellis.launcher.config_loader import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory with checkpoints/ and run_model.json")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("hf", "trellis"), default="hf",
                   help="hf: transformers' GPT-2/BERT format; trellis: model.safetensors + model.json")


def export(run_dir: str | Path, out: str | Path, step: int | None = None,
           fmt: str = "hf") -> Path:
    from trellis.launcher.weights import consolidate_run

    if fmt == "trellis":
        return consolidate_run(run_dir, out, step)
    with tempfile.TemporaryDirectory(dir=Path(out).parent if Path(out).parent.exists() else None) as tmp:
        weights = consolidate_run(run_dir, tmp, step)
        return export_weights(weights, out, Path(run_dir) / TOKENIZER_FILE, source=run_dir)


def export_weights(weights: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                   source: str | Path | None = None) -> Path:
    """trellis weight files (model/io) -> a Hugging Face directory at `out`: config.json,
    model.safetensors and, when `tokenizer` (a SentencePiece .model) exists, the tokenizer
    files. `source` names the run dir in errors."""
    from trellis.model.hf import save_hf_pretrained
    from trellis.model.io import load_module

    module, cfg, meta = load_module(weights)
    if meta["head"] == "seq2seq":  # an encoder-decoder: transformers' MarianMTModel
        return _export_seq2seq(module, cfg, out, tokenizer)
    if meta["head"] not in ("lm", "mlm"):
        raise ConfigError(f"run dir '{source or weights}' holds a '{meta['head']}' model, which "
                          f"has no Hugging Face architecture; use --format trellis")
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is None or not tok.is_file():
        return save_hf_pretrained(module, cfg, out)
    spm = Tokenizer(tok)  # the special ids the model was trained with
    # No BOS: trellis's data never starts a sequence with it (Tokenizer.encode adds none).
    path = save_hf_pretrained(module, cfg, out, str(tok), bos_id=None, eos_id=spm.eos_id)
    write_tokenizer_files(tok, path, cfg.max_seq_len, cfg.arch)
    return path


def _export_seq2seq(module, cfg, out: str | Path, tokenizer: str | Path | None) -> Path:
    """MarianMTModel directory; the decoder starts from BOS, as trellis trains it."""
    from trellis.model.hf_seq2seq import save_marian_pretrained

    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is None or not tok.is_file():
        return save_marian_pretrained(module, cfg, out)
    spm = Tokenizer(tok)
    path = save_marian_pretrained(module, cfg, out, str(tok), bos_id=spm.bos_id,
                                  eos_id=spm.eos_id)
    write_tokenizer_files(tok, path, cfg.max_seq_len, cfg.arch)
    return path


def write_tokenizer_files(tok: str | Path, out: str | Path, max_len: int, arch: str) -> list[Path]:
    """tokenizer.json (when exact), tokenizer_config.json, special_tokens_map.json for the
    SentencePiece model `tok` in `out`. Without tokenizer.json, transformers builds a tokenizer
    from tokenizer.model itself (the config still names the class and trellis's special
    tokens, so it never falls back to GPT-2's byte-level tokenizer); a note says so."""
    from trellis.data_pipeline.hf_tokenizer import (TOKENIZER_JSON, HFTokenizerUnsupported,
                                                    write_hf_tokenizer, write_tokenizer_config)

    # trellis generates from left-padded prompts (model/generate.py); BERT pads on the right.
    side = "left" if arch == "gpt" else "right"
    try:
        return write_hf_tokenizer(tok, out, model_max_length=max_len, padding_side=side)
    except HFTokenizerUnsupported as e:
        stale = Path(out) / TOKENIZER_JSON
        stale.unlink(missing_ok=True)  # one from an earlier export would not match this model
        print(f"trellis export: note: {TOKENIZER_JSON} not written: {e}. transformers will "
              f"build its own tokenizer from {TOKENIZER_FILE}; check its ids against trellis's.",
              file=sys.stderr)
        return write_tokenizer_config(tok, out, model_max_length=max_len, padding_side=side)


def run(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.out, args.step, args.format)
    print(f"exported {args.run_dir} -> {out}")
    return 0
