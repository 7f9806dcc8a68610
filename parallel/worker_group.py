"""WorkerGroup: N Ray actors forming one torch.distributed group; LocalGroup: the same
interface in-process (world size 1, no Ray) for --local runs and debugging.

The actor is generic: it wraps a user "worker class" (a class, or an import path
"pkg.module:Class"), constructed in each actor as cls(rank, world_size, **worker_kwargs)
after the process group exists, so its constructor may build an Engine. Calls fan out:

    group = WorkerGroup(Trainer, par, role="pretrain", worker_kwargs={"cfg": cfg})
    losses = group.call("train_step", batch_idx)        # [rank0 result, rank1 result, ...]
    refs = group.call_async("evaluate")                  # several groups run concurrently
    group.get(refs)

A dead actor makes call/get raise WorkerDied(role, rank) as soon as its result is due, even
while other ranks are blocked in a collective waiting for it (a lost node's actors likewise).
A rank that stops answering makes its peers' collectives time out after
par.collective_timeout_s; get then raises WorkerHung naming that rank and its node.
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Any, Sequence

from trellis.parallel import dist
from trellis.parallel.config import ParallelConfig
from trellis.parallel.resources import PlacementError, bundle_of, wait_placed

__all__ = ["LocalGroup", "PlacementError", "WorkerDied", "WorkerGroup", "WorkerHung",
           "ensure_ray", "resolve_class"]

# Environment the actors need but may not inherit (e.g. when joining an existing cluster);
# set in the actor before the worker class is built, so read-at-use variables only.
_FORWARD_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                "TOKENIZERS_PARALLELISM", "TRELLIS_DS_VERBOSE")


class WorkerDied(RuntimeError):
    """A worker actor of a group died (killed, crashed, node lost)."""

    def __init__(self, role: str, rank: int, cause: BaseException | None = None,
                 node: str | None = None):
        self.role, self.rank, self.cause, self.node = role, rank, cause, node
        why = f": {type(cause).__name__}" if cause is not None else ""
        where = f" on node {node}" if node else ""
        super().__init__(f"worker {role}/rank{rank} died{where}{why}")


class WorkerHung(WorkerDied):
    """A rank stopped answering: a peer's collective timed out waiting for it, and it neither
    answered nor died within the grace. Recovered like a death (the group is torn down)."""

    def __init__(self, role: str, rank: int, node: str | None, peer: int, timeout_s: float,
                 cause: BaseException | None = None):
        self.role, self.rank, self.cause, self.node = role, rank, cause, node
        RuntimeError.__init__(
            self, f"worker {role}/rank{rank} on node {node or '?'} stopped answering: rank "
                  f"{peer}'s collective timed out after {timeout_s:g}s "
                  f"(parallel.collective_timeout_s)")


def _is_collective_timeout(e: BaseException) -> bool:
    """gloo: 'Timed out waiting Nms for recv operation'; NCCL's watchdog: '... timeout'."""
    text = f"{type(e).__name__} {e}".lower()
    return "timed out" in text or "watchdog" in text or "timeout" in text


def _worker_error(e: Any, where: str) -> BaseException:
    """The exception a worker raised, as itself (a DataError stays a DataError, so the CLI
    can print its one line); the remote traceback rides along as a note for --debug."""
    cause = getattr(e, "cause", None)
    if not isinstance(cause, Exception):
        return e
    if hasattr(cause, "add_note"):
        cause.add_note(f"raised in worker {where}:\n{getattr(e, 'traceback_str', '')}")
    return cause


