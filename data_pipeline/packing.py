"""The reading engine behind TokenStream: which document comes next, and packing.

Epoch order of one source (the same on every rank and worker; depends only on seed, epoch
and source name): shards in a permuted order, then documents permuted within consecutive
windows of ``shuffle_buffer`` documents of that sequence (block shuffle). Consumer c of C
(C = world_size * max(1, loader_workers)) reads positions c, c + C, c + 2C, ... of that order, so
consumers never overlap and together read every document exactly once per epoch.

A consumer's position is three integers per source (epoch, index in its sequence, token
offset in the current document) plus mixing counters: that is the whole resumable state,
because every order is recomputed from (seed, epoch) instead of being stored.

Speed: a window's document spans are looked up vectorized; a single source then gathers
consecutive documents (EOS after each) into ~256K-token chunks with one concatenate, so
filling a batch is one slice copy per chunk touched instead of Python work per document.
"""
from __future__ import annotations

import bisect
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trellis.data_pipeline.shards import (DataError, ShardArrays, check_token_range,
                                          check_tokenizer, id_limit, load_manifest, open_shard,
                                          warn_unverified)

IDENTITY_WINDOW = 1 << 16  # window size when documents are not shuffled (amortizes lookups)
CHUNK_TOKENS = 1 << 18     # documents are gathered (with their EOS) into chunks of this size


class Source:
    """An ingested dataset opened for one split: per-shard document ranges and lazy mmaps.

    Integrity (see data_pipeline.shards): the manifest's recorded token ids must fit below
    `vocab_size` (the model's) and the tokenizer's vocabulary, checked here without reading a
    shard; each shard's size and checksum are verified when this process first maps it
    (`verify`), so no batch carries bytes other than the ingested ones."""

    def __init__(self, name: str, path: str, split: str, val_fraction: float, tokenizer: Any,
                 vocab_size: int | None = None, verify: bool = True):
        m = load_manifest(path)
        if m["kind"] != "tokens":
            raise DataError(f"{path}: manifest kind is '{m['kind']}', not 'tokens'")
        check_tokenizer(m, tokenizer)
        check_token_range(m, vocab_size)
        if verify:
            warn_unverified(m)
        self.verify, self.limit = verify, id_limit(m, vocab_size)
        self.name, self.manifest, self.root = name, m, Path(m["root"])
        self.key = zlib.crc32(name.encode())
        self.eos_id = int(m["tokenizer"].get("eos_id", 3))
        self.pad_id = int(m["tokenizer"].get("pad_id", 0))
        self.dtype = np.dtype(m["token_dtype"])
        shard_idx, starts, counts = [], [], []
        for i, s in enumerate(m["shards"]):
            n = s["num_documents"]
            v = math.ceil(n * val_fraction) if val_fraction > 0 else 0
            v = min(v, n - 1) if n > 1 else v  # keep at least one training document
            lo, cnt = (0, n - v) if split == "train" else (n - v, v)
            if cnt > 0:
                shard_idx.append(i), starts.append(lo), counts.append(cnt)
        self.shard_idx = np.asarray(shard_idx, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_docs = int(self.counts.sum())
        if self.num_docs == 0:
            raise DataError(f"{self.root}: no documents in the '{split}' split")
        self._open: dict[int, ShardArrays] = {}
        self.cache: dict = {}  # per-process derived tables (data_pipeline.samples)

    def doc_spans(self, shards: np.ndarray, rows: np.ndarray) -> tuple[list, list[int], list[int]]:
        """Per document (shard values array, first token, length), vectorized per shard."""
        starts = np.empty(len(rows), dtype=np.int64)
        lengths = np.empty(len(rows), dtype=np.int64)
        vals: list = [None] * len(rows)
        for sh in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == sh)
            a = self.arrays(sh)
            r = rows[sel]
            starts[sel] = a.offsets[r]
            lengths[sel] = a.offsets[r + 1] - a.offsets[r]
            for i in sel.tolist():
                vals[i] = a.values
        return vals, starts.tolist(), lengths.tolist()

    def arrays(self, shard: int) -> ShardArrays:
        a = self._open.get(shard)
        if a is None:
            s = self.manifest["shards"][shard]
            a = open_shard(self.root / s["path"], entry=s, verify=self.verify, limit=self.limit)
            self._open[shard] = a
        return a

    def __getstate__(self) -> dict:  # DataLoader workers re-map shards after the fork/spawn
        d = dict(self.__dict__)
        d["_open"], d["cache"] = {}, {}
        return d


