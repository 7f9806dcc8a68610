"""`trellis pipeline` config: the embedded demo task and the knobs of each stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.data_pipeline.tokenizer import TokenizerConfig
from trellis.model.config import ModelConfig
from trellis.rl.demo_task import DemoTaskConfig
from trellis.rl.dpo_config import DPOConfig
from trellis.rl.ppo_config import PPOConfig
from trellis.rl.selection import SelectionConfig


@dataclass
class StageConfig:
    """What a pipeline stage exposes of its job config."""
    steps: int = field(default=100, metadata={"min": 1})
    """Optimizer steps."""
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    """Peak learning rate (warmup 10% of steps, cosine to 10%)."""
    micro_batch_size: int = field(default=16, metadata={"min": 1})
    """Rows (or packed blocks) per rank per step."""
    num_workers: int = field(default=1, metadata={"min": 1})
    """Ray workers (data-parallel ranks)."""
    zero_stage: int = field(default=0, metadata={"min": 0, "max": 3})
    """DeepSpeed ZeRO stage."""
    seq_len: int = field(default=0, metadata={"min": 0})
    """Tokens per row: pretraining block length; SFT/RM rows (prompt + response); 0 = the
    pipeline's max_len."""
    packing: bool = False
    """Pretraining only: pack lines into full blocks (True) or one task line per row,
    padded, starting at position 0 as SFT and PPO see them (False). Measured on the sort
    demo: packed blocks never learn to copy the prompt's words (answer loss stays ln 16 at
    lr 2e-3, 2000 steps); unpacked rows learn it in ~1000 steps at lr 1e-3."""