def resolve_class(spec: type | str) -> type:
    """A class, or 'pkg.module:Class' / 'pkg.module.Class' imported here."""
    if isinstance(spec, type):
        return spec
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module or not name:
        raise ValueError(f"worker class '{spec}': expected 'package.module:Class'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"worker class '{spec}': {e}") from None


def ensure_ray(address: str | None = None, num_cpus: float | None = None,
               log_to_driver: bool = True, include_dashboard: bool = False,
               namespace: str | None = None) -> None:
    """Connect to Ray at `address`, or start a local Ray kept on 127.0.0.1. No-op if connected."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray binds to eth0
    import ray
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, namespace=namespace)
    else:
        # "local": a new instance even when /tmp/ray/ray_current_cluster names another (a
        # stale file left by a killed `ray start` would otherwise make ray.init connect there).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 _node_ip_address="127.0.0.1", log_to_driver=log_to_driver, namespace=namespace)


class _Worker:
    """The Ray actor body (made remote lazily so importing this module needs no Ray).

    Its process is titled `ray::trellis <role>/rank<r>` in ps/top, idle or busy (a call
    appends its method). Ray titles an actor process `ray::<Class>.<method>` while a task
    runs and `ray::<Class>` between tasks, the class name read off the actor object anew at
    each task; so the actor takes a subclass of its own named so, and sets the title itself
    when a call starts. The `ray::` prefix stays: `ray stop` finds stray workers by it."""

    def __init__(self, role: str, rank: int, world_size: int, env: dict[str, str]):
        os.environ.update(env)
        self.role, self.rank, self.world_size = role, rank, world_size
        self.obj: Any = None
        self._name = f"trellis {role}/rank{rank}"
        self.__class__ = type(self._name, (type(self),), {})  # idle: ray::<class name>
        self._title()

    def _title(self, doing: str = "") -> None:
        try:
            from ray._raylet import setproctitle  # Ray's own (what Ray titles tasks with)
        except ImportError:
            return
        setproctitle(f"ray::{self._name}" + (f" {doing}" if doing else ""))

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"{self.role}/rank{self.rank}"

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: where the others meet it: 127.0.0.1 when every rank's bundle is on this
        node (the group's sockets then stay on loopback), else this node's address; and a
        port there, bound and listening from now on and handed to the store by setup."""
        import ray
        import ray.util
        here = ray.get_runtime_context().get_node_id()
        pg = ray.util.get_current_placement_group()
        if pg is None:
            nodes = {here} if self.world_size == 1 else set()
        else:  # rank r lives in bundle r
            where = ray.util.placement_group_table(pg)["bundles_to_node_id"]
            nodes = {where.get(r) for r in range(self.world_size)}
        ip = "127.0.0.1" if nodes == {here} else ray.util.get_node_ip_address()
        return ip, dist.reserve_rendezvous(ip)

    def setup(self, addr: str, port: int, backend: str, worker_cls: type | str,
              kwargs: dict[str, Any], timeout_s: float = 600.0) -> tuple[int, str]:
        """Join the process group (collectives time out after `timeout_s`), build the worker
        object; returns (pid, node)."""
        self._title("setup")
        dist.init_distributed(self.rank, self.world_size, addr, port, backend, timeout_s=timeout_s)
        self.obj = resolve_class(worker_cls)(self.rank, self.world_size, **kwargs)
        return os.getpid(), self.node()

    def call(self, method: str, args_kwargs: tuple[tuple, dict]) -> Any:
        self._title(method)
        args, kwargs = args_kwargs
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """'<node id, 8 hex> (<ip>)': where this rank runs, as error messages name it."""
        import ray
        import ray.util
        return f"{ray.get_runtime_context().get_node_id()[:8]} ({ray.util.get_node_ip_address()})"

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()


class WorkerGroup:
    """par.num_workers Ray actors named '<role>/rank<r>' in one placement group (par.placement)
    with fractional bundles {CPU: par.cpus_per_worker, GPU: par.gpus_per_worker, **par.resources}."""

    def __init__(self, worker_cls: type | str, par: ParallelConfig, role: str = "worker",
                 worker_kwargs: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float | None = None, placement_group: Any = None):
        """`placement_group`: an existing one to place rank r into bundle r (colocating
        several groups on the same devices, each taking its fraction); it is then not
        removed at shutdown. Default: a placement group of this group's own.
        `start_timeout_s`: how long to wait for placement (default par.placement_timeout_s);
        past it, PlacementError names the missing resources."""
        import ray
        import ray.util
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialized; call parallel.ensure_ray() first")
        self.role, self.world_size = role, par.num_workers
        self.collective_timeout_s = par.collective_timeout_s
        self.nodes: list[str] = []  # by rank, once set up
        start_timeout_s = par.placement_timeout_s if start_timeout_s is None else start_timeout_s
        bundle = bundle_of([par])
        if not {"CPU", "GPU"} & set(bundle):
            raise ValueError("cpus_per_worker and gpus_per_worker are both 0; reserve something")
        self._owns_pg = placement_group is None
        self._pg = placement_group or ray.util.placement_group(
            [dict(bundle)] * self.world_size, strategy=par.placement, name=f"{role}-pg")
        self._actors: list[Any] = []
        try:
            self._place(ray, bundle, start_timeout_s)
            # Building the engines may take long on a busy machine: a separate, generous
            # bound (a dead actor is still reported at once, as WorkerDied).
            self._start(worker_cls, par, worker_kwargs or {}, env, max(start_timeout_s,
                                                                    self.SETUP_TIMEOUT_S))
        except BaseException:
            self.shutdown()
            raise

    def _place(self, ray: Any, bundle: dict, timeout_s: float) -> None:
        wait_placed(self._pg, f"group '{self.role}': placement group of {self.world_size} x "
                              f"{bundle}", timeout_s)

    def _start(self, worker_cls: type | str, par: ParallelConfig, kwargs: dict,
               env: dict[str, str] | None, timeout_s: float) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        env_vars = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ} | (env or {})
        remote = ray.remote(_Worker)
        for r in range(self.world_size):
            self._actors.append(remote.options(
                name=f"{self.role}/rank{r}", num_cpus=par.cpus_per_worker,
                num_gpus=par.gpus_per_worker, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=r),
            ).remote(self.role, r, self.world_size, env_vars))
        addr, port = self.get([self._actors[0].rendezvous.remote()], ranks=[0],
                              timeout_s=timeout_s)[0]
        where = self.get([a.setup.remote(addr, port, par.backend, worker_cls, kwargs,
                                         par.collective_timeout_s) for a in self._actors],
                         timeout_s=timeout_s)
        self.nodes = [node for _, node in where]

    # ---- calls ---------------------------------------------------------------------------
    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Start `method(*args, **kwargs)` on every rank; ObjectRefs by rank (see get)."""
        import ray
        payload = ray.put((args, kwargs))  # one copy in the object store for all ranks
        return [a.call.remote(method, payload) for a in self._actors]

    def call_scatter_async(self, method: str, per_rank_args: Sequence[Any], *args: Any,
                           **kwargs: Any) -> list[Any]:
        """Rank r runs method(per_rank_args[r], *args, **kwargs); ObjectRefs by rank."""
        if len(per_rank_args) != self.world_size:
            raise ValueError(f"group '{self.role}': {len(per_rank_args)} per-rank arguments "
                             f"for {self.world_size} ranks")
        return [a.call.remote(method, ((x, *args), kwargs))
                for a, x in zip(self._actors, per_rank_args)]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run `method` on every rank and gather the results (a list by rank)."""
        return self.get(self.call_async(method, *args, **kwargs))

    def call_scatter(self, method: str, per_rank_args: Sequence[Any], *args: Any,
                     **kwargs: Any) -> list[Any]:
        return self.get(self.call_scatter_async(method, per_rank_args, *args, **kwargs))

    SETUP_TIMEOUT_S = 1800.0
    """How long the ranks may take to rendezvous and build their worker objects."""

    # A rank that dies mid-collective makes its peers fail too ("connection reset by peer"),
    # and their errors may arrive first: before reporting a worker's error, wait this long
    # for a death among the other ranks, which wins (and is recoverable).
    DEATH_GRACE_S = 30.0

    def get(self, refs: Sequence[Any], ranks: Sequence[int] | None = None,
            timeout_s: float | None = None) -> list[Any]:
        """Results of refs (by rank). Raises WorkerDied for the first dead rank found and the
        worker's own exception for the first failed call (unless another rank turns out to be
        dead within DEATH_GRACE_S), without waiting for the rest."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        pending = dict(zip(refs, range(len(refs))))
        results: list[Any] = [None] * len(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
            if not ready:
                late = sorted(ranks[i] for i in pending.values())
                raise TimeoutError(f"group '{self.role}': ranks {late} did not answer "
                                   f"within {timeout_s}s")
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayActorError as e:  # includes ActorDiedError / ActorUnavailableError
                    raise WorkerDied(self.role, ranks[i], e, self._node(ranks[i])) from e
                except RayTaskError as e:
                    died = self._death_among(pending, ranks)
                    if died is not None:
                        raise died from None
                    error = _worker_error(e, f"{self.role}/rank{ranks[i]}")
                    if pending and _is_collective_timeout(error):  # they never answered
                        hung = min(ranks[j] for j in pending.values())
                        raise WorkerHung(self.role, hung, self._node(hung), ranks[i],
                                         self.collective_timeout_s, error) from None
                    raise error from None
        return results

    def _node(self, rank: int) -> str | None:
        return self.nodes[rank] if rank < len(self.nodes) else None

    def _death_among(self, pending: dict[Any, int], ranks: list[int]) -> WorkerDied | None:
        """WorkerDied for a rank among `pending` that turns out dead within DEATH_GRACE_S
        (at most the collective timeout: a dead peer fails its peers' collectives sooner)."""
        import ray
        from ray.exceptions import RayActorError
        deadline = time.monotonic() + min(self.DEATH_GRACE_S, self.collective_timeout_s)
        while pending and (left := deadline - time.monotonic()) > 0:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    return WorkerDied(self.role, ranks[i], e, self._node(ranks[i]))
                except Exception:  # another rank's error: keep looking for a death
                    pass
        return None

    # ---- inspection and lifecycle --------------------------------------------------------
    @property
    def actor_names(self) -> list[str]:
        return [f"{self.role}/rank{r}" for r in range(self.world_size)]

    def pids(self) -> list[int]:
        return self.get([a.pid.remote() for a in self._actors])

    def kill_rank(self, rank: int) -> None:
        """Kill one actor (for fault tests); later calls on the group raise WorkerDied."""
        import ray
        ray.kill(self._actors[rank], no_restart=True)

    def shutdown(self) -> None:
        """Kill every actor and release the placement group. Idempotent."""
        import ray
        from ray.util.placement_group import remove_placement_group
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []
        if self._pg is not None and self._owns_pg:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class LocalGroup:
    """The WorkerGroup interface in this process: one rank, no Ray (Ray is never imported)."""

    def __init__(self, worker_cls: type | str, par: ParallelConfig | None = None,
                 role: str = "local", worker_kwargs: dict[str, Any] | None = None):
        par = par or ParallelConfig()
        if par.num_workers != 1:
            raise ValueError(f"LocalGroup runs one rank; num_workers is {par.num_workers}")
        self.role, self.world_size = role, 1
        dist.init_distributed(0, 1, "127.0.0.1", None, par.backend)  # binds port 0: no race
        self._obj: Any = resolve_class(worker_cls)(0, 1, **(worker_kwargs or {}))

    def _target(self) -> Any:
        if self._obj is None:
            raise WorkerDied(self.role, 0)
        return self._obj

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(self._target(), method)(*args, **kwargs)]

    def call_scatter(self, method: str, per_rank_args: Sequence[Any], *args: Any,
                     **kwargs: Any) -> list[Any]:
        if len(per_rank_args) != 1:
            raise ValueError(f"group '{self.role}': {len(per_rank_args)} per-rank arguments for 1 rank")
        return [getattr(self._target(), method)(per_rank_args[0], *args, **kwargs)]

    # Eager: the "refs" are the results themselves, so get() is the identity.
    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.call(method, *args, **kwargs)

    def call_scatter_async(self, method: str, per_rank_args: Sequence[Any], *args: Any,
                           **kwargs: Any) -> list[Any]:
        return self.call_scatter(method, per_rank_args, *args, **kwargs)

    def get(self, refs: Sequence[Any], ranks: Sequence[int] | None = None,
            timeout_s: float | None = None) -> list[Any]:
        return list(refs)

    @property
    def actor_names(self) -> list[str]:
        return [f"{self.role}/rank0"]

    def pids(self) -> list[int]:
        return [os.getpid()]

    def kill_rank(self, rank: int) -> None:
        """Drop the worker object; later calls raise WorkerDied (the process lives on)."""
        self._obj = None

    def shutdown(self) -> None:
        # The world-1 process group stays for the life of the process: DeepSpeed caches group
        # handles, so a destroyed and re-created group breaks the next engine built here.
        self._obj = None

    def __enter__(self) -> "LocalGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
