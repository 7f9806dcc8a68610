"""Loading checkpoint files without running code from them.

`torch.load(weights_only=False)` unpickles: a file can name any importable callable and have
it called (`os.system`, `pathlib.Path.touch`, ...). DeepSpeed's torch checkpoint engine and
its `zero_to_fp32` pass weights_only=False explicitly, so loading an engine checkpoint through
them runs whatever the file holds. trellis keeps DeepSpeed's checkpoint layout but loads every
file of it with `torch.load(weights_only=True)`: tensors, containers and primitives, plus the
few DeepSpeed types listed in DEEPSPEED_GLOBALS, and nothing else.

    check_files(tag_dir.glob("*.pt"))  # static scan first: every rank refuses up front
    with safe_torch_load():            # around a DeepSpeed call that loads files
        engine.load_checkpoint(...)    # each torch.load inside is forced to weights_only=True
    state = load_file(path)            # trellis's own reads

A refused or unreadable file raises CheckpointError, one line naming the file; the refusal
happens while reading the pickle's GLOBAL opcode, before anything is called.

`safe_torch_load` swaps `torch.load` for the duration: DeepSpeed passes weights_only=False
explicitly, its checkpoint engine is only one of its load paths (zero_to_fp32 calls torch.load
itself), and torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD would hold for the whole process and its
children, not just the load, and cannot name the file in its error. The swap is process-wide: a torch.load on another thread meanwhile is forced to weights_only=True
as well, which is stricter, never looser. Nested and concurrent uses share one swap.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from trellis.parallel.checkpoint import LOAD_ERRORS, CheckpointError, refused

_torch_load: Callable[..., Any] = torch.load  # the real one, kept before any swap

# The non-tensor globals DeepSpeed 0.19.8 writes into an engine checkpoint, found by
# experiment (torch.serialization.get_unsafe_globals_in_checkpoint on every file written by
# Engine.save): ZeRO 0, 1, 2, 3; fp32, bf16 and fp16; with and without optimizer offload (and
# ZeRO-3 parameter offload); 1 and 2 ranks. The model-state files (mp_rank_00_model_states.pt,
# zero_pp_rank_*_model_states.pt) need none at any stage; ZeRO-0 checkpoints need none at all.
# Everything below sits in the ZeRO optimizer state (*optim_states.pt, ZeRO >= 1). Allowing a
# class lets a file construct it (cls.__new__, then __dict__ updated with plain values, or its
# Enum/dataclass constructor with plain arguments); none of these runs code on construction.
# (module, class name), imported lazily so that importing this module does not import DeepSpeed.
DEEPSPEED_GLOBALS: tuple[tuple[str, str], ...] = (
    # optimizer_state_dict['zero_stage']: ZeRO 1, 2, 3 (an int Enum; zero_to_fp32 reads it to
    # pick the stage's layout).
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    # optimizer_state_dict['param_slice_mappings']: ZeRO 1 and 2 (a dataclass of two ints,
    # numel and start, per parameter fragment; used by universal checkpoints).
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    # optimizer_state_dict['loss_scaler']: ZeRO 1, 2, 3 with fp32 and bf16 (static scale 1; a
    # plain object whose __dict__ holds cur_scale and dynamic; load_state_dict puts it back as
    # the live loss scaler).
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    # The same key with fp16 (dynamic loss scaling, trellis's fp16 setting): ints, floats,
    # bools and a torch dtype in its __dict__. fp16 is GPU-only in DeepSpeed; measured on CPU by
    # forcing the accelerator's fp16 support on (ZeRO 0-3 saved, resumed and consolidated).
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


@functools.cache
def allowed_globals() -> tuple[type, ...]:
    """The classes of DEEPSPEED_GLOBALS (imports DeepSpeed on first call)."""
    import importlib
    return tuple(getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_GLOBALS)


def load_file(f: Any, map_location: Any = "cpu", allow: tuple[type, ...] = (),
              **kw: Any) -> Any:
    """torch.load(f, weights_only=True) with `allow` (classes) added to what may be built;
    CheckpointError naming `f` when the file is refused or unreadable."""
    extra = [c for c in allow if c not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(extra):  # removes on exit only what it added
        try:
            return _torch_load(f, map_location=map_location, weights_only=True, **kw)
        except LOAD_ERRORS as e:
            raise refused(f, e) from None


def check_files(files: Iterable[str | Path]) -> None:
    """Refuse any file whose pickle names a global outside torch's weights_only set and
    DEEPSPEED_GLOBALS, by a static scan of its opcodes (nothing is loaded or run). Called on
    a whole engine checkpoint before DeepSpeed loads any of it, so every rank refuses the same
    checkpoint up front instead of failing part-way through a collective load; the forced
    weights_only load stays the guarantee (a file the scan cannot read is left to it)."""
    allowed = {f"{m}.{n}" for m, n in DEEPSPEED_GLOBALS}
    for f in files:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed
        except (ValueError, RuntimeError, EOFError, KeyError):  # not a zip checkpoint, damaged
            continue
        if unsafe:
            raise CheckpointError(f"refused to load checkpoint file '{f}': it holds "
                                  f"{sorted(unsafe)[0]}, which is not a tensor or an allowed "
                                  f"DeepSpeed type; nothing in it was run")


# ---- forcing weights_only on torch.load while DeepSpeed loads ---------------------------------
_lock = threading.Lock()
_depth = 0  # safe_torch_load contexts open, all threads
_allowed: Any = None  # the torch.serialization.safe_globals context they share
# Per thread: contexts open (depth) and the first refusal inside them (error), kept in case
# the caller swallows it.
_state = threading.local()


def _forced_load(f: Any, map_location: Any = None, pickle_module: Any = None, *,
                 weights_only: bool | None = None, mmap: bool | None = None, **kw: Any) -> Any:
    """torch.load as DeepSpeed calls it, with weights_only=True whatever it asked for."""
    del pickle_module, weights_only  # an explicit pickle module would unpickle freely
    try:
        return _torch_load(f, map_location=map_location, weights_only=True, mmap=mmap, **kw)
    except LOAD_ERRORS as e:
        err = refused(f, e)
        if getattr(_state, "depth", 0) and _state.error is None:
            _state.error = err
        raise err from None


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """For its duration, every torch.load in this process loads weights_only=True with
    DEEPSPEED_GLOBALS allowed. A refused or unreadable file raises CheckpointError naming it,
    also when the caller (DeepSpeed) catches the first error and carries on or re-wraps it;
    any other error in the body propagates unchanged."""
    global _depth, _allowed
    allow = list(allowed_globals())
    with _lock:
        if _depth == 0:
            _allowed = torch.serialization.safe_globals(allow)
            _allowed.__enter__()
            torch.load = torch.serialization.load = _forced_load
        _depth += 1
    outer = getattr(_state, "error", None)
    _state.error = None
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        if _state.error is not None:  # DeepSpeed re-wrapped our refusal
            raise _state.error from e
        raise
    else:
        if _state.error is not None:  # DeepSpeed swallowed it: never carry on half-loaded
            raise _state.error
    finally:
        _state.error = outer
        _state.depth -= 1
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load = torch.serialization.load = _torch_load
                _allowed.__exit__(None, None, None)
                _allowed = None
