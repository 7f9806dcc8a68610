"""Packaging: a plain (non-editable) install of the project puts ONE import package,
`trellis`, into site-packages, with every module and config file of the repository's parts,
and it imports and runs from outside the repository. Also: the editable install in this venv
resolves trellis.<part> to the repository's folders.

Offline and --no-deps: the wheel is built with this venv's setuptools (a fresh venv's bundled
setuptools has no bdist_wheel), installed by a fresh venv's own pip, and the dependencies
(torch, ray, ...) come from this venv's site-packages on PYTHONPATH."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("launcher", "model", "parallel", "rl", "data_pipeline", "cluster")
SKIP_AT_ROOT = {".venv", ".git", "build", "runs", "data", ".pytest_cache"}
SKIP_ANYWHERE = ("__pycache__", "*.egg-info", "*.pyc")


def _ignore(folder: str, names: list[str]) -> set[str]:
    """What `pip install <repo>` has no business reading: venvs, build outputs, caches."""
    skip = set(shutil.ignore_patterns(*SKIP_ANYWHERE)(folder, names))
    if Path(folder) == ROOT:
        skip |= SKIP_AT_ROOT & set(names)
    return skip


def run(cmd: list, cwd: Path, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **(extra_env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)  # builds in a copy: nothing written in the repo
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", tmp / "dist", src], cwd=tmp)
    wheels = list((tmp / "dist").glob("trellis-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp).stdout.strip())
    before = {p.name for p in site.iterdir()}
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0]], cwd=tmp)
    return {"tmp": tmp, "venv": venv, "python": py, "site": site,
            "added": {p.name for p in site.iterdir()} - before}


def test_only_the_trellis_package_is_installed(fresh):
    site = fresh["site"]
    dist_info = [n for n in fresh["added"] if n.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("trellis-"), fresh["added"]
    assert fresh["added"] == {"trellis", dist_info[0]}, fresh["added"]
    record = (site / dist_info[0] / "RECORD").read_text().splitlines()
    tops = {line.split(",")[0].split("/")[0] for line in record if line}
    scripts = {line.split(",")[0] for line in record if line.startswith("../")}
    assert tops - {"..", "trellis", dist_info[0]} == set(), tops
    assert {Path(s).name for s in scripts} == {"trellis"}, scripts  # the console script only
    top_level = site / dist_info[0] / "top_level.txt"
    if top_level.exists():
        assert top_level.read_text().split() == ["trellis"]


def test_every_module_and_config_file_is_installed(fresh):
    pkg = fresh["site"] / "trellis"
    for part in PARTS:
        repo_py = {p.relative_to(ROOT).as_posix() for p in (ROOT / part).rglob("*.py")
                   if "__pycache__" not in p.parts}
        inst_py = {p.relative_to(pkg).as_posix() for p in (pkg / part).rglob("*.py")}
        assert repo_py - inst_py == set(), "not installed (a folder without __init__.py?)"
    for folder in ("launcher/configs", "cluster/configs"):
        repo = {p.name for p in (ROOT / folder).iterdir() if p.is_file()}
        assert repo and {p.name for p in (pkg / folder).iterdir()} >= repo, folder


def test_fresh_install_imports_and_runs_outside_the_repo(fresh):
    main_site = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{fresh['site']}{os.pathsep}{main_site}"}
    code = ("import trellis, trellis.model, trellis.rl, trellis.launcher.cli\n"
            "print(trellis.model.__file__); print(trellis.rl.__file__)\n"
            "print(*trellis.__path__, sep='\\n')\n")
    out = run([fresh["python"], "-c", code], cwd=fresh["tmp"], extra_env=env).stdout.split()
    assert out and all(Path(p).is_relative_to(fresh["site"] / "trellis") for p in out), out
    helped = run([fresh["venv"] / "bin" / "trellis", "--help"], cwd=fresh["tmp"],
                 extra_env=env).stdout
    for name in ("pretrain", "ingest", "export", "ppo"):
        assert name in helped, helped


def test_editable_install_resolves_to_the_repository(tmp_path):
    code = "import importlib\n" + "".join(
        f"print(importlib.import_module('trellis.{p}').__file__)\n" for p in PARTS)
    out = run([sys.executable, "-c", code], cwd=tmp_path).stdout.split()
    assert out == [str(ROOT / p / "__init__.py") for p in PARTS], out
