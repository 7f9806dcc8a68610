"""torch.distributed process-group setup (adopted by DeepSpeed's comm layer) and small helpers.

gloo on CPU, NCCL when CUDA is available. DeepSpeed is imported inside functions only, so
`import parallel.dist` stays cheap.

Where the group listens. Rank 0 hosts the rendezvous store (a TCPStore) on a socket bound to
the master address itself, never to every interface (torch's own tcp:// rendezvous listens on
`*`/`::`); gloo's sockets go to one interface: the loopback interface when the master address
is loopback (a single-node group), else $GLOO_SOCKET_IFNAME when set, else the interface that
routes to the master. NCCL uses the same store; its own bootstrap follows $NCCL_SOCKET_IFNAME.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch


def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> 'nccl' when CUDA is available, else 'gloo'."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available here; use gloo or auto")
    return backend


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve(addr: str) -> str:
    """An IP address as given, or a host name's first address."""
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:  # a host name
        return socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)[0][4][0]


def listen_socket(addr: str, port: int = 0, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to `addr` only (port 0: the OS picks one) and listening."""
    ip = _resolve(addr)
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # not IPv4 too
        s.bind((ip, port))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s


# Rendezvous sockets bound ahead of init_distributed, by (address, port): rank 0 reserves
# one (reserve_rendezvous) before telling the other ranks where to connect, so the port is
# never free for someone else to take in between.
_reserved: dict[tuple[str, int], socket.socket] = {}


def reserve_rendezvous(addr: str = "127.0.0.1") -> int:
    """Rank 0, before init_distributed: bind and listen on `addr` now, keep the socket for
    init_distributed(rank 0, master_addr=addr, master_port=<the returned port>)."""
    s = listen_socket(addr)
    port = s.getsockname()[1]
    _reserved[(addr, port)] = s
    return port


def interface_of(addr: str) -> str | None:
    """Name of the network interface holding address `addr`, or None."""
    import psutil  # a DeepSpeed dependency
    ip = ipaddress.ip_address(_resolve(addr))
    for name, entries in psutil.net_if_addrs().items():
        for e in entries:
            if e.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(e.address.split("%")[0]) == ip:
                        return name
                except ValueError:
                    continue
    return None


def _route_source(master_ip: str) -> str:
    """This host's address on the route to `master_ip` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ipaddress.ip_address(master_ip).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((master_ip, 9))
        return s.getsockname()[0]


def gloo_interface(master_addr: str, rank: int) -> str:
    """The one interface gloo binds to (see the module docstring); sets nothing."""
    ip = _resolve(master_addr)
    if ipaddress.ip_address(ip).is_loopback:
        lo = interface_of(ip)
        if lo is None:
            raise RuntimeError(f"no network interface holds the loopback address {ip}")
        return lo
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    mine = ip if rank == 0 else _route_source(ip)
    name = interface_of(mine)
    if name is None:
        raise RuntimeError(
            f"rank {rank}: no network interface holds {mine} (the route to master {ip}); "
            f"set GLOO_SOCKET_IFNAME to the interface gloo should bind to")
    return name


def local_device_index(rank: int = 0) -> int:
    """CUDA device index for a rank: Ray usually exposes one GPU per actor (index 0);
    otherwise ranks on a node share the visible devices round-robin."""
    n = torch.cuda.device_count()
    return rank % n if n else 0


def device_for_rank(rank: int | None = None) -> torch.device:
    """cuda:<local index> when CUDA is available, else cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    r = int(os.environ.get("LOCAL_RANK", 0)) if rank is None else rank
    return torch.device("cuda", local_device_index(r))


def _skip_shm_comm_jit() -> None:
    """DeepSpeed JIT-builds a shared-memory all-reduce op (30 s cold) at every init on CPU;
    it only serves inference all-reduce, so mark it incompatible (a private knob)."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(rank: int, world_size: int, master_addr: str = "127.0.0.1",
                     master_port: int | None = None, backend: str = "auto",
                     timeout_s: float = 600.0) -> str:
    """Join (or create) the default process group; returns the backend used.

    Rank 0 hosts the rendezvous store on master_addr:master_port (bound to that address
    only; a socket from reserve_rendezvous when there is one, else bound now; port None: any
    free port, for a world of 1). DeepSpeed's comm layer adopts the group. Every collective
    of this process (DeepSpeed's own groups too) fails after `timeout_s` instead of waiting
    on a hung peer. Idempotent when already initialized with the same rank and world size.
    """
    import deepspeed
    import torch.distributed as tdist

    if tdist.is_initialized():
        if tdist.get_rank() != rank or tdist.get_world_size() != world_size:
            raise RuntimeError(
                f"process group already initialized as rank {tdist.get_rank()} of "
                f"{tdist.get_world_size()}, asked for rank {rank} of {world_size}")
        return tdist.get_backend()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if master_port is None and world_size > 1:
        raise ValueError("master_port is needed for a world size above 1 (every rank must "
                         "know it); rank 0 can take one from reserve_rendezvous()")
    backend = resolve_backend(backend)
    timeout = timedelta(seconds=timeout_s)
    local = local_device_index(rank) if torch.cuda.is_available() else 0
    # Every gloo group of this process (DeepSpeed makes more) reads it when it is created;
    # set for NCCL too, for any CPU-side gloo group.
    os.environ["GLOO_SOCKET_IFNAME"] = gloo_interface(master_addr, rank)
    store = _store(rank, world_size, master_addr, master_port, timeout)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(store.port))
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local)
        if world_size > 1 and _device_id_safe():  # as DeepSpeed's own init does
            kwargs["device_id"] = torch.device("cuda", local)
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                             timeout=timeout, **kwargs)
    _default_group_timeout(timeout)
    _skip_shm_comm_jit()
    # With torch.distributed initialized, DeepSpeed's comm layer wraps the existing group.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timeout, rank=rank, world_size=world_size)
    return backend


