"""`trellis pretrain --set train.objective=seq2seq`: the run dir of a translation model.

data.path (and data.val_path) name either a folder made by `trellis ingest --kind
translation` or {source, target} JSONL / Parquet files, ingested once into RUN_DIR/data/
(a bad record fails at once, naming its file and line). Without data.path, the generated
language pair (data_pipeline/translation_pair.py) is written to RUN_DIR/pairs/ and used, as
the clm objective uses the embedded corpus. The tokenizer is tokenizer.path, else
the ingested folder's, else one trained on the pairs' text into RUN_DIR/tokenizer.model (one
joint vocabulary, as the shared embedding wants). Every pair must fit data.seq_len with its
EOS; the first that does not is a one-line error naming its file and line.

A fresh run first scores the untrained model (same seed, same held-out pairs) so the BLEU
it ends with has its baseline next to it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

from trellis.data_pipeline.seq2seq_collate import check_pair_lengths
from trellis.data_pipeline.shards import MANIFEST_NAME
from trellis.data_pipeline.structured import StructuredDataset, ingest_structured
from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer, copy_tokenizer, train_tokenizer
from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig

WORKER = "trellis.launcher.jobs.pretrain.seq2seq_worker:Seq2SeqWorker"


def _is_ingested(path: str) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def _pair_texts(paths: list[str]) -> Iterator[str]:
    """Source and target texts of the input files (what a new tokenizer trains on)."""
    from trellis.data_pipeline.inputs import Row, detect_format, expand_paths, read_rows
    for path in expand_paths(paths):
        for item in read_rows(path, detect_format(path, "auto")):
            if isinstance(item, Row):
                for key in ("source", "target"):
                    if isinstance(item.data.get(key), str):
                        yield item.data[key]


def _tokenizer(cfg: PretrainJobConfig, run_dir: Path, paths: list[str]) -> Tokenizer:
    own = run_dir / TOKENIZER_FILE
    if cfg.tokenizer.path:
        src = cfg.tokenizer.path
    elif _is_ingested(paths[0]):
        src = json.loads((Path(paths[0]) / MANIFEST_NAME).read_text()).get("tokenizer_path", "")
    elif own.is_file():  # trained by an earlier start of this run
        return Tokenizer(own)
    else:
        return train_tokenizer(cfg.tokenizer, list(_pair_texts(paths)), own)
    if not src or not Path(src).is_file():
        raise ConfigError(f"config key 'tokenizer.path': no tokenizer file for '{paths[0]}' "
                          f"({src or 'none recorded'})")
    copy_tokenizer(src, run_dir)
    return Tokenizer(own)


def _rows(path: str, tok: Tokenizer, dest: Path) -> Path:
    """An ingested folder as is; files ingested (once) into `dest`, failing on a bad record."""
    if _is_ingested(path):
        return Path(path)
    if not _is_ingested(str(dest)):
        ingest_structured("translation", [path], tok, dest, on_error="fail", verbose=False)
    return dest


def _splits(cfg: PretrainJobConfig, train: StructuredDataset, val: StructuredDataset | None
            ) -> tuple[list[int] | None, list[int] | None]:
    """Train/val row indices of the training table (None: whole tables)."""
    from trellis.data_pipeline.row_stream import split_rows
    world, mb = cfg.parallel.num_workers, cfg.parallel.micro_batch_size
    train_rows = val_rows = None
    n_train, n_val = len(train), len(val) if val is not None else 0
    if val is None:
        if cfg.data.val_fraction <= 0:
            raise ConfigError("config key 'data.val_fraction': seq2seq needs held-out pairs for "
                              "BLEU (set data.val_fraction > 0 or data.val_path)")
        train_rows, val_rows = split_rows(n_train, cfg.data.val_fraction, cfg.data.seed)
        n_train, n_val = len(train_rows), len(val_rows)
    if n_train // world < mb:
        raise ConfigError(f"config key 'data.path': {n_train} training pairs are too few for "
                          f"{world} ranks x micro-batch {mb} (parallel.micro_batch_size)")
    if n_val // world < 1:
        raise ConfigError(f"config key 'data.val_fraction': {n_val} held-out pairs are too "
                          f"few for {world} ranks (at least one pair per rank)")
    return train_rows, val_rows


def seq2seq_spec(cfg: PretrainJobConfig) -> Any:
    """Prepare the run dir (tokenizer, ingested pairs, checks) and describe the workers."""
    from trellis.launcher.driver_loop import LoopSpec
    from trellis.launcher.job_flags import cpu_defaults
    from trellis.launcher.weights import write_run_model

    cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths, val_path = _inputs(cfg, run_dir)
    tok = _tokenizer(cfg, run_dir, paths)
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than "
                          f"the tokenizer's vocabulary ({tok.vocab_size}, {tok.path})")
    train_dir = _rows(paths[0], tok, run_dir / "data" / "train")
    val_dir = _rows(val_path, tok, run_dir / "data" / "val") if val_path else None
    train = StructuredDataset(train_dir, tok.sha256, cfg.model.vocab_size)
    val = StructuredDataset(val_dir, tok.sha256, cfg.model.vocab_size) if val_dir else None
    for ds in (train, val):
        if ds is not None:
            check_pair_lengths(ds, cfg.data.seq_len)
    train_rows, val_rows = _splits(cfg, train, val)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    write_run_model(run_dir, dataclasses.asdict(cfg.model), "seq2seq")
    kwargs = {"cfg": dataclasses.asdict(cfg), "train_dir": str(train_dir),
              "val_dir": str(val_dir) if val_dir else None, "train_rows": train_rows,
              "val_rows": val_rows, "run_dir": str(run_dir), "tokenizer_sha256": tok.sha256}
    from trellis.parallel.checkpoint import latest_complete
    before = {}
    if cfg.train.bleu_pairs and latest_complete(run_dir) is None:
        held = val if val is not None else train
        before = untrained_scores(cfg, held, val_rows if val is None else list(range(len(val))),
                                  tok)
        print(f"seq2seq: untrained model: {_fmt(before)} on {cfg.train.bleu_pairs} held-out "
              f"pairs", flush=True)
    return LoopSpec(role="pretrain", worker=WORKER, worker_kwargs=kwargs,
                    finish=_show_translations(cfg, before))


def _inputs(cfg: PretrainJobConfig, run_dir: Path) -> tuple[list[str], str]:
    """Training input paths and the held-out path ('' = split off val_fraction)."""
    if not (cfg.data.path or cfg.data.sources):
        from trellis.data_pipeline.translation_pair import write_language_pair
        pairs = run_dir / "pairs"
        train, val = pairs / "train.jsonl", pairs / "val.jsonl"
        if not (train.is_file() and val.is_file()):
            write_language_pair(pairs, seed=cfg.data.seed)
        return [str(train)], str(val)
    paths = [s.path for s in cfg.data.resolved_sources()]
    if len(paths) > 1:
        raise ConfigError("config key 'data.sources': seq2seq reads one source (data.path)")
    return paths, cfg.data.val_path


def untrained_scores(cfg: PretrainJobConfig, ds: StructuredDataset, rows: list[int],
                     tok: Tokenizer) -> dict[str, float]:
    """BLEU/chrF of the model the workers start from (same seed) on the first bleu_pairs rows."""
    from trellis.data_pipeline.seq2seq_collate import Seq2SeqCollator
    from trellis.launcher.jobs.pretrain.translation_eval import score_translations, translate_rows
    from trellis.model.build import build_model
    from trellis.parallel.rng import seed_all

    seed_all(cfg.seed)
    model = build_model(cfg.model, "seq2seq")
    picked = ds.rows(rows[:cfg.train.bleu_pairs])
    tcfg = dataclasses.replace(cfg.translate, max_new_tokens=min(cfg.translate.max_new_tokens,
                                                                 cfg.data.seq_len))
    hyps = translate_rows(model, picked, Seq2SeqCollator(cfg.data.seq_len), tok, tcfg,
                          cfg.parallel.micro_batch_size)
    return score_translations(hyps, [r["target"] for r in picked])


def _fmt(scores: dict[str, float]) -> str:
    return f"BLEU {scores.get('bleu', 0.0):.1f}, chrF {scores.get('chrf', 0.0):.1f}"


def _show_translations(cfg: PretrainJobConfig, before: dict[str, float]):
    def finish(group: Any) -> dict[str, Any]:
        n = cfg.train.sample_translations
        samples = group.call("sample_translations", n)[0] if n else []
        for s in samples:
            print(f"  source:    {s['source']}\n  reference: {s['reference']}\n"
                  f"  model:     {s['translation']}", flush=True)
        if before:
            print(f"seq2seq: untrained model (same seed): {_fmt(before)}", flush=True)
        return {"translations": samples} | {f"untrained_{k}": v for k, v in before.items()}
    return finish
