"""`trellis export RUN_DIR [--step N] --out DIR`: consolidate a checkpoint's ZeRO shards (any
stage, DeepSpeed's own consolidation) and write Hugging Face safetensors + config.json + the
tokenizer, loadable by transformers with no trellis code."""
from __future__ import annotations

import argparse
from pathlib import Path

from launcher.config import ConfigError, from_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory with checkpoints/ and config.yaml")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--engine", default="model", help="engine name inside the checkpoint")


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    from parallel import checkpoint

    if step is None:
        path = checkpoint.latest_complete(run_dir)
        if path is None:
            raise ConfigError(f"run dir '{run_dir}' has no complete checkpoint")
        return path
    path = checkpoint.step_dir(run_dir, step)
    checkpoint.read_marker(path)  # raises, naming the path, when incomplete or missing
    return path


def export(run_dir: str | Path, out: str | Path, step: int | None = None,
           engine: str = "model") -> Path:
    import yaml

    from launcher.job_config import PretrainJobConfig
    from model.build import build_model
    from model.hf import save_hf_pretrained
    from parallel.engine import Engine

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"run dir '{run_dir}' has no config.yaml")
    cfg = from_dict(PretrainJobConfig, yaml.safe_load(cfg_file.read_text()))
    ckpt = find_checkpoint(run_dir, step)
    state = Engine.consolidate(ckpt / engine)
    head = "lm" if cfg.model.arch == "gpt" else "mlm"
    model_cfg = cfg.model
    if cfg.train.objective == "distill":
        from model.distill import student_config
        from model.hf import config_from_hf
        import json
        teacher = config_from_hf(json.loads((Path(cfg.distill.teacher) / "config.json").read_text()))
        model_cfg = student_config(teacher, cfg.model.dropout)
    model = build_model(model_cfg, head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output weights may be stored once; anything else missing is a real mismatch.
    real_missing = [k for k in missing if not _is_tied(k)]
    if real_missing or unexpected:
        raise ValueError(f"checkpoint '{ckpt}' does not match the model in config.yaml: "
                         f"missing {real_missing[:3]}, unexpected {list(unexpected)[:3]}")
    tok = run_dir / "tokenizer.model"
    return save_hf_pretrained(model, model_cfg, out, str(tok) if tok.is_file() else None,
                              bos_id=2, eos_id=3)


def _is_tied(key: str) -> bool:
    return key in ("lm_head.weight", "head.decoder.weight")


def run(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.out, args.step, args.engine)
    print(f"exported {args.run_dir} -> {out}")
    return 0
