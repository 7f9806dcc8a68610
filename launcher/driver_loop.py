"""The ONE driver loop every training job runs (pretrain, sft, rm, ppo and the RL algorithms
that come next): step, log, evaluate, checkpoint, `stop_after`, and recovery. When a worker
of any role dies, the session (all of its worker groups) is torn down and a new one resumes
from the latest complete checkpoint, up to `train.max_failures` times.

A job hands the loop a factory `open_session(resume) -> Session`. The session owns the job's
worker groups and knows its own checkpoints; the loop owns the cadence:

    start() -> step to continue from      (resumes the latest complete checkpoint if allowed)
    train_step(step) -> (row, phases)     (metrics of one step; phase name -> seconds)
    describe(step, row) -> str            (the printed line)
    evaluate(step) -> row                 (held-out metrics; {} = none)
    should_stop() -> reason | None        (optional: early stop after an evaluation)
    save(step)                            (a complete checkpoint of every trainable role)
    finish(last) -> result                (after the schedule's last step)
    shutdown()

`GroupSession` is the session of the jobs that run one worker group of EngineWorker ranks
(pretrain, sft, rm); the RL jobs bring their own (launcher/jobs/ppo/driver.py).
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from trellis.cluster.metrics import MetricsLogger
from trellis.launcher.loop_config import LoopConfig
from trellis.launcher.progress import progress
from trellis.parallel import checkpoint
from trellis.parallel.config import CheckpointConfig
from trellis.parallel.peak import current_device_name, peak_flops
from trellis.parallel.worker_group import (LocalGroup, PlacementError, WorkerDied, WorkerGroup,
                                           ensure_ray)


class Session(Protocol):
    name: str
    """Log prefix and progress-bar label (e.g. 'pretrain', 'ppo')."""
    metrics_kind: str
    """Metrics kind of the step rows (CSV file name, gauge prefix); evaluations log as
    '<kind>_eval' unless the session names its own `eval_kind`."""

    def start(self) -> int: ...
    def train_step(self, step: int) -> tuple[dict[str, float], dict[str, float]]: ...
    def describe(self, step: int, row: dict[str, float]) -> str: ...
    def evaluate(self, step: int) -> dict[str, float]: ...
    def save(self, step: int) -> None: ...
    def finish(self, last: dict[str, Any]) -> dict[str, Any]: ...
    def shutdown(self) -> None: ...


class StopSignal:
    """SIGTERM / SIGINT ask the loop to stop at the next step boundary, with a checkpoint (a
    preemptible cluster or `trellis jobs stop` sends SIGTERM); a second signal stops at once.
    Handlers are installed only in the main thread (signals are delivered there)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.name = signal.Signals(signum).name
        print(f"trellis: {self.name} received; stopping after this step, with a checkpoint "
              f"(send it again to stop at once)", flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_loop(open_session: Callable[[bool], Session], loop: LoopConfig, ckpt: CheckpointConfig,
             metrics: MetricsLogger) -> dict[str, Any]:
    """Run the schedule to `loop.steps` (or `loop.stop_after`), recovering from worker deaths
    (a lost node's workers too) and stopping cleanly on SIGTERM/SIGINT. Returns {"step",
    "recoveries", "recovery_log", ...the last step's row..., ...finish()} (plus "stopped":
    the signal's name after a signal). recovery_log: per recovery, the error and the wall
    times it was caught ("failed_at") and the new session had resumed ("resumed_at").
    Resources that do not come (parallel.placement_timeout_s) end the job in one line."""
    failures, resume, log = 0, ckpt.resume, []
    with StopSignal() as stop:
        while True:
            session = None
            try:
                session = open_session(resume)
                return _run(session, loop, ckpt, metrics, stop, log) \
                    | {"recoveries": failures, "recovery_log": log}
            except PlacementError as e:
                raise SystemExit(f"trellis: {e}") from None
            except WorkerDied as e:
                failures += 1
                log.append({"error": str(e), "failed_at": time.time()})
                name = session.name if session is not None else "job"
                if stop.name is not None:
                    raise SystemExit(f"trellis {name}: {e} after {stop.name}; not restarted "
                                     f"(the latest complete checkpoint is kept)") from None
                if failures > loop.max_failures:
                    raise SystemExit(f"trellis {name}: {e}; gave up after {failures - 1} "
                                     f"recoveries (train.max_failures={loop.max_failures}; raise it with "
                                     f"--max-failures N)") from None
                print(f"trellis {name}: {e}; restarting every worker group from the latest "
                      f"complete checkpoint (recovery {failures}/{loop.max_failures})", flush=True)
            finally:
                if session is not None:
                    session.shutdown()
            resume = True  # a restarted session always resumes, whatever checkpoint.resume said


def _run(s: Session, loop: LoopConfig, ckpt: CheckpointConfig, metrics: MetricsLogger,
         stop: StopSignal, log: list[dict[str, Any]]) -> dict[str, Any]:
    start = s.start()
    if log and "resumed_at" not in log[-1]:
        log[-1]["resumed_at"] = time.time()
    end = min(loop.steps, loop.stop_after) if loop.stop_after else loop.steps
    eval_kind = getattr(s, "eval_kind", f"{s.metrics_kind}_eval")
    last: dict[str, Any] = {"step": start}
    bar = progress(loop.steps, desc=s.name, unit="step", initial=start)
    for step in range(start + 1, end + 1):
        row, phases = s.train_step(step)
        last = {"step": step, **row}
        if step % loop.log_every == 0 or step in (end, start + 1):
            metrics.log(step, row, kind=s.metrics_kind, phases=phases)
            print(s.describe(step, row), flush=True)
        if "loss" in row:
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
        if loop.eval_every and step % loop.eval_every == 0 and step != end:
            _evaluate(s, metrics, step, eval_kind)
        early = getattr(s, "should_stop", lambda: None)()
        if checkpoint.should_save(step, ckpt, end) or stop.name is not None or early:
            s.save(step)
        bar.update(1)
        if early:
            bar.close()
            print(f"{s.name}: stopped early after step {step} of {loop.steps}: {early}",
                  flush=True)
            return last | {"early_stop": early} | s.finish(last)
        if stop.name is not None and step < loop.steps:
            bar.close()
            print(f"{s.name}: stopped after step {step} of {loop.steps} on {stop.name} "
                  f"(checkpointed); run the same command again to resume", flush=True)
            return last | {"stopped": stop.name}
    bar.close()
    if end < loop.steps:
        print(f"{s.name}: stopped after step {end} of {loop.steps} (train.stop_after); "
              f"run again to resume", flush=True)
        return last
    return last | s.finish(last)


def _evaluate(s: Session, metrics: MetricsLogger, step: int, kind: str) -> dict[str, float]:
    ev = s.evaluate(step)
    if ev:
        metrics.log(step, ev, kind=kind)
        print(f"eval step {step}: " + fmt(ev), flush=True)
    return ev


_FMT = {"lr": "{:.2e}", "tokens_per_second": "{:,.0f}", "step_time": "{:.3f}s"}


def fmt(row: dict[str, float]) -> str:
    return " ".join(f"{k} " + _FMT.get(k, "{:.4f}").format(v) for k, v in row.items())


# ---- one worker group of EngineWorker ranks (pretrain, sft, rm) ---------------------------
@dataclass
class LoopSpec:
    """What differs between the one-group jobs: who the workers are and how to describe them."""
    role: str
    """Group role: actor names are '<role>/rank<r>'; also the log prefix."""
    worker: str
    """Worker class as 'package.module:Class' (a parallel.engine_worker.EngineWorker)."""
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


class GroupSession:
    """A one-group job on the driver loop. `cfg` has parallel, checkpoint and train."""
    metrics_kind, eval_kind = "train", "eval"

    def __init__(self, cfg: Any, spec: LoopSpec, run_dir: Path, metrics: MetricsLogger,
                 local: bool, address: str | None, resume: bool):
        self.cfg, self.spec, self.run_dir, self.resume = cfg, spec, run_dir, resume
        self.metrics = metrics
        self.name = spec.role
        # Peak FLOPs of this device kind, looked up once (MFU on every logged step).
        self.peak = peak_flops(current_device_name(), cfg.parallel.precision)
        self.group = make_group(cfg, spec, local, address)

    def start(self) -> int:
        self.group.call("validate")  # data sizes are checked before the first step
        path = checkpoint.latest_complete(self.run_dir) if self.resume else None
        start = self.group.call("resume", str(path) if path else None)[0]
        info = self.group.call("info")[0]
        # precision "auto" is resolved on the workers' device: the peak follows their choice
        self.peak = peak_flops(current_device_name(), info.get("compute_precision",
                                                               self.cfg.parallel.precision))
        print(f"{self.name}: {info['plan']} on {info['device']}, {info['precision']}"
              + (f"; resumed from {path}" if path else ""), flush=True)
        return start

    def train_step(self, step: int) -> tuple[dict[str, float], dict[str, float]]:
        out = self.group.call("train_step")[0]
        tps = out["tokens"] / max(out["step_time"], 1e-9)
        row = {k: v for k, v in out.items() if k != "tokens"} | {"tokens_per_second": tps}
        if self.peak and self.spec.flops_per_token:
            row["mfu"] = self.spec.flops_per_token * tps / (self.peak * self.cfg.parallel.num_workers)
        return row, {}

    def describe(self, step: int, row: dict[str, float]) -> str:
        return f"step {step}: " + fmt(row)

    def evaluate(self, step: int) -> dict[str, float]:
        return self.group.call("evaluate")[0]

    def save(self, step: int) -> None:
        self.group.call("save", step)

    def finish(self, last: dict[str, Any]) -> dict[str, Any]:
        # The result keeps the contract of before: step, loss, val_*, what spec.finish adds.
        out = {"step": last["step"], "loss": last.get("loss", float("nan"))}
        ev = _evaluate(self, self.metrics, last["step"], self.eval_kind)
        out |= {f"val_{k}": v for k, v in ev.items()}
        if self.spec.finish is not None:
            out |= self.spec.finish(self.group)
        return out

    def shutdown(self) -> None:
        self.group.shutdown()


def train_with_recovery(cfg: Any, spec: LoopSpec, run_dir: Path, local: bool = False,
                        address: str | None = None) -> dict[str, Any]:
    """Run a one-group job (pretrain, sft, rm) on the driver loop."""
    metrics = MetricsLogger(run_dir, cfg.metrics, role="driver")
    try:
        res = run_loop(lambda resume: GroupSession(cfg, spec, run_dir, metrics, local, address,
                                                      resume),
                       cfg.train, cfg.checkpoint, metrics)
    finally:
        metrics.close()
    res.setdefault("loss", float("nan"))
    return res