@dataclass
class PipelineConfig:
    run_dir: str = "runs/pipeline"
    """Every stage's run dir goes under here (pretrain/, sft/, rm/, ppo/, export/)."""
    seed: int = 0
    task: DemoTaskConfig = field(default_factory=lambda: DemoTaskConfig(
        n_demonstrations=30, n_comparison_prompts=1500))
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=512))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        preset="gpt-small-cpu", vocab_size=512, n_layer=4, n_head=4, d_model=128,
        max_seq_len=64))
    pretrain_lines: int = field(default=20000, metadata={"min": 1})
    """Lines of task-format text (random answers) to pretrain on."""
    max_len: int = field(default=40, metadata={"min": 8})
    """Default row length of every stage (prompt + response tokens)."""
    max_prompt_len: int = field(default=24, metadata={"min": 4})
    """SFT / RM rows: prompt tokens kept."""
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(
        steps=1000, lr=1e-3, micro_batch_size=64, seq_len=24))
    sft: StageConfig = field(default_factory=lambda: StageConfig(steps=300, lr=1e-3))
    rm: StageConfig = field(default_factory=lambda: StageConfig(steps=500, lr=1e-3,
                                                                micro_batch_size=8))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        prompts_per_iteration=64, minibatches=4, ppo_epochs=4,
        temperature=1.0, init_beta=0.05, max_new_tokens=10, max_prompt_len=24,
        eval_prompts=0))
    rl_algorithms: list[Literal["ppo", "grpo", "rloo", "reinforce_pp", "dpo"]] = field(
        default_factory=list)
    """RL stages after the reward model, one per entry, each from the same SFT policy and
    reward models into RUN_DIR/<algorithm>/; the table gets the rows <algorithm> (the
    selected iteration) and <algorithm>_last, and the verdict names the best by validation
    gold. Each stage is ppo.* with the entry as ppo.algorithm (see rl_group_size); "dpo" is
    `trellis dpo` on the reward model's comparisons (dpo, dpo_stage): one row, its final
    policy, scored on the validation prompts too for the verdict.
    Empty = one stage of ppo.algorithm."""
    rl_group_size: int = field(default=4, metadata={"min": 2})
    """Responses per prompt of grpo and rloo when ppo.group_size is 1. In the pipeline every
    RL stage samples ppo.prompts_per_iteration responses per iteration, as PPO does: an
    algorithm with G responses per prompt takes ppo.prompts_per_iteration / G prompts."""
    ppo_actor_lr: float = field(default=2e-5, metadata={"min": 0.0})
    """Measured on the demo: 1e-4 moves the policy too far per iteration (approximate KL
    0.6 between old and new policy, KL to SFT 7-10 nats after a few iterations)."""
    rl_actor_lr: dict[str, float] = field(default_factory=dict)
    """Actor learning rate of one RL algorithm, e.g. {grpo: 5e-5}; ppo_actor_lr for the
    algorithms not named. Measured on the demo (60 iterations; best validation gold, SFT
    0.702): GRPO at 2e-5 0.805, still rising at the end (KL to SFT 1.9; ~45% of its groups
    are four identical answers, no signal); at 5e-5 0.835 in-process and 0.806 on Ray from
    the same config (float order), so no better beyond run-to-run noise. RLOO 0.812 at 2e-5,
    0.820 at 5e-5 at KL 3-4 with gold flat while the RM score rose. Hence none by default."""
    ppo_critic_lr: float = field(default=5e-4, metadata={"min": 0.0})
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(max_prompt_len=24,
                                                             max_response_len=16))
    """The "dpo" entry of rl_algorithms: its loss, beta and rows per step."""
    dpo_stage: StageConfig = field(default_factory=lambda: StageConfig(steps=200, lr=5e-5))
    """The "dpo" stage's steps, policy learning rate and workers (micro_batch_size and
    seq_len unused: dpo.prompts_per_step and dpo.max_* set its rows)."""
    max_failures: int = field(default=0, metadata={"min": 0})
    """Worker deaths each training stage recovers from (its train.max_failures)."""
    ppo_iterations: int = field(default=120, metadata={"min": 1})
    """PPO iterations (rollout + PPO epochs); the PPO job's train.steps. Measured on the demo
    (seed 0): validation gold still rises from 60 (0.84) to 90 (0.87) with the KL to SFT
    nearly flat (2.4 -> 3.1 nats)."""
    ppo_eval_every: int = field(default=5, metadata={"min": 0})
    """PPO iterations between evaluations on the validation prompts (gold, RM, KL); the
    selection picks among them; 0 = start and end only."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Which PPO evaluation is the result ("ppo" in the table; "ppo_last" is the final one)."""
    rlhf_rounds: int = field(default=1, metadata={"min": 1, "max": 10})
    """Iterated RLHF: after each PPO run, rank new comparisons on the current policy's
    samples, retrain the RM on all rounds' comparisons, continue PPO from the policy (the
    reference stays the SFT policy). 1 = the classic single pass."""
    rm_ensemble: int = field(default=1, metadata={"min": 1, "max": 8})
    """Reward models trained (seeds seed, seed+1, ...: head init and data order differ);
    PPO's reward is their ppo.ensemble_reduce."""
    rm_heldout: bool = False
    """Train one more reward model (seed + 100) that PPO never optimises, scored at each
    evaluation as an independent judge (selection uses it when a task has no gold)."""
    format_gate: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """After pretraining: the share of validation answers that must use exactly the
    prompt's words, or the pipeline stops with one line (0 = no gate)."""
    ppo_workers: int = field(default=1, metadata={"min": 1})
    """Ray workers per PPO role."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Every stage's parallel.precision (auto: bf16 where the device computes it natively;
    on CPUs only for models at least 128 wide: parallel.precision)."""
    placement: Literal["colocate", "separate"] = "colocate"
    """PPO role placement."""
    comparisons_from: Literal["sft", "mixed", "corrupt"] = "mixed"
    """The K responses the labeler ranks: sampled from the SFT policy as InstructGPT does
    ("sft"); the rule's answer corrupted to 0..K-1 degrees ("corrupt": clear gradations,
    but mostly order and length errors, so the RM cannot see the SFT policy's own mistakes,
    e.g. a word not in the prompt: it preferred the right answer over a wrong-word one 58%
    of the time); or half of each ("mixed", the default: the policy's own answers next to
    clear gradations)."""
    eval_prompts: int = field(default=200, metadata={"min": 1})
    """Held-out prompts in the results table (at most task.n_eval_prompts). At 100 the
    table's PPO-SFT difference moved by about 0.01-0.02 with the prompt sample."""
    samples_shown: int = field(default=4, metadata={"min": 0})
    """Example answers printed per policy."""

    def __post_init__(self) -> None:
        if len(set(self.rl_algorithms)) != len(self.rl_algorithms):
            raise ValueError(f"rl_algorithms lists an algorithm twice: {self.rl_algorithms}")
        if self.rlhf_rounds > 1 and "dpo" in self.algorithms:
            raise ValueError("rlhf_rounds > 1 samples comparisons from the RL policy of each "
                             "round: it needs ppo, grpo, rloo or reinforce_pp, not dpo")
        if self.rlhf_rounds > 1 and len(self.algorithms) > 1:
            raise ValueError(f"rlhf_rounds > 1 continues one policy: it needs a single "
                             f"algorithm, got rl_algorithms {self.rl_algorithms}")
        for alg, lr in self.rl_actor_lr.items():
            if alg not in ("ppo", "grpo", "rloo", "reinforce_pp") or lr < 0:
                raise ValueError(f"rl_actor_lr: {alg}: {lr} (allowed: ppo, grpo, rloo, "
                                 f"reinforce_pp, each a learning rate >= 0)")
        for alg in (a for a in self.algorithms if a != "dpo"):
            g = self.group_size_of(alg)
            if self.ppo.prompts_per_iteration % g:
                raise ValueError(f"ppo.prompts_per_iteration {self.ppo.prompts_per_iteration} "
                                 f"(responses per iteration) must divide by {alg}'s {g} "
                                 f"responses per prompt (rl_group_size, or ppo.group_size)")

    @property
    def algorithms(self) -> list[str]:
        """The RL stages to run, in order."""
        return list(self.rl_algorithms) or [self.ppo.algorithm]

    def group_size_of(self, algorithm: str) -> int:
        """Responses per prompt of one RL stage."""
        if self.ppo.group_size > 1 or algorithm not in ("grpo", "rloo"):
            return self.ppo.group_size
        return self.rl_group_size
