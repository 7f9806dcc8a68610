"""Ray Jobs for trellis: submit `trellis <job> --config F.yaml ...` to a cluster, and list,
inspect, tail and stop submitted jobs (ray.job_submission.JobSubmissionClient).

The project directory travels as the job's runtime_env working_dir (minus .venv, build,
runs, .git and other bulky or local folders); the config file is given to the entrypoint
relative to it, so it must live inside the project. Clients use Ray token auth.

Which job kinds may be submitted, and which standard flags each accepts, is passed in by the
caller (the launcher, from its job registry): cluster/ imports nothing from launcher/.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, Iterator, Mapping, TextIO

import yaml

from trellis.cluster.head import DEFAULT_TEMP_DIR, ClusterError, read_state, use_token_auth

# gitignore-style, relative to the working dir (anchored with '/' so tests/data stays).
EXCLUDES = ["/.venv", "/build", "/runs", "/.git", "/data", "/.pytest_cache", "*.egg-info",
            "__pycache__", "*.pyc"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# Job kind -> the standard flags `trellis <kind>` accepts, named as options without '--' and
# with '_' for '-' (config, set, local, run_dir, max_failures, no_resume, ...); only these
# kinds may be submitted.
JobKinds = Mapping[str, AbstractSet[str]]


@dataclass
class SubmitSpec:
    """One `trellis submit`: which config, how to run it, with what resources."""
    config: str
    job: str = ""                 # job kind; "" = the YAML's `job:` key, else "pretrain"
    overrides: list[str] = field(default_factory=list)
    local: bool = False           # pass --local: the whole job in the entrypoint process
    run_dir: str | None = None    # pass --run-dir (use a path the cluster nodes share)
    max_failures: int | None = None  # pass --max-failures
    no_resume: bool = False       # pass --no-resume
    working_dir: str | None = ""  # "" = the trellis project; None = no upload
    env: dict[str, str] = field(default_factory=dict)
    num_cpus: float | None = None  # None: 1 with --local, else 0 (workers hold the CPUs)
    num_gpus: float | None = None
    memory: int | None = None
    submission_id: str = ""


def project_root() -> Path | None:
    """The trellis source tree (has setup.py) this code runs from, or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "setup.py").is_file() else None


def resolve_address(address: str | None, temp_dir: str = DEFAULT_TEMP_DIR) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS / an http $RAY_ADDRESS, else the head that
    `trellis cluster up` recorded, else http://127.0.0.1:8265."""
    def http(a: str) -> str:
        return (a if a.startswith(("http://", "https://")) else f"http://{a}").rstrip("/")
    if address:
        return http(address)
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return http(os.environ["RAY_API_SERVER_ADDRESS"])
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        return http(os.environ["RAY_ADDRESS"])
    state = read_state(temp_dir)
    return state.dashboard_url if state else "http://127.0.0.1:8265"


def connect(address: str | None = None, temp_dir: str = DEFAULT_TEMP_DIR):
    """A JobSubmissionClient for the cluster, with token auth. Raises ClusterError."""
    url = resolve_address(address, temp_dir)
    state = read_state(temp_dir)
    use_token_auth(state if state and state.dashboard_url == url else None)
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, AuthenticationError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"cannot reach the Ray Jobs API at {url}: {first}") from None


def job_kind(config: Path, flag: str, kinds: JobKinds) -> str:
    """The job subcommand: --job, else the YAML's top-level `job:` key, else pretrain; one
    of `kinds`."""
    kind = flag
    if not kind:
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            raise ClusterError(f"config file '{config}': invalid YAML ({e})") from None
        kind = data.get("job", "") if isinstance(data, dict) else ""
    kind = kind or "pretrain"
    if kind not in kinds:
        raise ClusterError(f"job {kind!r} cannot be submitted: it is not a trellis job that "
                           f"runs on a cluster (allowed: {', '.join(sorted(kinds))})")
    return kind


def _option(flag: str) -> str:
    return "--" + flag.replace("_", "-")


def used_flags(spec: SubmitSpec) -> list[str]:
    """The standard flags this submission passes to the job."""
    wanted = {"config": True, "set": bool(spec.overrides), "local": spec.local,
              "run_dir": bool(spec.run_dir), "max_failures": spec.max_failures is not None,
              "no_resume": spec.no_resume}
    return [f for f, on in wanted.items() if on]


def check_flags(kind: str, spec: SubmitSpec, accepted: AbstractSet[str]) -> None:
    """ClusterError naming the first flag `trellis <kind>` would reject."""
    for flag in used_flags(spec):
        if flag not in accepted:
            takes = ", ".join(_option(f) for f in sorted(accepted)) or "none"
            raise ClusterError(f"job {kind!r} does not accept {_option(flag)} "
                               f"(its flags: {takes})")


