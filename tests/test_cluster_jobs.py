"""A real local Ray head (`trellis cluster up` on free loopback ports, token auth), real jobs
through `trellis submit` / `trellis jobs`, the job's metrics endpoint scraped while it runs,
Ray's own export carrying trellis metrics, and `trellis cluster down`. CPU only, loopback."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import listening_sockets
from trellis.cluster.head import free_port, head_processes, read_state

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/data/cluster_tiny.yaml"
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")
pytestmark = [pytest.mark.slow, pytest.mark.integration]


STEPS = 300  # tests/data/cluster_tiny.yaml: long enough to be scraped while it runs


def trellis(*args: str, env: dict | None = None, timeout: float = 120):
    exe = Path(sys.executable).parent / "trellis"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trellis.launcher.cli"]
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
from trellis.cluster.metrics import MetricsConfig, MetricsLogger
ray.init(address=sys.argv[1], log_to_driver=False)
m = MetricsLogger(sys.argv[2], MetricsConfig(port=-1, job="mirror-test"))
m.log(3, {"loss": 4.25})  # once: MetricsLogger must keep it alive in Ray's export
print("logged", flush=True)
sys.stdin.readline()
m.close()
"""


# Deadline for something that comes within seconds on an idle machine: only fails when it
# never comes, however slow or busy the machine.
DEADLINE_S = 300
# Ray's export reports every ~10 s and drops a gauge ~20 s after its last set (ENVIRONMENT.md):
# a figure still exported this long after its only log is being kept alive by MetricsLogger.
RAY_DROPS_AFTER_S = 36


def _wait_line(proc: subprocess.Popen, want: str, timeout: float) -> None:
    """Block until `proc` prints the line `want` (fail when it exits first or the time is up)."""
    got: list = []

    def read():
        for line in proc.stdout:  # ends at EOF: the process exited
            got.append(line.strip())
            if got[-1] == want:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert want in got, f"expected {want!r} from the process, got {got}"


