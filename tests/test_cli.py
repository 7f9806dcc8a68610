"""The `trellis` CLI and its job registry: every command's parser accepts the standard flags the
registry declares (and no others), every `trellis submit` entrypoint parses with its kind's
real parser, bad kinds and flags are refused in one line before the cluster is contacted,
--version, --print-config, and `--help` without Ray or DeepSpeed."""
import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trellis.cluster.ray_jobs import SubmitSpec, prepare
from trellis.launcher.cli import build_parser, main
from trellis.launcher.config_loader import field_docs, load_config
from trellis.launcher.registry import COMMANDS, STANDARD_FLAGS, cluster_jobs

ROOT = Path(__file__).resolve().parents[1]
# Keys a config class needs before it validates (its __post_init__ requires them).
REQUIRED = {"sft": ["init_from=runs/pretrain", "data.train=demos.jsonl"],
            "rm": ["init_from=runs/sft", "data.train=comparisons.jsonl"],
            "ppo": ["actor_init=runs/sft", "reward_init=runs/rm", "prompts=prompts.jsonl"],
            "finetune": ["init_from=runs/pretrain", "data.train=rows.jsonl"],
            "eval": ["model=runs/pretrain", "tasks=[mood.yaml]"],
            "bon": ["policy=runs/sft", "reward=runs/rm", "prompts=prompts.jsonl"],
            "dpo": ["policy_init=runs/sft", "data.train=comparisons.jsonl"],
            "plan": ["model=gpt-tiny"]}


def accepted_flags(name: str) -> set[str]:
    """The standard flags (and print_config) the command's real parser has as options."""
    p = argparse.ArgumentParser(prog=f"trellis {name}")
    COMMANDS[name].load().add_arguments(p)
    options = {o for a in p._actions for o in a.option_strings}
    return {f for f in [*STANDARD_FLAGS, "print_config"] if "--" + f.replace("_", "-") in options}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_registry_declares_each_commands_real_flags(name):
    cmd = COMMANDS[name]
    want = set(cmd.flags) | ({"print_config"} if cmd.config else set())
    assert accepted_flags(name) == want
    if cmd.config:
        assert isinstance(cmd.config_class(), type)
    assert cmd.cluster_job == (name in {"ingest", "pretrain", "sft", "rm", "ppo", "pipeline",
                                        "finetune", "eval", "meta"})


def test_cluster_jobs_view():
    kinds = cluster_jobs()
    assert set(kinds) == {"ingest", "pretrain", "sft", "rm", "ppo", "pipeline", "finetune", "eval",
                          "meta"}
    assert kinds["ingest"] == {"config", "set"}
    assert {"max_failures", "no_resume", "local", "run_dir"} <= kinds["pretrain"]
    assert "max_failures" in kinds["ppo"] and "max_failures" in kinds["pipeline"]
    assert "no_resume" not in kinds["pipeline"]


def everything_it_accepts(kind: str, config: Path) -> SubmitSpec:
    """A submission using every flag `kind` accepts."""
    flags = cluster_jobs()[kind]
    return SubmitSpec(config=str(config), job=kind, working_dir=str(config.parent),
                      overrides=["seed=3", "run_dir=/shared/a b"] if "set" in flags else [],
                      local="local" in flags, run_dir="/shared/r 1" if "run_dir" in flags else None,
                      max_failures=2 if "max_failures" in flags else None,
                      no_resume="no_resume" in flags)


@pytest.mark.parametrize("kind", sorted(cluster_jobs()))
def test_submitted_entrypoint_parses_with_the_kinds_real_parser(kind, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("seed: 1\n")
    entry = prepare(everything_it_accepts(kind, config), cluster_jobs())["entrypoint"]
    argv = shlex.split(entry)
    assert argv[:2] == ["trellis", kind]
    try:
        args = build_parser(argv[1:]).parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"trellis {kind} rejects its own entrypoint: {entry}")
    assert args.command == kind and args.config == "job.yaml"
    flags = cluster_jobs()[kind]
    assert args.overrides == (["seed=3", "run_dir=/shared/a b"] if "set" in flags else [])
    if "local" in flags:
        assert args.local and args.run_dir == "/shared/r 1"
    if "max_failures" in flags:
        assert args.max_failures == 2
    if "no_resume" in flags:
        assert args.no_resume


def test_ingest_entrypoint_has_only_config_and_set(tmp_path):
    config = tmp_path / "ingest.yaml"
    config.write_text("out_dir: /tmp/x\n")
    entry = prepare(SubmitSpec(config=str(config), job="ingest", overrides=["processes=1"],
                               working_dir=str(tmp_path)), cluster_jobs())["entrypoint"]
    assert entry == "trellis ingest --config ingest.yaml --set processes=1"


