"""`trellis bon`: best-of-n sampling (rejection sampling). n responses per prompt from a
policy, the reward model keeps the best (rl.best_of_n.pick); the picks are written as an
SFT demonstrations JSONL ({prompt, response, score}), the fine-tuning set InstructGPT and
Llama-2 build this way, and the summary reports RM (and gold) scores of best-of-1..n as the
baseline an RL policy should beat at equal KL. Runs in-process (no worker groups)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trellis.launcher.config_loader import ConfigError
from trellis.launcher.job_flags import add_job_arguments, resolve_config
from trellis.launcher.jobs.bon.config import BoNJobConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    p.add_argument("--run-dir", default=None, help="override run_dir")


def read_prompts(path: Path, limit: int = 0) -> list[str]:
    """The "prompt" of each JSONL row; a bad row is an error naming file:line."""
    if not path.is_file():
        raise ConfigError(f"config key 'prompts': '{path}' does not exist")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not row["prompt"].strip():
                raise ConfigError(f"{path}:{i}: needs a non-empty string 'prompt'")
            out.append(row["prompt"])
            if limit and len(out) >= limit:
                break
    if not out:
        raise ConfigError(f"{path}: no prompts")
    return out


def bon(cfg: BoNJobConfig) -> dict[str, Any]:
    import torch

    from trellis.data_pipeline.tokenizer import TOKENIZER_FILE, Tokenizer
    from trellis.launcher.weights import materialize
    from trellis.model.io import load_module
    from trellis.rl.best_of_n import best_of_n_curve, pick
    from trellis.rl.gold import gold_scorer
    from trellis.rl.policy_eval import rm_scores, sample_k

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(Path(cfg.prompts), cfg.max_prompts)
    policy_dir = materialize(cfg.policy, run_dir / "init" / "policy")
    reward_dir = materialize(cfg.reward, run_dir / "init" / "reward")
    if not (policy_dir / TOKENIZER_FILE).is_file():
        raise ConfigError(f"config key 'policy': no tokenizer.model with the weights at {policy_dir}")
    tok = Tokenizer(policy_dir / TOKENIZER_FILE)
    policy = load_module(policy_dir, head="lm")[0]
    rm = load_module(reward_dir, head="score")[0]
    torch.manual_seed(cfg.seed)
    samples = sample_k(policy, tok, prompts, cfg.n, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    flat_p = [p for p in prompts for _ in range(cfg.n)]
    flat_r = [r for rs in samples for r in rs]
    scores = rm_scores(rm, tok, flat_p, flat_r, cfg.max_len).view(len(prompts), cfg.n)  # (P, n)
    best = pick(scores, cfg.n)
    out = Path(cfg.out) if cfg.out else run_dir / "demonstrations.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    empty = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for i, p in enumerate(prompts):
            resp = samples[i][int(best[i])]
            if not resp.strip():  # an SFT set cannot hold an empty answer: counted, not kept
                empty += 1
                continue
            f.write(json.dumps({"prompt": p, "response": resp,
                                "score": float(scores[i, best[i]])}) + "\n")
    tmp.replace(out)
    gold = gold_scorer(cfg.gold)
    g = torch.tensor([[gold(p, r) for r in rs] for p, rs in zip(prompts, samples)]) \
        if gold is not None else None
    ns = sorted({1, *[k for k in (2, 4, 8, 16, 32, 64) if k < cfg.n], cfg.n})
    curve = best_of_n_curve(scores, g, ns)
    for row in curve:
        print("bon: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in row.items()), flush=True)
    print(f"bon: {len(prompts) - empty} picks of {cfg.n} samples each -> {out}"
          + (f" ({empty} empty picks left out)" if empty else ""), flush=True)
    return {"out": str(out), "rows": len(prompts) - empty, "empty": empty, "curve": curve}


def run(args: argparse.Namespace) -> int:
    args.local = False  # always in this process; resolve_config reads the flag
    bon(resolve_config(BoNJobConfig, args))
    return 0
