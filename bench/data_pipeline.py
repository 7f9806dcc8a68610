"""Data pipeline throughput (prints, never asserts).

1. Streaming, one core: packed seq_len=1024 batches (B = 8 and 32 rows) from warm
   memory-mapped shards (TokenStream.iter_batches, block shuffle on) in tokens per CPU
   second of this process (CPU time, so other load on the machine does not count), next to a
   raw memory-mapped read of the same shards (copying every token out: as uint16, and
   widened to int32 like the batches' ids), as ratios. Goal: >= 200M tokens/s, >= 25% of raw.
2. Integrity: the cost of verifying shards (size + xxh3_64 checksum on the first open per
   process, token ids checked against the vocabulary from the manifest). Streaming with
   checks vs without (verify=False), interleaved runs, as a ratio: steady state (shards
   already verified in this process; goal: < 5% slower, i.e. ratio >= 0.95) and one epoch
   that includes the first open; and the checksum alone, as GB/s and as a fraction of the
   time streaming the same tokens takes.
3. Ingest: tokenization tokens/s (wall clock) with 1 and 2 processes on the default corpus
   repeated, one document per file. Goal: >= 1.7x at 2 processes (needs 2 idle cores).

    python bench/data_pipeline.py [--tokens 50_000_000] [--copies 8] [--only integrity]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

from trellis.data_pipeline.config import DataConfig  # noqa: E402
from trellis.data_pipeline.corpus import default_corpus_documents  # noqa: E402
from trellis.data_pipeline.ingest import ingest  # noqa: E402
from trellis.data_pipeline.shards import (clear_verified, load_manifest,  # noqa: E402
                                          make_token_dataset, open_shard, verify_shard)
from trellis.data_pipeline.stream import TokenStream  # noqa: E402
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402


def make_shards(root: Path, total_tokens: int, vocab: int = 32_000) -> Path:
    """Documents with log-normal lengths (median ~600, mean ~1000 tokens), ~8M tokens/shard."""
    rng = np.random.default_rng(0)
    lengths, n = [], 0
    while n < total_tokens:
        k = int(min(20_000, max(8, rng.lognormal(6.4, 1.0))))
        lengths.append(k)
        n += k
    flat = rng.integers(7, vocab, n, dtype=np.uint16)
    cuts = np.cumsum([0, *lengths])
    docs = [flat[cuts[i]:cuts[i + 1]] for i in range(len(lengths))]
    per_shard = max(1, len(docs) * 8_000_000 // n)
    make_token_dataset(root, docs, per_shard, vocab)
    return root


def raw_read(root: Path, widen: type | None) -> tuple[int, float]:
    m = load_manifest(root)
    t0, n = time.process_time(), 0
    for s in m["shards"]:
        a = open_shard(root / s["path"])
        out = a.values.astype(widen) if widen else a.values.copy()
        n += len(out)
    return n, time.process_time() - t0


def stream_read(root: Path, total: int, B: int, T: int = 1024, verify: bool = True,
                order: str = "sequential") -> tuple[int, float]:
    s = TokenStream(root, DataConfig(seq_len=T, shuffle_buffer=1024, seed=0, order=order),
                    verify=verify, vocab_size=32_000)
    it = s.iter_batches(B)
    t0, n = time.process_time(), 0
    while n < total:
        next(it)
        n += B * T  # new tokens per batch (row r+1 starts at row r's last id)
    return n, time.process_time() - t0


def _cpu() -> tuple[float, float]:
    """CPU seconds used by this process and by its finished children."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def python_speed() -> float:
    """ns per `min(a, b)` call: a yardstick for how fast Python runs on this machine."""
    t0 = time.process_time()
    a, b = 3, 5
    for _ in range(200_000):
        min(a, b)
    return (time.process_time() - t0) / 200_000 * 1e9


