"""RowStream: one data-parallel rank's batches of rows from a structured table (SFT
demonstrations, comparisons, prompts), with exact resume.

Each epoch is a (seed, epoch) permutation of the table dealt round-robin to the ranks
(`rank_indices`), so ranks never overlap and together see every row. Every rank uses the
same number of rows per epoch (the common floor), so all ranks take the same number of
steps and collectives stay aligned; the few rows left over rotate with the permutation.
"""
from __future__ import annotations

from typing import Any, Iterator

from trellis.data_pipeline.structured import StructuredDataset, rank_indices


class RowStream:
    def __init__(self, dataset: StructuredDataset, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 infinite: bool = True, rows: list[int] | None = None):
        """`rows`: restrict to these row indices of the table (e.g. a train/val split)."""
        self.ds, self.batch_size = dataset, batch_size
        self.rank, self.world, self.seed = rank, world_size, seed
        self.shuffle, self.infinite = shuffle, infinite
        self.rows = list(range(len(dataset))) if rows is None else list(rows)
        self.per_rank = len(self.rows) // world_size
        if self.per_rank < batch_size:
            raise ValueError(f"{dataset.manifest.get('root', 'table')}: {len(self.rows)} rows "
                             f"are too few for {world_size} ranks x batch {batch_size}")
        self.epoch, self.pos = 0, 0

    def _order(self, epoch: int) -> list[int]:
        mine = rank_indices(len(self.rows), self.rank, self.world, self.seed, epoch, self.shuffle)
        return [self.rows[i] for i in mine[:self.per_rank]]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        order = self._order(self.epoch)
        while True:
            if self.pos + self.batch_size > len(order):
                if not self.infinite:
                    return
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order(self.epoch)
            batch = self.ds.rows(order[self.pos:self.pos + self.batch_size])
            self.pos += self.batch_size
            yield batch

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "world_size": self.world,
                "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for key, mine in (("world_size", self.world), ("rows", len(self.rows)), ("seed", self.seed)):
            if d.get(key) != mine:
                raise ValueError(f"row-stream state was saved with {key}={d.get(key)} but this "
                                 f"run has {key}={mine}; resume with the same {key}")
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of n rows: the val rows are a seeded random subset."""
    import numpy as np

    if val_fraction <= 0:
        return list(range(n)), []
    order = np.random.default_rng([seed, 7919]).permutation(n)
    k = max(1, int(round(n * val_fraction)))
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())
