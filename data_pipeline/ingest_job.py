"""Run an IngestConfig (what `trellis ingest` does): the default corpus when no sources are
given, the tokenizer (given, reused from out_dir, or trained on a sample of the inputs), then
token ingest or structured ingest by kind."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from trellis.data_pipeline.config import IngestConfig, InputSource
from trellis.data_pipeline.inputs import Doc, Piece, detect_format, expand_paths, read_piece
from trellis.data_pipeline.ingest import ingest
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
    return train_tokenizer(cfg.tokenizer, sample_documents(sources, cfg.tokenizer_sample_chars),
                           saved)


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
