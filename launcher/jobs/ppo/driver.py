"""`trellis ppo`: RLHF's third step. Materialises the four roles' weights, checks prompts and
tokenizers, starts four worker groups (colocated or separate) and runs rl.ppo_trainer."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, resolve_config
from trellis.launcher.jobs.ppo.config import PPOJobConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, recovery=False)  # --local: all four roles in this process


def _weights(cfg: PPOJobConfig, run_dir: Path) -> dict[str, Path]:
    from trellis.launcher.weights import materialize
    actor = materialize(cfg.actor_init, run_dir / "init" / "actor")
    reward = materialize(cfg.reward_init, run_dir / "init" / "reward")
    return {"actor": actor, "reward": reward,
            "reference": materialize(cfg.reference_init, run_dir / "init" / "reference")
            if cfg.reference_init else actor,
            "critic": materialize(cfg.critic_init, run_dir / "init" / "critic")
            if cfg.critic_init else reward}


def _tokenizer(weights: dict[str, Path]) -> Any:
    from trellis.data_pipeline.tokenizer import Tokenizer
    files = {r: w / "tokenizer.model" for r, w in weights.items()}
    missing = [f"{r} ({f.parent})" for r, f in files.items() if not f.is_file()]
    if missing:
        raise ConfigError(f"no tokenizer.model with the weights of {', '.join(missing)}")
    toks = {r: Tokenizer(f) for r, f in files.items()}
    if len({t.sha256 for t in toks.values()}) != 1:
        raise ConfigError("the four roles' weights were trained with different tokenizers: "
                          + ", ".join(f"{r}={t.sha256[:12]}" for r, t in toks.items()))
    return toks["actor"]


def check_prompts(ds: Any, cfg: PPOJobConfig, max_seq_len: int, where: str) -> None:
    """Oversize prompts are an error naming the row, never silently cut."""
    p = cfg.ppo
    if p.max_prompt_len + p.max_new_tokens > max_seq_len:
        raise ConfigError(f"config key 'ppo.max_prompt_len': {p.max_prompt_len} + "
                          f"ppo.max_new_tokens {p.max_new_tokens} exceeds the model's context "
                          f"{max_seq_len}")
    lengths = ds.table.column("prompt_ids").to_pylist()
    for i, ids in enumerate(lengths):
        if len(ids) > p.max_prompt_len:
            raise ConfigError(f"{where}: prompt row {i} has {len(ids)} tokens, more than "
                              f"ppo.max_prompt_len {p.max_prompt_len}")
        if not ids:
            raise ConfigError(f"{where}: prompt row {i} is empty")


def _group_kwargs(cfg: PPOJobConfig, role: str, weights: dict[str, Path], run_dir: Path) -> dict:
    rc = getattr(cfg, role)
    p = cfg.ppo
    trainable = role in ("actor", "critic")
    kw = {"init_dir": str(weights[role]), "ppo": dataclasses.asdict(p),
          "par": dataclasses.asdict(rc.parallel),
          "optim": dataclasses.asdict(rc.optim) if trainable else None,
          "total_steps": p.iterations * p.ppo_epochs * p.minibatches if trainable else 0,
          "rows_per_rank": p.prompts_per_iteration // rc.parallel.num_workers,
          "run_dir": str(run_dir / role), "seed": cfg.seed}
    if role == "actor" and p.ptx_coef > 0:
        kw["ptx_dir"] = p.ptx_data
    return kw


def make_groups(cfg: PPOJobConfig, weights: dict[str, Path], run_dir: Path, local: bool,
                address: str | None) -> Any:
    from trellis.parallel.worker_group import LocalGroup, WorkerGroup, ensure_ray
    from trellis.rl.ppo_trainer import ROLES, WORKERS, Groups

    kwargs = {r: _group_kwargs(cfg, r, weights, run_dir) for r in ROLES}
    if local:
        return Groups(**{r: LocalGroup(WORKERS[r], getattr(cfg, r).parallel, role=r,
                                       worker_kwargs=kwargs[r]) for r in ROLES})
    ensure_ray(address)
    pg = None
    if cfg.placement == "colocate":
        import ray
        from ray.util.placement_group import placement_group
        pars = [getattr(cfg, r).parallel for r in ROLES]
        bundle = {k: v for k, v in (("CPU", sum(p.cpus_per_worker for p in pars)),
                                    ("GPU", sum(p.gpus_per_worker for p in pars))) if v}
        pg = placement_group([bundle] * pars[0].num_workers, strategy=pars[0].placement,
                             name="ppo-colocated")
        ray.get(pg.ready(), timeout=120)
    groups = Groups(actor=None, critic=None, reference=None, reward=None, pg=pg)
    try:
        for r in ROLES:
            setattr(groups, r, WorkerGroup(WORKERS[r], getattr(cfg, r).parallel, role=r,
                                           worker_kwargs=kwargs[r], placement_group=pg))
    except BaseException:
        groups.shutdown()
        raise
    return groups


def ppo(cfg: PPOJobConfig, local: bool = False, address: str | None = None) -> dict[str, Any]:
    from trellis.cluster.metrics import MetricsLogger
    from trellis.data_pipeline.structured import StructuredDataset
    from trellis.launcher.jobs.finetune.driver import prepare_rows
    from trellis.launcher.progress import progress
    from trellis.launcher.weights import write_run_model
    from trellis.model.io import read_meta
    from trellis.rl.ppo_trainer import PPOTrainer

    cpu_defaults()
    if local:
        bad = [r for r in ("actor", "critic", "reference", "reward")
               if getattr(cfg, r).parallel.num_workers != 1]
        if bad:
            raise ConfigError(f"config key '{bad[0]}.parallel.num_workers': --local runs one "
                              f"worker per role")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = _weights(cfg, run_dir)
    tok = _tokenizer(weights)
    actor_meta = read_meta(weights["actor"])
    prompts = StructuredDataset(prepare_rows(cfg.prompts, "prompts", tok, run_dir / "data" / "prompts"))
    check_prompts(prompts, cfg, actor_meta["model"]["max_seq_len"], cfg.prompts)
    eval_ds = None
    if cfg.eval_prompts:
        eval_ds = StructuredDataset(prepare_rows(cfg.eval_prompts, "prompts", tok,
                                                 run_dir / "data" / "eval_prompts"))
        check_prompts(eval_ds, cfg, actor_meta["model"]["max_seq_len"], cfg.eval_prompts)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    for role, head in (("actor", "lm"), ("critic", "value")):
        (run_dir / role).mkdir(exist_ok=True)
        (run_dir / role / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
        write_run_model(run_dir / role, read_meta(weights[role])["model"], head)
    metrics = MetricsLogger(run_dir, cfg.metrics, role="driver")
    groups = make_groups(cfg, weights, run_dir, local, address)
    try:
        trainer = PPOTrainer(cfg, groups, prompts, eval_ds, run_dir, metrics, tok)
        resumed = cfg.checkpoint.resume and trainer.resume()
        print(f"ppo: {cfg.ppo.prompts_per_iteration} prompts/iteration, roles "
              + ", ".join(f"{r} x{getattr(cfg, r).parallel.num_workers} "
                          f"ZeRO-{getattr(cfg, r).parallel.zero_stage}" for r in
                          ("actor", "critic", "reference", "reward"))
              + f", placement {cfg.placement}"
              + (f"; resumed at iteration {trainer.iteration}" if resumed else ""), flush=True)
        result: dict[str, Any] = {"start_eval": trainer.evaluate() if not resumed else {}}
        bar = progress(cfg.ppo.iterations, desc="ppo", unit="it", initial=trainer.iteration)
        last: dict[str, float] = {}
        end = min(cfg.ppo.iterations, cfg.stop_after) if cfg.stop_after else cfg.ppo.iterations
        while trainer.iteration < end:
            last = trainer.step()
            print(f"iteration {trainer.iteration}: score {last['score']:.3f} "
                  f"kl {last['kl']:.3f} beta {last['beta']:.4f} "
                  f"clip {last.get('actor/clip_fraction', 0):.3f} "
                  f"value_loss {last.get('critic/value_loss', 0):.4f} "
                  f"len {last['response_length']:.1f} "
                  f"{last['samples_per_second']:.1f} samples/s", flush=True)
            every = cfg.checkpoint.every
            if (every and trainer.iteration % every == 0) or trainer.iteration == end:
                trainer.save()
            if cfg.ppo.eval_every and trainer.iteration % cfg.ppo.eval_every == 0:
                ev = trainer.evaluate()
                if ev:
                    metrics.log(trainer.iteration, {"reward_mean": ev["reward_mean"],
                                                    "kl": ev["kl_mean"]}, kind="ppo_eval")
            bar.update(1)
        bar.close()
        result |= {"last": last, "iteration": trainer.iteration,
                   "info": {r: getattr(groups, r).call("info") for r in
                            ("actor", "critic", "reference", "reward")},
                   "end_eval": trainer.evaluate() if end == cfg.ppo.iterations else {}}
        return result
    finally:
        groups.shutdown()
        metrics.close()


def run(args: argparse.Namespace) -> int:
    res = ppo(resolve_config(PPOJobConfig, args), local=args.local, address=args.address)
    for name in ("start_eval", "end_eval"):
        ev = res.get(name) or {}
        if ev:
            print(f"{name}: reward {ev['reward_mean']:.3f} kl {ev['kl_mean']:.3f} "
                  f"length {ev['response_length']:.1f}")
    return 0
