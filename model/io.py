"""trellis's own weight files: model.safetensors + model.json (ModelConfig and head name).

Used between stages (pretrain -> SFT -> RM -> PPO) for any head, including the score and
value heads that have no Hugging Face architecture; `model.hf` writes the HF format.
Loading never unpickles: safetensors and JSON only.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trellis.model.build import build_model
from trellis.model.config import ModelConfig

WEIGHTS, META = "model.safetensors", "model.json"


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings): safetensors refuses
    shared tensors, and load_state_dict re-ties them by module structure."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def save_module(module: nn.Module, cfg: ModelConfig, head: str, out_dir: str | Path,
                extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(_unshared(module.state_dict()), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    meta = {"model": dataclasses.asdict(cfg), "head": head, **(extra or {})}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _tie_groups(module: nn.Module) -> list[set[str]]:
    """Names of parameters that are one tensor (tied embeddings), read off the module."""
    groups: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every weight of `module` from `state` (a tied tensor may be stored under one of
    its names only); anything else missing or unexpected is an error naming `where`."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    covered = {n for g in _tie_groups(module) if g - set(missing) for n in g}
    real = [k for k in missing if k not in covered]
    if real or unexpected:
        raise ValueError(f"'{where}' does not match the model: missing {real[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")


def is_module_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file() and (Path(path) / WEIGHTS).is_file()


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def load_module(path: str | Path, head: str | None = None) -> tuple[nn.Module, ModelConfig, dict]:
    """(module, its config, model.json). `head` builds another head on the saved trunk
    (e.g. a value model from a reward model's weights); the trunk must then match."""
    path = Path(path)
    if not is_module_dir(path):
        raise FileNotFoundError(f"'{path}' has no {META} + {WEIGHTS}")
    meta = read_meta(path)
    cfg = ModelConfig.from_saved(meta["model"])
    state = load_file(str(path / WEIGHTS))
    module = build_model(cfg, head or meta["head"])
    if head is None or head == meta["head"]:
        load_full_state_dict(module, state, str(path / WEIGHTS))
    else:
        from trellis.model.heads import load_trunk_state_dict
        trunk = module.trunk if hasattr(module, "trunk") else module
        load_trunk_state_dict(trunk, _trunk_state(state, meta["head"]))
        if head == "value" and meta["head"] == "score":
            _value_head_from_score_head(module, state)
    return module, cfg, meta


@torch.no_grad()
def _value_head_from_score_head(value_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A critic started from a reward model takes its (normalised) score head too, so V(s_t)
    starts as the RM's score of the prefix rather than noise (DeepSpeed-Chat's critic is the
    RM itself): w' = w / std, b' = (b - mean) / std."""
    std, mean = state["norm_std"].float(), state["norm_mean"].float()
    value_model.value_head.weight.copy_(state["score_head.weight"] / std)
    value_model.value_head.bias.copy_((state["score_head.bias"] - mean) / std)


def _trunk_state(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """The trunk's weights out of a saved module of head `head`."""
    if head in ("value", "score"):
        state = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    if "wte.weight" in state:  # GPT's tied LM head was stored once, under wte
        state = {**state, "lm_head.weight": state["wte.weight"]}
    return state
