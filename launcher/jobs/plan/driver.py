"""`trellis plan`: will this job fit, per role and per GPU, and what would make it fit.

    trellis plan --set model=llama-2-7b --set job=ppo --set cluster.gpu_memory_gib=141
    trellis plan --config my_plan.yaml
    trellis plan --table        # the README's PPO table (GPT-2 sizes, Llama 2 7B/13B/70B)
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from trellis.launcher.config_loader import load_config
from trellis.launcher.job_flags import add_job_arguments
from trellis.launcher.jobs.plan.config import PlanConfig
from trellis.launcher.jobs.plan.estimate import (RL, Fix, Plan, gib, plan, resolve_shape,
                                                 suggestions)

TABLE_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b", "llama-2-13b",
                "llama-2-70b")
TABLE_NODES = ((80.0, "8x80 GB"), (141.0, "8x141 GB"))
_SHORT = {"parallel.activation_checkpointing=true": "act. ckpt",
          "parallel.offload_optimizer=true": "offload optimizer",
          "parallel.offload_params=true": "offload params"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    p.add_argument("--table", action="store_true",
                   help="print the README's table: PPO of GPT-2 124M-1.5B and Llama 2 "
                        "7B/13B/70B on 8x80 GB and 8x141 GB nodes")


def header(cfg: PlanConfig, p: Plan) -> str:
    c, par, w = cfg.cluster, cfg.parallel, cfg.workload
    shape = resolve_shape(cfg.model, "lm")
    where = (f"{c.nodes} node(s) x {c.gpus_per_node} GPU x {c.gpu_memory_gib:g} GiB"
             if c.gpus_per_node else f"{c.nodes} node(s) x {c.cpu_ranks_per_node} CPU rank(s)")
    seq = (f"{w.prompt_len} prompt + {w.max_new_tokens} new tokens, rollout batch "
           f"{w.rollout_batch}" if cfg.job in RL else f"seq {w.seq_len}")
    return (f"{cfg.job} of {shape.name} ({shape.params / 1e6:,.1f}M params"
            + (f"; reward model {cfg.reward_model}" if cfg.reward_model else "")
            + f") on {where}, {cfg.placement}, ZeRO-{par.zero_stage} {par.precision}"
            + (", activation checkpointing" if par.activation_checkpointing else "")
            + (", offload optimizer" if par.offload_optimizer else "")
            + (", offload params" if par.offload_params else "")
            + f", micro-batch {w.micro_batch_size}, {seq}")


def role_table(p: Plan) -> list[str]:
    """Per role, one rank (= one GPU's share of that role), GiB."""
    cols = ("role", "ranks", "ZeRO", "params", "grads", "optim", "step+", "activ", "KV",
            "prefill", "buffers", "peak", "DeepSpeed", "host")
    rows = [cols]
    for r in p.roles:
        ds = gib(r.deepspeed_gpu) if r.deepspeed_gpu is not None else "-"
        rows.append((r.role, str(r.ranks), str(r.zero_stage), *map(gib, (
            r.params, r.grads, r.optimizer, r.step_extra, r.activations, r.kv_cache, r.prefill,
            r.buffers, r.peak)), ds, gib(r.host)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return ["  ".join(x.rjust(wd) if i else x.ljust(wd) for i, (x, wd) in
                      enumerate(zip(row, widths))) for row in rows]


def verdict(p: Plan) -> str:
    c = p.cfg.cluster
    gpu = (f"per GPU {gib(p.per_gpu)} GiB of {gib(p.gpu_budget)} ({c.gpu_memory_gib:g} - "
           f"{c.reserve_gib:g} reserved); " if p.on_gpu else "")
    return (f"{gpu}host per node {gib(p.host_per_node)} of {c.host_memory_gib:g} GiB: "
            + ("fits" if p.fits else "does NOT fit"))


def ray_line(p: Plan) -> str:
    parts = [f"{role} {n} x {{{', '.join(f'{k}: {v:g}' for k, v in b.items())}}}"
             for role, (n, b) in p.bundles.items()]
    gpus = sum(n * b.get("GPU", 0) for n, b in p.bundles.values())
    cpus = sum(n * b.get("CPU", 0) for n, b in p.bundles.values())
    return f"Ray bundles: {'; '.join(parts)}; in all GPU {gpus:g}, CPU {cpus:g} (+ the driver's)"


def report(cfg: PlanConfig) -> list[str]:
    p = plan(cfg)
    lines = [header(cfg, p), "GiB per rank (one GPU's share of each role):", *role_table(p),
             verdict(p), ray_line(p)]
    if not p.fits and cfg.suggest:
        fixes = suggestions(cfg)
        if not fixes:
            lines.append("nothing tried fits (ZeRO-3, offload, micro-batch 1, up to 64 nodes)")
        for f in fixes:
            lines.append(f"fits with --set {' --set '.join(f.label.split())}: per GPU "
                         f"{gib(f.plan.per_gpu)} GiB, host per node {gib(f.plan.host_per_node)} GiB")
    return lines


def _short(fix: Fix) -> str:
    parts = []
    for item in fix.label.split():
        key, _, val = item.partition("=")
        parts.append(_SHORT.get(item) or {"parallel.zero_stage": f"ZeRO-{val}",
                                          "workload.micro_batch_size": f"micro-batch {val}",
                                          "workload.rollout_batch": f"rollout batch {val}",
                                          "cluster.nodes": f"{val} nodes"}.get(key, item))
    return ", ".join(parts) or "as given"


def _cell(cfg: PlanConfig) -> tuple[str, str]:
    p = plan(cfg)
    if p.fits:
        return gib(p.per_gpu), "as given"
    fixes = suggestions(cfg)
    return gib(p.per_gpu), "; or ".join(_short(f) for f in fixes) or "does not fit"


def table(base: PlanConfig | None = None) -> list[str]:
    """Markdown: PPO per model on one 8-GPU node of each kind (as given, and what fits)."""
    base = base or load_config(PlanConfig, None, ["job=ppo"])
    head = ["| model | params |" + "".join(f" {n}: GiB/GPU | {n}: fits with |"
                                           for _, n in TABLE_NODES),
            "|---|---:|" + "---:|---|" * len(TABLE_NODES)]
    rows = []
    for m in TABLE_MODELS:
        cells = []
        for mem, _ in TABLE_NODES:
            cells += _cell(dataclasses.replace(
                base, model=m, cluster=dataclasses.replace(base.cluster, gpu_memory_gib=mem)))
        params = resolve_shape(m, "lm").params
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
        rows.append(f"| {m} | {size} | " + " | ".join(cells) + " |")
    return head + rows


def run(args: argparse.Namespace) -> int:
    if args.table:  # PPO unless the config or --set says otherwise
        print("\n".join(table(load_config(PlanConfig, args.config, ["job=ppo", *args.overrides],
                                           job="plan"))))
        return 0
    print("\n".join(report(load_config(PlanConfig, args.config, args.overrides, job="plan"))))
    return 0


def plan_summary(cfg: PlanConfig) -> dict[str, Any]:
    """The figures other tools compare against (e.g. cluster configs): GPUs, per-GPU and
    per-node bytes, Ray CPUs and GPUs in all, fits."""
    p = plan(cfg)
    return {"gpus": p.gpus, "per_gpu": p.per_gpu, "host_per_node": p.host_per_node,
            "ray_gpus": sum(n * b.get("GPU", 0) for n, b in p.bundles.values()),
            "ray_cpus": sum(n * b.get("CPU", 0) for n, b in p.bundles.values()),
            "fits": p.fits}
