"""Per-step metrics: a CSV per kind in the run directory, a Prometheus endpoint, Ray metrics.

One `MetricsLogger` per process. `log(step, {"loss": 2.3, "lr": 3e-4}, kind="train")`
  - appends a row to RUN_DIR/metrics/train.csv (columns: step, time, then the keys);
  - sets the gauges trellis_train_loss, trellis_train_lr, ... labelled job/role/rank on the
    process's own prometheus_client registry, served over HTTP on cfg.host (127.0.0.1 by
    default) while the job runs;
  - mirrors the same figures to ray.util.metrics.Gauge when this process is connected to
    Ray, so Ray's own Prometheus export and dashboard carry them too.
Labelled series (PPO's per-phase seconds) go through `phases=`:
`log(step, {...}, kind="ppo", phases={"rollout": 1.2})` sets
trellis_ppo_phase_seconds{phase="rollout"} and writes a CSV column "phase_seconds/rollout".

Where the endpoint is: `.address`; also written as a Prometheus file_sd target to
RUN_DIR/metrics/endpoints/<role>-<rank>.json (see cluster/configs/prometheus.yml) and
printed once to stdout ("trellis metrics: http://...").

CSV files: the driver (role "driver") writes <kind>.csv, the file `trellis plot` reads;
any other role writes <kind>.<role>.<rank>.csv so concurrent writers never share a file.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server

LABELS = ("job", "role", "rank")
RAY_REFRESH_S = 5.0
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class MetricsConfig:
    port: int = field(default=0, metadata={"min": -1, "max": 65535})
    """Prometheus endpoint port; 0 picks a free port, -1 serves no endpoint."""
    host: str = "127.0.0.1"
    """Address the endpoint binds to; loopback unless a scraper elsewhere must reach it."""
    ray_metrics: bool = True
    """Also mirror every figure to ray.util.metrics when this process is connected to Ray."""
    job: str = ""
    """Value of the `job` label; empty: $TRELLIS_JOB_ID (set by `trellis submit`), else the
    run directory's name."""
    linger_s: float = field(default=0.0, metadata={"min": 0.0})
    """After close(), keep serving until one more scrape has read the final values, at most
    this many seconds (short jobs otherwise end between two Prometheus scrapes)."""


def metric_name(kind: str, key: str) -> str:
    """'train', 'loss/val' -> 'trellis_train_loss_val'. '/', '.', '-' and any other
    character Prometheus disallows become '_'; callers detect collisions (see _Series)."""
    name = f"trellis_{kind}_{key}"
    return re.sub(r"_+", "_", _NAME_OK.sub("_", name)).rstrip("_")


