"""A local Ray head for trellis: start it on loopback with token auth, find it, stop it.

`start_head` runs `ray start --head` with every port it opens chosen (so two heads on one
machine never fight over Ray's fixed defaults 10001/52365), bound to cfg.host (127.0.0.1
by default) and with Ray token authentication on. It records what it started in
TEMP_DIR/trellis_head.json; `stop_head` stops exactly the processes of that head (its
session's processes and their children), never other Ray clusters on the machine, which
is what plain `ray stop` would do.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_TEMP_DIR = "/tmp/trellis-ray"
STATE_FILE = "trellis_head.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ClusterError(RuntimeError):
    """A cluster operation failed; str() is one line saying what and where."""


@dataclass
class HeadConfig:
    host: str = "127.0.0.1"
    """Address the head and its dashboard bind to; a real cluster needs a routable one."""
    port: int = field(default=6379, metadata={"min": 0, "max": 65535})
    """GCS port (the cluster address is HOST:PORT); 0 = a free port."""
    dashboard_port: int = field(default=8265, metadata={"min": 0, "max": 65535})
    """Dashboard and Jobs API port; 0 = a free port."""
    metrics_export_port: int = field(default=8080, metadata={"min": 0, "max": 65535})
    """Ray's own Prometheus export port (also carries trellis' ray.util.metrics); 0 = free."""
    num_cpus: int | None = None
    """CPUs the head offers to tasks; None = Ray detects."""
    num_gpus: int | None = None
    """GPUs the head offers; None = Ray detects."""
    temp_dir: str = DEFAULT_TEMP_DIR
    """Ray's session/log root for this head; keep it short (Unix socket paths < 108 bytes)."""
    timeout_s: float = field(default=120.0, metadata={"min": 1.0})
    """How long `ray start` may take."""


