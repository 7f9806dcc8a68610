"""trellis data_pipeline: SentencePiece tokenizer, ingest to Arrow shards, streaming reader,
collators, rollout batches. Names are imported lazily so `import data_pipeline` stays cheap.

    tokenizer.py   TokenizerConfig, Tokenizer, train_tokenizer (fixed special ids)
    corpus.py      the default English corpus present on every machine with Python
    config.py      InputSource, IngestConfig, SourceConfig, DataConfig
    inputs.py      raw inputs: paths/globs, pieces of files, records (text/JSONL/Parquet/Arrow)
    shards.py      shard + manifest format, DataError
    ingest.py      ingest(): parallel, resumable tokenization into shards
    ingest_job.py  ingest_from_config(): what `trellis ingest` runs
    packing.py     epoch order, rank/worker dealing, packing engine
    samples.py     sample-level shuffling: per-epoch global index of fixed-length samples
    stream.py      TokenStream: the per-rank streaming reader with exact resume (also
                   through DataLoader workers: worker_batches / record_delivered)
    loader.py      batches(): micro-batches, in-process or from DataLoader worker processes
    prefetch.py    prefetched(): an iterator run ahead by a background thread
    collate.py     CLM, MLM, SFT, pair and prompt collators
    structured.py  SFT/RLHF tables: ingest_structured, StructuredDataset
    rollout.py     RolloutBatch <-> Arrow (zero-copy) <-> Parquet
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TokenizerConfig": "tokenizer", "Tokenizer": "tokenizer", "TokenizerError": "tokenizer",
    "train_tokenizer": "tokenizer",
    "default_corpus_documents": "corpus", "write_default_corpus": "corpus",
    "InputSource": "config", "IngestConfig": "config", "SourceConfig": "config",
    "DataConfig": "config",
    "DataError": "shards", "load_manifest": "shards", "make_token_dataset": "shards",
    "ingest": "ingest", "ingest_from_config": "ingest_job",
    "TokenStream": "stream", "DataStateError": "stream", "batches": "loader",
    "clm_collate": "collate", "MLMCollator": "collate", "SFTCollator": "collate",
    "PairCollator": "collate", "PromptCollator": "collate", "IGNORE": "collate",
    "PackedSFTCollator": "packed_collate", "PackedPairCollator": "packed_collate",
    "ingest_structured": "structured", "StructuredDataset": "structured",
    "RolloutBatch": "rollout", "to_arrow": "rollout", "from_arrow": "rollout",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"trellis.data_pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
