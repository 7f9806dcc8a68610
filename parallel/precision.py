"""precision "auto" (the default): bf16 where the device computes it natively and it pays,
else fp32.

GPUs: torch.cuda.is_bf16_supported() (Ampere and later), any model. CPUs: AVX512-BF16 or AMX
(Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4), for models at least
CPU_BF16_MIN_WIDTH wide; elsewhere bf16 is emulated and slower than fp32. Measured on an AMX
CPU (bench/pretrain.py, DeepSpeed engine step, bf16 vs fp32, 8 x 256 tokens, 1 / 2 threads):
d_model 256 2.14x / 1.93x, 128 1.35x / 1.22x, 64 1.31x / 1.16x [1.08..1.28]; nanoGPT's
character recipe (d_model 128, 12 x 64 tokens) 1.29x (bench/recipe.py). That is with
BF16_Optimizer at stage 0 and attention differentiated in fp32 (model.layers); before those,
bf16 lost at 128 (0.7-1.1x). 64 gains least and least surely, and the tests' tiny models (and
the meta demo's) are that wide, so the line is at 128.
bf16 keeps fp32 master weights in the optimizer (DeepSpeed); exports read the masters."""
from __future__ import annotations

import statistics

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_MIN_WIDTH = 128
"""Hidden width from which `auto` picks bf16 on a CPU with native bf16 (see above)."""


def bf16_support() -> tuple[bool, str]:
    """(native bf16 here?, what was found), for the device this process computes on."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    cpu = getattr(torch, "cpu", None)
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    avx = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    found = [n for n, f in (("AMX", amx), ("AVX512-BF16", avx)) if f]
    return bool(found), f"CPU with {' + '.join(found)}" if found else "CPU without AVX512-BF16/AMX"


def model_width(model: nn.Module) -> int | None:
    """The model's hidden width: the median input width of its linear layers (d_model for a
    transformer: q/k/v, output and MLP-in layers take d_model, only MLP-out takes 4x);
    None when it has none."""
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    return statistics.median_low(widths) if widths else None


def _choice(width: int | None) -> tuple[str, str]:
    """auto's (precision, reason) on this device for a model `width` wide (None: unknown)."""
    ok, why = bf16_support()
    if not ok:
        return "fp32", why
    if not torch.cuda.is_available() and width is not None and width < CPU_BF16_MIN_WIDTH:
        return "fp32", f"{why}, but width {width} < {CPU_BF16_MIN_WIDTH}: bf16 does not pay"
    return "bf16", why


def resolve_precision(precision: str, width: int | None = None) -> str:
    """'auto' -> 'bf16' or 'fp32' for this device and a model `width` wide (model_width;
    None: unknown, decided by the device alone); other values as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return _choice(width)[0] if precision == "auto" else precision


def describe_precision(precision: str, width: int | None = None) -> str:
    """One line for the start of a run, e.g. 'precision auto -> bf16 (CPU with AMX)'."""
    if precision != "auto":
        return f"precision {precision}"
    chosen, why = _choice(width)
    return f"precision auto -> {chosen} ({why})"
