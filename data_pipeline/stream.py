"""TokenStream: the streaming reader over ingested shards, per data-parallel rank.

What it yields (``seq_len`` = T):

* ``iter(stream)``: one block at a time, a dict of
    ``input_ids``   IntTensor (T + 1,)  tokens; block k+1 starts with block k's last token, so
                    ``input_ids[:-1]`` are inputs and ``input_ids[1:]`` their labels and every
                    token is a label exactly once;
    ``num_tokens``  int, valid ids in ``input_ids`` (T + 1 except at the end of a finite epoch or
                    of an unpacked document; the rest is pad_id).
* ``stream.iter_batches(B)``: the same stacked, ``(B, T + 1)`` / ``(B,)``, plus the ints
  ``epoch``, ``step`` (this reader's batch counter) and ``consumer`` (its global index) that
  collators use to seed their randomness. This is the fast path (no per-block tensors).

Token ids are int32 (``stream.token_dtype``; int64 only if the vocabulary could reach 2^31):
half of int64's host memory traffic and bytes sent to the device, and torch's embedding and
comparisons take them. Widen to int64 on the device where an op needs it (cross_entropy's
targets). Not torch.uint16, the shards' own dtype: torch 2.13 has no comparisons, arithmetic
or type promotion for it ("lt_cpu not implemented for 'UInt16'").

Documents are packed (concatenate with EOS after each, then cut) unless ``cfg.packing`` is
False, in which case each block starts at a document start and is padded after its EOS.

Order (training split, ``cfg.shuffle`` on, packed): ``cfg.order = "shuffled"`` (default) reads
whole samples from a per-epoch global shuffle of fixed-length samples (data_pipeline.samples),
so a batch's B rows come from far-apart places of the corpus; ``"sequential"`` reads the
packed stream in order (documents shuffled by data_pipeline.packing), B consecutive blocks
per batch, each block's last id starting the next one: for streaming reads from remote
storage. Validation, ``shuffle=False`` and unpacked blocks are always sequential.

The stream is infinite by default: when a source's documents for this reader are used up it
continues with that source's next epoch (order recomputed from seed and epoch). With
``infinite=False`` it stops after one epoch (of every source): validation and tests.

Rank r of N with W = ``cfg.loader_workers`` workers is consumers r*W .. r*W+W-1 of N*W; see
data_pipeline.packing for how documents are dealt. In the training process (no DataLoader)
the W consumers are read round-robin, exactly as a DataLoader with W workers would deliver
them, so results do not depend on whether worker processes are used.

Reading ahead in this process (a prefetch thread; data_pipeline.loader): ``stream.read_ahead(B,
collate)`` yields the same ``(consumer, batch, position after it)`` items from a snapshot of the
stream's position, handed to ``record_delivered`` as they reach the trainer.

Worker processes (data_pipeline.loader drives them): ``stream.worker_batches(B, collate)`` is
the IterableDataset a DataLoader with W workers runs; DataLoader worker j reads the consumer
that is due j-th from the stream's current position and yields ``(consumer, batch, that
consumer's position after the batch)``. The reader in the training process hands each item
to ``stream.record_delivered(consumer, position)`` as it passes the batch on, so the stream's
position is what the trainer received, not what the workers read ahead.

``state_dict()`` after consuming an item describes the position right after it (per consumer:
a few integers; no token data); ``load_state_dict`` on a fresh stream resumes bit for bit.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trellis.data_pipeline.config import DataConfig, SourceConfig
from trellis.data_pipeline.packing import Packer, Source
from trellis.data_pipeline.samples import SamplePacker
from trellis.data_pipeline.shards import DataError

STATE_VERSION = 1


class DataStateError(ValueError):
    """A saved data state that does not fit this stream (world size, sources, ...)."""


def token_dtype(sources: list[Source]) -> np.dtype:
    """int32 unless a source's ids may reach 2^31 (uint32 shards of such a vocabulary)."""
    fits = all(s.dtype.itemsize <= 2 or s.limit[0] <= 1 << 31 for s in sources)
    return np.dtype(np.int32 if fits else np.int64)


def _rows(flat: np.ndarray, B: int, T1: int, dtype: np.dtype) -> np.ndarray:
    """(B, T1) rows of a flat (B*(T1-1)+1,) buffer; row r = flat[r*(T1-1) : r*(T1-1)+T1]
    (a reshape plus one column: much faster than copying a strided view), widened to dtype."""
    T = T1 - 1
    out = np.empty((B, T1), dtype=dtype)
    out[:, :T] = flat[:-1].reshape(B, T)
    out[:, T] = flat[T::T]
    return out


