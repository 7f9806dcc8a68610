"""The pretraining driver loop: step a worker group, log, evaluate, checkpoint; on a worker's
death tear the group down and resume a new one from the latest complete checkpoint."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from cluster.metrics import MetricsLogger
from launcher.config import to_dict
from launcher.job_config import PretrainJobConfig
from launcher.pretrain_data import PreparedData
from launcher.progress import progress
from model.flops import flops_per_token
from parallel import checkpoint
from parallel.peak import current_device_name, peak_flops
from parallel.worker_group import LocalGroup, WorkerDied, WorkerGroup, ensure_ray

WORKER = "launcher.pretrain_worker:PretrainWorker"


def make_group(cfg: PretrainJobConfig, data: PreparedData, run_dir: Path, local: bool,
               address: str | None) -> Any:
    kwargs = {"cfg": to_dict(cfg), "data_dir": str(data.train_dir),
              "val_dir": str(data.val_dir) if data.val_dir else None, "run_dir": str(run_dir),
              "tokenizer_sha256": data.tokenizer_sha256}
    if local:
        return LocalGroup(WORKER, cfg.parallel, role="pretrain", worker_kwargs=kwargs)
    ensure_ray(address)
    return WorkerGroup(WORKER, cfg.parallel, role="pretrain", worker_kwargs=kwargs)


def train_with_recovery(cfg: PretrainJobConfig, data: PreparedData, run_dir: Path,
                        local: bool = False, address: str | None = None) -> dict[str, Any]:
    failures = 0
    metrics = MetricsLogger(run_dir, cfg.metrics, role="driver")
    try:
        while True:
            group = None
            try:
                group = make_group(cfg, data, run_dir, local, address)
                return _train(group, cfg, data, run_dir, metrics)
            except WorkerDied as e:
                failures += 1
                if failures > cfg.train.max_failures:
                    raise SystemExit(
                        f"trellis pretrain: {e}; gave up after {failures - 1} recoveries "
                        f"(train.max_failures={cfg.train.max_failures})") from None
                print(f"trellis pretrain: {e}; restarting the group from the latest complete "
                      f"checkpoint (recovery {failures}/{cfg.train.max_failures})", flush=True)
            finally:
                if group is not None:
                    group.shutdown()
            # A restarted group always resumes, whatever checkpoint.resume said.
            cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
    finally:
        metrics.close()


def _mfu(cfg: PretrainJobConfig, tokens_per_s: float) -> float | None:
    peak = peak_flops(current_device_name(), cfg.parallel.precision)
    if not peak:
        return None
    return flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s / (peak * cfg.parallel.num_workers)


def _train(group: Any, cfg: PretrainJobConfig, data: PreparedData, run_dir: Path,
           metrics: MetricsLogger) -> dict[str, Any]:
    resume = checkpoint.resume_path(run_dir, cfg.checkpoint)
    start = group.call("resume", str(resume) if resume else None)[0]
    info = group.call("info")[0]
    print(f"pretrain: {cfg.train.objective} {cfg.model.arch} {info['plan']} on {info['device']}"
          + (f"; resumed from {resume}" if resume else ""), flush=True)
    steps, tc = cfg.train.steps, cfg.train
    last: dict[str, Any] = {"step": start, "loss": float("nan")}
    bar = progress(steps, desc="pretrain", unit="step", initial=start)
    end = min(steps, tc.stop_after) if tc.stop_after else steps
    for step in range(start + 1, end + 1):
        out = group.call("train_step")[0]
        tps = out["tokens"] / max(out["step_time"], 1e-9)
        row = {k: v for k, v in out.items() if k != "tokens"} | {"tokens_per_second": tps}
        mfu = _mfu(cfg, tps)
        if mfu is not None:
            row["mfu"] = mfu
        last = {"step": step, "loss": out["loss"]}
        if step % tc.log_every == 0 or step == end or step == start + 1:
            metrics.log(step, row)
            bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
            print(f"step {step}: loss {out['loss']:.4f} lr {out['lr']:.2e} "
                  f"grad_norm {out['grad_norm']:.3f} tok/s {tps:,.0f}"
                  + (f" mfu {mfu:.3f}" if mfu is not None else ""), flush=True)
        if tc.eval_every and step % tc.eval_every == 0 and step != end:
            _evaluate(group, metrics, step)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == end:
            group.call("save", step)
        bar.update(1)
    bar.close()
    if end < steps:
        print(f"pretrain: stopped after step {end} of {steps} (train.stop_after); "
              f"run again to resume", flush=True)
        return last
    ev = _evaluate(group, metrics, steps)
    if ev:
        last |= {"val_loss": ev["loss"], "val_ppl": ev["perplexity"]}
    if cfg.model.arch == "gpt" and tc.sample_tokens:
        last["sample"] = _sample(group, data, tc.sample_tokens)
    return last


def _evaluate(group: Any, metrics: MetricsLogger, step: int) -> dict[str, float]:
    ev = group.call("evaluate")[0]
    if ev:
        metrics.log(step, ev, kind="eval")
        print(f"eval step {step}: loss {ev['loss']:.4f} perplexity {ev['perplexity']:.2f}",
              flush=True)
    return ev


def _sample(group: Any, data: PreparedData, n: int) -> str:
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(data.tokenizer_path)
    prompt = tok.encode(data.sample_prompt)
    out = group.call("sample", prompt, n, tok.eos_id)[0]
    return data.sample_prompt + tok.decode(out)