@pytest.fixture(scope="module")
def mirror(head, tmp_path_factory):
    """A Ray driver that logs one figure through MetricsLogger and stays connected (until
    this module's tests are done); yields when (time.monotonic) it logged."""
    env = {**CLIENT_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head["info"].token_path}
    run = tmp_path_factory.mktemp("mirror")
    proc = subprocess.Popen([sys.executable, "-c", MIRROR, head["info"].address, str(run)],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        _wait_line(proc, "logged", DEADLINE_S)
        yield {"logged": time.monotonic()}
    finally:
        proc.communicate("done\n", timeout=60)


@pytest.fixture(scope="module")
def jobs(head, mirror, tmp_path_factory):
    """Submit a failing and a good job; scrape the good one's endpoint while it runs. (The
    mirror driver is started first only so that its wait overlaps the jobs.)"""
    tmp = tmp_path_factory.mktemp("jobs")
    out = {"run_dir": tmp / "run"}
    bad = trellis("submit", "--config", TINY, "--set", "train.no_such_key=1", "--local",
                  "--run-dir", str(tmp / "bad"), *head["addr"])
    assert bad.returncode == 0, bad.stderr
    out["bad_id"] = re.search(r"submitted: (\S+)", bad.stdout).group(1)
    good = trellis("submit", "--config", TINY, "--local", "--run-dir", str(out["run_dir"]),
                   *head["addr"])
    assert good.returncode == 0, good.stderr
    out["good_id"] = re.search(r"submitted: (\S+)", good.stdout).group(1)
    out.update(_watch_job(head, out["good_id"], out["run_dir"]))
    return out


def _watch_job(head, gid: str, run_dir: Path) -> dict:
    """Scrape the job's endpoint (found through its service-discovery file) until it closes
    after the last step, the scrape releasing the job's metrics.linger_s."""
    sd_file = run_dir / "metrics" / "endpoints" / "driver-0.json"
    found = {"scrapes": [], "endpoint": None}
    start = time.monotonic()
    url, done, last_status_check = None, False, start
    while not done and time.monotonic() - start < DEADLINE_S:
        if url is None and sd_file.is_file():
            target = json.loads(sd_file.read_text())[0]["targets"][0]
            url = f"http://{target}/metrics"
            port = int(target.rsplit(":", 1)[1])
            found["endpoint"] = [c.laddr.ip for c in psutil.net_connections("tcp")
                                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        if url is not None:
            try:
                found["scrapes"].append(samples(url))
            except OSError:  # closed: the last scrape was the final one
                done = any(s.name == "trellis_train_step" and s.value == STEPS
                           for s in (found["scrapes"] or [[]])[-1])
        if time.monotonic() - last_status_check > 20:  # a job that died early
            last_status_check = time.monotonic()
            st = trellis("jobs", "status", gid, *head["addr"])
            assert "FAILED" not in st.stdout, st.stdout
        time.sleep(0.5)
    assert done, f"job {gid}: endpoint never served step {STEPS} and closed"
    return found


def _status(head, sid):
    return trellis("jobs", "status", sid, "--wait", "--timeout", "120", *head["addr"])


def test_good_job_succeeds_and_logs_final_loss(head, jobs):
    st = _status(head, jobs["good_id"])
    assert st.returncode == 0 and "status:        SUCCEEDED" in st.stdout, st.stdout + st.stderr
    assert "trellis pretrain --config tests/data/cluster_tiny.yaml --local" in st.stdout
    logs = trellis("jobs", "logs", jobs["good_id"], "--follow", *head["addr"]).stdout
    final = float(re.search(rf"^final: step {STEPS} train loss ([0-9.]+)", logs, re.M).group(1))
    rows = (jobs["run_dir"] / "metrics" / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,time,loss")
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert last["step"] == str(STEPS) and abs(float(last["loss"]) - final) < 1e-4
    assert re.search(rf": 100%.*{STEPS}/{STEPS}.*step/s", logs)  # the progress bar, as lines
    listed = trellis("jobs", "list", *head["addr"]).stdout
    assert re.search(rf"{jobs['good_id']}\s+SUCCEEDED", listed)
    assert re.search(rf"{jobs['bad_id']}\s+FAILED", listed)


def test_metrics_endpoint_scraped_while_running(jobs):
    assert jobs["endpoint"] == ["127.0.0.1"]  # the job's server socket, from the kernel
    losses = [[s for s in scrape if s.name == "trellis_train_loss"] for scrape in jobs["scrapes"]]
    losses = [ls for ls in losses if ls]
    # At least one scrape (a fast machine may finish the job before a second one: the
    # lingering endpoint still serves the final figures, checked below).
    assert losses, "no scrape found trellis_train_loss"
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


def _mirrored(head) -> list:
    return [s for s in samples(head["info"].metrics_url)
            if s.name == "ray_trellis_train_loss" and s.labels.get("job") == "mirror-test"]


def _poll(what, deadline_s: float = DEADLINE_S, not_before: float = 0.0):
    """what() polled until truthy, looking only from time.monotonic() >= not_before on;
    its last value when the deadline passes (falsy: the event never came)."""
    while time.monotonic() < not_before:
        time.sleep(min(1.0, not_before - time.monotonic()))
    deadline, got = time.monotonic() + deadline_s, None
    while not got and time.monotonic() < deadline:
        got = what()
        if not got:
            time.sleep(1)
    return got


def _sd_targets(sd_file: Path) -> list:
    try:
        return json.loads(sd_file.read_text())[0]["targets"]
    except (OSError, ValueError, IndexError, KeyError):  # not (fully) written yet
        return []


def test_ray_export_carries_trellis_metrics(head, mirror):
    """A figure a Ray driver logged once through MetricsLogger reaches Ray's own Prometheus
    export (the first report comes ~10-12 s after the log) and is still exported once Ray
    alone would have dropped it (MetricsLogger re-sets it while it lives)."""
    got = _poll(lambda: _mirrored(head))
    assert got and got[0].value == 4.25, "Ray's export never carried the mirrored figure"
    assert got[0].labels["role"] == "driver" and got[0].labels["rank"] == "0"
    kept = _poll(lambda: _mirrored(head), not_before=mirror["logged"] + RAY_DROPS_AFTER_S)
    assert [s.value for s in kept or []] == [4.25], "dropped: MetricsLogger did not keep it"
    # Ray's Prometheus service discovery (prometheus.yml reads it) lists that export port;
    # Ray rewrites the file every few seconds as nodes register.
    target, sd_file = f"127.0.0.1:{head['ports']['metrics-export-port']}", \
        head["temp"] / "prom_metrics_service_discovery.json"
    assert _poll(lambda: target in _sd_targets(sd_file)), (target, _sd_targets(sd_file))


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


INGEST_LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times."
                for i in range(40)]


@pytest.fixture
def ingest_inputs():
    """A tiny text input and an ingest config inside the uploaded project (tests/data is
    uploaded; /data, /runs, /build are not), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tmp-ingest-", dir=ROOT / "tests" / "data"))
    rel = folder.relative_to(ROOT).as_posix()
    (folder / "notes.txt").write_text("\n".join(INGEST_LINES) + "\n")
    (folder / "ingest.yaml").write_text(
        "sources:\n"
        f"  - {{name: notes, paths: [{rel}/notes.txt], text_mode: lines}}\n"
        "tokenizer: {vocab_size: 400, num_threads: 1}\n"
        "processes: 1\n")
    try:
        yield rel
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_ingest_runs_as_a_cluster_job(head, ingest_inputs, tmp_path):
    """A job that is not training: `trellis ingest` submitted with --job, only the flags
    ingest accepts in its entrypoint, SUCCEEDED, and its output folder has a manifest."""
    out = tmp_path / "ingested"
    refused = trellis("submit", "--job", "ingest", "--config", f"{ingest_inputs}/ingest.yaml",
                      "--local", *head["addr"])
    assert refused.returncode == 1 and "does not accept --local" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    sub = trellis("submit", "--job", "ingest", "--config", f"{ingest_inputs}/ingest.yaml",
                  "--set", f"out_dir={out}", *head["addr"])
    assert sub.returncode == 0, sub.stderr
    sid = re.search(r"submitted: (\S+)", sub.stdout).group(1)
    assert sid.startswith("trellis-ingest-")
    st = trellis("jobs", "status", sid, "--wait", "--timeout", "300", *head["addr"], timeout=360)
    logs = trellis("jobs", "logs", sid, *head["addr"]).stdout
    assert st.returncode == 0 and "status:        SUCCEEDED" in st.stdout, st.stdout + logs
    assert (f"entrypoint:    trellis ingest --config {ingest_inputs}/ingest.yaml "
            f"--set out_dir={out}") in st.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_documents"] == len(INGEST_LINES) and manifest["num_tokens"] > 0
    assert re.search(rf"ingested {len(INGEST_LINES)} documents, \d+ tokens", logs), logs
