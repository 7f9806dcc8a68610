"""Bytes an Engine's rank really holds, counted from its live tensors (each storage once):
what `trellis plan` (parallel/memory_plan.py) is checked against, and what bench/pretrain.py
prints. Categories, the first that claims a storage wins:

    params   module parameters (ZeRO-3: this rank's ds_tensor partitions)
    master   fp32 master copies the ZeRO optimizer keeps of its partition (stage 1/2
             single_partition_of_fp32_groups, stage 3 fp32_partitioned_groups_flat; none
             when they share the parameters' storage)
    state    optimizer state (AdamW exp_avg, exp_avg_sq)
    grads    gradients (module .grad, and tensors of the ZeRO optimizer named for gradients)
    other    further tensors of the ZeRO optimizer (communication buckets: torch.empty, mostly
             untouched pages on CPU), not in "total"
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def _tensors(obj: Any, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) pairs reachable from a DeepSpeed/torch optimizer object's attributes."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if depth == 0 or id(obj) in seen or isinstance(obj, nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            yield from _tensors(v, f"{path}[{k if isinstance(k, (str, int)) else '.'}]",
                                depth - 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", depth - 1, seen)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for k, v in list(vars(obj).items()):
            yield from _tensors(v, f"{path}.{k}", depth - 1, seen)


def held_bytes(engine: Any) -> dict[str, Any]:
    """{params, grads, master, state, other, total (the first four), biggest_other (path,
    bytes)} of a parallel.engine.Engine on this rank."""
    ds = engine._ds
    opt = ds.optimizer
    inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
    counted: set[int] = set()
    sizes: dict[str, Any] = {k: 0 for k in ("params", "grads", "master", "state", "other")}
    sizes["biggest_other"] = ("", 0)

    def add(cat: str, t: torch.Tensor | None, path: str = "") -> None:
        if t is None or t.numel() == 0 or t.device.type == "meta":
            return
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in counted:
            counted.add(s.data_ptr())
            sizes[cat] += s.nbytes()
            if cat == "other" and s.nbytes() > sizes["biggest_other"][1]:
                sizes["biggest_other"] = (path, s.nbytes())

    params = list(engine.module.parameters())
    for p in params:
        add("params", p.data)
        add("params", getattr(p, "ds_tensor", None))
    for attr in _MASTER_ATTRS:  # ZeRO-3 swaps these in and out of inner.param_groups
        for t in getattr(opt, attr, None) or []:
            add("master", t)
    if inner is not None:
        for st in inner.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    add("state", v)
        for group in inner.param_groups:
            for p in group["params"]:
                add("master", p)
    for p in params:
        add("grads", p.grad)
    if opt is not None:
        for path, t in _tensors(opt, "opt", 6, set()):
            last = path.rsplit(".", 1)[-1].lower()
            add("grads" if "grad" in last or path.endswith(".grad") else "other", t, path)
    sizes["total"] = sizes["params"] + sizes["grads"] + sizes["master"] + sizes["state"]
    return sizes
