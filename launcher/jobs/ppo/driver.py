"""`trellis ppo`: RLHF's third step. Materialises the four roles' weights, checks prompts and
tokenizers, starts four worker groups (colocated or separate) and runs rl.ppo_trainer."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, copy_tokenizer
from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, resolve_config
from trellis.launcher.jobs.ppo.config import PPOJobConfig


EVALS, BEST = "evals.jsonl", "best"  # the held-out curve; the selected actor's weights


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)  # --local: all four roles in this process


def _weights(cfg: PPOJobConfig, run_dir: Path) -> dict[str, Path]:
    from trellis.launcher.weights import materialize
    actor = materialize(cfg.actor_init, run_dir / "init" / "actor")
    reward = materialize(cfg.reward_init, run_dir / "init" / "reward")
    # Further reward models: ensemble members, then the held-out judge (scored last).
    extra = [materialize(m, run_dir / "init" / f"reward_member_{i}")
             for i, m in enumerate(cfg.reward_members)]
    if cfg.heldout_reward:
        extra.append(materialize(cfg.heldout_reward, run_dir / "init" / "reward_heldout"))
    return {"actor": actor, "reward": reward, "reward_extra": extra,
            "reference": materialize(cfg.reference_init, run_dir / "init" / "reference")
            if cfg.reference_init else actor,
            "critic": materialize(cfg.critic_init, run_dir / "init" / "critic")
            if cfg.critic_init else reward}


def _tokenizer(weights: dict[str, Path]) -> Any:
    from trellis.data_pipeline.tokenizer import Tokenizer
    files = {r: w / TOKENIZER_FILE for r, w in weights.items() if r != "reward_extra"}
    files |= {f"reward model {w}": w / TOKENIZER_FILE for w in weights["reward_extra"]}
    missing = [f"{r} ({f.parent})" for r, f in files.items() if not f.is_file()]
    if missing:
        raise ConfigError(f"no tokenizer.model with the weights of {', '.join(missing)}")
    toks = {r: Tokenizer(f) for r, f in files.items()}
    if len({t.sha256 for t in toks.values()}) != 1:
        raise ConfigError("the four roles' weights were trained with different tokenizers: "
                          + ", ".join(f"{r}={t.sha256[:12]}" for r, t in toks.items()))
    return toks["actor"]


def check_prompts(ds: Any, cfg: PPOJobConfig, max_seq_len: int, where: str) -> int:
    """Oversize prompts are an error naming the row, or cut with a count (never silently);
    returns the number cut."""
    p = cfg.ppo
    if p.max_prompt_len + p.max_new_tokens > max_seq_len:
        raise ConfigError(f"config key 'ppo.max_prompt_len': {p.max_prompt_len} + "
                          f"ppo.max_new_tokens {p.max_new_tokens} exceeds the model's context "
                          f"{max_seq_len}")
    lengths = ds.table.column("prompt_ids").to_pylist()
    cut = 0
    for i, ids in enumerate(lengths):
        if len(ids) > p.max_prompt_len:
            if p.long_prompts == "error":
                raise ConfigError(f"{where}: prompt row {i} has {len(ids)} tokens, more than "
                                  f"ppo.max_prompt_len {p.max_prompt_len} (or set "
                                  f"ppo.long_prompts=truncate_left)")
            cut += 1
        if not ids:
            raise ConfigError(f"{where}: prompt row {i} is empty")
    if cut:  # PromptCollator keeps each prompt's last max_prompt_len tokens
        print(f"{where}: {cut} of {len(lengths)} prompts keep only their last "
              f"ppo.max_prompt_len={p.max_prompt_len} tokens (cut from the left)", flush=True)
    return cut


def _role_specs(cfg: PPOJobConfig, weights: dict[str, Path], run_dir: Path) -> dict:
    from trellis.parallel.placement import RoleSpec
    from trellis.rl.ppo_trainer import WORKERS, roles_of, trained_roles_of

    p, specs = cfg.ppo, {}
    for role in roles_of(p):  # no critic group for the critic-free algorithms
        rc, trainable = getattr(cfg, role), role in trained_roles_of(p)
        kw = {"init_dir": str(weights[role]), "ppo": dataclasses.asdict(p),
              "par": dataclasses.asdict(rc.parallel),
              "optim": dataclasses.asdict(rc.optim) if trainable else None,
              "total_steps": cfg.train.steps * p.ppo_epochs * p.minibatches if trainable else 0,
              "rows_per_rank": p.rollout_rows // rc.parallel.num_workers,
              "run_dir": str(run_dir / role), "seed": cfg.seed,
              "keep_last": cfg.checkpoint.keep_last}
        if role == "actor" and p.ptx_coef > 0:
            kw["ptx_dir"] = p.ptx_data
        if role == "reward":
            kw["members"] = [str(w) for w in weights["reward_extra"]]
            kw["heldout"] = bool(cfg.heldout_reward)
        specs[role] = RoleSpec(WORKERS[role], rc.parallel, kw)
    return specs


class PPOSession:
    """PPO on the driver loop: the four role groups and the single controller over them."""
    name, metrics_kind = "ppo", "ppo"

    def __init__(self, cfg: PPOJobConfig, prep: dict[str, Any], local: bool,
                 address: str | None, resume: bool):
        from trellis.parallel.placement import RoleGroups
        from trellis.rl.ppo_trainer import PPOTrainer

        self.cfg, self.resume = cfg, resume
        self.groups = RoleGroups.start(_role_specs(cfg, prep["weights"], prep["run_dir"]),
                                       colocate=cfg.placement == "colocate", local=local,
                                       address=address, name="ppo")
        self.trainer = PPOTrainer(cfg, self.groups, prep["prompts"], prep["eval"],
                                  prep["run_dir"], prep["tokenizer"])
        self.start_eval: dict[str, Any] = {}
        self.prep = prep

    def start(self) -> int:
        resumed = self.resume and self.trainer.resume()
        roles = ", ".join(f"{r} x{getattr(self.cfg, r).parallel.num_workers} "
                          f"ZeRO-{getattr(self.cfg, r).parallel.zero_stage}"
                          for r in self.trainer.roles)
        p = self.cfg.ppo
        algo = "" if p.algorithm == "ppo" else f"{p.algorithm} (group {p.group_size}), "
        print(f"ppo: {algo}{p.prompts_per_iteration} prompts/iteration, roles {roles}, "
              f"placement {self.cfg.placement}"
              + (f"; resumed at iteration {self.trainer.iteration}" if resumed else ""),
              flush=True)
        if not resumed:  # a fresh run: no curve or selection of an earlier one survives
            import shutil
            (self.prep["run_dir"] / EVALS).unlink(missing_ok=True)
            shutil.rmtree(self.prep["run_dir"] / BEST, ignore_errors=True)
            self.start_eval = self.trainer.evaluate()
            self._consider(0, self.start_eval)
        return self.trainer.iteration

    def train_step(self, step: int) -> tuple[dict[str, float], dict[str, float]]:
        return self.trainer.step()

    def describe(self, step: int, r: dict[str, float]) -> str:
        critic = f"value_loss {r.get('critic/value_loss', 0):.4f} " if self.cfg.ppo.has_critic \
            else f"|adv| {r.get('advantage_abs_mean', 0):.3f} "
        return (f"iteration {step}: score {r['score']:.3f} kl {r['kl']:.3f} "
                f"beta {r['beta']:.4f} clip {r.get('actor/clip_fraction', 0):.3f} " + critic +
                f"len {r['response_length']:.1f} {r['samples_per_second']:.1f} samples/s")

    def evaluate(self, step: int) -> dict[str, float]:
        return self._consider(step, self.trainer.evaluate())

    def _consider(self, step: int, ev: dict[str, Any]) -> dict[str, float]:
        """Log one held-out evaluation (RUN_DIR/evals.jsonl: the gold/RM/KL curve) and keep
        the actor's weights when it is the selection's new best (RUN_DIR/best)."""
        if not ev:
            return {}
        row = {"iteration": step, "rm": ev["reward_mean"], "kl": ev["kl_mean"],
               **{k: ev[k] for k in ("gold", "exact", "rm_heldout") if k in ev}}
        with open(self.prep["run_dir"] / EVALS, "a") as f:
            f.write(json.dumps(row) + "\n")
        t = self.trainer
        if t.selector.update(step, row):
            best = self.prep["run_dir"] / BEST
            self.groups.actor.call("export_weights", str(best),
                                   {"source": str(self.prep["run_dir"]), "iteration": step,
                                    "criterion": t.selector.key, "evaluation": row})
            copy_tokenizer(self.prep["tokenizer"].path, best)
        t.stopped_early = t.selector.should_stop()
        return {k: v for k, v in row.items() if k != "iteration"} | \
            {"best_iteration": t.selector.best_iteration}

    def should_stop(self) -> str | None:
        s = self.trainer.selector
        if self.trainer.stopped_early:
            return (f"no better {s.key} on held-out prompts in {s.cfg.patience} evaluations "
                    f"(best: iteration {s.best_iteration}, {s.best_value:.4f})")
        return None

    def save(self, step: int) -> None:
        self.trainer.save()

    def finish(self, last: dict[str, Any]) -> dict[str, Any]:
        end = self.trainer.evaluate()
        if not self.trainer.stopped_early:  # an early stop's last evaluation was this step's
            self._consider(self.trainer.iteration, end)
        return {"start_eval": self.start_eval, "end_eval": end,
                "best": self.trainer.selector.state_dict(),
                "last": last, "iteration": self.trainer.iteration,
                "info": {r: g.call("info") for r, g in self.groups.items()}}

    def shutdown(self) -> None:
        self.groups.shutdown()


def prepare(cfg: PPOJobConfig) -> dict[str, Any]:
    """Weights, tokenizer, checked prompts and the run dir's own files, made once per job."""
    from trellis.data_pipeline.structured import StructuredDataset
    from trellis.launcher.jobs.finetune.driver import prepare_rows
    from trellis.launcher.weights import write_run_model
    from trellis.model.io import read_meta

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = _weights(cfg, run_dir)
    tok = _tokenizer(weights)
    actor = read_meta(weights["actor"])["model"]
    max_seq, vocab = actor["max_seq_len"], actor["vocab_size"]
    prompts = StructuredDataset(prepare_rows(cfg.prompts, "prompts", tok,
                                             run_dir / "data" / "prompts"), tok.sha256, vocab)
    check_prompts(prompts, cfg, max_seq, cfg.prompts)
    eval_ds = None
    if cfg.eval_prompts:
        eval_ds = StructuredDataset(prepare_rows(cfg.eval_prompts, "prompts", tok,
                                                 run_dir / "data" / "eval_prompts"),
                                    tok.sha256, vocab)
        check_prompts(eval_ds, cfg, max_seq, cfg.eval_prompts)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    copy_tokenizer(tok.path, run_dir)
    for role, head in (("actor", "lm"), ("critic", "value")):
        if role == "critic" and not cfg.ppo.has_critic:
            continue
        (run_dir / role).mkdir(exist_ok=True)
        copy_tokenizer(tok.path, run_dir / role)
        write_run_model(run_dir / role, read_meta(weights[role])["model"], head)
    return {"run_dir": run_dir, "weights": weights, "tokenizer": tok, "prompts": prompts,
            "eval": eval_ds}


