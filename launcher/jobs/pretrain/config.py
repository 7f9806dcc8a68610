"""`trellis pretrain` job config: the components' own dataclasses composed into one tree that
a YAML file and `--set` overrides fill (validation rules: launcher/config_loader.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.cluster.metrics import MetricsConfig
from trellis.data_pipeline.config import DataConfig
from trellis.data_pipeline.tokenizer import TokenizerConfig
from trellis.launcher.loop_config import LoopConfig
from trellis.model.config import ModelConfig
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig


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
