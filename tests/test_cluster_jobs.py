"""A real local Ray head (`trellis cluster up` on free loopback ports, token auth), real jobs
through `trellis submit` / `trellis jobs`, the job's metrics endpoint scraped while it runs,
Ray's own export carrying trellis metrics, and `trellis cluster down`. CPU only, loopback."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.head import free_port, head_processes, listening_sockets, read_state

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/data/cluster_tiny.yaml"
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")
pytestmark = pytest.mark.slow


def trellis(*args: str, env: dict | None = None, timeout: float = 120):
    exe = Path(sys.executable).parent / "trellis"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "launcher.cli"]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env or CLIENT_ENV, capture_output=True,
                          text=True, timeout=timeout)


# Clients get no token settings: trellis must turn token auth on and find the head's token
# through the state `cluster up` recorded.
CLIENT_ENV = {k: v for k, v in os.environ.items()
              if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}


def samples(url: str) -> list:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="trh", dir="/tmp"))  # short: Unix socket paths
    ports = {"port": free_port(), "dashboard-port": free_port(),
             "metrics-export-port": free_port()}
    env = {**CLIENT_ENV, "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token")}
    args = [f"--{k}={v}" for k, v in ports.items()]
    proc = trellis("cluster", "up", *args, "--num-cpus=2", f"--temp-dir={temp}", env=env)
    assert proc.returncode == 0, proc.stderr
    info = read_state(temp)
    try:
        yield {"info": info, "temp": temp, "ports": ports, "up_stdout": proc.stdout,
               "addr": ["--address", info.dashboard_url, "--temp-dir", str(temp)]}
    finally:
        down = trellis("cluster", "down", f"--temp-dir={temp}", env=env)
        left = head_processes(info)
        for p in left:  # never leave a head behind, even when `down` is broken
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)
        assert down.returncode == 0 and not left, (down.stderr, left)


def test_head_binds_only_loopback_and_enforces_token_auth(head):
    info, ports = head["info"], head["ports"]
    assert info.dashboard_url in head["up_stdout"] and info.metrics_url in head["up_stdout"]
    procs = head_processes(info)
    socks = listening_sockets(procs)
    assert len(procs) >= 5 and len(socks) >= 5
    assert {ip for ip, _, _ in socks} <= set(LOOPBACK), socks  # from the kernel, not config
    bound = {port for _, port, _ in socks}
    assert {ports["port"], ports["dashboard-port"], ports["metrics-export-port"]} <= bound
    assert oct(os.stat(info.token_path).st_mode & 0o777) == "0o600"
    # A client that does not send the token is refused; trellis' clients send it.
    refused = trellis("jobs", "list", *head["addr"], env={**CLIENT_ENV, "RAY_AUTH_MODE": "disabled"})
    assert refused.returncode == 1 and "uthentication" in refused.stderr, refused.stderr
    ok = trellis("jobs", "list", *head["addr"])
    assert ok.returncode == 0 and "SUBMISSION ID" in ok.stdout, ok.stderr


MIRROR = """
import sys, ray
from cluster.metrics import MetricsConfig, MetricsLogger
ray.init(address=sys.argv[1], log_to_driver=False)
m = MetricsLogger(sys.argv[2], MetricsConfig(port=-1, job="mirror-test"))
m.log(3, {"loss": 4.25})
print("logged", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def jobs(head, tmp_path_factory):
    """Submit a failing and a good job, watch the good one's endpoint while it runs."""
    tmp = tmp_path_factory.mktemp("jobs")
    out = {"run_dir": tmp / "run"}
    bad = trellis("submit", "--config", TINY, "--set", "train.no_such_key=1", "--local",
                  "--run-dir", str(tmp / "bad"), *head["addr"])
    assert bad.returncode == 0, bad.stderr
    out["bad_id"] = re.search(r"submitted: (\S+)", bad.stdout).group(1)
    good = trellis("submit", "--config", TINY, "--local", "--run-dir", str(out["run_dir"]),
                   *head["addr"])
    assert good.returncode == 0, good.stderr
    out["good_id"] = gid = re.search(r"submitted: (\S+)", good.stdout).group(1)
    # Meanwhile a Ray driver logs through MetricsLogger: Ray's export must carry it.
    env = {**CLIENT_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head["info"].token_path}
    mirror = subprocess.Popen([sys.executable, "-c", MIRROR, head["info"].address, str(tmp / "m")],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        out["scrapes"], out["endpoint"] = _watch_job(head, gid)
        out["ray_export"] = _wait_for_ray_export(head["info"].metrics_url)
    finally:
        mirror.communicate("done\n", timeout=60)
    return out


def _watch_job(head, gid: str):
    """Find the endpoint in the job's logs; scrape it while the job trains and once after
    the last step (which releases the job's metrics.linger_s)."""
    deadline, url, scrapes, endpoint = time.monotonic() + 150, None, [], None
    while time.monotonic() < deadline:
        logs = trellis("jobs", "logs", gid, *head["addr"]).stdout
        url = url or (m.group(1) if (m := re.search(r"trellis metrics: (\S+)", logs)) else None)
        if url:
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            endpoint = endpoint or [c.laddr.ip for c in psutil.net_connections("tcp")
                                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
            try:
                scrapes.append(samples(url))
            except OSError:
                pass  # not up yet, or closed after the final scrape
        if re.search(r"^final:", logs, re.M) or "FAILED" in logs:
            return scrapes, endpoint
        time.sleep(1.0)
    raise AssertionError(f"job {gid} did not finish; last logs:\n{logs[-2000:]}")


def _wait_for_ray_export(url: str, timeout: float = 40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [s for s in samples(url) if s.name == "ray_trellis_train_loss"
               and s.labels.get("job") == "mirror-test"]
        if got:
            return got
        time.sleep(1.0)
    return []


def _status(head, sid):
    return trellis("jobs", "status", sid, "--wait", "--timeout", "120", *head["addr"])


def test_good_job_succeeds_and_logs_final_loss(head, jobs):
    st = _status(head, jobs["good_id"])
    assert st.returncode == 0 and "status:        SUCCEEDED" in st.stdout, st.stdout + st.stderr
    assert "trellis pretrain --config tests/data/cluster_tiny.yaml --local" in st.stdout
    logs = trellis("jobs", "logs", jobs["good_id"], "--follow", *head["addr"]).stdout
    final = float(re.search(r"^final: step 20 train loss ([0-9.]+)", logs, re.M).group(1))
    rows = (jobs["run_dir"] / "metrics" / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,time,loss")
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert last["step"] == "20" and abs(float(last["loss"]) - final) < 1e-4
    assert re.search(r"pretrain: 100%.*20/20.*step/s", logs)  # the progress bar, as lines
    listed = trellis("jobs", "list", *head["addr"]).stdout
    assert re.search(rf"{jobs['good_id']}\s+SUCCEEDED", listed)
    assert re.search(rf"{jobs['bad_id']}\s+FAILED", listed)


def test_metrics_endpoint_scraped_while_running(jobs):
    assert jobs["endpoint"] == ["127.0.0.1"]  # the job's server socket, from the kernel
    losses = [[s for s in scrape if s.name == "trellis_train_loss"] for s in [None]
              for scrape in jobs["scrapes"]]
    losses = [ls for ls in losses if ls]
    assert len(losses) >= 2, "too few scrapes found trellis_train_loss"
    sample = losses[0][0]
    assert sample.labels == {"job": jobs["good_id"], "role": "driver", "rank": "0"}
    assert 0 < sample.value < 20
    names = {s.name for s in jobs["scrapes"][-1]}
    assert {"trellis_train_lr", "trellis_train_tokens_per_second", "trellis_train_grad_norm",
            "trellis_train_step_time", "trellis_process_resident_memory_bytes"} <= names
    rows = (jobs["run_dir"] / "metrics" / "train.csv").read_text().splitlines()
    final_csv = float(dict(zip(rows[0].split(","), rows[-1].split(",")))["loss"])
    last = [s.value for s in jobs["scrapes"][-1] if s.name == "trellis_train_loss"]
    assert last and abs(last[0] - final_csv) < 1e-6  # the lingering endpoint's last word


def test_ray_export_carries_trellis_metrics(head, jobs):
    got = jobs["ray_export"]
    assert got and got[0].value == 4.25
    assert got[0].labels["role"] == "driver" and got[0].labels["rank"] == "0"
    # Ray's Prometheus service discovery (prometheus.yml reads it) lists that export port;
    # Ray rewrites the file every few seconds as nodes register.
    target, sd_file = f"127.0.0.1:{head['ports']['metrics-export-port']}", \
        head["temp"] / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + 30
    while target not in sd_file.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    assert target in json.loads(sd_file.read_text())[0]["targets"]


def test_failing_job_reports_failed_with_its_error(head, jobs):
    st = _status(head, jobs["bad_id"])
    assert st.returncode == 1
    assert "status:        FAILED" in st.stdout
    assert "unknown config key 'train.no_such_key'" in st.stdout, st.stdout


def test_stop_a_running_job_and_unknown_ids(head, jobs):
    sub = trellis("submit", "--config", TINY, "--local", "--num-cpus", "0", "--set",
                  "train.steps=100000", "--run-dir", str(jobs["run_dir"].parent / "long"),
                  "--submission-id", "trellis-long-test", *head["addr"])
    assert sub.returncode == 0, sub.stderr
    stop = trellis("jobs", "stop", "trellis-long-test", *head["addr"])
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stderr
    st = _status(head, "trellis-long-test")
    assert st.returncode == 1 and "status:        STOPPED" in st.stdout
    missing = trellis("jobs", "status", "no-such-job", *head["addr"])
    assert missing.returncode == 1 and "no job with submission id 'no-such-job'" in missing.stderr
