"""Configs of the fine-tuning jobs: `trellis sft` (demonstrations) and `trellis rm` (reward
model from comparisons). Both start from trained weights (`init_from`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.cluster.metrics import MetricsConfig
from trellis.launcher.loop_config import LoopConfig
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig


@dataclass
class RowsConfig:
    train: str = ""
    """Training rows: an ingested folder (manifest.json) or JSONL/Parquet files to ingest."""
    val: str = ""
    """Held-out rows, same forms; empty = hold out val_fraction of `train`."""
    val_fraction: float = field(default=0.1, metadata={"min": 0.0, "max": 0.5})
    """Share of `train` rows held out when `val` is empty."""
    max_len: int = field(default=128, metadata={"min": 4})
    """Prompt + response tokens per row (longer rows are cut: prompt from the left, response
    from the right)."""
    max_prompt_len: int = field(default=64, metadata={"min": 1})
    """Prompt tokens kept (its end)."""
    seed: int = 0
    """Row order seed (with the epoch)."""
    packing: bool = False
    """sft and rm: lay each micro-batch's rows end to end in blocks of at most `pack_len`
    tokens (each row attends only to itself, positions from 0) instead of padding every row
    to the longest one: the same rows and loss, fewer pad tokens computed. GPT models only."""
    pack_len: int = field(default=0, metadata={"min": 0})
    """Tokens per packed block; 0 = max_len. At least max_len, so every row (cut to max_len
    as without packing) fits in one block; at most the model's max_seq_len."""

    def __post_init__(self) -> None:
        if self.pack_len and self.pack_len < self.max_len:
            raise ValueError(f"data.pack_len {self.pack_len} must be 0 or at least data.max_len "
                             f"{self.max_len} (a row of max_len tokens must fit in one block)")

    @property
    def block_len(self) -> int:
        """Tokens per packed block."""
        return self.pack_len or self.max_len


@dataclass
class SFTJobConfig:
    run_dir: str = "runs/sft"
    """Checkpoints, metrics, the ingested rows and the initial weights go here."""
    seed: int = 0
    init_from: str = ""
    """Weights to start from: a pretrain run dir, trellis weights, or a local HF GPT-2 dir."""
    data: RowsConfig = field(default_factory=RowsConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=200, eval_every=50))

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ValueError("init_from is required (a pretrain run dir or model weights)")
        if not self.data.train:
            raise ValueError("data.train is required (demonstrations)")


@dataclass
class RMJobConfig(SFTJobConfig):
    run_dir: str = "runs/rm"
    normalize_on: str = ""
    """Demonstrations whose mean score becomes 0 after training (InstructGPT's RM bias);
    empty = no normalisation."""
    weighting: Literal["prompt", "pair"] = "prompt"
    """'prompt': each prompt's C(K,2) pairs share one unit of weight (InstructGPT);
    'pair': every pair counts alike."""
