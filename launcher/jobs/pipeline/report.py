"""The pipeline's results: every policy on the held-out prompts with gold-vs-proxy accounting
(the task's own score next to the reward model's and the KL to SFT), best-of-n from SFT as
the baseline RL must beat, the PPO run's held-out curve, how well the RM agrees with gold
on the policy's own samples, and the one-line verdict. Written to RUN_DIR/results.json:

  {"policies": {name: {"gold", "exact", "rm", "kl", "format"}}, "bon_curve": [...],
   "rl": {algorithm: {"curve": [...], "selected_iteration"}}, "algorithms": [...],
   "algorithm": the best by validation gold (its curve is also "ppo_curve"), "reward_model": {...},
   "format_gate": {...}, "verdict": str}

Each online RL algorithm has two rows: <algorithm> (the iteration selected on validation
prompts) and <algorithm>_last; DPO has one, and its "curve" is one evaluation of its final
policy on the same validation prompts (so the best algorithm is picked on equal ground).

KL columns: greedy answers' summed log-ratio to the SFT policy for the trained policies;
best-of-n's analytic KL to its sampling policy, log n - (n-1)/n."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trellis.launcher.jobs.pipeline.config import PipelineConfig

BON_NS = (1, 2, 4, 8, 16)


class FormatGateError(RuntimeError):
    """The pretrained policy did not learn the task's format; later stages cannot fix it."""


def _prompts(path: Path, n: int | None = None) -> list[str]:
    rows = [json.loads(line)["prompt"] for line in open(path)]
    return rows[:n] if n else rows


def _load(src: Path, root: Path, name: str):
    from trellis.launcher.weights import materialize
    from trellis.model.io import load_module
    return load_module(materialize(src, root / "eval" / name))[0]


def format_rate(policy, tok, prompts: list[str], cfg: PipelineConfig) -> float:
    """Share of greedy answers that use exactly the prompt's items (rl.demo_task)."""
    from trellis.rl.demo_task import uses_prompt_items
    from trellis.rl.policy_eval import respond
    resp = respond(policy, tok, prompts, cfg.ppo.max_new_tokens, max_prompt_len=cfg.max_prompt_len)
    return sum(uses_prompt_items(p, r) for p, r in zip(prompts, resp)) / len(prompts)


def check_format(cfg: PipelineConfig, pretrain_dir: Path, tokenizer: Path,
                 val_prompts: Path) -> dict[str, float]:
    """The "format learned" gate after pretraining, on validation prompts."""
    from trellis.data_pipeline.tokenizer import Tokenizer
    root = Path(cfg.run_dir)
    prompts = _prompts(val_prompts, cfg.eval_prompts)
    rate = format_rate(_load(pretrain_dir, root, "pretrained"), Tokenizer(tokenizer), prompts, cfg)
    print(f"format gate: {rate:.0%} of {len(prompts)} validation answers of the pretrained "
          f"policy use exactly the prompt's words (gate {cfg.format_gate:.0%})", flush=True)
    if rate < cfg.format_gate:
        raise FormatGateError(
            f"the pretrained policy's answers use exactly the prompt's words for only "
            f"{rate:.0%} of {len(prompts)} validation prompts (format_gate {cfg.format_gate:.0%}): "
            f"pretraining did not learn the task format, which SFT and RL cannot add; train "
            f"longer or unpacked (pretrain.steps, pretrain.lr, pretrain.packing=false)")
    return {"rate": rate, "gate": cfg.format_gate, "prompts": len(prompts)}


def _policy_row(policy, sft, reward, tok, prompts: list[str], cfg: PipelineConfig
                ) -> tuple[dict[str, float], list[str]]:
    from trellis.rl.demo_task import score, uses_prompt_items
    from trellis.rl.gold import gold_stats
    from trellis.rl.policy_eval import kl_to_reference, respond, rm_scores
    resp = respond(policy, tok, prompts, cfg.ppo.max_new_tokens, max_prompt_len=cfg.max_prompt_len)
    row = gold_stats(score, prompts, resp) | {
        "rm": float(rm_scores(reward, tok, prompts, resp).mean()),
        "kl": kl_to_reference(policy, sft, tok, prompts, resp),
        "format": sum(uses_prompt_items(p, r) for p, r in zip(prompts, resp)) / len(prompts)}
    return row, resp


