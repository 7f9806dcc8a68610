"""`trellis meta` config: the GPT-2/GPT-3 meta-learning demonstration. Pretrain a small GPT on
episodes of a task family (data_pipeline/meta_episodes.py), then on held-out tasks compare
in-context learning (k examples in the prompt, no gradient step) with fine-tuning the same
model on n labelled examples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.data_pipeline.meta_episodes import MetaTaskConfig, heldout_names
from trellis.data_pipeline.tokenizer import TokenizerConfig
from trellis.launcher.jobs.pipeline.config import StageConfig
from trellis.model.config import ModelConfig


@dataclass
class FinetuneSweepConfig:
    """Fine-tuning (SFT: loss on the answer tokens) of the pretrained model on the first n
    labelled rows of each of `tasks`, for each n in `sizes` (the `sft` stage's knobs)."""
    tasks: list[str] = field(default_factory=lambda: ["lookup_heldout0", "swap"])
    """The held-out tasks fine-tuned on (names from the generated held-out tasks): a new
    table of a pretrained rule, and a rule never pretrained on."""
    sizes: list[int] = field(default_factory=lambda: [8, 64, 512, 4096])
    """Labelled examples per fine-tuning run."""
    eval_every: int = field(default=20, metadata={"min": 1})
    """Steps between validation-loss passes (and logged train losses): the curves. Train
    accuracy is measured on the first min(n, task.n_eval) training rows."""


@dataclass
class MetaDemoConfig:
    run_dir: str = "runs/meta"
    """task/, corpus/, data/, pretrain/, icl/, ft_<n>/ and the results go under here."""
    seed: int = 0
    """Seed of model init and data order in every stage."""
    task: MetaTaskConfig = field(default_factory=MetaTaskConfig)
    """The task family, the pretraining episodes and what is held out."""
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=512))
    """SentencePiece, trained on the pretraining episodes."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        n_layer=2, n_head=4, d_model=64, max_seq_len=128, vocab_size=512))
    """Two layers are enough for the lookup (a match-and-copy, "induction", circuit)."""
    pretrain_episodes: int = field(default=100000, metadata={"min": 1})
    """Episodes of generated text to pretrain on, read once in order (the warm-up first):
    about pretrain.steps x pretrain.micro_batch_size."""
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(
        steps=3000, lr=3e-3, micro_batch_size=32, seq_len=96, packing=False))
    """Pretraining: one episode per row from position 0, as the evaluation prompts stand."""
    pretrain_weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    """AdamW weight decay of pretraining (the recipe was measured without)."""
    sft: StageConfig = field(default_factory=lambda: StageConfig(
        steps=1000, lr=1e-3, micro_batch_size=16))
    """Each fine-tuning run: the same steps for every size (small sets see many epochs);
    micro-batches shrink to n when a set is smaller."""
    finetune: FinetuneSweepConfig = field(default_factory=FinetuneSweepConfig)
    max_len: int = field(default=32, metadata={"min": 8})
    """Fine-tuning rows: instruction + input + answer tokens."""
    max_prompt_len: int = field(default=24, metadata={"min": 4})
    """Fine-tuning rows: prompt tokens kept."""
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    """Examples in the prompt (k) for in-context evaluation; 0 = the instruction only."""
    eval_seed: int = 1234
    """Seed of the few-shot draws (each row's k examples are fixed by seed, task and row)."""
    eval_batch_size: int = field(default=50, metadata={"min": 1})
    """Prompts per generation batch in every evaluation."""
    max_failures: int = field(default=0, metadata={"min": 0})
    """Worker deaths each training stage recovers from (its train.max_failures)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Every stage's parallel.precision (auto: bf16 where the device computes it natively;
    on CPUs only for models at least 128 wide: parallel.precision)."""

    def __post_init__(self) -> None:
        pool = self.task.n_pool
        if any(k < 0 for k in self.shots) or not self.shots:
            raise ValueError(f"shots must be a non-empty list of k >= 0, got {self.shots}")
        if max(self.shots) > pool:
            raise ValueError(f"shots: k={max(self.shots)} examples asked, but each held-out "
                             f"task has task.n_pool={pool} labelled rows")
        if not self.finetune.sizes or min(self.finetune.sizes) < 1:
            raise ValueError(f"finetune.sizes must be >= 1, got {self.finetune.sizes}")
        if max(self.finetune.sizes) > pool:
            raise ValueError(f"finetune.sizes: n={max(self.finetune.sizes)} labelled rows "
                             f"asked, but the task has task.n_pool={pool}")
        names = heldout_names(self.task)
        bad = [t for t in self.finetune.tasks if t not in names]
        if bad or not self.finetune.tasks:
            raise ValueError(f"finetune.tasks: {bad[0] if bad else 'none'!r} is not a held-out "
                             f"task (allowed: {', '.join(names)})")
