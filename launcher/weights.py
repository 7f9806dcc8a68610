"""Weights that move between stages: a run directory's checkpoint consolidated into trellis's
own weight files (model/io.py), or a local Hugging Face directory, materialised once per job
into RUN_DIR/<name> so every worker loads the same files. Nothing here unpickles: engine
checkpoints are read weights_only (parallel.safe_load), weight directories as safetensors;
a refused file raises parallel.checkpoint.CheckpointError, one line naming it."""
from __future__ import annotations

import json
from pathlib import Path

from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, copy_tokenizer
from trellis.launcher.config_loader import ConfigError
from trellis.model.io import META, is_module_dir, load_full_state_dict, read_meta, save_module
from trellis.parallel.checkpoint import CheckpointError

RUN_MODEL = "run_model.json"  # written by every training job: {model, head, engine}


def write_run_model(run_dir: Path, model_cfg: dict, head: str, engine: str = "model") -> None:
    (run_dir / RUN_MODEL).write_text(json.dumps({"model": model_cfg, "head": head,
                                                 "engine": engine}, indent=2) + "\n")


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    from trellis.parallel import checkpoint

    if step is None:
        path = checkpoint.latest_complete(run_dir)
        if path is None:
            raise ConfigError(f"run dir '{run_dir}' has no complete checkpoint")
        return path
    if not checkpoint.is_complete(run_dir, step):
        done = [s for s, _ in checkpoint.list_complete(run_dir)]
        raise ConfigError(f"run dir '{run_dir}' has no complete checkpoint of step {step} "
                          f"(complete: {', '.join(map(str, done)) or 'none'})")
    return checkpoint.step_dir(run_dir, step)


def consolidate_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """A training run's checkpoint (latest complete, or `step`) -> trellis weight files."""
    from trellis.model.build import build_model
    from trellis.model.config import ModelConfig
    from trellis.parallel.engine import Engine

    run_dir = Path(run_dir)
    meta_file = run_dir / RUN_MODEL
    if not meta_file.is_file():
        raise ConfigError(f"'{run_dir}' is not a trellis run directory (no {RUN_MODEL})")
    meta = json.loads(meta_file.read_text())
    cfg = ModelConfig.from_saved(meta["model"])
    path = find_checkpoint(run_dir, step) / meta["engine"]
    state = Engine.consolidate(path)  # weights_only reads; CheckpointError when refused
    module = build_model(cfg, meta["head"])
    try:
        load_full_state_dict(module, state, str(path))
    except ValueError as e:  # the checkpoint's weights do not fit run_model.json
        raise CheckpointError(str(e)) from None
    extra = {"source": str(run_dir), "source_fingerprint": source_fingerprint(run_dir, step)}
    tok = run_dir / TOKENIZER_FILE
    out = save_module(module, cfg, meta["head"], out_dir, extra)
    if tok.is_file():
        copy_tokenizer(tok, out)
    return out


def source_fingerprint(source: Path, step: int | None = None) -> str:
    """What `materialize` made its copy from: a run dir's chosen checkpoint (its path and
    completion marker's mtime), or an HF dir's files (name, size, mtime). A re-run stage
    writes a new marker, so its consumers' copies no longer match and are rebuilt."""
    from trellis.parallel.checkpoint import MARKER
    if (source / RUN_MODEL).is_file():
        ckpt = find_checkpoint(source, step)
        return f"{ckpt.resolve()}@{(ckpt / MARKER).stat().st_mtime_ns}"
    files = sorted(f for f in source.iterdir() if f.is_file())
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def materialize(source: str | Path, dest: str | Path) -> Path:
    """`source` = a trellis weight dir, a run dir, or a local HF GPT-2/BERT dir -> trellis
    weight files at `dest`, reused only when made from the same source state (a re-run
    stage's consumers get its new weights, never the old copy)."""
    source, dest = Path(source), Path(dest)
    if is_module_dir(source):
        return source
    if is_module_dir(dest) and source.is_dir() and \
            read_meta(dest).get("source_fingerprint") == source_fingerprint(source):
        return dest
    if (source / RUN_MODEL).is_file():
        return consolidate_run(source, dest)
    if (source / "config.json").is_file():
        from trellis.model.hf import UnsafeWeightsError, load_hf_pretrained
        try:
            module, cfg = load_hf_pretrained(source)
        except UnsafeWeightsError as e:  # only pytorch_model.bin: refused, never unpickled
            raise CheckpointError(str(e)) from None
        head = "lm" if cfg.arch == "gpt" else "mlm"
        out = save_module(module, cfg, head, dest, {"source": str(source),
                                                    "source_fingerprint": source_fingerprint(source)})
        tok = source / TOKENIZER_FILE
        if tok.is_file():
            copy_tokenizer(tok, out)
        return out
    raise ConfigError(f"'{source}' is neither a trellis run directory, trellis weights "
                      f"({META}) nor a Hugging Face model directory (config.json)")
