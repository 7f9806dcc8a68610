"""A job's roles on a cluster -> per-GPU and per-node memory, whether it fits, and which
settings would make it fit. The per-role arithmetic is parallel/memory_plan.py's; this file
knows the job kinds (which roles, which trained, what each computes)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.launcher.config_loader import ConfigError, from_dict
from trellis.launcher.jobs.plan.config import ClusterSpec, PlanConfig, WorkloadSpec
from trellis.model.config import ModelConfig
from trellis.model.shape import ModelShape, named, of_config, of_hf
from trellis.parallel.config import ParallelConfig
from trellis.parallel.memory_plan import RoleMemory, Workload, role_memory

GIB = 1 << 30
RL = ("ppo", "grpo", "rloo", "reinforce_pp")
_PPO = [("actor", True, "model", "lm"), ("critic", True, "reward", "value"),
        ("reference", False, "model", "lm"), ("reward", False, "reward", "score")]
# role -> (trained, which model, head) per job kind
ROLES: dict[str, list[tuple[str, bool, str, str]]] = {
    "pretrain": [("pretrain", True, "model", "lm")],
    "sft": [("sft", True, "model", "lm")],
    "rm": [("rm", True, "reward", "score")],
    "dpo": [("policy", True, "model", "lm"), ("reference", False, "model", "lm")],
    "ppo": _PPO,
    # the critic-free algorithms start no critic group (rl.ppo_trainer.roles_of)
    **{job: [r for r in _PPO if r[0] != "critic"] for job in RL[1:]},
}


def resolve_shape(spec: str, head: str) -> ModelShape:
    """A model spec (PlanConfig.model) -> its shape with `head`; ConfigError naming it."""
    path = Path(spec)
    try:
        if not path.suffix:
            return named(spec, head)
        if not path.is_file():
            raise ConfigError(f"config key 'model': '{spec}' is neither a preset, a built-in "
                              f"shape nor an existing file")
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
                raise ConfigError(f"'{path}': no model: section (a trellis job config)")
            return of_config(from_dict(ModelConfig, data["model"]), head, path.stem)
        data = json.loads(path.read_text())
        if "model_type" in data:
            return of_hf(data, head, path.parent.name or path.stem)
        if isinstance(data.get("model"), dict):  # trellis model.json / run_model.json
            return of_config(ModelConfig.from_saved(data["model"]), head, path.parent.name)
        raise ConfigError(f"'{path}': neither an HF config.json (model_type) nor trellis "
                          f"weights metadata (model)")
    except (KeyError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        where = "" if not path.suffix else f" ({spec})"
        raise ConfigError(f"config key 'model'{where}: {e.args[0] if e.args else e}") from None


def _shapes(cfg: PlanConfig) -> dict[tuple[str, str], ModelShape]:
    out = {}
    for _, _, which, head in ROLES[cfg.job]:
        spec = cfg.reward_model or cfg.model if which == "reward" else cfg.model
        if (which, head) not in out:
            out[(which, head)] = resolve_shape(spec, head)
    return out


@dataclass
class Plan:
    cfg: PlanConfig
    roles: list[RoleMemory]
    gpus: int
    """GPUs (or CPU ranks) the job uses."""
    per_gpu: int
    """Bytes on the fullest GPU (colocated roles summed)."""
    host_per_node: int
    gpu_budget: int
    host_budget: int
    bundles: dict[str, tuple[int, dict[str, float]]]
    """Ray: role -> (ranks, one rank's bundle)."""

    @property
    def on_gpu(self) -> bool:
        return self.cfg.cluster.gpus_per_node > 0

    @property
    def fits(self) -> bool:
        gpu_ok = not self.on_gpu or self.per_gpu <= self.gpu_budget
        return gpu_ok and self.host_per_node <= self.host_budget


def ranks_of(cfg: PlanConfig) -> dict[str, int]:
    """Ranks of each role: every GPU (colocate) or its share (separate)."""
    c = cfg.cluster
    total = c.nodes * (c.gpus_per_node or c.cpu_ranks_per_node)
    roles = [r for r, *_ in ROLES[cfg.job]]
    if cfg.placement == "colocate" or len(roles) == 1:
        return {r: total for r in roles}
    if cfg.role_gpus:
        missing = [r for r in roles if r not in cfg.role_gpus]
        if missing or sum(cfg.role_gpus.values()) > total:
            raise ConfigError(f"config key 'role_gpus': {cfg.role_gpus} must name {roles} and "
                              f"sum to at most {total} GPUs")
        return {r: cfg.role_gpus[r] for r in roles}
    if total < len(roles):
        raise ConfigError(f"config key 'placement': separate needs a GPU per role ({len(roles)}"
                          f"), the cluster has {total}")
    return {r: total // len(roles) for r in roles}


def _workload(cfg: PlanConfig, role: str, trained: bool, head: str) -> Workload:
    w = cfg.workload
    seq = w.prompt_len + w.max_new_tokens if cfg.job in RL else w.seq_len
    mb = w.micro_batch_size
    gen = cfg.job in RL and role == "actor"
    return Workload(train_batch=mb if trained else 0, seq_len=seq,
                    score_batch=0 if trained and cfg.job not in RL else mb,
                    gen_batch=w.rollout_batch if gen else 0, prompt_len=w.prompt_len,
                    gen_len=seq if gen else 0, lm_head=head == "lm")


def plan(cfg: PlanConfig, shapes: dict[tuple[str, str], ModelShape] | None = None) -> Plan:
    """Memory of every role's rank, the fullest GPU, host memory per node, Ray bundles.
    `shapes`: (model or reward, head) -> shape, instead of resolving cfg.model."""
    c, shapes, ranks = cfg.cluster, shapes or _shapes(cfg), ranks_of(cfg)
    per_node = c.gpus_per_node or c.cpu_ranks_per_node
    roles, bundles = [], {}
    n_roles = len(ROLES[cfg.job])
    colocated = cfg.placement == "colocate" and n_roles > 1
    for role, trained, which, head in ROLES[cfg.job]:
        par = dataclasses.replace(cfg.parallel, num_workers=ranks[role],
                                  micro_batch_size=cfg.workload.micro_batch_size)
        roles.append(role_memory(role, shapes[(which, head)], par, trained,
                                 _workload(cfg, role, trained, head), c.gpus_per_node))
        share = 1.0 / n_roles if colocated else 1.0
        gpu = {"GPU": round(par.gpus_per_worker * share, 4)} if c.gpus_per_node else {}
        bundles[role] = (ranks[role], {"CPU": round(par.cpus_per_worker * share, 4), **gpu,
                                       **par.resources})
    per_gpu = sum(r.peak for r in roles) if colocated else max(r.peak for r in roles)
    host = 0
    for r in roles:  # a role's ranks spread over the nodes; DeepSpeed's host figure is per node
        on_node = min(r.ranks, per_node)
        host += max(on_node * r.host, r.deepspeed_host or 0)
    if not c.gpus_per_node:  # CPU ranks: what a GPU would hold is host memory too
        host += sum(r.peak * min(r.ranks, per_node) for r in roles)
    return Plan(cfg, roles, sum(ranks.values()) if not colocated else c.nodes * per_node,
                per_gpu, host, int((c.gpu_memory_gib - c.reserve_gib) * GIB),
                int(c.host_memory_gib * GIB), bundles)


# ---- what would make it fit -----------------------------------------------------------------
def _ladder(cfg: PlanConfig) -> list[tuple[str, dict[str, Any]]]:
    """Cumulative changes, cheapest first (activation checkpointing, ZeRO-3, halved
    micro-batch, halved rollout batch down to 8, offload): (label, fields)."""
    par, steps, changes = cfg.parallel, [], {}

    def add(key: str, value: Any) -> None:
        changes[key] = value
        steps.append(dict(changes))

    if not par.activation_checkpointing:
        add("parallel.activation_checkpointing", True)
    if par.zero_stage < 3:
        add("parallel.zero_stage", 3)
    mb = cfg.workload.micro_batch_size
    while mb > 1:
        mb //= 2
        add("workload.micro_batch_size", mb)
    rollout = cfg.workload.rollout_batch if cfg.job in RL else 1
    while rollout > 8:  # generation's KV cache
        rollout //= 2
        add("workload.rollout_batch", rollout)
    if not par.offload_optimizer:
        add("parallel.offload_optimizer", True)
    if not par.offload_params:
        add("parallel.offload_params", True)
    return [("", {})] + [(" ".join(f"{k}={_yaml(v)}" for k, v in s.items()), s) for s in steps]


def _yaml(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def with_changes(cfg: PlanConfig, changes: dict[str, Any], nodes: int | None = None) -> PlanConfig:
    par = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("parallel.")}
    work = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("workload.")}
    out = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **par),
                              workload=dataclasses.replace(cfg.workload, **work))
    if nodes is not None:
        out = dataclasses.replace(out, cluster=dataclasses.replace(out.cluster, nodes=nodes))
    return out