class TokenStream(IterableDataset):
    def __init__(self, path: str | Path | None = None, cfg: DataConfig | None = None,
                 rank: int = 0, world_size: int = 1, epoch: int = 0, *, split: str = "train",
                 infinite: bool = True, tokenizer: Any = None, vocab_size: int | None = None,
                 verify: bool = True):
        """`path`: an ingested folder or manifest.json (else cfg.path / cfg.sources);
        `split`: "train" or "val" (cfg.val_path, or the val_fraction tail of each shard of
        the train data; val is read in order, unshuffled); `tokenizer`: a Tokenizer or sha256
        that the manifest must match (None skips the check); `vocab_size`: the model's
        vocabulary: a manifest recording a larger token id is refused here, so no batch
        carries an id >= vocab_size (the tokenizer's vocabulary bounds ids either way);
        `verify`: check each shard's size and checksum on its first open in this process
        (False only for benchmarks). Corruption is a DataError naming the shard."""
        cfg = cfg or DataConfig()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.cfg, self.rank, self.world_size, self.split = cfg, rank, world_size, split
        self.infinite, self.start_epoch = infinite, epoch
        self.shuffle = cfg.shuffle and split == "train"
        self.sampled = self.shuffle and cfg.packing and cfg.order == "shuffled"
        self.sources = self._open_sources(path, tokenizer, vocab_size, verify)
        self.weights = [s.weight for s in self._source_cfgs]
        self.workers = max(1, cfg.loader_workers)
        self.eos_id, self.pad_id = self.sources[0].eos_id, self.sources[0].pad_id
        wide = any(s.dtype.itemsize > 2 for s in self.sources)
        self._buf_dtype = np.uint32 if wide else np.uint16
        self.token_dtype = token_dtype(self.sources)  # of the batches' input_ids
        self._states: list[dict | None] = [None] * self.workers
        self._live: dict[int, Packer] = {}  # packers of the current in-process iteration
        self._next = 0  # logical worker (consumer of this rank) that delivers the next item
        for w in range(self.workers):  # fail now, not in a worker, if the data is too small
            self._packer(w)

    def _open_sources(self, path: str | Path | None, tokenizer: Any, vocab_size: int | None,
                      verify: bool) -> list[Source]:
        """train: `path` or cfg.path / cfg.sources. val: cfg.val_path (or `path`) read whole
        when cfg.val_path is set, else the val_fraction tail of each shard of the train data."""
        cfg = self.cfg
        whole_val = self.split == "val" and bool(cfg.val_path)
        if self.split == "val" and not whole_val and cfg.val_fraction <= 0:
            raise DataError("no validation data: set data.val_path or data.val_fraction")
        if path is not None:
            cfgs = [SourceConfig(name="default", path=str(path))]
        elif whole_val:
            cfgs = [SourceConfig(name="val", path=cfg.val_path)]
        else:
            cfgs = cfg.resolved_sources()
        frac = 0.0 if whole_val else cfg.val_fraction
        split = "train" if whole_val else self.split
        self._source_cfgs = cfgs
        return [Source(c.name, c.path, split, frac, tokenizer, vocab_size, verify)
                for c in cfgs]

    # -- consumers --------------------------------------------------------------------------------
    @property
    def order(self) -> str:
        """The order this stream actually reads in: 'shuffled' samples or 'sequential'."""
        return "shuffled" if self.sampled else "sequential"

    def _packer(self, logical: int) -> Packer | SamplePacker:
        c = self.rank * self.workers + logical
        if self.sampled:
            return SamplePacker(self.sources, self.weights, self.cfg.mix_by, c,
                                self.world_size * self.workers, self.cfg.seed, self.cfg.seq_len,
                                self.start_epoch, self.infinite, self._states[logical])
        return Packer(self.sources, self.weights, self.cfg.mix_by, c,
                      self.world_size * self.workers, self.cfg.seed, self.shuffle,
                      self.cfg.shuffle_buffer, self.start_epoch, self.infinite,
                      self.cfg.packing, self._states[logical])

    def _batch(self, pk: Packer, B: int) -> dict[str, Any] | None:
        """The next (B, T+1) batch of one consumer, or None when its finite epoch is over."""
        epoch, step = pk.epoch, pk.step
        if self.sampled:
            tok, valid = pk.rows(B, self.cfg.seq_len + 1, self.token_dtype)
        else:
            fill = self._fill_packed if self.cfg.packing else self._fill_unpacked
            tok, valid = fill(pk, B, self.cfg.seq_len + 1)
        if len(valid) == 0:
            return None
        if valid[-1] < 2:  # rows with fewer than 2 ids (end of a finite epoch) are dropped
            keep = valid >= 2
            if not keep.any():
                return None
            tok, valid = tok[keep], valid[keep]
        pk.step += 1
        out = {"input_ids": torch.from_numpy(tok), "num_tokens": torch.from_numpy(valid)}
        out.update(epoch=epoch, step=step, consumer=self.rank * self.workers)
        return out

    def _fill_packed(self, pk: Packer, B: int, T1: int) -> tuple[np.ndarray, np.ndarray]:
        """Fill B*(T1-1)+1 tokens in one flat buffer; rows are overlapping strided views."""
        flat = np.empty(B * (T1 - 1) + 1, dtype=self._buf_dtype)
        first = 0
        if pk.carry is not None:  # the last token of the previous block starts this one
            flat[0] = pk.carry[0]
            first = 1
        n = first + pk.fill(flat[first:])
        if n >= 1:
            pk.carry = [int(flat[n - 1])]
        if n < len(flat):
            flat[n:] = self.pad_id
            valid = np.clip(n - np.arange(B) * (T1 - 1), 0, T1)
        else:
            valid = np.full(B, T1)
        return _rows(flat, B, T1, self.token_dtype), valid

    def _fill_unpacked(self, pk: Packer, B: int, T1: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row starts at a document start (or continues one that did not fit) and is
        padded after the document's EOS."""
        tok = np.full((B, T1), self.pad_id, dtype=self.token_dtype)
        valid = np.zeros(B, dtype=np.int64)
        for r in range(B):
            first = 0
            if pk.carry is not None:
                tok[r, 0] = pk.carry[0]
                first = 1
            n = first + pk.fill(tok[r, first:], boundary_stop=True)
            valid[r] = n
            mid_doc = pk.cur >= 0 and n == T1
            pk.carry = [int(tok[r, n - 1])] if mid_doc else None
            if n < 2 and pk.done:
                break
        return tok, valid

    # -- iteration --------------------------------------------------------------------------------
    def _iterate(self, B: int, logical_ids: list[int]) -> Iterator[tuple[int, dict, Packer]]:
        """Round-robin over `logical_ids`' consumers, starting with the first. The packers
        stay live while suspended at a yield, so their state is read only when asked for."""
        self._materialize()
        packers = {w: self._packer(w) for w in logical_ids}
        self._live = packers
        active = list(logical_ids)
        while active:
            for w in list(active):
                pk = packers[w]
                batch = None if pk.done else self._batch(pk, B)
                if batch is None:
                    pk.done = True
                    active.remove(w)
                    continue
                batch["consumer"] = self.rank * self.workers + w
                self._next = (w + 1) % self.workers
                yield w, batch, pk

    def _materialize(self) -> None:
        """Copy the live packers' positions into _states (before a new iteration / a save)."""
        for w, pk in getattr(self, "_live", {}).items():
            self._states[w] = pk.state()

    def _logical_ids(self) -> list[int]:
        """In this process: all W consumers, the one due next first. In DataLoader worker j
        (of W): the j-th of them only, so the DataLoader's round-robin delivers in that order."""
        info = get_worker_info()
        if info is None:
            return [(self._next + i) % self.workers for i in range(self.workers)]
        if info.num_workers != self.workers:
            raise DataStateError(f"DataLoader has {info.num_workers} workers but "
                                 f"data.loader_workers is {self.workers}")
        return [(info.id + self._next) % self.workers]

    def iter_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        for _, batch, _ in self._iterate(batch_size, self._logical_ids()):
            yield batch

    def worker_batches(self, batch_size: int,
                       collate: Callable[[dict], dict] | None = None) -> "WorkerBatches":
        """The dataset for a DataLoader with ``cfg.loader_workers`` workers, starting at this
        stream's current position (any iteration in this process ends here). Feed every item
        it delivers to record_delivered; see the module docstring."""
        if self.cfg.loader_workers < 1:
            raise ValueError("worker_batches needs data.loader_workers >= 1")
        self._materialize()
        self._live = {}
        return WorkerBatches(self, batch_size, collate)

    def read_ahead(self, batch_size: int, collate: Callable[[dict], dict] | None = None
                   ) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        """(logical worker, collated batch, that consumer's position after it) from a snapshot
        of this stream's position, for a reader in this process that runs ahead of the trainer
        (a prefetch thread). Any iteration in this process ends here; feed every item that
        reaches the trainer to record_delivered."""
        self._materialize()
        self._live = {}
        return _positioned(copy.copy(self), batch_size, collate)

    def record_delivered(self, worker: int, state: dict[str, Any]) -> None:
        """A batch of logical worker `worker` (of this rank) reached the trainer, leaving that
        consumer at `state`: the stream's position now continues after it."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not in [0, {self.workers})")
        self._live.pop(worker, None)
        self._states[worker] = dict(state)
        self._next = (worker + 1) % self.workers

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned DataLoader workers): positions only, no live readers or mmaps."""
        self._materialize()
        d = dict(self.__dict__)
        d["_live"], d["_states"] = {}, [None if s is None else dict(s) for s in self._states]
        return d

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.iter_batches(1):
            yield {"input_ids": batch["input_ids"][0], "num_tokens": int(batch["num_tokens"][0])}

    # -- epochs and state -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Restart every consumer of this rank at the beginning of `epoch`."""
        self.start_epoch = epoch
        self._states = [None] * self.workers
        self._live = {}
        self._next = 0

    @property
    def epoch(self) -> int:
        """Epoch of the first source at the next consumer to deliver."""
        self._materialize()
        st = self._states[self._next]
        return st["epoch"][0] if st else self.start_epoch

    def _fingerprint(self) -> list:
        return [[s.name, s.num_docs, s.manifest["tokenizer"].get("sha256")] for s in self.sources]

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serializable position of this rank's reader (after the last item)."""
        self._materialize()
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "loader_workers": self.cfg.loader_workers, "seed": self.cfg.seed,
                "seq_len": self.cfg.seq_len, "packing": self.cfg.packing, "split": self.split,
                "order": self.order, "start_epoch": self.start_epoch,
                "sources": self._fingerprint(),
                "next_worker": self._next,
                "workers": [None if s is None else dict(s) for s in self._states]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for key, mine in (("world_size", self.world_size), ("rank", self.rank),
                          ("loader_workers", self.cfg.loader_workers), ("seed", self.cfg.seed),
                          ("seq_len", self.cfg.seq_len), ("packing", self.cfg.packing),
                          ("split", self.split), ("order", self.order)):
            # states written before data.order existed were read sequentially
            if d.get(key, "sequential" if key == "order" else None) != mine:
                raise DataStateError(
                    f"data state was saved with {key}={d.get(key)} but this run has {key}={mine}; "
                    f"resume with the same {key}, or start the data stream fresh")
        if d.get("version") != STATE_VERSION:
            raise DataStateError(f"data state version {d.get('version')} is not {STATE_VERSION}")
        if [list(x) for x in d["sources"]] != self._fingerprint():
            raise DataStateError(f"data state was saved for sources {d['sources']} but this run "
                                 f"reads {self._fingerprint()}")
        self.start_epoch = d["start_epoch"]
        self._live = {}
        self._states = [None if s is None else dict(s) for s in d["workers"]]
        self._next = d["next_worker"]


def _positioned(s: TokenStream, batch_size: int, collate: Callable[[dict], dict] | None
                ) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
    """A snapshot stream's (logical worker, collated batch, consumer position after it)."""
    for w, batch, pk in s._iterate(batch_size, s._logical_ids()):
        out = collate(batch) if collate is not None else batch
        yield w, out, pk.state()


class WorkerBatches(IterableDataset):
    """What each DataLoader worker of TokenStream.worker_batches runs: its consumer's
    (logical worker, collated batch, consumer position after the batch), from a snapshot of
    the stream's position taken when this was made."""

    def __init__(self, stream: TokenStream, batch_size: int,
                 collate: Callable[[dict], dict] | None = None):
        # A snapshot (copy goes through __getstate__: positions, no live readers); the
        # original moves on as delivered items are recorded.
        self.stream = copy.copy(stream)
        self.batch_size, self.collate = batch_size, collate

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        if get_worker_info() is None:
            raise RuntimeError("WorkerBatches runs inside DataLoader workers only")
        yield from _positioned(self.stream, self.batch_size, self.collate)
