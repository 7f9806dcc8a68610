"""The default corpus: English text present on every machine that has Python.

CPython's ``pydoc_data.topics`` (the language reference topics behind ``help()``, ~465K
characters) plus the licence texts in ``/usr/share/common-licenses`` where that Debian
directory exists (~237K characters). Deterministic order: topics sorted by key, then licence
files sorted by name; a symlink to a file already read (GPL -> GPL-3) is read once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

LICENSES_DIR = Path("/usr/share/common-licenses")


def load_default_corpus(licenses_dir: Path = LICENSES_DIR) -> tuple[list[str], dict[str, str]]:
    """Return (documents, skipped) where skipped maps an unreadable file to the reason."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics) if topics[k].strip()]
    skipped: dict[str, str] = {}
    if licenses_dir.is_dir():
        seen: set[Path] = set()
        for p in sorted(licenses_dir.iterdir(), key=lambda q: q.name):
            real = p.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            try:
                text = p.read_bytes().decode("utf-8")
            except OSError as e:
                skipped[str(p)] = f"unreadable ({e.strerror})"
                continue
            except UnicodeDecodeError as e:
                skipped[str(p)] = f"not UTF-8 text (byte {e.start})"
                continue
            if "\x00" in text:
                skipped[str(p)] = "binary (NUL bytes)"
            elif text.strip():
                docs.append(text)
            else:
                skipped[str(p)] = "empty"
    return docs, skipped


def default_corpus_documents() -> list[str]:
    """The default corpus as a list of documents; skipped files are reported on stderr."""
    docs, skipped = load_default_corpus()
    for path, why in skipped.items():
        print(f"default corpus: skipped {path}: {why}", file=sys.stderr)
    return docs


def write_default_corpus(out_dir: str | Path) -> list[Path]:
    """Write each default-corpus document to ``out_dir/doc-NNNNN.txt`` (one document per file,
    for ``trellis ingest``). Returns the paths in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(default_corpus_documents()):
        p = out / f"doc-{i:05d}.txt"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(doc, encoding="utf-8")
        os.replace(tmp, p)
        paths.append(p)
    return paths