def best_of_n(sft, reward, tok, prompts: list[str], cfg: PipelineConfig
              ) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Best-of-n from SFT samples at the PPO rollout temperature, and the RM's agreement
    with gold on those samples."""
    from trellis.rl.best_of_n import best_of_n_curve, rm_gold_agreement
    from trellis.rl.demo_task import score
    from trellis.rl.policy_eval import rm_scores, sample_k
    K = max(BON_NS)
    groups = sample_k(sft, tok, prompts, K, cfg.ppo.max_new_tokens,
                      temperature=cfg.ppo.temperature, seed=cfg.seed)
    flat_p = [p for p in prompts for _ in range(K)]
    flat_r = [r for g in groups for r in g]
    rm = torch.cat([rm_scores(reward, tok, flat_p[i:i + 256], flat_r[i:i + 256])
                    for i in range(0, len(flat_p), 256)]).view(len(prompts), K)
    gold = torch.tensor([score(p, r) for p, r in zip(flat_p, flat_r)]).view(len(prompts), K)
    return best_of_n_curve(rm, gold, BON_NS), rm_gold_agreement(rm, gold)


def selected_policy(run: Path) -> Path:
    """An RL stage's delivered policy: the selected iteration's weights (RUN_DIR/best) when
    the run kept them, else its last actor checkpoint; a DPO run dir is its policy."""
    from trellis.launcher.jobs.ppo.driver import BEST
    return run / BEST if (run / BEST).is_dir() else \
        run / "actor" if (run / "actor").is_dir() else run


def ppo_curve(ppo_dir: Path) -> list[dict[str, float]]:
    """An RL run's held-out evaluations (validation prompts), one per iteration (a resumed
    run's repeated evaluations: the last one counts)."""
    from trellis.launcher.jobs.ppo.driver import EVALS
    path = ppo_dir / EVALS
    if not path.is_file():
        return []
    by_it = {r["iteration"]: r for r in map(json.loads, open(path))}
    return [by_it[k] for k in sorted(by_it)]


def evaluate(cfg: PipelineConfig, dirs: dict[str, Any], gate: dict[str, float] | None
             ) -> dict[str, Any]:
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.jobs.ppo.driver import BEST
    from trellis.model.io import read_meta

    root = Path(cfg.run_dir)
    tok = Tokenizer(dirs["tokenizer"])
    prompts = _prompts(dirs["prompts_eval"], cfg.eval_prompts)
    reward, sft = _load(dirs["rm"], root, "rm"), _load(dirs["sft"], root, "sft")
    sources = {"pretrained": dirs["pretrain"], "sft": dirs["sft"]}
    for alg, run in dirs["rl"].items():  # each RL stage's rows are named after its algorithm
        sources[alg] = selected_policy(run)
        if (run / "actor").is_dir():  # DPO's run dir is its one policy
            sources[f"{alg}_last"] = run / "actor"
    policies, samples = {}, {}
    for name, src in sources.items():
        policy = sft if name == "sft" else _load(src, root, name)
        policies[name], resp = _policy_row(policy, sft, reward, tok, prompts, cfg)
        samples[name] = list(zip(prompts[:cfg.samples_shown], resp[:cfg.samples_shown]))
    curve, agreement = best_of_n(sft, reward, tok, prompts, cfg)
    for r in curve:
        if r["n"] in (4, 16):
            policies[f"bon_{r['n']}"] = {k: r[k] for k in ("gold", "exact", "rm", "kl")}
    rl = {alg: {"curve": ppo_curve(run), "selected_iteration":
                read_meta(run / BEST).get("iteration") if (run / BEST).is_dir() else None}
          for alg, run in dirs["rl"].items()}
    val = _prompts(dirs["prompts_val"], cfg.task.n_val_prompts)
    for alg in (a for a, r in rl.items() if not r["curve"]):
        # DPO evaluates nothing while it trains: score its policy on the validation prompts
        # the RL runs were selected on, so the best algorithm is picked on the same ground.
        row, _ = _policy_row(_load(sources[alg], root, alg), sft, reward, tok, val, cfg)
        rl[alg]["curve"] = [row | {"iteration": cfg.dpo_stage.steps}]
    best = best_algorithm(rl, policies)  # the delivered (exported) policy
    out = {"prompts": len(prompts), "algorithm": best, "algorithms": list(rl),
           "policies": policies, "bon_curve": curve, "rl": rl,
           "ppo_curve": rl[best]["curve"], "ppo_selected_iteration": rl[best]["selected_iteration"],
           "reward_model": agreement, "format_gate": gate, "samples": samples}
    out["verdict"] = verdict(out)
    return out


