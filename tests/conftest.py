"""Test-wide environment: CPU DeepSpeed, Ray on loopback, JIT ops cached in build/; helpers."""
import ipaddress
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Threads sleep instead of spinning when waiting: tests, actors and others share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def listening_sockets(pids=None) -> set[tuple[str, int, int]]:
    """(ip, port, pid) of every TCP socket the processes `pids` (default: this one) listen
    on, from the kernel's socket tables (/proc/net/tcp and tcp6, matched by inode to each
    process's open descriptors), not from any configuration. Plain stdlib: also runs inside
    Ray actors (tests register this module for pickling by value)."""
    pids = [os.getpid()] if pids is None else [getattr(p, "pid", p) for p in pids]
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in owner:  # state LISTEN, one of ours
                hexip, hexport = f[1].split(":")
                found.add((_kernel_ip(hexip), int(hexport, 16), owner[f[9]]))
    return found


def _kernel_ip(hexip: str) -> str:
    """/proc/net/tcp{,6} address: 32-bit words in host byte order; an IPv4-mapped IPv6
    address is shown as the IPv4 one."""
    step = -1 if sys.byteorder == "little" else 1
    raw = b"".join(bytes.fromhex(hexip[i:i + 8])[::step] for i in range(0, len(hexip), 8))
    ip = ipaddress.ip_address(raw)
    return str(ip.ipv4_mapped) if ip.version == 6 and ip.ipv4_mapped else str(ip)
