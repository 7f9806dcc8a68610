"""Sample-level shuffling (``data.order: shuffled``): a global index of fixed-length samples
per source and epoch, as Megatron's ``sample_idx`` + ``shuffle_idx``, so a batch's rows come
from far-apart places of the corpus whatever the document lengths.

Epoch e of a source (the same on every rank and worker; a function of seed, epoch, source
name and seq_len T only):

1. the split's documents in a random order (one permutation of all of them);
2. packed in that order, EOS after each, into one circular sequence of N tokens;
3. cut from a random start offset s in [0, T) into S = ceil(N / T) samples: sample j is the
   T + 1 tokens from position s + j*T (the last one shorter: N - (S-1)*T labels), so every
   token is an input once and a label once per epoch, and block boundaries move each epoch;
4. the S samples in a random order; consumer c of C (ranks x loader workers) reads positions
   c, c + C, c + 2C, ... of it, so consumers never overlap and together read every sample.

A consumer's position is (epoch, index) per source plus mixing counters: the index itself
is recomputed from (seed, epoch), never stored. It is built lazily, when a consumer first
reads an epoch, once per process and source (a rank's consumers share it): ~28 bytes per
document plus 8 per sample, vectorised numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trellis.data_pipeline.packing import Source, pick_source
from trellis.data_pipeline.shards import DataError

MANY_PIECES = 32  # a sample spanning more documents is gathered vectorised, not piece by piece
CACHED_EPOCHS = 2  # indexes kept per source (consumers of a rank may straddle an epoch)


def doc_table(src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, first token, length) of every document of the split, in manifest order,
    (D,) int64 each; cached on the source (maps every shard once)."""
    got = src.cache.get("doc_table")
    if got is None:
        starts, lengths = [], []
        for sh, lo, n in zip(src.shard_idx.tolist(), src.starts.tolist(), src.counts.tolist()):
            off = src.arrays(sh).offsets[lo:lo + n + 1].astype(np.int64)
            starts.append(off[:-1])
            lengths.append(np.diff(off))
        got = (np.repeat(src.shard_idx, src.counts), np.concatenate(starts),
               np.concatenate(lengths))
        src.cache["doc_table"] = got
    return got


