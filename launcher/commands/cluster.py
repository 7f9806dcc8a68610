"""`trellis cluster up|down|status`: a local Ray head on loopback with token auth.

  trellis cluster up [--host 127.0.0.1] [--port 6379] [--dashboard-port 8265]
                     [--metrics-export-port 8080] [--num-cpus N] [--num-gpus N] [--temp-dir D]
  trellis cluster status [--temp-dir D]
  trellis cluster down [--temp-dir D]
Port 0 picks a free port. `down` stops only the head that `up` recorded in --temp-dir.
"""
from __future__ import annotations

import argparse
import sys

from trellis.cluster.head import (DEFAULT_TEMP_DIR, ClusterError, HeadConfig, head_processes,
                          read_state, start_head, stop_head)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    d = HeadConfig()
    up = sub.add_parser("up", help="start a local Ray head and print its addresses")
    up.add_argument("--host", default=d.host, help="bind address (default: %(default)s)")
    up.add_argument("--port", type=int, default=d.port, help="GCS port (default: %(default)s)")
    up.add_argument("--dashboard-port", type=int, default=d.dashboard_port,
                    help="dashboard / Jobs API port (default: %(default)s)")
    up.add_argument("--metrics-export-port", type=int, default=d.metrics_export_port,
                    help="Ray's Prometheus export port (default: %(default)s)")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs offered (default: all)")
    up.add_argument("--num-gpus", type=int, default=None, help="GPUs offered (default: all)")
    for name, help_text in (("status", "show the recorded head and whether it runs"),
                            ("down", "stop the head that `cluster up` started")):
        sub.add_parser(name, help=help_text)
    for q in sub.choices.values():
        q.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR,
                       help="Ray temp dir identifying the head (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        return {"up": _up, "down": _down, "status": _status}[args.action](args)
    except ClusterError as e:
        print(f"trellis cluster {args.action}: error: {e}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"trellis cluster up: note: binding to {args.host}; Ray token auth stays on, "
              "but anyone who can reach this address can try it", file=sys.stderr)
    cfg = HeadConfig(host=args.host, port=args.port, dashboard_port=args.dashboard_port,
                     metrics_export_port=args.metrics_export_port, num_cpus=args.num_cpus,
                     num_gpus=args.num_gpus, temp_dir=args.temp_dir)
    info = start_head(cfg)
    print("Ray head started.")
    print("\n".join(info.lines()))
    print(f"submit with:     trellis submit --config FILE.yaml --address {info.dashboard_url}")
    return 0


def _down(args: argparse.Namespace) -> int:
    n = stop_head(args.temp_dir)
    print(f"Ray head stopped ({n} processes).")
    return 0


def _status(args: argparse.Namespace) -> int:
    info = read_state(args.temp_dir)
    if info is None:
        print(f"no trellis Ray head recorded in {args.temp_dir}")
        return 1
    procs = head_processes(info)
    print("\n".join(info.lines()))
    print(f"state:           {'running' if procs else 'not running'} ({len(procs)} processes)")
    return 0 if procs else 1
