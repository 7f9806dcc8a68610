"""`trellis export RUN_DIR [--step N] --out DIR`: consolidate a checkpoint's ZeRO shards (any
stage, DeepSpeed's own consolidation) and write Hugging Face safetensors + config.json + the
tokenizer, loadable by transformers with no trellis code. Score and value models (RM, critic)
have no HF architecture; `--format trellis` writes trellis's own weight files for any head."""
from __future__ import annotations

import argparse
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
    from trellis.model.hf import save_hf_pretrained
    from trellis.model.io import load_module

    if fmt == "trellis":
        return consolidate_run(run_dir, out, step)
    with tempfile.TemporaryDirectory(dir=Path(out).parent if Path(out).parent.exists() else None) as tmp:
        weights = consolidate_run(run_dir, tmp, step)
        module, cfg, meta = load_module(weights)
        if meta["head"] not in ("lm", "mlm"):
            raise ConfigError(f"run dir '{run_dir}' holds a '{meta['head']}' model, which has no "
                              f"Hugging Face architecture; use --format trellis")
        tok = Path(run_dir) / TOKENIZER_FILE
        if not tok.is_file():
            return save_hf_pretrained(module, cfg, out)
        spm = Tokenizer(tok)  # the special ids the model was trained with
        return save_hf_pretrained(module, cfg, out, str(tok), bos_id=spm.bos_id,
                                  eos_id=spm.eos_id)


def run(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.out, args.step, args.format)
    print(f"exported {args.run_dir} -> {out}")
    return 0