@dataclass
class Fix:
    label: str
    """--set changes (empty: as given), plus the node count when it changed."""
    plan: Plan


def suggestions(cfg: PlanConfig, max_nodes: int = 64) -> list[Fix]:
    """The first settings that fit on these nodes; and, when those offload, the fewest
    nodes that fit without offloading (doubling the node count)."""
    out: list[Fix] = []
    nodes = cfg.cluster.nodes
    while nodes <= max_nodes:
        for label, changes in _ladder(cfg):
            p = plan(with_changes(cfg, changes, nodes))
            if not p.fits:
                continue
            where = "" if nodes == cfg.cluster.nodes else f"cluster.nodes={nodes}"
            fix = Fix(" ".join(x for x in (label, where) if x), p)
            offloads = "offload" in label
            if not out or (offloads is False and "offload" in out[0].label):
                out.append(fix)
            if not offloads:
                return out
            break
        nodes *= 2
    return out


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f}"


def job_plan(kind: str, job: Any, cluster: ClusterSpec) -> Plan:
    """The plan of a one-group job's config (pretrain, sft: `model`, `parallel`, `data` or
    the job's seq_len) on `cluster`, whose GPUs (or CPU ranks) are its ranks."""
    head = {"pretrain": "lm", "sft": "lm"}[kind]
    seq = getattr(getattr(job, "data", None), "seq_len", None) or job.seq_len
    cfg = PlanConfig(job=kind, cluster=cluster, parallel=job.parallel, suggest=False,
                     workload=WorkloadSpec(seq_len=seq,
                                           micro_batch_size=job.parallel.micro_batch_size))
    return plan(cfg, {("model", head): of_config(job.model, head)})
