"""What a worker group asks Ray for (one bundle per rank), waiting for it, and saying in one
line what is missing when it does not come: a resource no alive node has (e.g. the custom
resource of a lost node), or more than the alive nodes hold in all, or more than is free."""
from __future__ import annotations

from typing import Any, Iterable

from trellis.parallel.config import ParallelConfig


class PlacementError(RuntimeError):
    """A group's placement group was not placed within its timeout; str() is one line
    naming the resources that are missing."""


def bundle_of(pars: Iterable[ParallelConfig]) -> dict[str, float]:
    """One rank's bundle: CPU, GPU and custom resources of every config summed (several
    roles colocated on one bundle), zero amounts left out."""
    out: dict[str, float] = {}
    for p in pars:
        for k, v in (("CPU", p.cpus_per_worker), ("GPU", p.gpus_per_worker), *p.resources.items()):
            out[k] = out.get(k, 0.0) + float(v)
    return {k: v for k, v in out.items() if v}


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def shortfall(bundles: list[dict[str, float]], nodes: list[dict[str, float]],
              free: dict[str, float]) -> str:
    """What keeps `bundles` from being placed, given the alive nodes' total resources and
    the cluster's free resources (pure; one line)."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    absent = [k for k in sorted(need) if not any(n.get(k, 0) for n in nodes)]
    if absent:
        return ", ".join(f"resource '{k}' (no alive node has it)" for k in absent)
    short = [f"{k} {need[k]:g} needed, {sum(n.get(k, 0) for n in nodes):g} on "
             f"{len(nodes)} alive node(s)" for k in sorted(need)
             if sum(n.get(k, 0) for n in nodes) < need[k] - 1e-9]
    if short:
        return "; ".join(short)
    busy = [f"{k} {need[k]:g} needed, {free.get(k, 0):g} free" for k in sorted(need)
            if free.get(k, 0) < need[k] - 1e-9]
    if busy:
        return "; ".join(busy) + " (held by other groups or jobs)"
    whole = [b for b in bundles if not any(all(n.get(k, 0) >= v for k, v in b.items())
                                           for n in nodes)]
    if whole:
        return f"no alive node holds a whole bundle {_fmt(whole[0])}"
    return "enough in total; the placement strategy could not be met"


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    import ray
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def wait_placed(pg: Any, what: str, timeout_s: float) -> None:
    """Wait for placement group `pg`; on timeout remove it and raise PlacementError naming
    `what` (e.g. "group 'pretrain': placement group of 2 x {...}") and what is missing."""
    import ray
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if ready:
        return
    from ray.util.placement_group import remove_placement_group
    why = shortfall(list(pg.bundle_specs), alive_nodes(), ray.available_resources())
    remove_placement_group(pg)
    raise PlacementError(f"{what} not placed in {timeout_s:.0f}s "
                         f"(parallel.placement_timeout_s); missing: {why}")
