"""Batch arithmetic in one place, in named units, checked at start-up and logged.

    global_batch_sequences = micro_batch * grad_accum * world
    tokens_per_step        = global_batch_sequences * seq_len
"""
from __future__ import annotations

from dataclasses import dataclass

from trellis.parallel.config import ParallelConfig


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    """Sequences per rank per forward/backward."""
    grad_accum: int
    """Micro-batches per rank per optimizer step."""
    world: int
    """Data-parallel ranks."""
    seq_len: int
    """Tokens per sequence."""

    @property
    def global_batch_sequences(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.seq_len

    @property
    def sequences_per_rank_step(self) -> int:
        return self.micro_batch * self.grad_accum

    @classmethod
    def from_config(cls, par: ParallelConfig, seq_len: int, world_size: int | None = None,
                    global_batch_sequences: int | None = None) -> "BatchPlan":
        """Plan from `par`; `world_size` defaults to par.num_workers.

        With `global_batch_sequences` the accumulation is derived from it: it must be a multiple
        of micro_batch_size * world_size, and agree with par.grad_accum unless that is 1.
        """
        world = par.num_workers if world_size is None else world_size
        for name, v in (("seq_len", seq_len), ("world_size", world),
                        ("micro_batch_size", par.micro_batch_size), ("grad_accum", par.grad_accum)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"batch plan: {name} must be a positive integer, got {v!r}")
        accum = par.grad_accum
        if global_batch_sequences is not None:
            per_pass = par.micro_batch_size * world
            if global_batch_sequences < 1 or global_batch_sequences % per_pass:
                raise ValueError(
                    f"batch plan: global batch {global_batch_sequences} sequences is not a positive "
                    f"multiple of micro_batch_size {par.micro_batch_size} x world {world} = {per_pass}")
            derived = global_batch_sequences // per_pass
            if par.grad_accum not in (1, derived):
                raise ValueError(
                    f"batch plan: grad_accum {par.grad_accum} disagrees with global batch "
                    f"{global_batch_sequences} = {par.micro_batch_size} x {world} x {derived}")
            accum = derived
        return cls(micro_batch=par.micro_batch_size, grad_accum=accum, world=world, seq_len=seq_len)

    def check_rows(self, rows: int, what: str = "batch") -> None:
        """Raise unless a per-rank micro-batch of `rows` sequences matches the plan."""
        if rows != self.micro_batch:
            raise ValueError(f"{what}: got {rows} sequences per rank, plan says {self.micro_batch}")

    def describe(self) -> str:
        """One log line, e.g. 'batch: 8 seq/micro x 2 accum x 4 ranks = 64 seq = 65,536 tokens/step'."""
        return (f"batch: {self.micro_batch} seq/micro x {self.grad_accum} accum x {self.world} ranks"
                f" = {self.global_batch_sequences} seq x {self.seq_len} tokens"
                f" = {self.tokens_per_step:,} tokens/step")