def _rss_bytes() -> float:
    """Resident memory of this process (psutil when present, else /proc)."""
    try:
        import psutil
        return float(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


class _CsvLog:
    """Append-only CSV with a stable header: a new key rewrites the file once with the
    widened header (old rows get empty cells), atomically, so no row is ever lost."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        if path.is_file() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f), [])

    def append(self, row: Mapping[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            self._widen(new)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])

    def _widen(self, new: list[str]) -> None:
        old_rows: list[list[str]] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                old_rows = list(csv.reader(f))[1:]
        self.columns = (self.columns or ["step", "time"]) + [c for c in new
                                                             if c not in ("step", "time")]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            for r in old_rows:
                w.writerow(r + [""] * (len(self.columns) - len(r)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


class _ScrapeCounter:
    """A collector with no metrics: prometheus_client calls collect() once per scrape."""

    def __init__(self, owner: "MetricsLogger"):
        self.owner = owner

    def collect(self) -> list:
        self.owner.scrapes += 1
        return []

    def describe(self) -> list:  # registering must not count as a scrape
        return []


class MetricsLogger:
    """Per-step metrics for one process; see the module docstring."""

    def __init__(self, run_dir: str | Path, cfg: MetricsConfig | None = None,
                 role: str = "driver", rank: int = 0):
        self.cfg = cfg or MetricsConfig()
        self.run_dir = Path(run_dir)
        self.role, self.rank = role, int(rank)
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        job = self.cfg.job or os.environ.get("TRELLIS_JOB_ID") or self.run_dir.resolve().name
        self.labels = {"job": job, "role": role, "rank": str(self.rank)}
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauges: dict[str, Gauge] = {}
        self._sources: dict[str, tuple[str, str]] = {}  # metric name -> (kind, key)
        self._ray_gauges: dict[str, Any] = {}
        self._ray_last: dict[tuple, tuple] = {}  # (name, tags) -> (gauge, value, tags)
        self._refresher: threading.Thread | None = None
        self._closed = threading.Event()
        self._csv: dict[str, _CsvLog] = {}
        self._lock = threading.Lock()
        mem = Gauge("trellis_process_resident_memory_bytes",
                    "Resident memory of this trellis process", LABELS, registry=self.registry)
        mem.labels(**self.labels).set_function(_rss_bytes)
        self.scrapes = 0  # endpoint reads so far (counted by _ScrapeCounter)
        self.registry.register(_ScrapeCounter(self))
        self._server = self._thread = None
        self.address: str | None = None
        self.endpoint_file: Path | None = None
        if self.cfg.port != -1:
            self._start_server()

    # ----------------------------------------------------------------- endpoint
    def _start_server(self) -> None:
        self._server, self._thread = start_http_server(
            self.cfg.port, addr=self.cfg.host, registry=self.registry)
        host, port = self._server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        self.address = f"http://{shown}:{port}/metrics"
        self.port = int(port)
        target = {"targets": [f"{shown}:{port}"], "labels": dict(self.labels)}
        ep_dir = self.metrics_dir / "endpoints"
        ep_dir.mkdir(exist_ok=True)
        self.endpoint_file = ep_dir / f"{self.role}-{self.rank}.json"
        self.endpoint_file.write_text(json.dumps([target]))
        print(f"trellis metrics: {self.address} (role={self.role} rank={self.rank})", flush=True)

    def close(self) -> None:
        """Stop the endpoint (after cfg.linger_s, see there) and remove its service-discovery
        file. Idempotent."""
        self._closed.set()
        if self._server is not None:
            seen, deadline = self.scrapes, time.monotonic() + self.cfg.linger_s
            while self.scrapes == seen and time.monotonic() < deadline:
                time.sleep(0.05)
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        if self.endpoint_file is not None:
            self.endpoint_file.unlink(missing_ok=True)
            self.endpoint_file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- logging
    def csv_path(self, kind: str) -> Path:
        name = kind if self.role == "driver" else f"{kind}.{self.role}.{self.rank}"
        return self.metrics_dir / f"{name}.csv"

    def log(self, step: int, values: Mapping[str, float], kind: str = "train",
            phases: Mapping[str, float] | None = None) -> None:
        """Record one step: a CSV row, gauges trellis_<kind>_<key>, Ray gauges.
        `phases` (name -> seconds) become trellis_<kind>_phase_seconds{phase=name}."""
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", kind):
            raise ValueError(f"metrics kind {kind!r}: use letters, digits and '_'")
        vals = {k: float(v) for k, v in values.items()}
        phases = {p: float(s) for p, s in (phases or {}).items()}
        row: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3), **vals}
        row.update({f"phase_seconds/{p}": s for p, s in phases.items()})
        with self._lock:
            for k in ["step", *vals, *(["phase_seconds"] if phases else [])]:
                self._check_name(kind, k)  # before writing anything: a bad call has no effect
            self._csv_for(kind).append(row)
            self._set(kind, "step", float(step))
            for k, v in vals.items():
                self._set(kind, k, v)
            for p, s in phases.items():
                self._set(kind, "phase_seconds", s, phase=p)

    def _csv_for(self, kind: str) -> _CsvLog:
        if kind not in self._csv:
            self._csv[kind] = _CsvLog(self.csv_path(kind))
        return self._csv[kind]

    def _check_name(self, kind: str, key: str) -> str:
        name = metric_name(kind, key)
        src = self._sources.setdefault(name, (kind, key))
        if src != (kind, key):  # two keys sanitise to one name: refuse rather than overwrite
            raise ValueError(f"metric key {key!r} ({kind}) and {src[1]!r} ({src[0]}) both map "
                             f"to Prometheus name {name!r}; rename one")
        return name

    def _set(self, kind: str, key: str, value: float, phase: str | None = None) -> None:
        name = self._check_name(kind, key)
        g = self._gauges.get(name)
        extra = {"phase": phase} if phase is not None else {}
        if g is None:
            g = Gauge(name, f"trellis {kind} {key}", LABELS + tuple(extra),
                      registry=self.registry)
            self._gauges[name] = g
        g.labels(**self.labels, **extra).set(value)
        self._mirror_to_ray(name, f"trellis {kind} {key}", value, extra)

    def _mirror_to_ray(self, name: str, desc: str, value: float, extra: dict) -> None:
        """Ray is never imported here: only a process already connected to Ray mirrors."""
        ray = sys.modules.get("ray")
        if not self.cfg.ray_metrics or ray is None or not ray.is_initialized():
            return
        g = self._ray_gauges.get(name)
        if g is None:
            from ray.util.metrics import Gauge as RayGauge
            g = RayGauge(name, description=desc, tag_keys=LABELS + tuple(extra))
            self._ray_gauges[name] = g
        tags = {**self.labels, **extra}
        g.set(value, tags=tags)
        self._ray_last[(name, tuple(sorted(tags.items())))] = (g, value, tags)
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_ray, daemon=True,
                                               name="trellis-ray-metrics")
            self._refresher.start()

    def _refresh_ray(self) -> None:
        """Measured (Ray 2.60): Ray's export drops a gauge ~20 s after its last set, so a
        figure logged rarely (eval) would vanish between logs. Re-set the last values."""
        while not self._closed.wait(RAY_REFRESH_S):
            with self._lock:
                for g, value, tags in list(self._ray_last.values()):
                    g.set(value, tags=tags)

    def log_memory(self) -> float:
        """Current resident memory (bytes); the gauge itself is read at scrape time."""
        return _rss_bytes()
