"""Job configs: each composes the components' own dataclasses into one tree that a YAML file
and `--set` overrides fill (see launcher/config.py for the validation rules)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.cluster.metrics import MetricsConfig
from trellis.data_pipeline.config import DataConfig
from trellis.data_pipeline.tokenizer import TokenizerConfig
from trellis.model.config import ModelConfig
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig


@dataclass
class LoopConfig:
    steps: int = field(default=300, metadata={"min": 1})
    """Optimizer steps to train for (the schedule's length)."""
    log_every: int = field(default=10, metadata={"min": 1})
    """Steps between logged (and printed) metric rows."""
    eval_every: int = field(default=100, metadata={"min": 0})
    """Steps between validation passes; 0 = only at the end."""
    eval_batches: int = field(default=4, metadata={"min": 1})
    """Micro-batches per rank in a validation pass."""
    stop_after: int = field(default=0, metadata={"min": 0})
    """End this invocation after this step (checkpointed) though the schedule spans `steps`:
    for time-sliced or preemptible allocations; a later run resumes. 0 = run to the end."""
    max_failures: int = field(default=0, metadata={"min": 0})
    """Worker deaths to recover from (restart the group, resume the latest checkpoint)."""


@dataclass
class DistillConfig:
    teacher: str = ""
    """Teacher: an HF BERT directory or a trellis run directory (its latest checkpoint)."""
    temperature: float = field(default=2.0, metadata={"min": 0.1})
    """Softmax temperature T of the KL term (DistilBERT: 2)."""
    alpha_kl: float = field(default=5.0, metadata={"min": 0.0})
    """Weight of KL(teacher/T || student/T) * T^2."""
    alpha_mlm: float = field(default=2.0, metadata={"min": 0.0})
    """Weight of the student's own masked-LM loss."""
    alpha_cos: float = field(default=1.0, metadata={"min": 0.0})
    """Weight of the cosine loss between student and teacher last hidden states."""


@dataclass
class TrainConfig(LoopConfig):
    objective: Literal["clm", "mlm", "distill"] = "clm"
    """clm: GPT next-token; mlm: BERT masked LM (RoBERTa recipe); distill: DistilBERT student."""
    sample_tokens: int = field(default=48, metadata={"min": 0})
    """Tokens generated as a sample at the end (GPT only); 0 = none."""
    mask_prob: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0})
    """MLM: fraction of non-special tokens chosen per batch."""


@dataclass
class PretrainJobConfig:
    run_dir: str = "runs/pretrain"
    """Where checkpoints, metrics, the tokenizer and the ingested data go."""
    seed: int = 0
    """Seed for model init, data order and masking."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        want = "gpt" if self.train.objective == "clm" else "bert"
        if self.model.arch != want:
            raise ValueError(f"train.objective={self.train.objective} needs model.arch={want}, "
                             f"got {self.model.arch}")
        if self.train.objective == "distill" and not self.distill.teacher:
            raise ValueError("train.objective=distill needs distill.teacher (a directory)")
