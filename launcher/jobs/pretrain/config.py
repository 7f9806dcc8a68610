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
from trellis.model.seq2seq_generate import TranslateConfig
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
    objective: Literal["clm", "mlm", "distill", "seq2seq"] = "clm"
    """clm: GPT next-token; mlm: BERT masked LM (RoBERTa recipe); distill: DistilBERT student;
    seq2seq: encoder-decoder translation on {source, target} pairs (data.path; without one,
    a generated language pair, data_pipeline/translation_pair.py)."""
    sample_tokens: int = field(default=48, metadata={"min": 0})
    """Tokens generated as a sample at the end (GPT only); 0 = none."""
    mask_prob: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0})
    """MLM: fraction of non-special tokens chosen per batch."""
    bleu_pairs: int = field(default=200, metadata={"min": 0})
    """seq2seq: held-out pairs translated at each evaluation for BLEU and chrF; 0 = loss only."""
    sample_translations: int = field(default=5, metadata={"min": 0})
    """seq2seq: held-out pairs whose translations are printed at the end."""
    compile: bool = False
    """clm/mlm/distill: torch.compile the model's training forward (inductor). The first step
    pays the compilation (tiny GPT on CPU: ~80 s cold, ~8 s from the cache); evaluation and
    sampling stay eager. Off by default: bench/pretrain.py --compile measures whether it pays."""


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
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    """seq2seq: how held-out sources are translated (greedy or beam) for BLEU/chrF."""

    def __post_init__(self) -> None:
        want = {"clm": "gpt", "seq2seq": "seq2seq"}.get(self.train.objective, "bert")
        if self.model.arch != want:
            raise ValueError(f"train.objective={self.train.objective} needs model.arch={want}, "
                             f"got {self.model.arch}")
        if self.train.compile and self.parallel.zero_stage == 3:
            raise ValueError("train.compile needs parallel.zero_stage <= 2 (under ZeRO-3 the "
                             "parameter-gather hooks make torch.compile recompile every module)")
        if self.train.objective == "distill" and not self.distill.teacher:
            raise ValueError("train.objective=distill needs distill.teacher (a directory)")
        if self.train.objective == "seq2seq":
            if self.data.seq_len > self.model.max_seq_len:
                raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                                 f"{self.model.max_seq_len} (the longest source or target)")
