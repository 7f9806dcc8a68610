"""The pipeline's stages as typed job configs: each stage's config is its job's own dataclass,
composed from the pipeline config with `dataclasses.replace` (no `--set` strings), then
validated like a loaded config (ranges, allowed values, cross-field checks)."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from trellis.launcher.config_loader import from_dict
from trellis.launcher.jobs.dpo.config import DPOJobConfig
from trellis.launcher.jobs.finetune.config import RMJobConfig, RowsConfig, SFTJobConfig
from trellis.launcher.jobs.pipeline.config import PipelineConfig, StageConfig
from trellis.launcher.jobs.ppo.config import PPOJobConfig
from trellis.rl.ppo_config import PPOConfig
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig

T = TypeVar("T")


def _checked(cfg: T) -> T:
    """Validate a composed config exactly as `load_config` validates a YAML one."""
    return from_dict(type(cfg), asdict(cfg))


def _stage(job: Any, s: StageConfig, run_dir: Path, cfg: PipelineConfig) -> Any:
    """A training job's config with one pipeline stage's knobs applied."""
    return replace(
        job, run_dir=str(run_dir), seed=cfg.seed,
        optim=replace(job.optim, lr=s.lr, warmup_steps=max(1, s.steps // 10)),
        parallel=replace(job.parallel, micro_batch_size=s.micro_batch_size,
                         num_workers=s.num_workers, zero_stage=s.zero_stage,
                         cpus_per_worker=0.8 / s.num_workers, precision=cfg.precision),
        train=replace(job.train, steps=s.steps, log_every=max(1, s.steps // 5), eval_every=0,
                      max_failures=cfg.max_failures),
        metrics=replace(job.metrics, port=-1))


def _rows(cfg: PipelineConfig, s: StageConfig, train: Path) -> RowsConfig:
    return RowsConfig(train=str(train), max_len=s.seq_len or cfg.max_len,
                      max_prompt_len=cfg.max_prompt_len)


def pretrain_config(cfg: PipelineConfig, run_dir: Path, data: Path, tokenizer: Path,
                    vocab: int) -> PretrainJobConfig:
    job = PretrainJobConfig()
    job = replace(job, model=replace(cfg.model, vocab_size=vocab),
                  tokenizer=replace(job.tokenizer, path=str(tokenizer)),
                  data=replace(job.data, path=str(data), val_fraction=0.02,
                               seq_len=cfg.pretrain.seq_len or cfg.max_len,
                               packing=cfg.pretrain.packing),
                  train=replace(job.train, sample_tokens=0))
    return _checked(_stage(job, cfg.pretrain, run_dir, cfg))


def sft_config(cfg: PipelineConfig, run_dir: Path, init: Path,
               demonstrations: Path) -> SFTJobConfig:
    job = SFTJobConfig(init_from=str(init), data=_rows(cfg, cfg.sft, demonstrations))
    return _checked(_stage(job, cfg.sft, run_dir, cfg))


def rm_config(cfg: PipelineConfig, run_dir: Path, init: Path, comparisons: Path,
              demonstrations: Path, seed_offset: int = 0) -> RMJobConfig:
    """The reward model; ensemble members and the held-out judge differ by seed_offset (head
    initialisation and data order)."""
    job = RMJobConfig(init_from=str(init), data=_rows(cfg, cfg.rm, comparisons),
                      normalize_on=str(demonstrations))
    job = _stage(job, cfg.rm, run_dir, cfg)
    seed = cfg.seed + seed_offset
    return _checked(replace(job, seed=seed, data=replace(job.data, seed=seed)))


def rl_settings(cfg: PipelineConfig, algorithm: str) -> PPOConfig:
    """ppo.* for one RL stage: the algorithm, and its responses per prompt G taken from the
    same responses per iteration (ppo.prompts_per_iteration / G prompts, G responses each)."""
    g = cfg.group_size_of(algorithm)
    return replace(cfg.ppo, algorithm=algorithm, group_size=g,
                   prompts_per_iteration=cfg.ppo.prompts_per_iteration // g,
                   eval_prompts=cfg.task.n_val_prompts)


def ppo_config(cfg: PipelineConfig, run_dir: Path, sft: Path, rms: list[Path],
               prompts: Path, val_prompts: Path, heldout_rm: Path | None = None,
               reference: Path | None = None, algorithm: str = "ppo") -> PPOJobConfig:
    """An RL stage (`algorithm`, see rl_settings) from `sft` (or a later round's policy,
    with the SFT policy as `reference`)."""
    job = PPOJobConfig(actor_init=str(sft), reward_init=str(rms[0]),
                       reference_init=str(reference) if reference and reference != sft else "",
                       reward_members=[str(r) for r in rms[1:]],
                       heldout_reward=str(heldout_rm) if heldout_rm else "",
                       prompts=str(prompts), eval_prompts=str(val_prompts), gold="demo",
                       selection=cfg.selection)
    w = cfg.ppo_workers

    def role(r: Any, lr: float | None = None) -> Any:
        par = replace(r.parallel, num_workers=w, cpus_per_worker=0.2 / w,
                      precision=cfg.precision)
        return replace(r, parallel=par) if lr is None else \
            replace(r, parallel=par, optim=replace(r.optim, lr=lr))

    job = replace(job, run_dir=str(run_dir), seed=cfg.seed, placement=cfg.placement,
                  ppo=rl_settings(cfg, algorithm),
                  train=replace(job.train, steps=cfg.ppo_iterations, eval_every=cfg.ppo_eval_every,
                                max_failures=cfg.max_failures),
                  actor=role(job.actor, cfg.rl_actor_lr.get(algorithm, cfg.ppo_actor_lr)),
                  critic=role(job.critic, cfg.ppo_critic_lr),
                  reference=role(job.reference), reward=role(job.reward),
                  metrics=replace(job.metrics, port=-1))
    return _checked(job)


def dpo_config(cfg: PipelineConfig, run_dir: Path, sft: Path, comparisons: Path) -> DPOJobConfig:
    """The "dpo" RL stage: DPO from `sft` on the reward model's comparisons, the SFT policy
    as the frozen reference."""
    s = cfg.dpo_stage
    job = DPOJobConfig(run_dir=str(run_dir), seed=cfg.seed, policy_init=str(sft),
                       data=RowsConfig(train=str(comparisons)), dpo=cfg.dpo)
    par = replace(job.policy.parallel, num_workers=s.num_workers, zero_stage=s.zero_stage,
                  cpus_per_worker=0.4 / s.num_workers, precision=cfg.precision)
    job = replace(job, policy=replace(job.policy, parallel=par, optim=replace(
                      job.policy.optim, lr=s.lr, warmup_steps=max(1, s.steps // 10))),
                  reference=replace(job.reference, parallel=replace(
                      job.reference.parallel, num_workers=s.num_workers,
                      cpus_per_worker=0.4 / s.num_workers, precision=cfg.precision)),
                  train=replace(job.train, steps=s.steps, log_every=max(1, s.steps // 5),
                                eval_every=0, max_failures=cfg.max_failures),
                  checkpoint=replace(job.checkpoint, every=s.steps),
                  metrics=replace(job.metrics, port=-1))
    return _checked(job)
