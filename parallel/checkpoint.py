"""Atomic checkpoints: RUN_DIR/checkpoints/step_<n>/ with a COMPLETE marker written last.

Layout of one checkpoint (every rank writes into the same shared directory):
    step_<n>/<engine name>/engine/...   DeepSpeed shards of each engine (Engine.save)
    step_<n>/rank_<r>.pt                 per-rank state: RNG states, data-stream state, counters
    step_<n>/COMPLETE                    JSON {step, world_size, time, engines}; written last

Save flow (collective; all ranks call save_checkpoint):
    rank 0 clears a stale .tmp-step_<n> and creates it; barrier
    every rank: engine shards (DeepSpeed, collective) + its rank_<r>.pt (fsynced); barrier
    rank 0: fsync every file, rename .tmp-step_<n> -> step_<n>, fsync the parent, write
            COMPLETE (tmp + fsync + rename), prune to keep_last; barrier
A crash at any point leaves either a .tmp-* directory or a step_<n> without COMPLETE; both
are ignored by latest_complete(), so a restart resumes from the previous complete checkpoint.
The run directory must be on storage every rank sees (one node, or a shared filesystem).
Rank files load with torch.load(weights_only=True), so their contents must be tensors and
primitives (checked at save time, naming the offending key).

Nothing here unpickles code: rank files load with weights_only=True and no extra types, the
engine shards through DeepSpeed under parallel.safe_load (weights_only=True forced, a short
allow-list of DeepSpeed's own types). A file that holds anything else raises CheckpointError.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch

from trellis.parallel import dist
from trellis.parallel.config import CheckpointConfig
from trellis.parallel.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file was refused (it holds something other than tensors, plain values and
    the allowed DeepSpeed types, so loading it could run code) or cannot be read. One line,
    naming the file; nothing in the file was run. The CLI exits 1 on it."""


# What torch.load raises on a refused (UnpicklingError) or malformed file.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)
_UNSAFE = re.compile(r"GLOBAL (\S+) was not an allowed global")
_BLOCKED = re.compile(r"(\S+) whose module (\S+) is blocked")


def _reason(e: BaseException) -> str:
    """One line from torch's multi-paragraph weights_only error (which suggests loading with
    weights_only=False: never)."""
    text = str(e)
    m = _UNSAFE.search(text)
    if m:
        return f"it holds {m.group(1)}, which is not a tensor or an allowed DeepSpeed type"
    m = _BLOCKED.search(text)
    if m:
        return f"it holds {m.group(1)} from the blocked module {m.group(2)}"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "(1)", "(2)")):
            return line.removeprefix("WeightsUnpickler error: ")
    return type(e).__name__


def refused(file: Any, e: BaseException) -> CheckpointError:
    """The CheckpointError for what torch.load(weights_only=True) raised on `file`."""
    name = str(file) if isinstance(file, (str, Path)) else getattr(file, "name", repr(file))
    if isinstance(e, pickle.UnpicklingError):
        return CheckpointError(f"refused to load checkpoint file '{name}': {_reason(e)}; "
                               f"nothing in it was run")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"checkpoint file '{name}' is unreadable: {first}")


class EngineLike(Protocol):
    """What checkpoints need of parallel.engine.Engine (not imported here: the engine's load
    path imports this module's CheckpointError)."""

    def save(self, directory: str | Path, client_state: dict | None = None) -> None: ...

    def load(self, directory: str | Path) -> dict: ...


MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def read_marker(path: str | Path) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint directory; raises if it is missing or unreadable."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete (no {MARKER} marker)")
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint marker '{marker}' is unreadable: {e}") from None