def _config_arg(config: Path, working_dir: Path | None) -> str:
    """The config path as the entrypoint sees it (relative to the uploaded working dir)."""
    if working_dir is None:
        return str(config)
    try:
        rel = config.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise ClusterError(f"config file '{config}' is outside the uploaded working dir "
                           f"{working_dir}; put it inside (e.g. launcher/configs/)") from None
    top = "/" + rel.parts[0]
    if top in EXCLUDES:
        raise ClusterError(f"config file '{config}' is under {top[1:]}/, which is not "
                           "uploaded; put it elsewhere in the project")
    return rel.as_posix()


def build_entrypoint(kind: str, config_arg: str, spec: SubmitSpec,
                     accepted: AbstractSet[str]) -> str:
    """`trellis <kind> --config F ...`, from the flags the kind accepts only."""
    check_flags(kind, spec, accepted)
    cmd = ["trellis", kind, "--config", config_arg]
    for o in spec.overrides:
        cmd += ["--set", o]
    if spec.local:
        cmd.append("--local")
    if spec.run_dir:
        cmd += ["--run-dir", spec.run_dir]
    if spec.max_failures is not None:
        cmd += ["--max-failures", str(spec.max_failures)]
    if spec.no_resume:
        cmd.append("--no-resume")
    return shlex.join(cmd)


def prepare(spec: SubmitSpec, kinds: JobKinds) -> dict[str, Any]:
    """Everything submit_job needs, without contacting the cluster (testable offline).
    `kinds`: the job kinds that may be submitted, each with the standard flags it accepts.
    Raises ClusterError (one line) for a kind not in `kinds` or a flag it does not accept."""
    config = Path(spec.config)
    if not config.is_file():
        raise ClusterError(f"config file '{config}' does not exist")
    if spec.working_dir == "":
        wd = project_root()
    else:
        wd = Path(spec.working_dir) if spec.working_dir else None
    if wd is not None and not wd.is_dir():
        raise ClusterError(f"working dir '{wd}' does not exist")
    kind = job_kind(config, spec.job, kinds)
    sid = spec.submission_id or (
        f"trellis-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    env = {"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token", "TRELLIS_JOB_ID": sid,
           **spec.env}
    runtime_env: dict[str, Any] = {"env_vars": env}
    if wd is not None:
        runtime_env.update(working_dir=str(wd), excludes=list(EXCLUDES))
    cpus = spec.num_cpus if spec.num_cpus is not None else (1 if spec.local else 0)
    return dict(entrypoint=build_entrypoint(kind, _config_arg(config, wd), spec, kinds[kind]),
                submission_id=sid, runtime_env=runtime_env,
                metadata={"trellis_job": kind, "config": str(config)},
                entrypoint_num_cpus=cpus, entrypoint_num_gpus=spec.num_gpus,
                entrypoint_memory=spec.memory)


def submit(client, prepared: dict[str, Any]) -> str:
    """Submit what prepare() returned; returns the submission id."""
    try:
        return client.submit_job(**prepared)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"submitting {prepared['metadata']['config']}: {first}") from None


def _call(fn, sid: str, *a):
    try:
        return fn(sid, *a)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "does not exist" in msg or "404" in msg:
            raise ClusterError(f"no job with submission id {sid!r}") from None
        raise ClusterError(f"job {sid}: {msg}") from None


def info(client, sid: str):
    return _call(client.get_job_info, sid)


def logs(client, sid: str) -> str:
    return _call(client.get_job_logs, sid)


def stop(client, sid: str) -> bool:
    return bool(_call(client.stop_job, sid))


def wait(client, sid: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> str:
    """Poll until the job ends; returns its final status. Raises ClusterError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(_call(client.get_job_status, sid).value)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise ClusterError(f"job {sid} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow(client, sid: str, out: TextIO) -> None:
    """Stream the job's logs to `out` until it ends."""
    async def _tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()
    info(client, sid)  # a clear error for an unknown id before streaming
    asyncio.run(_tail())


def _ts(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def describe(job) -> Iterator[str]:
    """Lines for `trellis jobs status`: status, timing, exit code, and the error if any."""
    end = job.end_time or time.time() * 1000
    dur = f"{(end - job.start_time) / 1000:.1f} s" if job.start_time else "-"
    yield f"submission id: {job.submission_id}"
    yield f"status:        {job.status.value}"
    yield f"entrypoint:    {job.entrypoint}"
    yield f"started:       {_ts(job.start_time)}   duration: {dur}"
    if job.driver_exit_code is not None:
        yield f"exit code:     {job.driver_exit_code}"
    if job.error_type:
        yield f"error type:    {job.error_type}"
    if job.message:
        yield "message:"
        yield from ("  " + line for line in job.message.rstrip().splitlines())


def table(jobs: list) -> str:
    """`trellis jobs list`: newest first."""
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        ep = j.entrypoint if len(j.entrypoint) <= 60 else j.entrypoint[:57] + "..."
        rows.append((j.submission_id or j.job_id or "-", j.status.value, _ts(j.start_time), ep))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
                     for r in rows)
