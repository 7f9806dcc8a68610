"""Micro-batches from a TokenStream, with or without DataLoader worker processes, resumable.

    stream = TokenStream(run_dir / "data", cfg.data, rank, world_size)
    loader = batches(stream, micro_batch_size=8, collate=clm_collate)
    for batch in loader: ...            # infinite unless the stream is finite
    ckpt["data"] = loader.state_dict()  # per rank; loader.load_state_dict(...) on resume

With ``cfg.loader_workers = W > 0`` a torch DataLoader runs W worker processes; each
produces whole collated micro-batches of its own consumer and attaches its position, which
this wrapper records as it hands the batch over, so ``state_dict()`` is exact even though the
workers read ahead. Batches arrive in the same order as with W = 0.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset

from trellis.data_pipeline.stream import TokenStream

Collate = Callable[[dict[str, Any]], dict[str, Any]]


class _WorkerBatches(IterableDataset):
    def __init__(self, stream: TokenStream, batch_size: int, collate: Collate | None):
        self.stream, self.batch_size, self.collate = stream, batch_size, collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for w, batch, state in self.stream.iter_batches_with_state(self.batch_size):
            out = self.collate(batch) if self.collate else batch
            out["_data_state"] = (w, state)
            yield out


class Batches:
    """Iterable of (collated) micro-batches of one rank; see module docstring."""

    def __init__(self, stream: TokenStream, micro_batch_size: int, collate: Collate | None = None,
                 prefetch_factor: int = 2):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.stream, self.micro_batch_size, self.collate = stream, micro_batch_size, collate
        self.prefetch_factor = prefetch_factor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.stream
        if s.cfg.loader_workers == 0:
            for batch in s.iter_batches(self.micro_batch_size):
                yield self.collate(batch) if self.collate else batch
            return
        s._materialize()
        s._live = {}           # positions now come from the workers' batches
        s._rotation = s._next  # physical worker 0 plays the consumer that is due next
        dl = DataLoader(_WorkerBatches(s, self.micro_batch_size, self.collate), batch_size=None,
                        num_workers=s.cfg.loader_workers, prefetch_factor=self.prefetch_factor)
        for item in dl:
            w, state = item.pop("_data_state")
            s._states[int(w)] = state
            s._next = (int(w) + 1) % s.workers
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.stream.load_state_dict(d)


def batches(stream: TokenStream, micro_batch_size: int, collate: Collate | None = None) -> Batches:
    return Batches(stream, micro_batch_size, collate)
