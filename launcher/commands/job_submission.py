"""`trellis submit` and `trellis jobs`: run job configs on a Ray cluster through Ray Jobs.

  trellis submit --config F.yaml [--set k=v ...] [--job KIND] [--local] [--run-dir D]
                 [--max-failures N] [--no-resume] [--address URL] [--env K=V ...]
                 [--num-cpus N] [--num-gpus N] [--submission-id ID] [--wait | --follow]
  trellis jobs list
  trellis jobs status ID [--wait] [--timeout S]     exit 1 if the job FAILED or was STOPPED
  trellis jobs logs ID [--follow]
  trellis jobs stop ID
The cluster address: --address, else $RAY_API_SERVER_ADDRESS, else the head that
`trellis cluster up` started, else http://127.0.0.1:8265. Clients use Ray token auth.
Only the registry's cluster jobs may be submitted, with the flags each accepts (checked
before the cluster is contacted).
"""
from __future__ import annotations

import argparse
import sys

from trellis.cluster.head import DEFAULT_TEMP_DIR, ClusterError


def add_arguments(p: argparse.ArgumentParser) -> None:
    # One module serves two subcommands; the parser's prog tells which one this is.
    if p.prog.split()[-1] == "submit":
        _submit_arguments(p)
        p.set_defaults(handler=_submit)
    else:
        _jobs_arguments(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray dashboard / Jobs API URL (default: the `trellis cluster up` head)")
    p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR,
                   help="temp dir of a `trellis cluster up` head (default: %(default)s)")


def _submit_arguments(p: argparse.ArgumentParser) -> None:
    from trellis.launcher.registry import cluster_jobs

    p.add_argument("--config", help="the job's YAML config (inside the uploaded project)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the job as --set KEY=VALUE (repeatable)")
    _common(p)
    p.add_argument("--job", default="", help="job kind: " + ", ".join(sorted(cluster_jobs()))
                   + " (default: the YAML's `job:`, else pretrain)")
    p.add_argument("--local", action="store_true", help="run the job in one process (--local)")
    p.add_argument("--run-dir", default=None, help="passed to the job; use shared storage")
    p.add_argument("--max-failures", type=int, default=None, help="passed to the job")
    p.add_argument("--no-resume", action="store_true", help="passed to the job")
    p.add_argument("--working-dir", default="",
                   help="folder uploaded as the job's working dir (default: this trellis "
                        "project; 'none' uploads nothing)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs reserved for the entrypoint (default: 1 with --local, else 0)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs for the entrypoint")
    p.add_argument("--submission-id", default="", help="default: trellis-KIND-TIME-XXXX")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wait", action="store_true", help="wait for the end; exit 0 iff SUCCEEDED")
    g.add_argument("--follow", action="store_true", help="stream the logs until the end")


def _jobs_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="all jobs on the cluster, newest first")
    lst.set_defaults(handler=_list)
    st = sub.add_parser("status", help="status, timing and error of one job")
    st.add_argument("--wait", action="store_true", help="wait until the job ends")
    st.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait may take")
    st.set_defaults(handler=_status)
    lg = sub.add_parser("logs", help="the job's output")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lg.set_defaults(handler=_logs)
    sp = sub.add_parser("stop", help="stop a running job")
    sp.set_defaults(handler=_stop)
    for name, q in sub.choices.items():
        if name != "list":
            q.add_argument("submission_id", metavar="ID")
        _common(q)


def run(args: argparse.Namespace) -> int:
    try:
        return args.handler(args)
    except ClusterError as e:
        print(f"trellis {args.command}: error: {e}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace):
    from trellis.cluster.ray_jobs import connect
    return connect(args.address, args.temp_dir)


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ClusterError(f"--env '{item}': expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _submit(args: argparse.Namespace) -> int:
    from trellis.cluster import ray_jobs as jobs
    from trellis.launcher.registry import cluster_jobs

    if not args.config:
        raise ClusterError("--config is required")
    wd = None if args.working_dir.lower() == "none" else args.working_dir
    spec = jobs.SubmitSpec(config=args.config, job=args.job, overrides=args.overrides,
                           local=args.local, run_dir=args.run_dir,
                           max_failures=args.max_failures, no_resume=args.no_resume,
                           working_dir=wd, env=_pairs(args.env), num_cpus=args.num_cpus,
                           num_gpus=args.num_gpus, submission_id=args.submission_id)
    prepared = jobs.prepare(spec, cluster_jobs())  # refuses bad kinds/flags offline
    client = _client(args)
    sid = jobs.submit(client, prepared)
    print(f"submitted: {sid}", flush=True)
    print(f"  follow:  trellis jobs logs {sid} --follow", flush=True)
    if args.follow:
        jobs.follow(client, sid, sys.stdout)
    if args.follow or args.wait:
        status = jobs.wait(client, sid, timeout_s=1e9)
        print(f"{sid}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _list(args: argparse.Namespace) -> int:
    from trellis.cluster import ray_jobs as jobs

    client = _client(args)
    try:
        listed = client.list_jobs()
    except Exception as e:
        raise ClusterError(f"listing jobs: {str(e).splitlines()[0] if str(e) else e}") from None
    print(jobs.table(listed))
    return 0


def _status(args: argparse.Namespace) -> int:
    from trellis.cluster import ray_jobs as jobs

    client = _client(args)
    if args.wait:
        jobs.wait(client, args.submission_id, timeout_s=args.timeout)
    job = jobs.info(client, args.submission_id)
    print("\n".join(jobs.describe(job)))
    return 1 if job.status.value in ("FAILED", "STOPPED") else 0


def _logs(args: argparse.Namespace) -> int:
    from trellis.cluster import ray_jobs as jobs

    client = _client(args)
    if args.follow:
        jobs.follow(client, args.submission_id, sys.stdout)
    else:
        sys.stdout.write(jobs.logs(client, args.submission_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from trellis.cluster import ray_jobs as jobs

    client = _client(args)
    stopped = jobs.stop(client, args.submission_id)
    print(f"{args.submission_id}: {'stop requested' if stopped else 'not running'}")
    return 0