def list_complete(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        try:
            read_marker(p)
        except (FileNotFoundError, ValueError):
            continue
        found.append((int(m.group(1)), p))
    return sorted(found)


def is_complete(run_dir: str | Path, step: int) -> bool:
    """Is there a complete checkpoint of `step` in `run_dir`?"""
    return (step_dir(run_dir, step) / MARKER).is_file()


def latest_complete(run_dir: str | Path) -> Path | None:
    """Newest checkpoint with a valid COMPLETE marker; temporary and incomplete dirs are ignored."""
    done = list_complete(run_dir)
    return done[-1][1] if done else None


def resume_path(run_dir: str | Path, cfg: CheckpointConfig) -> Path | None:
    """Where to resume from under `cfg` (None: start fresh)."""
    return latest_complete(run_dir) if cfg.resume else None


def should_save(step: int, cfg: CheckpointConfig, total_steps: int) -> bool:
    """Checkpoint after optimizer step `step` (1-based)? Every `cfg.every` steps and at the end."""
    return step == total_steps or (cfg.every > 0 and step % cfg.every == 0)


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, plus leftovers of crashed
    saves (temporary dirs, and step dirs without marker older than the newest complete one).
    Call only while no save is in progress. Returns what was removed."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = list_complete(run_dir)
    removed = [p for _, p in done[:-keep_last]]
    newest = done[-1][0] if done else None
    complete = {p for _, p in done}
    for p in checkpoints_dir(run_dir).iterdir() if checkpoints_dir(run_dir).is_dir() else ():
        m = _STEP_RE.match(p.name)
        if p.name.startswith(_TMP_PREFIX) or (
                m and p not in complete and newest is not None and int(m.group(1)) < newest):
            removed.append(p)
    for p in removed:
        log.info("checkpoint: removing %s", p)
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---- per-rank state -------------------------------------------------------------------------
def check_plain(obj: Any, key: str = "rank_state") -> None:
    """Raise TypeError naming the key unless `obj` holds only tensors and primitives
    (what torch.load(weights_only=True) accepts back)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{key}: key {k!r} must be str or int")
            check_plain(v, f"{key}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{key}[{i}]")
        return
    raise TypeError(f"{key}: {type(obj).__name__} cannot be checkpointed; "
                    f"use tensors, numbers, strings, lists and dicts")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)  # POSIX: fsync on a directory fd persists its entries


def _atomic_torch_save(obj: Any, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _write_marker(path: Path, content: dict[str, Any]) -> None:
    part = path / (MARKER + ".part")
    with open(part, "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path / MARKER)
    _fsync_dir(path)


def _finalize(tmp: Path, final: Path, marker: dict[str, Any]) -> None:
    """Rank 0: make the fully written temporary directory the checkpoint, marker last."""
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            _fsync_file(p)
    old = final.with_name(_TMP_PREFIX + "old-" + final.name)
    if final.exists():  # re-saving a step (e.g. after a resume): keep it until the new one lands
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _write_marker(final, marker)
    shutil.rmtree(old, ignore_errors=True)


# ---- save / load ----------------------------------------------------------------------------
@dataclass
class Restored:
    """What load_checkpoint hands back to the trainer."""
    step: int
    """Optimizer step the checkpoint was written after."""
    state: dict[str, Any] = field(default_factory=dict)
    """This rank's rank_state as given to save_checkpoint."""
    path: Path | None = None


def save_checkpoint(run_dir: str | Path, step: int, engines: Mapping[str, EngineLike],
                    rank_state: dict[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Collective: every rank calls with its own rank_state. Returns the checkpoint path."""
    rank_state = rank_state or {}
    check_plain(rank_state)
    rank, world = dist.get_rank(), dist.get_world_size()
    final = step_dir(run_dir, step)
    tmp = final.with_name(_TMP_PREFIX + final.name)
    t0 = time.perf_counter()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this step
        tmp.mkdir(parents=True)
    dist.barrier()
    for name, engine in engines.items():
        engine.save(tmp / name, client_state={"step": step})
    _atomic_torch_save({"rank": rank, "world_size": world, "step": step, "rng": rng_state(),
                        "state": rank_state}, tmp / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        _finalize(tmp, final, {"step": step, "world_size": world, "time": time.time(),
                               "engines": sorted(engines)})
        if keep_last is not None:
            prune(run_dir, keep_last)
        log.info("checkpoint: step %d saved to %s in %.2fs", step, final, time.perf_counter() - t0)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, engines: Mapping[str, EngineLike],
                    restore_rng: bool = True) -> Restored:
    """Collective: restore engines and this rank's state from a complete checkpoint."""
    path = Path(path)
    marker = read_marker(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    if marker.get("world_size") != world:
        raise ValueError(
            f"checkpoint '{path}' was written by {marker.get('world_size')} ranks but this job "
            f"has {world}; resume with num_workers={marker.get('world_size')} or start a new run")
    missing = sorted(set(engines) - set(marker.get("engines", [])))
    if missing:
        raise ValueError(f"checkpoint '{path}' has no engine named {missing[0]} "
                         f"(has: {', '.join(marker.get('engines', []))})")
    for name, engine in engines.items():
        engine.load(path / name)
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' lacks {rank_file.name}")
    try:  # tensors and plain values only: no allow-list here
        saved = torch.load(rank_file, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise refused(rank_file, e) from None
    if restore_rng:
        set_rng_state(saved["rng"])
    return Restored(step=int(marker["step"]), state=saved["state"], path=path)