@dataclass
class EpochPlan:
    """Global document order of one source in one epoch (shared by all consumers)."""

    shard: np.ndarray  # (V,) shard index of each view, in epoch order
    start: np.ndarray  # (V,) first row of each view
    cum: np.ndarray    # (V,) epoch position of each view's first document
    window: int
    seed: tuple | None  # None: documents are not permuted within windows
    num_docs: int

    @classmethod
    def build(cls, src: Source, seed: int, epoch: int, shuffle: bool, buffer: int) -> "EpochPlan":
        order = np.arange(len(src.counts))
        if shuffle:
            order = np.random.default_rng([seed, epoch, src.key, 0]).permutation(order)
        counts = src.counts[order]
        cum = np.zeros(len(order), dtype=np.int64)
        np.cumsum(counts[:-1], out=cum[1:])
        permute = shuffle and buffer > 1
        return cls(src.shard_idx[order], src.starts[order], cum,
                   buffer if permute else IDENTITY_WINDOW,
                   (seed, epoch, src.key) if permute else None, src.num_docs)

    def window_refs(self, k: int, c: int, C: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Consumer c's documents in window k: (first consumer index, shards, rows)."""
        lo, hi = k * self.window, min((k + 1) * self.window, self.num_docs)
        p_lo, p_hi = max(0, -(-(lo - c) // C)), max(0, -(-(hi - c) // C))
        g = c + np.arange(p_lo, p_hi, dtype=np.int64) * C
        q = g
        if self.seed is not None:
            perm = np.random.default_rng([*self.seed, 1, k]).permutation(hi - lo)
            q = lo + perm[g - lo]
        idx = np.searchsorted(self.cum, q, side="right") - 1
        return p_lo, self.shard[idx], self.start[idx] + q - self.cum[idx]


@dataclass
class Chunk:
    """Consecutive documents of one consumer gathered into one buffer, EOS after each, so
    packing copies whole batch rows at a time instead of one document at a time."""

    lo: int              # consumer position of the first document
    buf: np.ndarray      # (N,) tokens
    start: list[int]     # (k,) first index of each document in buf
    end: list[int]       # (k,) one past each document's EOS


class Cursor:
    """One consumer's position in one source: epoch, index into its sequence, token offset."""

    def __init__(self, src: Source, c: int, C: int, seed: int, shuffle: bool, buffer: int,
                 epoch: int, pos: int = 0, offset: int = 0):
        self.src, self.c, self.C = src, c, C
        self.seed, self.shuffle, self.buffer = seed, shuffle, buffer
        self.per_epoch = max(0, -(-(src.num_docs - c) // C))
        if src.num_docs < C:  # every reader needs a document, or one rank would starve
            raise DataError(f"{src.root}: {src.num_docs} documents cannot feed {C} readers "
                            "(world_size x loader_workers); use fewer or ingest more data")
        self.epoch, self.pos, self.offset = epoch, pos, offset
        self._plan: EpochPlan | None = None
        self._win_lo, self._win_hi = 0, 0  # consumer positions covered by the cached window
        self._win: tuple[list, list[int], list[int]] = ([], [], [])
        self._chunk: Chunk | None = None

    def exhausted(self) -> bool:
        return self.pos >= self.per_epoch

    def next_epoch(self) -> None:
        self.epoch, self.pos, self.offset, self._plan = self.epoch + 1, 0, 0, None
        self._win_lo = self._win_hi = 0
        self._chunk = None

    def doc(self) -> tuple[np.ndarray, int, int]:
        """(shard values, first token index, length) of the document at the cursor."""
        i = self.pos - self._win_lo
        if not 0 <= i < self._win_hi - self._win_lo:
            self._load_window()
            i = self.pos - self._win_lo
        vals, starts, lengths = self._win
        return vals[i], starts[i], lengths[i]

    def chunk(self, eos: int) -> Chunk:
        """The chunk holding the document at the cursor (built from the current window)."""
        ch = self._chunk
        if ch is not None and ch.lo <= self.pos < ch.lo + len(ch.start):
            return ch
        i0 = self.pos - self._win_lo
        if not 0 <= i0 < self._win_hi - self._win_lo:
            self._load_window()
            i0 = self.pos - self._win_lo
        vals, starts, lengths = self._win
        i1, total = i0, 0
        while i1 < len(lengths) and total < CHUNK_TOKENS:
            total += lengths[i1] + 1
            i1 += 1
        k = i1 - i0
        parts: list = [None] * (2 * k)  # document, EOS, document, EOS, ... in one concatenate
        parts[0::2] = [v[a:a + n] for v, a, n in zip(vals[i0:i1], starts[i0:i1], lengths[i0:i1])]
        parts[1::2] = [np.full(1, eos, dtype=self.src.dtype)] * k
        buf = np.concatenate(parts)
        lens = np.asarray(lengths[i0:i1], dtype=np.int64) + 1
        end = np.cumsum(lens)
        self._chunk = Chunk(self.pos, buf, (end - lens).tolist(), end.tolist())
        return self._chunk

    def _load_window(self) -> None:
        if self._plan is None:
            self._plan = EpochPlan.build(self.src, self.seed, self.epoch, self.shuffle,
                                         self.buffer)
        k = (self.c + self.pos * self.C) // self._plan.window
        p_lo, shards, rows = self._plan.window_refs(k, self.c, self.C)
        self._win = self.src.doc_spans(shards, rows)
        self._win_lo, self._win_hi = p_lo, p_lo + len(rows)


def pick_source(counts: list, weights: list[float], skip: list[bool]) -> int:
    """Next source: the one furthest below its weight share (deterministic, exact); -1 when
    every source is skipped or weightless."""
    best, best_v = -1, math.inf
    for s, (n, w) in enumerate(zip(counts, weights)):
        if w <= 0 or skip[s]:
            continue
        if n / w < best_v:
            best, best_v = s, n / w
    return best


class Packer:
    """Fills token buffers with one consumer's packed stream: documents from the mixed
    sources, each followed by EOS, in order."""

    def __init__(self, sources: list[Source], weights: list[float], mix_by: str,
                 c: int, C: int, seed: int, shuffle: bool, buffer: int, epoch: int,
                 infinite: bool, packing: bool, state: dict | None = None):
        self.sources, self.mix_by, self.infinite, self.packing = sources, mix_by, infinite, packing
        self.w = weights
        st = state or {}
        epochs = st.get("epoch", [epoch] * len(sources))
        pos, off = st.get("pos", [0] * len(sources)), st.get("offset", [0] * len(sources))
        self.cursors = [Cursor(s, c, C, seed, shuffle, buffer, epochs[i], pos[i], off[i])
                        for i, s in enumerate(sources)]
        self.counts = list(st.get("counts", [0] * len(sources)))
        self.cur: int = st.get("cur", -1)
        self.carry: list[int] | None = st.get("carry")  # [last token of the previous block]
        self.step: int = st.get("step", 0)
        self.done: bool = st.get("done", False)
        self.eos = sources[0].eos_id
        self._doc: tuple[np.ndarray, int, int] | None = None

    def state(self) -> dict:
        return {"epoch": [c.epoch for c in self.cursors], "pos": [c.pos for c in self.cursors],
                "offset": [c.offset for c in self.cursors], "counts": list(self.counts),
                "cur": self.cur, "carry": self.carry, "step": self.step, "done": self.done}

    @property
    def epoch(self) -> int:
        return self.cursors[0].epoch

    def _select(self) -> int:
        return pick_source(self.counts, self.w,
                           [not self.infinite and c.exhausted() for c in self.cursors])

    def _start_doc(self) -> bool:
        if len(self.cursors) == 1:  # fast path: no mixing
            s, cur = 0, self.cursors[0]
            if cur.pos >= cur.per_epoch and not self.infinite:
                return False
        else:
            s = self._select()
            if s < 0:
                return False
            cur = self.cursors[s]
        if cur.pos >= cur.per_epoch:  # infinite: this source's next epoch begins
            cur.next_epoch()
        self.cur, self._doc = s, cur.doc()
        self.counts[s] += self._doc[2] + 1 if self.mix_by == "tokens" else 1
        return True

    def fill(self, tok: np.ndarray, boundary_stop: bool = False) -> int:
        """Write up to len(tok) next tokens; returns how many (fewer only at the end of a
        finite epoch, or with boundary_stop after the first EOS, for unpacked blocks).
        One iteration per document; a single source takes the chunked path instead."""
        if len(self.cursors) == 1 and not boundary_stop:
            return self._fill_chunked(tok)
        n, i, eos = len(tok), 0, self.eos
        while i < n:
            if self.cur < 0 and not self._start_doc():
                self.done = True
                break
            cur = self.cursors[self.cur]
            if self._doc is None:  # restored mid-document
                self._doc = cur.doc()
            vals, start, length = self._doc
            o = cur.offset
            rem = length + 1 - o                # this document's tokens left + its EOS
            if rem <= n - i:                    # the rest of the document fits
                j = i + rem - 1
                tok[i:j] = vals[start + o:start + length]
                tok[j] = eos
                i = j + 1
                cur.pos, cur.offset = cur.pos + 1, 0
                self.cur, self._doc = -1, None
                if boundary_stop:
                    break
            else:                               # fill to the end; the document continues
                take = n - i
                tok[i:n] = vals[start + o:start + o + take]
                cur.offset, i = o + take, n
        return i

    def _fill_chunked(self, tok: np.ndarray) -> int:
        """Single source: copy straight from chunk buffers, one slice per chunk touched."""
        cur, n, i = self.cursors[0], len(tok), 0
        while i < n:
            if cur.pos >= cur.per_epoch:
                if not self.infinite:
                    self.done = True
                    break
                cur.next_epoch()
            ch = cur._chunk
            if ch is None or not ch.lo <= cur.pos < ch.lo + len(ch.start):
                ch = cur.chunk(self.eos)
            j0 = cur.pos - ch.lo
            b0 = ch.start[j0] + cur.offset
            take = min(n - i, len(ch.buf) - b0)
            b1 = b0 + take
            tok[i:i + take] = ch.buf[b0:b1]
            j1 = bisect.bisect_right(ch.end, b1)  # documents finished
            cur.pos = ch.lo + j1
            cur.offset = b1 - ch.start[j1] if j1 < len(ch.start) else 0
            i += take
        self.cur, self._doc = (0 if cur.offset else -1), None
        return i