def ppo(cfg: PPOJobConfig, local: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run PPO on the driver loop (with recovery); returns start/end evaluations, the last
    iteration's metrics and each role's engine info."""
    from trellis.cluster.metrics import MetricsLogger
    from trellis.launcher.driver_loop import run_loop

    cpu_defaults()
    if local:
        from trellis.rl.ppo_trainer import roles_of
        bad = [r for r in roles_of(cfg.ppo) if getattr(cfg, r).parallel.num_workers != 1]
        if bad:
            raise ConfigError(f"config key '{bad[0]}.parallel.num_workers': --local runs one "
                              f"worker per role")
    prep = prepare(cfg)
    metrics = MetricsLogger(prep["run_dir"], cfg.metrics, role="driver")
    try:
        return run_loop(lambda resume: PPOSession(cfg, prep, local, address, resume),
                        cfg.train, cfg.checkpoint, metrics)
    finally:
        metrics.close()


def is_done(cfg: PPOJobConfig) -> bool:
    """Has cfg.run_dir completed all cfg.train.steps iterations?"""
    from trellis.rl.ppo_trainer import finished, trained_roles_of
    return finished(Path(cfg.run_dir), cfg.train.steps, trained_roles_of(cfg.ppo))


def run(args: argparse.Namespace) -> int:
    res = ppo(resolve_config(PPOJobConfig, args), local=args.local, address=args.address)
    for name in ("start_eval", "end_eval"):
        ev = res.get(name) or {}
        if ev:
            print(f"{name}: reward {ev['reward_mean']:.3f} kl {ev['kl_mean']:.3f} "
                  f"length {ev['response_length']:.1f}")
    return 0