def submit_error(capsys, *argv: str) -> str:
    """Run `trellis submit ...` in-process against an address nothing listens on; the
    refusal must come before any contact, in one line on stderr."""
    rc = main(["submit", "--config", "tests/data/cluster_tiny.yaml",
               "--address", "http://127.0.0.1:9", *argv])
    out, err = capsys.readouterr()
    assert rc in (1, 2) and not out, (rc, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot reach" not in err, err
    return err.strip()


@pytest.mark.parametrize("kind", ["export", "cluster", "submit", "jobs", "plot", "nope"])
def test_submit_refuses_kinds_that_are_not_cluster_jobs(kind, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = submit_error(capsys, "--job", kind)
    assert err.startswith("trellis submit: error: ")
    assert f"job '{kind}' cannot be submitted: it is not a trellis job that runs on a cluster" \
        in err and "pretrain" in err


@pytest.mark.parametrize("kind,flags,bad", [
    ("ingest", ["--local"], "--local"), ("ingest", ["--run-dir", "/r"], "--run-dir"),
    ("ingest", ["--max-failures", "1"], "--max-failures"),
    ("pipeline", ["--no-resume"], "--no-resume")])
def test_submit_refuses_flags_the_kind_does_not_accept(kind, flags, bad, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = submit_error(capsys, "--job", kind, *flags)
    assert f"job '{kind}' does not accept {bad} (its flags: " in err
    accepted = err.split("(its flags: ")[1].rstrip(")").split(", ")
    assert "--config" in accepted and bad not in accepted


def test_refusal_through_the_installed_cli():
    exe = Path(sys.executable).parent / "trellis"
    proc = subprocess.run([str(exe), "submit", "--job", "export", "--config",
                           "tests/data/cluster_tiny.yaml", "--address", "http://127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "trellis submit: error: job 'export' cannot be submitted: it is not a trellis job that "
        "runs on a cluster (allowed: eval, finetune, ingest, meta, pipeline, ppo, pretrain, rm, "
        "sft)"]


def test_version_and_help_need_neither_ray_nor_deepspeed():
    code = ("import sys\nfrom trellis.launcher.cli import main\n"
            "for argv in (['--version'], ['--help'], ['pretrain', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 0, argv\n"
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import version
    assert proc.stdout.splitlines()[0] == f"trellis {version('trellis')}"
    assert "--print-config" in proc.stdout and "--max-failures" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", sorted(n for n, c in COMMANDS.items() if c.config))
def test_print_config_round_trips_with_docs(name, tmp_path, capsys):
    cls = COMMANDS[name].config_class()
    keys = {f.name for f in dataclasses.fields(cls)}
    sets = [*REQUIRED.get(name, []), *(["seed=7"] if "seed" in keys else [])]
    want = load_config(cls, None, sets)  # a default config that does not load is a bug
    argv = [name, "--print-config", *[a for s in sets for a in ("--set", s)]]
    if "run_dir" in COMMANDS[name].flags:
        argv += ["--run-dir", str(tmp_path / "run")]
        want = load_config(cls, None, [*sets, f"run_dir={tmp_path / 'run'}"])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # printed, not run
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(cls, printed) == want
    assert yaml.safe_load(text)  # plain YAML
    # Each key's doc, from the string under its dataclass field, as a comment above it.
    key, doc = next((k, d) for k, d in field_docs(cls).items() if len(d) < 80)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    assert lines[at - 1] == f"# {doc}"


def test_print_config_nested_sections_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {d_model: 64}\ntrain: {steps: 9}\n")
    assert main(["pretrain", "--print-config", "--config", str(cfg), "--set", "optim.lr=0.002",
                 "--max-failures", "4"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "model:" in lines and "  d_model: 64" in lines and "  steps: 9" in lines
    assert lines[lines.index("  d_model: 64") - 1] == "  # Hidden size."
    assert "  max_failures: 4" in lines and "  lr: 0.002" in lines
    # A doc inherited from a base dataclass (TrainConfig <- LoopConfig) is there too.
    from trellis.launcher.jobs.pretrain.config import TrainConfig
    i = j = lines.index("  steps: 9")
    while lines[j - 1].startswith("  # "):
        j -= 1
    assert " ".join(line[4:] for line in lines[j:i]) == field_docs(TrainConfig)["steps"]


def test_print_config_reports_a_bad_key_in_one_line(capsys):
    assert main(["pretrain", "--print-config", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trellis pretrain: error: unknown config key 'train.nope'")
    assert len(err.strip().splitlines()) == 1
