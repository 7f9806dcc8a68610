"""PPO's single controller (the driver, as OpenRLHF's PPOTrainer): four worker groups, one
DeepSpeed engine each; per iteration

  actor.generate -> {reference.logprobs, reward.scores, critic.values} concurrently
  -> driver: KL-shaped rewards, GAE, whitening (rl.experience.make_experience)
  -> actor.train (PPO clip + ptx) and critic.train (clipped value loss) concurrently.

The critic-free algorithms (ppo.algorithm grpo, rloo, reinforce_pp) run the same loop on
three groups (no critic): group_size responses per prompt, the advantages of
rl.advantages (rl.experience.make_critic_free_experience), the same clipped actor update.

Everything that crosses the object store is an Arrow record batch. The driver owns the
prompt stream, the KL controller and the iteration counter; they are checkpointed with the
actor and critic engines, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from trellis.data_pipeline.collate import PromptCollator
from trellis.data_pipeline.rollout import arrow_to_tensors, tensors_to_arrow, write_parquet
from trellis.data_pipeline.row_stream import RowStream
from trellis.rl.experience import Experience, make_critic_free_experience, make_experience
from trellis.rl.gold import gold_scorer, gold_stats
from trellis.rl.kl import make_kl_controller
from trellis.rl.selection import Selector

ROLES = ("actor", "critic", "reference", "reward")
TRAINED_ROLES = ("actor", "critic")
CRITIC_FREE_ROLES = ("actor", "reference", "reward")


def roles_of(ppo: Any) -> tuple[str, ...]:
    """The worker groups an algorithm runs (a PPOConfig): no critic but for ppo."""
    return ROLES if ppo.has_critic else CRITIC_FREE_ROLES


def trained_roles_of(ppo: Any) -> tuple[str, ...]:
    return TRAINED_ROLES if ppo.has_critic else ("actor",)
WORKERS = {"actor": "trellis.rl.ppo_workers:ActorWorker", "critic": "trellis.rl.ppo_workers:CriticWorker",
           "reference": "trellis.rl.ppo_workers:ReferenceWorker", "reward": "trellis.rl.ppo_workers:RewardWorker"}


def split_rows(t: dict[str, torch.Tensor], n: int) -> list[pa.RecordBatch]:
    """Rows of `t` dealt to n ranks in equal consecutive slices, as Arrow batches."""
    B = next(iter(t.values())).shape[0]
    k = B // n
    return [tensors_to_arrow({name: v[i * k:(i + 1) * k] for name, v in t.items()})
            for i in range(n)]


def gather_rows(rbs: list[pa.RecordBatch]) -> tuple[dict[str, torch.Tensor], float]:
    """Concatenate the ranks' results; also the slowest rank's compute seconds."""
    parts = [arrow_to_tensors(rb) for rb in rbs]
    secs = max(float((rb.schema.metadata or {}).get(b"seconds", b"0")) for rb in rbs)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, secs


class PPOTrainer:
    def __init__(self, cfg: Any, groups: Any, prompts: Any, eval_prompts: Any,
                 run_dir: Path, tokenizer: Any):
        self.cfg, self.ppo, self.g = cfg, cfg.ppo, groups
        self.run_dir, self.tok = run_dir, tokenizer
        self.prompts = RowStream(prompts, self.ppo.prompts_per_iteration, seed=cfg.seed)
        self._it = iter(self.prompts)
        self.eval_rows = eval_prompts.rows(list(range(min(len(eval_prompts), self.ppo.eval_prompts)))) \
            if eval_prompts is not None and self.ppo.eval_prompts else []
        self.kl = make_kl_controller(self.ppo.kl_controller, self.ppo.init_beta,
                                     self.ppo.target_kl, self.ppo.kl_horizon)
        self.collate = PromptCollator(max_prompt_len=self.ppo.max_prompt_len)
        self.gold = gold_scorer(cfg.gold)
        self.selector = Selector(cfg.selection, has_gold=self.gold is not None)
        self.roles, self.trained = roles_of(self.ppo), trained_roles_of(self.ppo)
        self.iteration = 0
        self.stopped_early = False

    # ---- one iteration -------------------------------------------------------------------
    def rollout(self, rows: list[dict], greedy: bool = False
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Generate for `rows`, then ref log-probs, scores and values concurrently."""
        p = self.collate(rows)
        prompt = {"prompt_ids": p["input_ids"], "prompt_mask": p["attention_mask"].bool()}
        t0 = time.perf_counter()
        g = self.g
        seq, gen_s = gather_rows(g.actor.call_scatter(
            "generate", split_rows(prompt, g.actor.world_size), self.iteration, greedy))
        phases = {"generate": time.perf_counter() - t0}
        seq_only = {k: seq[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}
        t1 = time.perf_counter()
        refs = {"reference": g.reference.call_scatter_async(
                    "logprobs", split_rows(seq_only, g.reference.world_size), self.ppo.temperature),
                "reward": g.reward.call_scatter_async(
                    "scores", split_rows(seq_only, g.reward.world_size))}
        if "critic" in self.roles:
            refs["critic"] = g.critic.call_scatter_async(
                "values", split_rows(seq_only, g.critic.world_size))
        for role, r in refs.items():
            out, secs = gather_rows(getattr(g, role).get(r))
            seq |= out
            phases[{"reference": "ref", "reward": "reward", "critic": "value"}[role]] = secs
        phases["score_wall"] = time.perf_counter() - t1
        return seq, phases

    def step(self) -> tuple[dict[str, float], dict[str, float]]:
        """One iteration: rollout, experience, actor and critic updates. (stats, phase seconds)."""
        t0 = time.perf_counter()
        self.iteration += 1
        p = self.ppo
        # G consecutive copies of each prompt: one group of responses per prompt.
        rows = [r for r in next(self._it) for _ in range(p.group_size)]
        seq, phases = self.rollout(rows)
        if p.has_critic:
            exp, stats = make_experience(
                seq["prompt_ids"], seq["prompt_mask"], seq["response_ids"], seq["response_mask"],
                seq["logprobs"], seq["ref_logprobs"], seq["values"], seq["scores"],
                beta=self.kl.value, gamma=p.gamma, lam=p.lam, kl_kind=p.kl_kind,
                score_clip=p.score_clip or None, whiten_advantages=p.whiten_advantages)
        else:
            exp, stats = make_critic_free_experience(
                seq["prompt_ids"], seq["prompt_mask"], seq["response_ids"], seq["response_mask"],
                seq["logprobs"], seq["ref_logprobs"], seq["scores"], p.algorithm, p.group_size,
                beta=self.kl.value, kl_in_reward=p.kl_placement == "reward", gamma=p.gamma,
                kl_kind=p.kl_kind, score_clip=p.score_clip or None,
                scale_by_std=p.grpo_variant == "grpo", eps=p.adv_eps)
        stats |= {"beta": self.kl.value, "score_std": float(seq["scores"].std())}
        self.kl.update(stats["kl"], exp.batch_size)
        if self.cfg.save_rollouts:
            write_parquet(exp.to_rollout(), self.run_dir / "rollouts" / f"iter-{self.iteration:06d}.parquet")
        t1 = time.perf_counter()
        g = self.g
        if p.has_critic:
            a = g.actor.call_scatter_async("train", self._split(exp, g.actor.world_size),
                                           self.iteration)
            c = g.critic.call_scatter_async("train", self._split(exp, g.critic.world_size),
                                            self.iteration)
            stats |= g.actor.get(a)[0] | g.critic.get(c)[0]
        else:  # beta reaches the actor only when the KL is a loss term
            kl_coef = self.kl.value if p.kl_placement == "loss" else 0.0
            stats |= g.actor.call_scatter("train", self._split(exp, g.actor.world_size),
                                          self.iteration, kl_coef=kl_coef)[0]
        phases["train"] = time.perf_counter() - t1
        if p.has_critic:
            from trellis.rl.ppo_math import explained_variance
            stats["explained_variance"] = explained_variance(exp.values, exp.returns,
                                                             exp.response_mask)
        stats["iteration_seconds"] = time.perf_counter() - t0
        stats["samples_per_second"] = exp.batch_size / stats["iteration_seconds"]
        return stats, phases

    @staticmethod
    def _split(exp: Experience, n: int) -> list[pa.RecordBatch]:
        return [part.to_arrow() for part in exp.split(n)]

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Greedy responses on held-out prompts: RM score, summed KL to the reference."""
        if not self.eval_rows:
            return {}
        # Every group splits the rows evenly: use a multiple of all their world sizes.
        n = math.lcm(*(self.g[r].world_size for r in self.roles))
        rows = self.eval_rows[:len(self.eval_rows) // n * n]
        seq, _ = self.rollout(rows, greedy=True)
        # Greedy rollouts carry no sampled log-probs: the KL is measured with the actor's
        # log-probs of the greedy tokens, recomputed at temperature 1.
        lp, _ = gather_rows(self.g.actor.call_scatter(
            "token_logprobs", split_rows({k: seq[k] for k in ("prompt_ids", "prompt_mask",
                                          "response_ids", "response_mask")},
                                         self.g.actor.world_size), self.ppo.temperature))
        m = seq["response_mask"].float()
        kl = ((lp["logprobs"] - seq["ref_logprobs"]) * m).sum(1)
        responses = [self.tok.decode(r[mk.bool()].tolist()).replace("</s>", "").strip()
                     for r, mk in zip(seq["response_ids"], seq["response_mask"])]
        prompts = [r["prompt"] for r in rows]
        out = {"reward_mean": float(seq["scores"].mean()), "kl_mean": float(kl.mean()),
               "prompts": prompts, "responses": responses,
               "response_length": float(m.sum(1).mean())}
        if "scores_heldout" in seq:
            out["rm_heldout"] = float(seq["scores_heldout"].mean())
        if self.gold is not None:
            out |= gold_stats(self.gold, prompts, responses)
        return out

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "prompts": self.prompts.state_dict(),
                "kl": self.kl.state_dict(), "selector": self.selector.state_dict(),
                "stopped_early": self.stopped_early}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.iteration = int(s["iteration"])
        self.prompts.load_state_dict(s["prompts"])
        self._it = iter(self.prompts)
        self.kl.load_state_dict(s["kl"])
        if "selector" in s:
            self.selector.load_state_dict(s["selector"])
        self.stopped_early = bool(s.get("stopped_early", False))

    def save(self) -> None:
        """Actor and critic engines (collective, concurrently), then the driver state, written
        last: a state file names an iteration whose engines are both complete."""
        it, keep = self.iteration, self.cfg.checkpoint.keep_last
        refs = {r: self.g[r].call_async("save", it) for r in self.trained}
        for r, ref in refs.items():
            self.g[r].get(ref)
        state_dir = self.run_dir / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".iter-{it:06d}.json.tmp"
        tmp.write_text(json.dumps(self.state_dict()))
        with open(tmp) as f:
            os.fsync(f.fileno())
        tmp.replace(state_dir / f"iter-{it:06d}.json")
        for old in sorted(state_dir.glob("iter-*.json"))[:-keep]:
            old.unlink()

    def resume(self) -> bool:
        """Load the latest complete iteration (engines + driver state), if any."""
        found = latest_state(self.run_dir, self.trained)
        if found is None:
            return False
        path, dirs = found
        refs = {r: self.g[r].call_async("resume", str(dirs[r])) for r in self.trained}
        for r, ref in refs.items():
            self.g[r].get(ref)
        self.load_state_dict(json.loads(path.read_text()))
        return True


def latest_state(run_dir: Path, roles: tuple[str, ...] = TRAINED_ROLES
                 ) -> tuple[Path, dict[str, Path]] | None:
    """The newest driver state whose trained roles' checkpoints (actor and critic; the actor
    alone without a critic) are all complete: (state file, {role: checkpoint dir}); None when
    there is none."""
    from trellis.parallel import checkpoint
    for path in sorted((Path(run_dir) / "state").glob("iter-*.json"), reverse=True):
        it = int(path.stem.split("-")[1])
        dirs = {r: checkpoint.step_dir(Path(run_dir) / r, it) for r in roles}
        if all((d / checkpoint.MARKER).is_file() for d in dirs.values()):
            return path, dirs
    return None


def finished(run_dir: Path, iterations: int, roles: tuple[str, ...] = TRAINED_ROLES) -> bool:
    """Did a run in `run_dir` complete all `iterations` (or stop early by its selection)?"""
    found = latest_state(run_dir, roles)
    if found is None:
        return False
    return int(found[0].stem.split("-")[1]) >= iterations or \
        bool(json.loads(found[0].read_text()).get("stopped_early"))
