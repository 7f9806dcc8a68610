"""cluster/configs/*: each file parses, every `trellis ...` command in it is a real subcommand
whose arguments the real parser (and, for jobs, the real config loader) accepts, Ray runs
with token auth, and the Prometheus/Grafana files name metrics trellis really exports."""
import fnmatch
import json
import re
import shlex
import urllib.request
from pathlib import Path

import pytest
import yaml

from trellis.cluster.head import DEFAULT_TEMP_DIR
from trellis.cluster.metrics import MetricsConfig, MetricsLogger
from trellis.launcher.cli import build_parser
from trellis.launcher.config_loader import load_config
from trellis.launcher.registry import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"
SEPARATORS = {";", "&&", "||", "|", "&"}


def load(name: str):
    text = (CONFIGS / name).read_text()
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


NAME_KEYS = {"metadata", "name", "claimName", "cluster_name"}  # names, not commands


def strings(node):
    """Every string value in a parsed YAML/JSON tree, names excepted."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            if k not in NAME_KEYS:
                yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def shell_commands(text: str):
    """Simple commands (argv lists) in a shell snippet: split at ; && || | & and newlines,
    leading VAR=value assignments and trailing redirections dropped."""
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        cmd: list[str] = []
        for tok in [*lex, ";"]:
            if tok in SEPARATORS:
                while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    yield cmd
                cmd = []
            elif re.fullmatch(r"\d?[<>]+&?", tok):
                cmd.append("<redirect>")
            else:
                cmd.append(tok)


def trellis_commands(tree) -> list[list[str]]:
    out = []
    for s in strings(tree):
        for cmd in shell_commands(s):
            cut = cmd.index("<redirect>") if "<redirect>" in cmd else len(cmd)
            if cmd[0] == "trellis":
                out.append(cmd[:cut])
    return out


def check_trellis_command(argv: list[str]) -> None:
    """The real CLI parser accepts it; a job's --config/--set load with the real config."""
    assert len(argv) > 1 and argv[1] in COMMANDS, f"not a trellis subcommand: {argv}"
    try:
        args = build_parser(argv[1:]).parse_args(argv[1:])  # imports the named subcommand
    except SystemExit as e:
        assert e.code == 0, f"trellis rejects its arguments: {shlex.join(argv)}"
        return  # --help
    if getattr(args, "config", None):
        assert (ROOT / args.config).is_file(), f"{args.config} is not in the project"
        cls = COMMANDS[argv[1]].config_class()
        if cls is not None:  # raises ConfigError on an unknown key or a bad value
            load_config(cls, ROOT / args.config, args.overrides)


@pytest.mark.parametrize("name", ["autoscaler.yaml", "rayjob.yaml", "raycluster.yaml"])
def test_every_trellis_command_is_real(name):
    cmds = trellis_commands(load(name))
    assert cmds, f"{name} runs no trellis command"
    for argv in cmds:
        check_trellis_command(argv)


def test_command_checker_catches_bad_commands():
    assert trellis_commands({"a": ["X=1 trellis frobnicate --x && ls", "ls | trellis plot r"]}) \
        == [["trellis", "frobnicate", "--x"], ["trellis", "plot", "r"]]
    with pytest.raises(AssertionError, match="not a trellis subcommand"):
        check_trellis_command(["trellis", "frobnicate"])
    with pytest.raises(AssertionError, match="rejects its arguments"):
        check_trellis_command(["trellis", "jobs", "status"])  # ID missing
    with pytest.raises(Exception, match="no_such_key"):
        check_trellis_command(["trellis", "pretrain", "--config", "tests/data/cluster_tiny.yaml",
                               "--set", "train.no_such_key=1"])


def test_autoscaler_installs_trellis_and_keeps_token_auth():
    cfg = load("autoscaler.yaml")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = [t for t, n in cfg["available_node_types"].items() if "g5" in str(n["node_config"])]
    assert gpu and cfg["available_node_types"][gpu[0]]["max_workers"] >= 1
    setup = " ; ".join(cfg["setup_commands"])
    assert re.search(r"pip install .*-e ~/trellis", setup) and "~/trellis" in cfg["file_mounts"]
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cfg[key] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in starts[0]


def _containers(manifest) -> list[dict]:
    found = []
    def walk(n):
        if isinstance(n, dict):
            found.extend(n.get("containers", []))
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)
    walk(manifest)
    return found


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")])
def test_kuberay_manifests(name, kind):
    m = load(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == kind
    spec = m["spec"]["rayClusterSpec"] if kind == "RayJob" else m["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"]
                  .get("nvidia.com/gpu")]
    assert gpu_groups
    containers = _containers(m)
    assert len(containers) >= 2
    for c in containers:  # every Ray process (and the job submitter) uses token auth
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token"
    if kind == "RayJob":
        assert shlex.split(m["spec"]["entrypoint"])[:2] == ["trellis", "pretrain"]


def test_prometheus_scrape_config(tmp_path):
    cfg = load("prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = {name: [f for sd in j["file_sd_configs"] for f in sd["files"]]
             for name, j in jobs.items()}
    assert f"{DEFAULT_TEMP_DIR}/prom_metrics_service_discovery.json" in files["ray"]
    assert all(j["honor_labels"] for j in jobs.values())  # keep trellis' own `job` label
    for f in sum(files.values(), []):  # Prometheus allows a glob only in the last segment
        assert "*" not in f.rsplit("/", 1)[0], f
    # The trellis pattern matches where a real MetricsLogger writes its target.
    with MetricsLogger(tmp_path / "runs" / "default", MetricsConfig()) as m:
        written = m.endpoint_file.relative_to(tmp_path).as_posix()
        target = json.loads(m.endpoint_file.read_text())[0]["targets"][0]
    assert any(fnmatch.fnmatch(written, f.replace("../../", "")) for f in files["trellis"])
    assert target.startswith("127.0.0.1:")


def test_grafana_dashboard_names_only_exported_metrics(tmp_path):
    dash = load("grafana_dashboard.json")
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    named = set(re.findall(r"\(ray_\)\?(trellis_[a-z_]+)", " ".join(exprs)))
    assert len(named) == len(dash["panels"]) >= 12
    with MetricsLogger(tmp_path, MetricsConfig()) as m:
        m.log(1, {"loss": 1.0, "tokens_per_second": 1.0, "step_time": 1.0, "lr": 1.0,
                  "grad_norm": 1.0, "mfu": 0.5})
        m.log(1, {"loss": 1.0}, kind="eval")
        m.log(1, {"reward_mean": 1.0, "kl": 1.0, "clip_fraction": 0.1}, kind="ppo",
              phases={"generate": 1.0})
        text = urllib.request.urlopen(m.address, timeout=10).read().decode()
    exported = set(re.findall(r"^(trellis_[a-z_]+)\{", text, re.M))
    assert named <= exported, named - exported
    assert all('job=~"$job"' in e for e in exprs)
