"""The job registry: every `trellis` subcommand, read by the CLI (launcher/cli.py) and, through
launcher/commands/job_submission.py, by cluster/ (which job kinds `trellis submit` may send, and
the flags each accepts). Stdlib only, and nothing here imports a command's module: the CLI
imports that only when the command runs, so `trellis --help` needs neither Ray nor DeepSpeed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

# The standard flags: options without '--', '_' for '-' (so "set" is --set, "run_dir" --run-dir).
JOB_FLAGS = frozenset({"config", "set"})
RUN_FLAGS = JOB_FLAGS | {"local", "run_dir", "address"}
RECOVERY_FLAGS = RUN_FLAGS | {"max_failures", "no_resume"}
STANDARD_FLAGS = RECOVERY_FLAGS


@dataclass(frozen=True)
class Command:
    """One `trellis NAME` subcommand."""

    name: str
    help: str
    """One line, shown by `trellis --help`."""
    module: str
    """Import path of a module with `add_arguments(parser)` and `run(args) -> int`."""
    config: str | None = None
    """The job's config class, 'package.module:Class'; None for commands without one."""
    cluster_job: bool = False
    """Whether `trellis submit` may run it as a Ray job (a config file, no positionals)."""
    flags: frozenset[str] = frozenset()
    """Which of STANDARD_FLAGS it accepts."""

    def __post_init__(self) -> None:
        unknown = self.flags - STANDARD_FLAGS
        if unknown:
            raise ValueError(f"command {self.name!r}: unknown standard flags {sorted(unknown)}")
        if self.cluster_job and "config" not in self.flags:
            raise ValueError(f"command {self.name!r}: a cluster job needs --config")

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_class(self) -> type | None:
        if self.config is None:
            return None
        module, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(module), cls)


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("ingest", "tokenize raw text/JSONL/Parquet into Arrow shards + manifest",
            "trellis.launcher.jobs.ingest.driver",
            "trellis.data_pipeline.config:IngestConfig", cluster_job=True, flags=JOB_FLAGS),
    Command("pretrain", "pretrain a GPT (clm), BERT (mlm) or distilled student",
            "trellis.launcher.jobs.pretrain.driver",
            "trellis.launcher.jobs.pretrain.config:PretrainJobConfig", cluster_job=True,
            flags=RECOVERY_FLAGS),
    Command("sft", "supervised fine-tuning on demonstrations (prompt + answer)",
            "trellis.launcher.jobs.finetune.driver",
            "trellis.launcher.jobs.finetune.config:SFTJobConfig", cluster_job=True,
            flags=RECOVERY_FLAGS),
    Command("rm", "train a reward model on ranked comparisons",
            "trellis.launcher.jobs.finetune.driver",
            "trellis.launcher.jobs.finetune.config:RMJobConfig", cluster_job=True,
            flags=RECOVERY_FLAGS),
    Command("finetune", "task fine-tuning: classification / regression / QA head on GPT or BERT",
            "trellis.launcher.jobs.taskft.driver",
            "trellis.launcher.jobs.taskft.config:TaskFTJobConfig", cluster_job=True,
            flags=RECOVERY_FLAGS),
    Command("eval", "evaluate a model: perplexity, multiple choice, generation; 0..k-shot",
            "trellis.launcher.jobs.lmeval.driver",
            "trellis.launcher.jobs.lmeval.config:EvalJobConfig", cluster_job=True,
            flags=RUN_FLAGS),
    Command("ppo", "RLHF: PPO of a policy against a reward model, KL to a reference",
            "trellis.launcher.jobs.ppo.driver",
            "trellis.launcher.jobs.ppo.config:PPOJobConfig", cluster_job=True,
            flags=RECOVERY_FLAGS),
    Command("dpo", "RLHF without a reward model: DPO / IPO on ranked comparisons",
            "trellis.launcher.jobs.dpo.driver",
            "trellis.launcher.jobs.dpo.config:DPOJobConfig", flags=RECOVERY_FLAGS),
    Command("bon", "best-of-n sampling: a reward model picks; writes an SFT demonstrations set",
            "trellis.launcher.jobs.bon.driver",
            "trellis.launcher.jobs.bon.config:BoNJobConfig", flags=JOB_FLAGS | {"run_dir"}),
    Command("pipeline", "pretrain -> SFT -> RM -> PPO -> export on the embedded demo",
            "trellis.launcher.jobs.pipeline.driver",
            "trellis.launcher.jobs.pipeline.config:PipelineConfig", cluster_job=True,
            flags=RUN_FLAGS | {"max_failures"}),
    Command("meta", "meta-learning demo: in-context k-shot vs fine-tuning on held-out tasks",
            "trellis.launcher.jobs.meta.driver",
            "trellis.launcher.jobs.meta.config:MetaDemoConfig", cluster_job=True,
            flags=RUN_FLAGS | {"max_failures"}),
    Command("plan", "memory per role and GPU of a job on a cluster; what would make it fit",
            "trellis.launcher.jobs.plan.driver",
            "trellis.launcher.jobs.plan.config:PlanConfig", flags=JOB_FLAGS),
    Command("export", "export a checkpoint as Hugging Face safetensors + config.json",
            "trellis.launcher.jobs.export.driver"),
    Command("cluster", "start/stop/show a local Ray head (loopback, token auth)",
            "trellis.launcher.commands.cluster"),
    Command("submit", "submit a job config to a Ray cluster (Ray Jobs API)",
            "trellis.launcher.commands.job_submission", flags=RECOVERY_FLAGS),  # passed to the job
    Command("jobs", "list submitted jobs; status, logs or stop one",
            "trellis.launcher.commands.job_submission"),
    Command("plot", "render PNG curves from a run directory's metrics CSVs",
            "trellis.launcher.commands.plot"),
)}


def cluster_jobs() -> dict[str, frozenset[str]]:
    """What cluster/ray_jobs may submit: job kind -> the standard flags it accepts."""
    return {c.name: c.flags for c in COMMANDS.values() if c.cluster_job}
