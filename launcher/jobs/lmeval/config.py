"""Config of `trellis eval`: a model (trellis run, trellis weights or local HF GPT-2 dir) and
task YAMLs (data_pipeline/eval_tasks.py), scored data-parallel over Ray workers or --local."""
from __future__ import annotations

from dataclasses import dataclass, field

from trellis.parallel.config import ParallelConfig


@dataclass
class EvalJobConfig:
    run_dir: str = "runs/eval"
    """results.json, results.md, accuracy_vs_k.png and the materialised model go here."""
    model: str = ""
    """A pretrain run dir, trellis weights or a local HF GPT-2 dir (with tokenizer.model)."""
    tasks: list[str] = field(default_factory=list)
    """Task YAML files (the format is in data_pipeline/eval_tasks.py and the README)."""
    shots: list[int] = field(default_factory=list)
    """Numbers of solved examples in the prompt to evaluate; empty = each task's num_fewshot."""
    seed: int = 1234
    """Seed of the few-shot draws (each row's examples are fixed by seed, task and row)."""
    limit: int = field(default=0, metadata={"min": 0})
    """Evaluate only the first this many rows of each task; 0 = all."""
    batch_size: int = field(default=16, metadata={"min": 1})
    """Requests (choices, windows, prompts) per forward pass."""
    rolling_stride: int = field(default=0, metadata={"min": 0})
    """Perplexity: tokens predicted per window; 0 = the model's context (disjoint windows).
    Smaller gives each token more context at more compute; every token is scored once."""
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(micro_batch_size=1))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (a run dir, trellis weights or an HF dir)")
        if not self.tasks:
            raise ValueError("tasks is required (one or more task YAML files)")
        if any(k < 0 for k in self.shots):
            raise ValueError(f"shots must be >= 0, got {self.shots}")
