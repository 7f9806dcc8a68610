"""cluster.metrics (CSV + Prometheus endpoint) and launcher.progress, for real: the endpoint
is scraped over HTTP and its socket inspected; the CSV is read back."""
import csv
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trellis.cluster.metrics import MetricsConfig, MetricsLogger, metric_name
from trellis.launcher.config_loader import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from a Prometheus text endpoint."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_endpoint_serves_gauges_with_labels_on_loopback(tmp_path):
    with MetricsLogger(tmp_path / "run", MetricsConfig(job="j1"), role="actor", rank=3) as m:
        # Bound socket, not config: getsockname of the server and the kernel's socket table.
        assert m._server.socket.getsockname()[0] == "127.0.0.1"
        mine = [c for c in psutil.Process().net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == m.port]
        assert [c.laddr.ip for c in mine] == ["127.0.0.1"]
        m.log(5, {"loss": 2.5, "tokens_per_second": 1234.0, "lr": 3e-4, "grad_norm": 0.7,
                  "mfu": 0.31, "step_time": 0.12})
        m.log(2, {"reward_mean": 0.25, "kl": 0.02, "clip_fraction": 0.1}, kind="ppo",
              phases={"generate": 1.5, "train": 0.5})
        got = scrape(m.address)
    lab = frozenset({"job": "j1", "role": "actor", "rank": "3"}.items())
    assert got[("trellis_train_loss", lab)] == 2.5
    assert got[("trellis_train_tokens_per_second", lab)] == 1234.0
    for name in ("lr", "grad_norm", "mfu", "step_time", "step"):
        assert ("trellis_train_" + name, lab) in got
    assert got[("trellis_ppo_kl", lab)] == 0.02
    assert got[("trellis_ppo_clip_fraction", lab)] == 0.1
    assert got[("trellis_ppo_phase_seconds", lab | {("phase", "generate")})] == 1.5
    assert got[("trellis_process_resident_memory_bytes", lab)] > 10e6
    # Non-driver roles write their own CSV so concurrent writers never share a file.
    assert (tmp_path / "run/metrics/train.actor.3.csv").is_file()


def test_endpoint_file_is_prometheus_file_sd_and_removed_on_close(tmp_path):
    m = MetricsLogger(tmp_path, MetricsConfig())
    target = json.loads(m.endpoint_file.read_text())
    assert target == [{"targets": [f"127.0.0.1:{m.port}"],
                       "labels": {"job": tmp_path.name, "role": "driver", "rank": "0"}}]
    path = m.endpoint_file
    m.close()
    assert not path.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(m.address, timeout=2)
    m.close()  # idempotent


def test_no_endpoint_when_port_is_minus_one(tmp_path):
    m = MetricsLogger(tmp_path, MetricsConfig(port=-1))
    m.log(1, {"loss": 1.0})
    assert m.address is None and not (tmp_path / "metrics/endpoints").exists()
    m.close()


def test_names_map_slash_and_dot_and_collisions_fail(tmp_path):
    assert metric_name("train", "loss/val") == "trellis_train_loss_val"
    assert metric_name("eval", "ppl.top-1") == "trellis_eval_ppl_top_1"
    with MetricsLogger(tmp_path, MetricsConfig()) as m:
        m.log(1, {"loss/val": 1.5, "acc.top1": 0.5})
        got = scrape(m.address)
        names = {n for n, _ in got}
        assert {"trellis_train_loss_val", "trellis_train_acc_top1"} <= names
        with pytest.raises(ValueError, match="'loss_val'.*'loss/val'.*trellis_train_loss_val"):
            m.log(2, {"loss_val": 2.0})
        with pytest.raises(ValueError, match="kind"):
            m.log(2, {"x": 1.0}, kind="bad-kind")
    rows = list(csv.DictReader(open(tmp_path / "metrics/train.csv")))
    assert len(rows) == 1  # the refused call wrote nothing
    assert rows[0]["loss/val"] == "1.5" and rows[0]["acc.top1"] == "0.5"


def test_csv_resume_appends_under_existing_header(tmp_path):
    with MetricsLogger(tmp_path, MetricsConfig(port=-1)) as m:
        m.log(1, {"loss": 3.0, "lr": 0.1})
    with MetricsLogger(tmp_path, MetricsConfig(port=-1)) as m:  # a restarted job
        m.log(2, {"lr": 0.2, "loss": 2.0})       # other key order: same columns
        m.log(3, {"loss": 1.0, "grad_norm": 9.0})
    rows = list(csv.reader(open(tmp_path / "metrics/train.csv")))
    assert rows[0] == ["step", "time", "loss", "lr", "grad_norm"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert [r[2] for r in rows[1:]] == ["3.0", "2.0", "1.0"]
    assert [r[3] for r in rows[1:]] == ["0.1", "0.2", ""]
    assert [r[4] for r in rows[1:]] == ["", "", "9.0"]


def test_linger_waits_for_one_final_scrape(tmp_path):
    """close() returns once a scrape has read the final values, not at linger_s: linger_s is
    far beyond the test's deadline, so close() can only have returned because of a scrape."""
    m = MetricsLogger(tmp_path, MetricsConfig(linger_s=3600))
    m.log(7, {"loss": 0.5})
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (m.close(), closed.set()), daemon=True)
    closer.start()
    assert not closed.wait(0.5)  # nobody has scraped: close() keeps serving
    seen, deadline = {}, time.monotonic() + 120
    while not closed.is_set() and time.monotonic() < deadline:
        try:  # the scrape close() waits for (repeated: one may land before close() looks)
            seen.update(scrape(m.address))
        except OSError:  # closed meanwhile
            break
        closed.wait(0.2)
    assert closed.wait(max(0.0, deadline - time.monotonic())), "close() ignored the scrapes"
    assert seen[("trellis_train_loss", frozenset(m.labels.items()))] == 0.5


def test_metrics_config_validation():
    assert load_config(MetricsConfig, None, ["port=-1"]).port == -1
    with pytest.raises(ConfigError, match="'port'.*out of range"):
        load_config(MetricsConfig, None, ["port=-2"])


def _run_progress(env_extra: dict) -> str:
    """12 updates at least 0.05 s apart (sleep only ever makes them later)."""
    code = ("import time\nfrom trellis.launcher.progress import progress\n"
            "with progress(12, 'train', 'step') as bar:\n"
            "    for i in range(12):\n"
            "        time.sleep(0.05); bar.update(1); bar.set_postfix(loss=1.0)\n")
    env = {"PATH": "/usr/bin:/bin", "TRELLIS_PROGRESS_INTERVAL": "0.2", **env_extra}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_progress_in_logs_is_lines_with_rate_and_eta():
    err = _run_progress({})
    lines = err.splitlines()
    # The 12 updates span at least 0.6 s, so 0.2 s apart lines appear during the run too.
    assert "\r" not in err and len(lines) >= 3, lines
    assert lines[-1].startswith("train: 100%") and "12/12" in lines[-1]
    assert "step/s" in lines[-1] and "loss=1" in lines[-1]
    assert any("<" in ln for ln in lines)  # elapsed<remaining (the ETA)


def test_progress_lines_are_timed_not_one_per_update():
    """With an interval longer than any run, 12 updates (and postfix changes) give only the
    opening and the final line, however slow the machine."""
    lines = _run_progress({"TRELLIS_PROGRESS_INTERVAL": "3600"}).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%"), lines


def test_progress_can_be_turned_off():
    assert _run_progress({"TRELLIS_PROGRESS": "0"}) == ""
