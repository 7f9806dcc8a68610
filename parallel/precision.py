"""precision "auto" (the default): bf16 where the device computes it natively and it pays,
else fp32.

GPUs: torch.cuda.is_bf16_supported() (Ampere and later), any model. CPUs: AVX512-BF16 or AMX
(Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4), for models at least
CPU_BF16_MIN_WIDTH wide; elsewhere bf16 is emulated and slower than fp32. Measured on an AMX
CPU (DeepSpeed bf16 vs fp32 engine step, 1 thread): d_model 384 1.8x faster, 256 1.6x; at
128 the casts and the bf16 optimizer's master copies eat the gain (1.12x at 8 x 256 tokens
per step, 0.7x on nanoGPT's character recipe, 12 x 64), so small models stay in fp32 there.
bf16 keeps fp32 master weights in the optimizer (DeepSpeed); exports read the masters."""
from __future__ import annotations

import statistics

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_MIN_WIDTH = 256
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