@dataclass
class SampleIndex:
    """One source's samples in one epoch (see the module docstring)."""

    cum: np.ndarray    # (D+1,) position of each ordered document's first token; cum[D] = N
    shard: np.ndarray  # (D,) shard of each ordered document
    start: np.ndarray  # (D,) its first token in that shard's values
    offset: int        # s: where sample 0 starts
    T: int
    order: np.ndarray  # (S,) sample ids in the epoch's order

    @classmethod
    def build(cls, src: Source, seed: int, epoch: int, T: int) -> "SampleIndex":
        shard, start, length = doc_table(src)
        rng = np.random.default_rng([seed, epoch, src.key, 2])
        perm = rng.permutation(len(length))
        cum = np.zeros(len(length) + 1, dtype=np.int64)
        np.cumsum(length[perm] + 1, out=cum[1:])
        n_samples = -(-int(cum[-1]) // T)
        return cls(cum, shard[perm], start[perm], int(rng.integers(T)), T,
                   rng.permutation(n_samples))

    @classmethod
    def cached(cls, src: Source, seed: int, epoch: int, T: int) -> "SampleIndex":
        key = ("samples", seed, epoch, T)
        idx = src.cache.get(key)
        if idx is None:
            idx = src.cache[key] = cls.build(src, seed, epoch, T)
            old = sorted(k for k in src.cache if k[0] == "samples")[:-CACHED_EPOCHS]
            for k in old:
                del src.cache[k]
        return idx

    @property
    def num_samples(self) -> int:
        return len(self.order)

    def read(self, src: Source, j: int, out: np.ndarray) -> int:
        """Write sample j (not its shuffled position) into out (>= T+1,); returns its length."""
        N, T, cum = int(self.cum[-1]), self.T, self.cum
        n = min(T, N - j * T) + 1
        p = (self.offset + j * T) % N
        d = int(np.searchsorted(cum, p, side="right")) - 1
        if p + n <= N:
            d_end = int(np.searchsorted(cum, p + n - 1, side="right")) - 1
            if d_end - d > MANY_PIECES:
                self._gather(src, p, n, d, d_end, out)
                return n
        i = 0
        while i < n:  # one slice per document piece; wraps to document 0 at the end
            w, dl = p - int(cum[d]), int(cum[d + 1] - cum[d])  # dl: document + its EOS
            take = min(n - i, dl - w)
            body = min(take, dl - 1 - w)
            if body > 0:
                a = int(self.start[d]) + w
                out[i:i + body] = src.arrays(int(self.shard[d])).values[a:a + body]
            if body < take:
                out[i + body] = src.eos_id
            i, p, d = i + take, p + take, d + 1
            if d == len(self.start):
                p, d = 0, 0
        return n

    def _gather(self, src: Source, p: int, n: int, d0: int, d1: int, out: np.ndarray) -> None:
        """Positions p .. p+n-1 (no wrap) over documents d0..d1, one fancy index per shard."""
        cum = self.cum[d0:d1 + 2]
        pos = np.arange(p, p + n, dtype=np.int64)
        k = np.searchsorted(cum, pos, side="right") - 1  # (n,) document, relative to d0
        w = pos - cum[k]
        eos = w == cum[k + 1] - cum[k] - 1
        shards = self.shard[d0 + k]
        src_idx = self.start[d0 + k] + w
        row = out[:n]
        row[eos] = src.eos_id
        for sh in np.unique(shards[~eos]).tolist():
            sel = (shards == sh) & ~eos
            row[sel] = src.arrays(sh).values[src_idx[sel]]


class SampleCursor:
    """One consumer's position in one source's samples: epoch and index into its share."""

    def __init__(self, src: Source, c: int, C: int, seed: int, T: int, epoch: int, pos: int):
        self.src, self.c, self.C, self.seed, self.T = src, c, C, seed, T
        self.epoch, self.pos = epoch, pos
        n = self.index().num_samples
        if n < C:  # every reader needs a sample, or one rank would starve
            raise DataError(f"{src.root}: {src.num_docs} documents cannot feed {C} readers "
                            f"(world_size x loader_workers): they make {n} samples of {T} "
                            "tokens; use fewer readers, a shorter seq_len or more data")
        self.per_epoch = -(-(n - c) // C)

    def index(self) -> SampleIndex:
        return SampleIndex.cached(self.src, self.seed, self.epoch, self.T)

    def exhausted(self) -> bool:
        return self.pos >= self.per_epoch

    def read(self, out: np.ndarray) -> int:
        """The next sample into out; an infinite reader rolls into the next epoch first."""
        if self.exhausted():
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self.index()
        n = idx.read(self.src, int(idx.order[self.c + self.pos * self.C]), out)
        self.pos += 1
        return n


class SamplePacker:
    """One consumer's rows: whole shuffled samples, each from the source furthest below its
    mixture weight. The same interface as packing.Packer for TokenStream (state, step, done,
    epoch) with rows() in place of fill()."""

    def __init__(self, sources: list[Source], weights: list[float], mix_by: str, c: int,
                 C: int, seed: int, seq_len: int, epoch: int, infinite: bool,
                 state: dict | None = None):
        st = state or {}
        epochs = st.get("epoch", [epoch] * len(sources))
        pos = st.get("pos", [0] * len(sources))
        self.cursors = [SampleCursor(s, c, C, seed, seq_len, epochs[i], pos[i])
                        for i, s in enumerate(sources)]
        self.sources, self.w, self.mix_by, self.infinite = sources, weights, mix_by, infinite
        self.counts = list(st.get("counts", [0] * len(sources)))
        self.step: int = st.get("step", 0)
        self.done: bool = st.get("done", False)
        self.eos, self.pad = sources[0].eos_id, sources[0].pad_id

    def state(self) -> dict:
        return {"epoch": [c.epoch for c in self.cursors], "pos": [c.pos for c in self.cursors],
                "counts": list(self.counts), "step": self.step, "done": self.done}

    @property
    def epoch(self) -> int:
        return self.cursors[0].epoch

    def _select(self) -> int:
        if len(self.cursors) == 1:
            return -1 if not self.infinite and self.cursors[0].exhausted() else 0
        skip = [not self.infinite and c.exhausted() for c in self.cursors]
        return pick_source(self.counts, self.w, skip)

    def rows(self, B: int, T1: int, dtype: np.dtype = np.dtype(np.int64)
             ) -> tuple[np.ndarray, np.ndarray]:
        """Up to B rows (B, T1) of `dtype` and their valid lengths (fewer rows only at the end
        of a finite epoch)."""
        tok = np.full((B, T1), self.pad, dtype=dtype)
        valid = np.zeros(B, dtype=np.int64)
        for r in range(B):
            s = self._select()
            if s < 0:
                self.done = True
                return tok[:r], valid[:r]
            n = self.cursors[s].read(tok[r])
            valid[r] = n
            self.counts[s] += n - 1 if self.mix_by == "tokens" else \
                int(np.count_nonzero(tok[r, 1:n] == self.eos))
        return tok, valid