def best_algorithm(rl: dict[str, dict], policies: dict[str, dict]) -> str:
    """The RL algorithm whose selected iteration scored the best gold on the validation
    prompts (the held-out prompts only report it); held-out gold decides without one."""
    def key(alg: str) -> tuple[float, float]:
        curve = {e["iteration"]: e for e in rl[alg]["curve"]}
        chosen = curve.get(rl[alg]["selected_iteration"]) or \
            (rl[alg]["curve"][-1] if curve else {})
        return chosen.get("gold", float("-inf")), policies[alg]["gold"]
    return max(rl, key=key)


def verdict(res: dict[str, Any]) -> str:
    """The best algorithm (held-out gold of its selected iteration) against SFT and
    best-of-16; the other algorithms' gold after it."""
    p, alg = res["policies"], res.get("algorithm", "ppo")
    ppo, sft, bon = p[alg], p["sft"], p.get("bon_16")
    d = ppo["gold"] - sft["gold"]
    word = "beats" if d >= 0.10 and ppo["exact"] > sft["exact"] else \
        "is above" if d > 0 else "does NOT beat"
    line = (f"verdict: {alg.upper()} {word} SFT on the task's gold score: {sft['gold']:.3f} -> "
            f"{ppo['gold']:.3f} ({d:+.3f}); exact {sft['exact']:.0%} -> {ppo['exact']:.0%}")
    if bon:
        line += f"; vs best-of-16 by RM {bon['gold']:.3f} ({ppo['gold'] - bon['gold']:+.3f})"
    others = [a for a in res.get("algorithms", [alg]) if a != alg]
    if others:
        line += "; the others: " + ", ".join(
            f"{a.upper()} {p[a]['gold']:.3f} ({p[a]['gold'] - sft['gold']:+.3f})" for a in others)
    return line


def print_report(res: dict[str, Any]) -> None:
    print(f"\nheld-out prompts: {res['prompts']} (gold = the task's own score; rm = the "
          f"reward model's, the proxy PPO optimises)")
    print(f"{'policy':<17} {'gold':>7} {'exact':>7} {'RM':>8} {'KL':>7} {'format':>7}")
    for name, r in res["policies"].items():
        fmt = f"{r['format']:>7.0%}" if "format" in r else f"{'':>7}"
        print(f"{name:<17} {r['gold']:>7.3f} {r['exact']:>7.1%} {r['rm']:>8.3f} "
              f"{r['kl']:>7.3f} {fmt}")
    rm = res["reward_model"]
    print(f"reward model on SFT samples: pairwise accuracy {rm['pairwise_accuracy']:.3f} "
          f"({rm['pairs']} pairs), within-prompt correlation with gold "
          f"{rm['within_prompt_corr']:.3f}")
    print("best-of-n from SFT: " + "  ".join(
        f"n={r['n']} gold {r['gold']:.3f} (ceiling {r['gold_by_gold']:.3f})"
        for r in res["bon_curve"]))
    for alg, r in res.get("rl", {}).items():
        if r["selected_iteration"] is not None:
            print(f"{alg} = the iteration chosen on validation prompts: "
                  f"{r['selected_iteration']}; {alg}_last = the final one")
    for name, pairs in res["samples"].items():
        print(f"\n{name} answers:")
        for prompt, resp in pairs:
            print(f"  {prompt} {resp}")
    print(f"\n{res['verdict']}")
