"""Config of `trellis finetune`: a pretrained GPT / BERT (trellis run, trellis weights or a
local HF GPT-2 / BERT dir) plus a small task head, trained on labelled rows (GPT-1 / BERT
transfer), with early stopping on a held-out metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.cluster.metrics import MetricsConfig
from trellis.data_pipeline.task_rows import TaskFieldsConfig
from trellis.launcher.loop_config import LoopConfig
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig

# The metric each task reports first and stops early on by default.
DEFAULT_METRIC = {"classification": "accuracy", "regression": "pearson", "qa": "exact_match"}
METRICS = {"classification": ("accuracy", "f1", "loss"), "regression": ("pearson", "spearman", "loss"),
           "qa": ("exact_match", "f1", "loss")}


@dataclass
class TaskDataConfig:
    train: str = ""
    """Labelled training rows: a JSONL / Parquet / Arrow file, folder or glob."""
    val: str = ""
    """Held-out rows, same forms; empty = hold out val_fraction of `train`."""
    val_fraction: float = field(default=0.1, metadata={"min": 0.0, "max": 0.5})
    """Share of `train` held out when `val` is empty."""
    max_train_rows: int = field(default=0, metadata={"min": 0})
    """Use only the first this many training rows (after the split); 0 = all. For learning
    curves over the number of labelled examples."""
    max_len: int = field(default=128, metadata={"min": 4})
    """Tokens per row, special tokens included."""
    truncate: bool = False
    """Cut rows longer than max_len (the longer segment's end); false = a longer row is an
    error naming its file and row."""
    seed: int = 0
    """Row order and split seed."""


@dataclass
class EarlyStopConfig:
    metric: str = ""
    """Held-out metric to select on: classification accuracy|f1|loss, regression
    pearson|spearman|loss, qa exact_match|f1|loss; empty = the task's first."""
    patience: int = field(default=0, metadata={"min": 0})
    """Stop after this many evaluations (train.eval_every) without improvement; 0 = never
    stop early (the best evaluation's weights are still the ones exported)."""
    min_delta: float = field(default=0.0, metadata={"min": 0.0})
    """An evaluation improves on the best only by more than this."""


@dataclass
class TaskFTJobConfig:
    run_dir: str = "runs/finetune"
    """Checkpoints, metrics, the encoded rows, best/ weights and the HF export go here."""
    seed: int = 0
    init_from: str = ""
    """Pretrained weights: a pretrain run dir, trellis weights or a local HF GPT-2/BERT dir."""
    task: TaskFieldsConfig = field(default_factory=TaskFieldsConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.01,
                                                                   warmup_steps=10))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=300, eval_every=50))
    export: Literal["hf", "none"] = "hf"
    """hf: write the best weights as a transformers directory (RUN_DIR/hf) at the end."""

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ValueError("init_from is required (a pretrain run dir or model weights)")
        if not self.data.train:
            raise ValueError("data.train is required (labelled rows)")
        allowed = METRICS[self.task.kind]
        if self.early_stop.metric and self.early_stop.metric not in allowed:
            raise ValueError(f"early_stop.metric '{self.early_stop.metric}' is not a "
                             f"{self.task.kind} metric (allowed: {', '.join(allowed)})")

    @property
    def select_metric(self) -> str:
        return self.early_stop.metric or DEFAULT_METRIC[self.task.kind]
