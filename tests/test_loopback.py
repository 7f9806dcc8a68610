"""Where a trellis process group listens, read from the kernel's socket tables: the rendezvous
store and gloo bind the master address / one interface, never every interface (0.0.0.0, ::).
In-process (a world of 1, the --local path) and a 2-rank Ray WorkerGroup."""
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import listening_sockets
from trellis.parallel import dist

ROOT = Path(__file__).resolve().parents[1]
ANY = {"0.0.0.0", "::"}


def _other_address() -> tuple[str, str] | None:
    """(interface, IPv4 address) of a non-loopback interface of this machine, if any."""
    import psutil
    import socket
    for name, entries in psutil.net_if_addrs().items():
        for e in entries:
            if e.family == socket.AF_INET and not ipaddress.ip_address(e.address).is_loopback:
                return name, e.address
    return None


def test_import_needs_neither_ray_nor_deepspeed():
    code = ("import sys, trellis.parallel.dist\n"
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_listen_socket_and_reservation_bind_the_address_only():
    s = dist.listen_socket("127.0.0.1")
    try:
        port = s.getsockname()[1]
        assert ("127.0.0.1", port, os.getpid()) in listening_sockets()
    finally:
        s.close()
    port = dist.reserve_rendezvous("127.0.0.1")
    try:
        mine = {(ip, p) for ip, p, _ in listening_sockets()}
        assert ("127.0.0.1", port) in mine and not {(a, port) for a in ANY} & mine
    finally:
        dist._reserved.pop(("127.0.0.1", port)).close()


def test_gloo_interface_loopback_wins_else_configured_else_route(monkeypatch):
    lo = dist.interface_of("127.0.0.1")
    assert lo is not None
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "configured0")
    # A single-node group (loopback master) binds loopback whatever the environment says.
    assert dist.gloo_interface("127.0.0.1", 0) == dist.gloo_interface("127.0.0.1", 1) == lo
    other = _other_address()
    if other is None:
        pytest.skip("no non-loopback interface on this machine")
    name, addr = other
    assert dist.gloo_interface(addr, 1) == "configured0"  # multi-node: the configured one
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    # Unset: rank 0 the master address's interface, others the one routing to it.
    assert dist.gloo_interface(addr, 0) == dist.gloo_interface(addr, 1) == name


LOCAL = """
import json, os, sys
sys.path.insert(0, "tests")
from conftest import listening_sockets
from trellis.parallel.config import ParallelConfig
from trellis.parallel.worker_group import LocalGroup

class Echo:
    def __init__(self, rank, world_size):
        pass
    def all_reduce(self, x):
        import torch
        t = torch.tensor([x])
        torch.distributed.all_reduce(t)
        return float(t.item())

before = listening_sockets()
group = LocalGroup(Echo, ParallelConfig(num_workers=1))
after = listening_sockets()
print(json.dumps({"before": sorted(before), "after": sorted(after),
                  "sum": group.call("all_reduce", 2.0)[0],
                  "store_port": int(os.environ["MASTER_PORT"]),
                  "gloo_ifname": os.environ["GLOO_SOCKET_IFNAME"]}))
"""


@pytest.mark.integration
def test_local_group_listens_on_loopback_only():
    """The --local path in a fresh process (its group lives as long as the process). A
    GLOO_SOCKET_IFNAME naming another interface must not move a loopback group off lo."""
    env = dict(os.environ)
    other = _other_address()
    if other is not None:
        env["GLOO_SOCKET_IFNAME"] = other[0]
    out = subprocess.run([sys.executable, "-c", LOCAL], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    new = {(ip, port) for ip, port, _ in got["after"]} - {(ip, p) for ip, p, _ in got["before"]}
    print("listening before:", got["before"], "after:", got["after"])
    assert got["sum"] == 2.0
    assert ("127.0.0.1", got["store_port"]) in new  # the rendezvous store
    assert len(new) >= 2, new  # the store and gloo's listener
    assert {ip for ip, _ in new} == {"127.0.0.1"}, new
    assert got["gloo_ifname"] == dist.interface_of("127.0.0.1")


class Probe:
    """Worker class: reports this actor's listening sockets; opens a further gloo group the
    way DeepSpeed does (new_group) and reports what that one added."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def sockets(self) -> dict:
        import torch
        import torch.distributed as tdist
        before = listening_sockets()
        group = tdist.new_group(backend="gloo")  # collective: every rank calls it
        t = torch.tensor([1.0])
        tdist.all_reduce(t, group=group)
        after = listening_sockets()
        return {"all": sorted(after), "subgroup": sorted(after - before), "sum": t.item(),
                "master": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])]}


@pytest.mark.integration
def test_ray_group_of_two_listens_on_loopback_only():
    ray = pytest.importorskip("ray")
    from trellis.parallel.config import ParallelConfig
    from trellis.parallel.worker_group import WorkerGroup, ensure_ray
    # Actors unpickle the worker class by value: these modules are not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(conftest)
    started = not ray.is_initialized()
    ensure_ray(num_cpus=2, log_to_driver=False)
    try:
        with WorkerGroup(Probe, ParallelConfig(num_workers=2, cpus_per_worker=0.25),
                         role="loopback") as group:
            got = group.call("sockets")
    finally:
        if started:
            ray.shutdown()
    for rank, g in enumerate(got):
        print(f"rank {rank} listening:", g["all"], "new gloo group added:", g["subgroup"])
        assert g["sum"] == 2.0 and g["master"][0] == "127.0.0.1"
        assert g["subgroup"] and {ip for ip, _, _ in g["subgroup"]} == {"127.0.0.1"}
        assert not {ip for ip, _, _ in g["all"]} & ANY, g["all"]
    store = tuple(got[0]["master"])
    assert store in {(ip, port) for ip, port, _ in got[0]["all"]}  # rank 0 hosts the store
    assert {ip for g in got for ip, _, _ in g["all"]} == {"127.0.0.1"}