def _default_group_timeout(timeout: timedelta) -> None:
    """Groups made later without a timeout (DeepSpeed clones the world group with
    new_group(ranks)) take torch's module default, 30 min for gloo; make it ours, so every
    collective of this process gives up after `timeout` (a private knob of torch)."""
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout


def _device_id_safe() -> bool:
    """init_process_group(device_id=...) hangs with 2.6.0 < torch < 2.7.1 (DeepSpeed skips
    it there too, pytorch#153960)."""
    from packaging.version import Version  # a DeepSpeed dependency
    v = Version(torch.__version__.split("+")[0])
    return not Version("2.6.0") < v < Version("2.7.1")


def _store(rank: int, world_size: int, addr: str, port: int | None,
           timeout: timedelta) -> "torch.distributed.TCPStore":
    """Rank 0: the TCPStore server on a socket bound to `addr` only (the store takes the
    socket over); other ranks: a client of it."""
    import torch.distributed as tdist
    if rank != 0:
        return tdist.TCPStore(addr, port, world_size, False, timeout)
    sock = _reserved.pop((addr, port), None) if port is not None else None
    if sock is None:
        sock = listen_socket(addr, port or 0)
    port = sock.getsockname()[1]
    # The store owns the descriptor from here on (libuv and the classic server both close it).
    return tdist.TCPStore(addr, port, world_size, True, timeout, master_listen_fd=sock.detach())


def destroy_distributed() -> None:
    """Leave the default process group (no-op when none)."""
    import torch.distributed as tdist
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_initialized() -> bool:
    import torch.distributed as tdist
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    import torch.distributed as tdist
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    import torch.distributed as tdist
    return tdist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as tdist
    if is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def all_reduce_mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of each named metric, in one collective. NaN entries (a metric a rank
    could not measure, e.g. accuracy of a batch without pairs) are left out of that mean;
    every rank must pass the same keys."""
    import torch.distributed as tdist
    keys = sorted(values)
    v = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = torch.stack([torch.nan_to_num(v, nan=0.0), (~v.isnan()).double()])  # (2, K)
    if is_initialized() and tdist.get_world_size() > 1 and keys:
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
    t = t.cpu()
    return {k: float(t[0, i] / t[1, i]) if t[1, i] > 0 else float("nan")
            for i, k in enumerate(keys)}


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (e.g. a logged loss); returns a Python float."""
    import torch.distributed as tdist
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone().cpu()
    if is_initialized() and tdist.get_world_size() > 1:
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
        t = t / tdist.get_world_size()
    return float(t.item())