@dataclass
class HeadInfo:
    """What `start_head` started; saved as TEMP_DIR/trellis_head.json."""
    address: str
    dashboard_url: str
    metrics_url: str
    temp_dir: str
    ports: dict[str, int]
    token_path: str
    started: float

    def lines(self) -> list[str]:
        return [f"ray address:     {self.address}",
                f"dashboard/jobs:  {self.dashboard_url}",
                f"ray metrics:     {self.metrics_url}",
                f"auth token:      {self.token_path} (clients set RAY_AUTH_MODE=token)",
                f"ray temp dir:    {self.temp_dir}"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on `host` (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def token_path() -> Path:
    """Where Ray reads the auth token: $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_token() -> Path:
    """Create the auth token file (owner-only, like Ray's own) if it does not exist yet."""
    path = token_path()
    if "RAY_AUTH_TOKEN" in os.environ or (path.is_file() and path.stat().st_size > 0):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def client_env(env: dict[str, str] | None = None, state: HeadInfo | None = None) -> dict:
    """Environment for a Ray client of a trellis head: token auth on (unless the caller set a
    mode explicitly), the head's token file, and Ray kept on loopback addresses."""
    env = dict(os.environ if env is None else env)
    env.setdefault("RAY_AUTH_MODE", "token")
    if state is not None and "RAY_AUTH_TOKEN_PATH" not in env and "RAY_AUTH_TOKEN" not in env:
        env["RAY_AUTH_TOKEN_PATH"] = state.token_path
    return env


def use_token_auth(state: HeadInfo | None = None) -> None:
    """Make this process a token-auth Ray client; call before Ray reads its config."""
    os.environ.update(client_env(state=state))


def _head_env(cfg: HeadConfig) -> dict[str, str]:
    env = dict(os.environ)
    for var in _ENV_PORTS:
        env.setdefault(var, str(free_port(cfg.host)))
    env["RAY_AUTH_MODE"] = "token"  # trellis keeps Ray's token authentication on
    if cfg.host in LOOPBACK:
        # Measured (Ray 2.60): without this Ray binds to eth0 despite --node-ip-address.
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Jobs run `trellis ...`: make this interpreter's scripts directory visible to them.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _ports(cfg: HeadConfig) -> dict[str, int]:
    pick = lambda p: p or free_port(cfg.host)  # noqa: E731
    return {"port": pick(cfg.port), "dashboard_port": pick(cfg.dashboard_port),
            "metrics_export_port": pick(cfg.metrics_export_port),
            "ray_client_server_port": free_port(cfg.host),
            "dashboard_agent_listen_port": free_port(cfg.host)}


# Ray's internal metrics ports default to fixed numbers (44217, 44227): pick free ones so a
# second Ray instance on the machine does not collide. Set through the environment.
_ENV_PORTS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")


def start_head(cfg: HeadConfig) -> HeadInfo:
    """Start a Ray head per `cfg` and return where it listens. Raises ClusterError."""
    temp = Path(cfg.temp_dir).resolve()
    old = read_state(temp)
    if old is not None and head_processes(old):
        raise ClusterError(f"a trellis Ray head is already running from {temp} "
                           f"({old.address}); `trellis cluster down` first")
    temp.mkdir(parents=True, exist_ok=True)
    ensure_token()
    ports = _ports(cfg)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head",
           "--node-ip-address", cfg.host, "--dashboard-host", cfg.host,
           "--include-dashboard", "true", "--temp-dir", str(temp), "--disable-usage-stats"]
    for name, port in ports.items():
        cmd += [f"--{name.replace('_', '-')}", str(port)]
    if cfg.num_cpus is not None:
        cmd += ["--num-cpus", str(cfg.num_cpus)]
    if cfg.num_gpus is not None:
        cmd += ["--num-gpus", str(cfg.num_gpus)]
    try:
        proc = subprocess.run(cmd, env=_head_env(cfg), capture_output=True, text=True,
                              timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`ray start` did not finish within {cfg.timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ClusterError(f"`ray start` failed (exit {proc.returncode}): " + " | ".join(tail))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    info = HeadInfo(address=f"{host}:{ports['port']}",
                    dashboard_url=f"http://{host}:{ports['dashboard_port']}",
                    metrics_url=f"http://{host}:{ports['metrics_export_port']}/metrics",
                    temp_dir=str(temp), ports=ports, token_path=str(token_path()),
                    started=time.time())
    (temp / STATE_FILE).write_text(json.dumps(asdict(info), indent=1))
    return info


def read_state(temp_dir: str | Path = DEFAULT_TEMP_DIR) -> HeadInfo | None:
    """The head recorded under `temp_dir`, or None when there is none."""
    path = Path(temp_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return HeadInfo(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ClusterError(f"{path}: unreadable head state ({e})") from None


def head_processes(info: HeadInfo) -> list:
    """Live processes of this head: those whose command line names its temp dir or GCS
    address, plus all their descendants (workers, agents, job drivers)."""
    import psutil

    # Whole path components / whole addresses only: /tmp/r must not match /tmp/r2.
    mark = re.compile(rf"(^|[=\s]){re.escape(info.temp_dir)}(/|$|\s)"
                      rf"|(^|[=/\s]){re.escape(info.address)}($|\D)")
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        args = p.info.get("cmdline") or []
        if p.pid != os.getpid() and any(mark.search(a) for a in args):
            roots.append(p)
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return [p for p in procs.values() if p.is_running()]


def _terminate(procs: list, grace_s: float) -> list:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
    return alive


def stop_head(temp_dir: str | Path = DEFAULT_TEMP_DIR, grace_s: float = 5.0) -> int:
    """Stop the head recorded under `temp_dir`; returns how many processes were stopped.
    Order as `ray stop`: raylet first, gcs_server last, so fate-sharing agents exit quietly."""
    info = read_state(temp_dir)
    if info is None:
        raise ClusterError(f"no trellis Ray head recorded in {temp_dir} ({STATE_FILE} missing)")
    procs = head_processes(info)
    rank = lambda p: 0 if _name(p) == "raylet" else 2 if _name(p) == "gcs_server" else 1  # noqa
    for bucket in (0, 1, 2):
        _terminate([p for p in procs if rank(p) == bucket], grace_s)
    (Path(temp_dir) / STATE_FILE).unlink(missing_ok=True)
    return len(procs)


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""
