"""Run an IngestConfig (what `trellis ingest` does): the default corpus when no sources are
given, the tokenizer (given, reused from out_dir, or trained on a sample of the inputs), then
token ingest or structured ingest by kind; and `ingest_failure`, the verdict on a finished
ingest (nothing written, or more skipped than allowed) that makes the command exit 1."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from trellis.data_pipeline.config import IngestConfig, InputSource
from trellis.data_pipeline.inputs import Doc, Piece, Skip, detect_format, expand_paths, read_piece
from trellis.data_pipeline.ingest import BENIGN, FILE_REASONS, ingest
from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer


def sample_documents(sources: Sequence[InputSource], max_chars: int) -> Iterable[str]:
    """Documents from the start of each source, up to `max_chars` in all (tokenizer training)."""
    budget = max_chars
    per_source = max(1, max_chars // max(1, len(sources)))
    for src in sources:
        left = min(per_source, budget)
        for path in expand_paths(src.paths):
            fmt = detect_format(path, src.format)
            for item in read_piece(Piece(str(path), fmt), src.text_mode, src.text_field):
                if isinstance(item, Doc) and item.text.strip():
                    text = item.text[:left]
                    left -= len(text)
                    budget -= len(text)
                    yield text
                if left <= 0:
                    break
            if left <= 0:
                break


def resolve_tokenizer(cfg: IngestConfig, sources: Sequence[InputSource]) -> Tokenizer:
    """cfg.tokenizer.path, else out_dir/tokenizer.model from an earlier run, else train one
    on a sample of the inputs and save it there."""
    from trellis.data_pipeline.tokenizer import train_tokenizer
    if cfg.tokenizer.path:
        return Tokenizer(cfg.tokenizer.path)
    saved = Path(cfg.out_dir) / TOKENIZER_FILE
    if saved.is_file():
        return Tokenizer(saved)
    if cfg.kind != "tokens":
        raise DataError(f"ingest of {cfg.kind}: set tokenizer.path to the model's tokenizer")
    docs = list(sample_documents(sources, cfg.tokenizer_sample_chars))
    if not docs:
        raise DataError(f"{_names(sources)}: no text to train a tokenizer on "
                        f"({_first_skip(sources)}); give inputs with text, or --tokenizer "
                        "(tokenizer.path)")
    return train_tokenizer(cfg.tokenizer, docs, saved)


def _names(sources: Sequence[InputSource], most: int = 3) -> str:
    paths = [p for s in sources for p in s.paths]
    return ", ".join(paths[:most]) + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _first_skip(sources: Sequence[InputSource]) -> str:
    """Why the inputs held no text: the first skipped record that is not merely empty."""
    for src in sources:
        for path in expand_paths(src.paths):
            for item in read_piece(Piece(str(path), detect_format(path, src.format)),
                                   src.text_mode, src.text_field):
                if isinstance(item, Skip) and item.reason not in BENIGN:
                    return f"every record is empty or skipped, e.g. {item.message}"
    return "every document is empty"


# Skips the user asked for (long_docs=skip) or that drop nothing (blank records): reported,
# but not counted against max_skipped.
NOT_COUNTED = frozenset(BENIGN | {"too_long"})


def ingest_failure(manifest: dict[str, Any], max_skipped: float, out_dir: str | Path) -> str | None:
    """One line saying why a finished ingest failed, or None: nothing was written; a whole
    input file was skipped (unless max_skipped is 1); or more than `max_skipped` (a fraction
    of the input records) were skipped. Blank records and long_docs=skip are not counted."""
    report = Path(out_dir) / manifest.get("skipped_report", "skipped.txt")
    counts = manifest["skipped"]
    by_reason = ", ".join(f"{k}={v}" for k, v in counts.items())
    unit = "documents" if manifest["kind"] == "tokens" else "rows"
    if manifest["num_documents"] == 0:
        why = f"skipped {sum(counts.values())} input records ({by_reason}); see {report}" \
            if counts else "the inputs hold no records"
        return f"nothing was ingested: 0 {unit} written to {out_dir} ({why})"
    files = {k: v for k, v in counts.items() if k in FILE_REASONS}
    if files and max_skipped < 1:
        n = sum(files.values())
        return (f"{n} whole input file{'s' if n > 1 else ''} skipped "
                f"({', '.join(f'{k}={v}' for k, v in files.items())}; listed in {report}); "
                "fix or remove them (their rows are not counted, so --max-skipped below 1 "
                "cannot allow them)")
    bad = sum(v for k, v in counts.items() if k not in NOT_COUNTED)
    total = manifest.get("num_input_records") or manifest["num_documents"] + sum(counts.values())
    frac = bad / max(1, total)
    if bad and frac > max_skipped:
        need = math.ceil(frac * 1000) / 1000
        why = ", ".join(f"{k}={v}" for k, v in counts.items() if k not in NOT_COUNTED)
        benign = ", ".join(f"{k}={v}" for k, v in counts.items() if k in NOT_COUNTED)
        why += f"; not counted: {benign}" if benign else ""
        return (f"skipped {bad} of {total} input records ({frac:.1%}: {why}) > "
                f"--max-skipped {max_skipped:g}; listed in {report}; the "
                f"{manifest['num_documents']} {unit} read were written (rerun with "
                f"--max-skipped {need:g} to accept)")
    return None


def ingest_from_config(cfg: IngestConfig, progress: bool = True) -> dict[str, Any]:
    """Run an IngestConfig: default corpus when no sources, tokenizer resolution, then
    ingest (tokens) or ingest_structured (the SFT/RLHF kinds)."""
    from trellis.data_pipeline.corpus import write_default_corpus
    from trellis.data_pipeline.structured import ingest_structured
    sources = list(cfg.sources)
    if not sources:
        if cfg.kind != "tokens":
            raise DataError(f"ingest of {cfg.kind}: give input files (sources)")
        raw = Path(cfg.out_dir) / "raw"
        write_default_corpus(raw)
        sources = [InputSource(name="default", paths=[str(raw)])]
    tok = resolve_tokenizer(cfg, sources)
    if cfg.kind != "tokens":
        paths = [p for s in sources for p in s.paths]
        return ingest_structured(cfg.kind, paths, tok, cfg.out_dir, on_error=cfg.on_error)
    return ingest(sources, tok, cfg.out_dir, cfg.shard_tokens, cfg.processes,
                  max_doc_chars=cfg.max_doc_chars, long_docs=cfg.long_docs,
                  on_error=cfg.on_error, backend=cfg.backend, progress=progress)
