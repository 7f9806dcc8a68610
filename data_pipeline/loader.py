"""Micro-batches from a TokenStream, with or without DataLoader worker processes, resumable.

    stream = TokenStream(run_dir / "data", cfg.data, rank, world_size)
    loader = batches(stream, micro_batch_size=8, collate=clm_collate)
    for batch in loader: ...            # infinite unless the stream is finite
    ckpt["data"] = loader.state_dict()  # per rank; loader.load_state_dict(...) on resume

With ``cfg.loader_workers = W > 0`` a torch DataLoader runs W worker processes over
``stream.worker_batches``: each reads (and collates) whole micro-batches of its own consumer
and attaches that consumer's position; as a batch is handed over, ``stream.record_delivered``
records it, so ``state_dict()`` is exact even though the workers read ahead. Batches arrive
in the same order as with W = 0.

Workers start with the 'spawn' method by default: a training rank is often a Ray actor,
whose process runs threads (gRPC, Ray's core worker) that a fork would copy mid-operation.
Spawned workers import torch afresh: ~3-5 s before the first batch on a busy 2-core machine
(fork: 0.1 s), once per iteration (a new iteration begins at every resume). As with any
spawn, a script that starts one must guard its top level with ``if __name__ == "__main__"``
(the `trellis` command and Ray actors do). Items cross processes through shared memory:
~1-2M tokens/s per rank here, far above what a model trains on, but W = 0 (20-60M tokens/s)
is the better choice when collation is cheap and cores are few.

With W = 0, ``cfg.prefetch`` > 0 micro-batches are read and collated ahead by a background
thread (data_pipeline.prefetch) from ``stream.read_ahead``, recorded as delivered in the same
way, so the next batch is ready when a step ends and the position is still exact.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader

from trellis.data_pipeline.prefetch import prefetched
from trellis.data_pipeline.stream import TokenStream

Collate = Callable[[dict[str, Any]], dict[str, Any]]
START_METHOD = "spawn"
"""multiprocessing start method of DataLoader workers ('spawn', 'forkserver' or 'fork')."""


class Batches:
    """Iterable of (collated) micro-batches of one rank; see module docstring."""

    def __init__(self, stream: TokenStream, micro_batch_size: int, collate: Collate | None = None,
                 prefetch_factor: int = 2, start_method: str = START_METHOD):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.stream, self.micro_batch_size, self.collate = stream, micro_batch_size, collate
        self.prefetch_factor, self.start_method = prefetch_factor, start_method

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s, workers, ahead = self.stream, self.stream.cfg.loader_workers, self.stream.cfg.prefetch
        if workers == 0 and ahead == 0:
            for batch in s.iter_batches(self.micro_batch_size):
                yield self.collate(batch) if self.collate else batch
            return
        if workers == 0:
            items = prefetched(s.read_ahead(self.micro_batch_size, self.collate), ahead,
                               name=f"prefetch-rank{s.rank}")
        else:
            items = iter(DataLoader(s.worker_batches(self.micro_batch_size, self.collate),
                                    batch_size=None, num_workers=workers,
                                    prefetch_factor=self.prefetch_factor,
                                    multiprocessing_context=self.start_method))
        try:
            for w, item, state in items:
                s.record_delivered(int(w), state)
                yield item
        finally:
            if hasattr(items, "close"):  # the prefetch thread stops before this returns
                items.close()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.stream.load_state_dict(d)


def batches(stream: TokenStream, micro_batch_size: int, collate: Collate | None = None,
            start_method: str = START_METHOD) -> Batches:
    return Batches(stream, micro_batch_size, collate, start_method=start_method)
