"""The driver loop every training job shares (pretrain, sft, rm): step a worker group, log,
evaluate, checkpoint; when a worker dies, tear the group down and resume a new one from the
latest complete checkpoint, up to `train.max_failures` times.

A worker class serves the loop with: resume(path|None) -> step, info() -> {plan, device},
train_step() -> {loss, lr, grad_norm, tokens, step_time, ...}, evaluate() -> {loss, ...},
save(step). The job's config has `train` (a LoopConfig), `checkpoint`, `metrics`, `parallel`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trellis.cluster.metrics import MetricsLogger
from trellis.launcher.progress import progress
from trellis.parallel import checkpoint
from trellis.parallel.peak import current_device_name, peak_flops
from trellis.parallel.worker_group import LocalGroup, WorkerDied, WorkerGroup, ensure_ray


@dataclass
class LoopSpec:
    """What differs between jobs: who the workers are and how to describe them."""
    role: str
    """Group role: actor names are '<role>/rank<r>'; also the log prefix."""
    worker: str
    """Worker class as 'package.module:Class'."""
    worker_kwargs: dict[str, Any]
    flops_per_token: float | None = None
    """Training FLOPs per token, for MFU (None: not shown)."""
    finish: Callable[[Any], dict[str, Any]] | None = None
    """Called with the group after the last step (e.g. a generated sample)."""


def make_group(cfg: Any, spec: LoopSpec, local: bool, address: str | None) -> Any:
    if local:
        return LocalGroup(spec.worker, cfg.parallel, role=spec.role, worker_kwargs=spec.worker_kwargs)
    ensure_ray(address)
    return WorkerGroup(spec.worker, cfg.parallel, role=spec.role, worker_kwargs=spec.worker_kwargs)


def train_with_recovery(cfg: Any, spec: LoopSpec, run_dir: Path, local: bool = False,
                        address: str | None = None) -> dict[str, Any]:
    failures, max_failures = 0, cfg.train.max_failures
    metrics = MetricsLogger(run_dir, cfg.metrics, role="driver")
    try:
        while True:
            group = None
            try:
                group = make_group(cfg, spec, local, address)
                return _train(group, cfg, spec, run_dir, metrics)
            except WorkerDied as e:
                failures += 1
                if failures > max_failures:
                    raise SystemExit(f"trellis {spec.role}: {e}; gave up after {failures - 1} "
                                     f"recoveries (train.max_failures={max_failures})") from None
                print(f"trellis {spec.role}: {e}; restarting the group from the latest complete "
                      f"checkpoint (recovery {failures}/{max_failures})", flush=True)
            finally:
                if group is not None:
                    group.shutdown()
            # A restarted group always resumes, whatever checkpoint.resume said.
            cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
    finally:
        metrics.close()


def _row(out: dict[str, Any], spec: LoopSpec, cfg: Any) -> dict[str, float]:
    tps = out["tokens"] / max(out["step_time"], 1e-9)
    row = {k: v for k, v in out.items() if k != "tokens"} | {"tokens_per_second": tps}
    peak = peak_flops(current_device_name(), cfg.parallel.precision)
    if peak and spec.flops_per_token:
        row["mfu"] = spec.flops_per_token * tps / (peak * cfg.parallel.num_workers)
    return row


def _train(group: Any, cfg: Any, spec: LoopSpec, run_dir: Path,
           metrics: MetricsLogger) -> dict[str, Any]:
    resume = checkpoint.resume_path(run_dir, cfg.checkpoint)
    start = group.call("resume", str(resume) if resume else None)[0]
    info = group.call("info")[0]
    print(f"{spec.role}: {info['plan']} on {info['device']}"
          + (f"; resumed from {resume}" if resume else ""), flush=True)
    tc = cfg.train
    end = min(tc.steps, tc.stop_after) if tc.stop_after else tc.steps
    last: dict[str, Any] = {"step": start, "loss": float("nan")}
    bar = progress(tc.steps, desc=spec.role, unit="step", initial=start)
    for step in range(start + 1, end + 1):
        row = _row(group.call("train_step")[0], spec, cfg)
        last = {"step": step, "loss": row["loss"]}
        if step % tc.log_every == 0 or step in (end, start + 1):
            metrics.log(step, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            print(f"step {step}: " + _fmt(row), flush=True)
        if tc.eval_every and step % tc.eval_every == 0 and step != end:
            _evaluate(group, metrics, step)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == end:
            group.call("save", step)
        bar.update(1)
    bar.close()
    if end < tc.steps:
        print(f"{spec.role}: stopped after step {end} of {tc.steps} (train.stop_after); "
              f"run again to resume", flush=True)
        return last
    last |= {f"val_{k}": v for k, v in _evaluate(group, metrics, tc.steps).items()}
    if spec.finish is not None:
        last |= spec.finish(group)
    return last


_FMT = {"lr": "{:.2e}", "tokens_per_second": "{:,.0f}", "step_time": "{:.3f}s"}


def _fmt(row: dict[str, float]) -> str:
    return " ".join(f"{k} " + _FMT.get(k, "{:.4f}").format(v) for k, v in row.items())


def _evaluate(group: Any, metrics: MetricsLogger, step: int) -> dict[str, float]:
    ev = group.call("evaluate")[0]
    if ev:
        metrics.log(step, ev, kind="eval")
        print(f"eval step {step}: " + _fmt(ev), flush=True)
    return ev
