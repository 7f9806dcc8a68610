"""`trellis submit` without a cluster: the entrypoint, runtime_env and resources it would
send, what Ray's own packager would upload, and the errors for bad input. The job kinds
cluster/ may submit come from the launcher's registry, passed in (cluster/ never imports
launcher/); tests/test_cli.py parses every kind's entrypoint with its real parser."""
import zipfile
from pathlib import Path

import pytest

from trellis.cluster.head import ClusterError
from trellis.cluster import ray_jobs
from trellis.cluster.ray_jobs import EXCLUDES, SubmitSpec, resolve_address
from trellis.launcher.registry import cluster_jobs

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/data/cluster_tiny.yaml"
KINDS = cluster_jobs()


def prepare(spec: SubmitSpec, kinds=KINDS) -> dict:
    return ray_jobs.prepare(spec, kinds)


def test_prepare_builds_trellis_entrypoint_and_runtime_env(monkeypatch):
    monkeypatch.chdir(ROOT)
    kw = prepare(SubmitSpec(config=TINY, overrides=["train.steps=3", "optim.lr=1e-3"],
                            local=True, run_dir="/shared/r 1", max_failures=2, no_resume=True,
                            env={"A": "b"}))
    assert kw["entrypoint"] == ("trellis pretrain --config tests/data/cluster_tiny.yaml "
                                "--set train.steps=3 --set optim.lr=1e-3 --local "
                                "--run-dir '/shared/r 1' --max-failures 2 --no-resume")
    env = kw["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    assert {"/.venv", "/build", "/runs", "/.git"} <= set(env["excludes"])
    assert env["env_vars"]["TRELLIS_JOB_ID"] == kw["submission_id"]
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token" and env["env_vars"]["A"] == "b"
    assert kw["submission_id"].startswith("trellis-pretrain-")
    assert kw["entrypoint_num_cpus"] == 1  # --local: the entrypoint does the work
    assert prepare(SubmitSpec(config=TINY, num_gpus=1))["entrypoint_num_cpus"] == 0


def test_rays_packager_uploads_the_project_without_bulk(tmp_path, monkeypatch):
    """Ray's own packaging code with our excludes: source and tests/data in, .venv/build/.git out."""
    from ray._private.runtime_env.packaging import create_package

    monkeypatch.chdir(ROOT)
    env = prepare(SubmitSpec(config=TINY))["runtime_env"]
    zpath = tmp_path / "pkg.zip"
    create_package(env["working_dir"], zpath, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(zpath).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"launcher", "cluster", "model", "setup.py"} <= tops
    assert TINY in names and "cluster/configs/prometheus.yml" in names
    assert not tops & {".venv", "build", "runs", ".git"}
    assert not any("__pycache__" in n for n in names)
    assert zpath.stat().st_size < 5e6


def test_job_kind_from_yaml_key_and_flag(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("job: pretrain\ntrain: {steps: 2}\n")
    kw = prepare(SubmitSpec(config=str(cfg), working_dir=str(tmp_path)))
    assert kw["entrypoint"] == "trellis pretrain --config job.yaml"
    kw = prepare(SubmitSpec(config=str(cfg), job="ingest", working_dir=str(tmp_path)))
    assert kw["entrypoint"] == "trellis ingest --config job.yaml"
    assert kw["metadata"]["trellis_job"] == "ingest"
    cfg.write_text("job: plot\n")
    with pytest.raises(ClusterError, match=r"job 'plot' cannot be submitted: it is not a trellis "
                                           r"job that runs on a cluster \(allowed: .*pretrain"):
        prepare(SubmitSpec(config=str(cfg), working_dir=str(tmp_path)))
    with pytest.raises(ClusterError, match="job 'nope' cannot be submitted"):
        prepare(SubmitSpec(config=str(cfg), job="nope", working_dir=str(tmp_path)))


def test_kinds_and_their_flags_are_the_callers():
    """cluster/ submits only the kinds it is given, with the flags each accepts."""
    kinds = {"alpha": {"config", "set"}, "beta": {"config", "local", "run_dir"}}
    spec = SubmitSpec(config=TINY, job="alpha", working_dir=str(ROOT))
    assert prepare(spec, kinds)["entrypoint"] == f"trellis alpha --config {TINY}"
    with pytest.raises(ClusterError, match=r"job 'pretrain' cannot be submitted.*"
                                           r"\(allowed: alpha, beta\)"):
        prepare(SubmitSpec(config=TINY, job="pretrain", working_dir=str(ROOT)), kinds)
    with pytest.raises(ClusterError, match=r"^job 'alpha' does not accept --local "
                                           r"\(its flags: --config, --set\)$"):
        prepare(SubmitSpec(config=TINY, job="alpha", local=True, working_dir=str(ROOT)), kinds)
    with pytest.raises(ClusterError, match="job 'beta' does not accept --set"):
        prepare(SubmitSpec(config=TINY, job="beta", overrides=["a=1"], working_dir=str(ROOT)),
                kinds)
    beta = prepare(SubmitSpec(config=TINY, job="beta", local=True, run_dir="/r",
                              working_dir=str(ROOT)), kinds)["entrypoint"]
    assert beta == f"trellis beta --config {TINY} --local --run-dir /r"


def test_cluster_imports_nothing_from_launcher():
    for path in (ROOT / "cluster").glob("*.py"):
        assert "trellis.launcher" not in path.read_text(), path


def test_bad_config_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ClusterError, match="'missing.yaml' does not exist"):
        prepare(SubmitSpec(config="missing.yaml"))
    outside = tmp_path / "x.yaml"
    outside.write_text("train: {steps: 1}\n")
    with pytest.raises(ClusterError, match="outside the uploaded working dir"):
        prepare(SubmitSpec(config=str(outside)))
    # Without an upload the path goes through unchanged (it must exist on the cluster).
    assert f"--config {outside}" in prepare(SubmitSpec(config=str(outside), working_dir=None))[
        "entrypoint"]
    excluded = ROOT / "build" / "test_submit_excluded.yaml"
    excluded.parent.mkdir(exist_ok=True)
    excluded.write_text("train: {steps: 1}\n")
    try:
        with pytest.raises(ClusterError, match="under build/, which is not uploaded"):
            prepare(SubmitSpec(config=str(excluded)))
    finally:
        excluded.unlink()
    assert "/build" in EXCLUDES


def test_address_resolution(monkeypatch, tmp_path):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    empty = str(tmp_path)  # no head recorded here
    assert resolve_address(None, empty) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address: not the Jobs API
    assert resolve_address(None, empty) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.5:8265/")
    assert resolve_address(None, empty) == "http://10.0.0.5:8265"
    assert resolve_address("127.0.0.1:9999", empty) == "http://127.0.0.1:9999"
