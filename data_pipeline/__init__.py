"""trellis data_pipeline: SentencePiece tokenizer, ingest to Arrow shards, streaming reader,
collators, rollout batches. Names are imported lazily so `import data_pipeline` stays cheap."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TokenizerConfig": "tokenizer", "Tokenizer": "tokenizer", "TokenizerError": "tokenizer",
    "train_tokenizer": "tokenizer",
    "default_corpus_documents": "corpus", "write_default_corpus": "corpus",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"data_pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
