"""Several worker groups that form one job (the RL roles: actor, critic, reference, reward),
placed together or apart, started and torn down as one.

    groups = RoleGroups.start({"actor": RoleSpec(ActorWorker, par, kwargs), ...},
                              colocate=True, local=False, address=None)
    groups.actor.call(...); groups["reward"].call_async(...)
    groups.shutdown()

colocate: rank r of every role shares bundle r of ONE placement group (the same devices,
each role taking its fractional share); separate: each role its own placement group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from trellis.parallel.config import ParallelConfig
from trellis.parallel.resources import bundle_of, wait_placed
from trellis.parallel.worker_group import LocalGroup, WorkerGroup, ensure_ray

@dataclass
class RoleSpec:
    worker: type | str
    """Worker class (or 'package.module:Class') built on every rank of the role."""
    parallel: ParallelConfig
    kwargs: dict[str, Any] = field(default_factory=dict)


def colocated_placement_group(pars: list[ParallelConfig], name: str,
                              timeout_s: float | None = None) -> Any:
    """One placement group whose bundle r holds rank r of every role (their shares summed).
    Waits up to `timeout_s` (default: the longest placement_timeout_s of the roles)."""
    from ray.util.placement_group import placement_group

    if len({p.num_workers for p in pars}) != 1:
        raise ValueError(f"colocated roles need equal num_workers, got "
                         f"{[p.num_workers for p in pars]}")
    bundle = bundle_of(pars)
    pg = placement_group([bundle] * pars[0].num_workers, strategy=pars[0].placement,
                         name=name)
    wait_placed(pg, f"colocated placement group of {pars[0].num_workers} x {bundle}",
                timeout_s if timeout_s is not None else max(p.placement_timeout_s for p in pars))
    return pg


class RoleGroups:
    """Named worker groups of one job; attribute or item access by role name."""

    def __init__(self, groups: dict[str, Any], pg: Any = None):
        self._groups, self._pg = groups, pg

    @classmethod
    def start(cls, specs: Mapping[str, RoleSpec], colocate: bool, local: bool,
              address: str | None = None, name: str = "roles") -> "RoleGroups":
        """Start every role's group; `name` names the colocated placement group
        ('<name>-colocated')."""
        if local:
            return cls({r: LocalGroup(s.worker, s.parallel, role=r, worker_kwargs=s.kwargs)
                        for r, s in specs.items()})
        ensure_ray(address)
        pars = [s.parallel for s in specs.values()]
        pg = colocated_placement_group(pars, f"{name}-colocated") if colocate else None
        out = cls({}, pg)
        try:
            for r, s in specs.items():
                out._groups[r] = WorkerGroup(s.worker, s.parallel, role=r, worker_kwargs=s.kwargs,
                                             placement_group=pg)
        except BaseException:
            out.shutdown()
            raise
        return out

    def __getattr__(self, role: str) -> Any:
        groups = self.__dict__.get("_groups", {})
        if role in groups:
            return groups[role]
        raise AttributeError(role)

    def __getitem__(self, role: str) -> Any:
        return self._groups[role]

    def items(self):
        return self._groups.items()

    def shutdown(self) -> None:
        """Kill every group's actors, then release the shared placement group. Idempotent."""
        for g in self._groups.values():
            g.shutdown()
        self._groups = {}
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(self._pg)
            except Exception:  # already removed (e.g. the cluster went away)
                pass
            self._pg = None
