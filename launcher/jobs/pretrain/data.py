"""Data for a pretraining job: the tokenizer and the ingested shards, made once per run dir.

With no `data.path`, the embedded default corpus (pydoc topics + common licences, present on
every machine with Python) is written to RUN_DIR/corpus, a tokenizer is trained on it into
RUN_DIR/tokenizer.model and it is ingested into RUN_DIR/data. Each piece is reused when it
exists, so a resumed run reads exactly the same tokens.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from trellis.data_pipeline.corpus import default_corpus_documents, write_default_corpus
from trellis.data_pipeline.ingest import ingest
from trellis.data_pipeline.shards import MANIFEST_NAME
from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer
from trellis.launcher.config_loader import ConfigError
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig

SAMPLE_PROMPT = "The Python language"


@dataclass
class PreparedData:
    train_dir: Path
    """Ingested folder the training stream reads."""
    val_dir: Path | None
    """Ingested folder for validation, or None when there is no validation split."""
    tokenizer_path: Path
    vocab_size: int
    tokenizer_sha256: str
    sample_prompt: str = SAMPLE_PROMPT


def _manifest_tokenizer(data_dir: Path) -> str:
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"config key 'data.path': '{data_dir}' has no {MANIFEST_NAME} "
                          f"(run `trellis ingest` first)")
    return json.loads(path.read_text()).get("tokenizer_path", "")


def prepare_data(cfg: PretrainJobConfig, run_dir: Path) -> PreparedData:
    d = cfg.data
    if d.path or d.sources:
        first = Path(d.resolved_sources()[0].path)
        tok = Tokenizer(cfg.tokenizer.path or _manifest_tokenizer(first))
        # The run dir keeps its own copy, so export and later stages find it there.
        own = run_dir / TOKENIZER_FILE
        if not own.is_file() or Tokenizer(own).sha256 != tok.sha256:
            shutil.copyfile(tok.path, own)
        val = Path(d.val_path) if d.val_path else (first if d.val_fraction > 0 else None)
        return PreparedData(first, val, own, tok.vocab_size, tok.sha256)
    tok_path = run_dir / TOKENIZER_FILE
    corpus_dir = run_dir / "corpus"
    if not tok_path.is_file():
        source = Path(cfg.tokenizer.path) if cfg.tokenizer.path else None
        tok = Tokenizer(source) if source else train_tokenizer(
            cfg.tokenizer, default_corpus_documents(), tok_path)
        if source:
            tok_path.write_bytes(source.read_bytes())
    if not corpus_dir.is_dir():
        write_default_corpus(corpus_dir)
    tok = Tokenizer(tok_path)
    data_dir = run_dir / "data"
    if not (data_dir / MANIFEST_NAME).is_file():
        ingest([str(corpus_dir)], tok, data_dir, shard_tokens=1 << 18,
               processes=min(2, cfg.tokenizer.num_threads), progress=False)
    val = data_dir if d.val_fraction > 0 else None
    return PreparedData(data_dir, val, tok_path, tok.vocab_size, tok.sha256)
