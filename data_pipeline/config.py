"""Config dataclasses of the data pipeline: what to ingest (IngestConfig) and how to stream
it (DataConfig). Stdlib only; validated by launcher.config (see its docstring)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.data_pipeline.tokenizer import TokenizerConfig


@dataclass
class InputSource:
    """One named raw-input source for `trellis ingest`."""

    name: str = "default"
    """Source name: the shard folder under out_dir and the key in the manifest."""
    paths: list[str] = field(default_factory=list)
    """Files, directories (read recursively, sorted) and globs (``data/*.jsonl``)."""
    format: Literal["auto", "text", "jsonl", "parquet", "arrow"] = "auto"
    """Input format; auto picks by extension (.jsonl/.json, .parquet, .arrow/.feather, else text)."""
    text_mode: Literal["file", "blocks", "lines"] = "file"
    """Plain text: one document per file, per blank-line-separated block, or per line."""
    text_field: str = "text"
    """JSONL field / Parquet or Arrow column holding the document text."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"source name {self.name!r} must be a plain folder name")


@dataclass
class IngestConfig:
    """`trellis ingest`: raw inputs -> tokenized Arrow shards + manifest.json."""

    sources: list[InputSource] = field(default_factory=list)
    """Named inputs; empty = the default corpus (pydoc topics + common licences)."""
    out_dir: str = "runs/data"
    """Output folder: <source>/<task>-<part>.arrow shards, manifest.json, plan.json."""
    kind: Literal["tokens", "demonstrations", "comparisons", "prompts", "dialogue",
                  "translation"] = "tokens"
    """tokens: pretraining documents; translation: {source, target} pairs (seq2seq). The
    others are the structured SFT/RLHF formats."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """tokenizer.path loads a model; empty trains one on the inputs into out_dir/tokenizer.model."""
    tokenizer_sample_chars: int = field(default=50_000_000, metadata={"min": 1})
    """At most this many characters of the inputs train a new tokenizer."""
    shard_tokens: int = field(default=1 << 24, metadata={"min": 1})
    """Target tokens per shard (a shard closes at the first document that reaches it)."""
    processes: int = field(default=2, metadata={"min": 1})
    """Tokenizing worker processes."""
    backend: Literal["processes", "ray"] = "processes"
    """ray: run the tasks as Ray tasks on the attached cluster (shared filesystem needed)."""
    max_doc_chars: int = field(default=4_000_000, metadata={"min": 1})
    """Documents longer than this are split into pieces of this size or skipped."""
    long_docs: Literal["split", "skip"] = "split"
    """What happens to a document longer than max_doc_chars (counted either way)."""
    on_error: Literal["skip", "fail"] = "skip"
    """skip: bad rows/files are counted, printed and left out; fail: the first one aborts."""
    max_skipped: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Share of input records that may be skipped (bad JSON, empty, ...) before the ingest
    exits 1 after its full report (every skipped record by file:line); 0 = none may be."""


@dataclass
class SourceConfig:
    """One ingested dataset (a folder with manifest.json) in a training mixture."""

    name: str = "default"
    """Name used in logs and in the data state."""
    path: str = ""
    """Ingested folder (or its manifest.json)."""
    weight: float = field(default=1.0, metadata={"min": 0.0})
    """Mixture weight; normalised over sources. What it counts is DataConfig.mix_by."""


@dataclass
class DataConfig:
    """The streaming reader: rank/worker sharding, shuffling, packing, mixing, resume."""

    path: str = ""
    """One ingested folder; shorthand for a single source. Ignored when `sources` is set."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several ingested folders mixed by weight."""
    val_path: str = ""
    """Separate ingested folder for validation (read whole, in order). Takes precedence over
    val_fraction."""
    val_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5})
    """Without val_path: the last ceil(n * val_fraction) documents of every shard are held
    out as the validation split (never seen by the training split)."""
    seq_len: int = field(default=256, metadata={"min": 1})
    """Tokens a model sees per row; blocks carry seq_len + 1 ids (inputs + shifted labels)."""
    seed: int = 0
    """Shuffle seed; with the epoch it fixes the document order on every run."""
    shuffle: bool = True
    """Shuffle shard order and documents per epoch; False reads in manifest order."""
    shuffle_buffer: int = field(default=1024, metadata={"min": 0})
    """Block shuffle: documents are permuted within consecutive windows of this many documents
    of the (shuffled) shard sequence; 0 = shard order shuffled only."""
    order: Literal["shuffled", "sequential"] = "shuffled"
    """shuffled: each epoch, a global shuffle of fixed-length samples cut from the packed
    documents at a random start offset (Megatron-style), so a batch's rows come from far-apart
    places whatever the document lengths; sequential: the packed documents in order, B
    consecutive blocks per batch (for streaming from remote storage). Applies to the packed,
    shuffled training split; validation is always read in order."""
    packing: bool = True
    """Concatenate documents (EOS after each) and cut fixed blocks; False = one document per
    block start, padded (long documents continue over several blocks)."""
    mix_by: Literal["tokens", "documents"] = "tokens"
    """Mixture weights count tokens (incl. EOS) or documents delivered from each source."""
    loader_workers: int = field(default=0, metadata={"min": 0})
    """DataLoader worker processes per rank that read and collate micro-batches (0 = read
    in the training process). The rank's data is split into max(1, W) consumers either way,
    read round-robin, so batches and resume points are the same with or without processes;
    a resume needs the same value."""
    prefetch: int = field(default=2, metadata={"min": 0})
    """With loader_workers = 0: micro-batches a background thread of the training process
    reads and collates ahead of the trainer, so the next one is ready when a step ends (the
    saved position is still what the trainer received); 0 = read each when asked."""

    def __post_init__(self) -> None:
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ValueError("source weights must not all be 0")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate source names in {names}")

    def resolved_sources(self) -> list[SourceConfig]:
        if self.sources:
            return list(self.sources)
        if self.path:
            return [SourceConfig(name="default", path=self.path, weight=1.0)]
        raise ValueError("data config needs `path` or `sources`")
