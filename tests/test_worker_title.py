"""WorkerGroup actors name their processes `ray::trellis <role>/rank<r>` for ps/top: between
calls, and while a call runs (with the method). Read from /proc, as ps and top do."""
import os
import sys
import time
from pathlib import Path

import pytest

from trellis.parallel.config import ParallelConfig
from trellis.parallel.worker_group import WorkerGroup, ensure_ray

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration


class Napper:
    """Worker class: does nothing but sleep when asked."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def nap(self, until: str, max_s: float = 120.0) -> int:
        """Sleep until the file `until` exists (at most max_s)."""
        deadline = time.monotonic() + max_s
        while not os.path.exists(until) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.rank


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def wait_for(pids: list[int], ok, deadline_s: float = 60.0) -> list[str]:
    """Poll the titles of `pids` until ok(rank, title) holds for every rank (or the deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        titles = [cmdline(p) for p in pids]
        if all(ok(r, t) for r, t in enumerate(titles)) or time.monotonic() > deadline:
            return titles
        time.sleep(0.1)


@pytest.fixture(scope="module")
def group():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors can't import us
    ensure_ray(num_cpus=2, log_to_driver=False)
    g = WorkerGroup(Napper, ParallelConfig(num_workers=2, cpus_per_worker=0.25, backend="gloo"),
                    role="titled")
    yield g
    g.shutdown()
    ray.shutdown()


def test_idle_actors_are_titled_by_role_and_rank(group):
    pids = group.pids()
    assert len(set(pids)) == 2 and os.getpid() not in pids
    # Ray retitles a process when each task ends, so poll rather than read once.
    titles = wait_for(pids, lambda r, t: t == f"ray::trellis titled/rank{r}")
    assert titles == ["ray::trellis titled/rank0", "ray::trellis titled/rank1"]


def test_title_holds_while_a_call_runs_and_after(group, tmp_path):
    pids = group.pids()
    wake = tmp_path / "wake"
    refs = group.call_async("nap", str(wake))
    try:
        titles = wait_for(pids, lambda r, t: t == f"ray::trellis titled/rank{r} nap")
        assert titles == ["ray::trellis titled/rank0 nap", "ray::trellis titled/rank1 nap"]
    finally:
        wake.touch()
        assert group.get(refs, timeout_s=120) == [0, 1]
    titles = wait_for(pids, lambda r, t: t == f"ray::trellis titled/rank{r}")
    assert titles == ["ray::trellis titled/rank0", "ray::trellis titled/rank1"]
