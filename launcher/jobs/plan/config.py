"""`trellis plan` config: the model, the job, the cluster, the parallel settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trellis.parallel.config import ParallelConfig

JOBS = ("pretrain", "sft", "rm", "ppo", "grpo", "rloo", "reinforce_pp", "dpo")


@dataclass
class ClusterSpec:
    nodes: int = field(default=1, metadata={"min": 1})
    """Nodes of the cluster."""
    gpus_per_node: int = field(default=8, metadata={"min": 0})
    """GPUs per node; 0 plans for CPU ranks (cpu_ranks_per_node of them)."""
    gpu_memory_gib: float = field(default=80.0, metadata={"min": 0.0})
    """Memory of one GPU (GiB): 80 for A100/H100 80GB, 141 for H200, 24 for A10G."""
    host_memory_gib: float = field(default=2048.0, metadata={"min": 0.0})
    """Host (CPU) memory per node (GiB): offloaded optimizer state and parameters go there
    (and, on CPU clusters, everything)."""
    cpu_ranks_per_node: int = field(default=1, metadata={"min": 1})
    """Ranks per node when gpus_per_node is 0."""
    reserve_gib: float = field(default=4.0, metadata={"min": 0.0})
    """Per GPU, kept free for the CUDA context, NCCL buffers and allocator fragmentation."""


@dataclass
class WorkloadSpec:
    seq_len: int = field(default=1024, metadata={"min": 1})
    """Tokens per training sequence (pretrain, sft, rm, dpo); RL jobs use prompt_len +
    max_new_tokens."""
    micro_batch_size: int = field(default=4, metadata={"min": 1})
    """Sequences per rank per forward/backward of a trained role."""
    prompt_len: int = field(default=512, metadata={"min": 1})
    """RL: prompt tokens."""
    max_new_tokens: int = field(default=512, metadata={"min": 1})
    """RL: response tokens generated (the KV cache holds prompt_len + max_new_tokens)."""
    rollout_batch: int = field(default=64, metadata={"min": 1})
    """RL: sequences each actor rank generates at once; scoring roles forward micro_batch_size
    of them at a time."""


@dataclass
class PlanConfig:
    model: str = "gpt2"
    """The policy / trained model: a preset (model/presets.py), a built-in shape
    (llama-2-7b, llama-2-13b, llama-2-70b), a trellis config (a job YAML with a model:
    section, or model.json / run_model.json) or a Hugging Face config.json."""
    reward_model: str = ""
    """RL and rm: the reward model (and critic) in the same forms; empty = `model`."""
    job: Literal["pretrain", "sft", "rm", "ppo", "grpo", "rloo", "reinforce_pp", "dpo"] = \
        "pretrain"
    """pretrain/sft: one trained LM; rm: one trained score model; ppo: actor + critic
    trained, reference + reward frozen; grpo, rloo, reinforce_pp: the same without a critic
    (critic-free advantages); dpo: policy trained, reference frozen."""
    placement: Literal["colocate", "separate"] = "colocate"
    """Several roles: colocate = every role on every GPU (its own engine, ZeRO over all of
    them); separate = the GPUs split between the roles (role_gpus, else evenly)."""
    role_gpus: dict[str, int] = field(default_factory=dict)
    """placement=separate: GPUs per role, e.g. {actor: 4, critic: 2, reference: 1, reward: 1}."""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(
        zero_stage=2, precision="bf16", gpus_per_worker=1.0))
    """Engine settings of every role (num_workers and micro_batch_size are set by the plan
    from the cluster and the workload; frozen roles run ZeRO-3 when zero_stage is 3, else 0)."""
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    suggest: bool = True
    """When it does not fit: look for the settings that would (more ZeRO, activation
    checkpointing, a smaller micro-batch, offload, more nodes)."""