def bench_stream(tokens: int, parts: set[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    try:
        root = make_shards(tmp / "shards", tokens)
        if "stream" in parts:
            _stream_rates(root)
        if "integrity" in parts:
            print("integrity (size + xxh3_64 checksum per shard on first open, ids vs vocab):")
            _integrity(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _integrity(root: Path, reps: int = 5) -> None:
    m = load_manifest(root)
    raw_read(root, None)  # warm the page cache
    n_bytes = sum(s["bytes"] for s in m["shards"])
    hash_s = []
    for _ in range(reps):
        clear_verified()
        t0 = time.process_time()
        for s in m["shards"]:
            verify_shard(root / s["path"], s)
        hash_s.append(time.process_time() - t0)
    h = sorted(hash_s)[len(hash_s) // 2]
    print(f"  checksum, all {len(m['shards'])} shards ({n_bytes / 1e6:.0f} MB): {h * 1e3:.1f} ms "
          f"= {n_bytes / h / 1e9:.1f} GB/s (median of {reps})")
    B, total = 8, m["num_tokens"]
    for label, first_open in (("steady state (verified earlier in the process)", False),
                              ("one epoch incl. first open (cache cleared)", True)):
        rates: dict[bool, list[float]] = {True: [], False: []}
        for r in range(reps):  # interleaved, alternating which goes first
            for verify in ((True, False) if r % 2 == 0 else (False, True)):
                if first_open:
                    clear_verified()
                n, dt = stream_read(root, total, B, verify=verify)
                rates[verify].append(n / dt)
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        print(f"  {label}: checked {med[True] / 1e6:.0f}M vs unchecked {med[False] / 1e6:.0f}M "
              f"tokens/s (B={B}, median of {reps}) -> ratio {med[True] / med[False]:.3f} "
              f"(goal >= 0.95)")
        if not first_open:
            epoch_s = total / med[False]
            print(f"  checksum time / one unchecked epoch of streaming the same tokens = "
                  f"{h / epoch_s:.3f}")


def _stream_rates(root: Path) -> None:
    m = load_manifest(root)
    print(f"shards: {len(m['shards'])} files, {m['num_documents']:,} docs "
          f"(mean {m['num_tokens'] / m['num_documents']:.0f} tokens), "
          f"{m['num_tokens']:,} uint16 tokens")
    raw_read(root, None)  # warm the page cache
    best = {}
    for name, fn in (("raw mmap copy (uint16)", lambda: raw_read(root, None)),
                     ("raw mmap -> int32", lambda: raw_read(root, np.int32)),
                     ("raw mmap -> int64", lambda: raw_read(root, np.int64)),
                     ("TokenStream packed 8x1024", lambda: stream_read(root, m["num_tokens"], 8)),
                     ("TokenStream packed 32x1024",
                      lambda: stream_read(root, m["num_tokens"], 32)),
                     ("TokenStream shuffled 8x1024",  # data.order shuffled (the default)
                      lambda: stream_read(root, m["num_tokens"], 8, order="shuffled")),
                     ("TokenStream shuffled 32x1024",
                      lambda: stream_read(root, m["num_tokens"], 32, order="shuffled"))):
        rates = []
        for _ in range(3):
            n, dt = fn()
            rates.append(n / dt)
        best[name] = max(rates)
        print(f"  {name:28s} {best[name] / 1e6:9.1f} M tokens/s (best of 3)")
    for b, kind in ((8, "packed"), (32, "packed"), (8, "shuffled"), (32, "shuffled")):
        s = best[f"TokenStream {kind} {b}x1024"]
        print(f"  {kind} B={b}: stream / raw uint16 copy = {s / best['raw mmap copy (uint16)']:.2f}; "
              f"stream / raw int32 = {s / best['raw mmap -> int32']:.2f} "
              f"(goal >= 200M tokens/s and >= 0.25)")
    print(f"  (Python yardstick: min(a, b) takes {python_speed():.0f} ns here; "
          "~40-60 ns on a typical desktop core)")


def bench_ingest(copies: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    try:
        docs = default_corpus_documents()
        corpus = tmp / "corpus"
        corpus.mkdir()
        for c in range(copies):
            for i, d in enumerate(docs):
                (corpus / f"c{c:02d}-{i:04d}.txt").write_text(d)
        tok = train_tokenizer(TokenizerConfig(vocab_size=8000), docs, tmp / "tok.model")
        chars = sum(len(d) for d in docs) * copies
        rates, cores = {}, 0.0
        for procs in (1, 2):
            t0, c0 = time.perf_counter(), _cpu()
            m = ingest([str(corpus)], tok, tmp / f"out{procs}", shard_tokens=1 << 17,
                       processes=procs, progress=False)
            dt, (me, kids) = time.perf_counter() - t0, [b - a for a, b in zip(c0, _cpu())]
            rates[procs], cores = m["num_tokens"] / dt, (kids or me) / dt
            print(f"  ingest {procs} process{'es' if procs > 1 else '  '}: "
                  f"{m['num_tokens']:,} tokens ({chars / 1e6:.1f}M chars, "
                  f"{len(m['shards'])} shards) in {dt:.2f} s = {rates[procs] / 1e6:.2f} M tokens/s"
                  f"  [CPU s: main {me:.2f}, workers {kids:.2f}]")
        print(f"  ingest scaling at 2 processes: {rates[2] / rates[1]:.2f}x wall clock (goal >= "
              f"1.7x); the 2 workers averaged {cores:.2f} busy cores ({os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--only", choices=["stream", "integrity", "ingest"], action="append",
                    help="run only these parts (repeatable; default all)")
    args = ap.parse_args()
    parts = set(args.only or ["stream", "integrity", "ingest"])
    if parts & {"stream", "integrity"}:
        print("streaming (one core):")
        bench_stream(args.tokens, parts)
    if "ingest" in parts:
        print("ingest:")
        bench_ingest(args.copies)


if __name__ == "__main__":
    main()
