"""Peak dense FLOP/s by device name, for MFU (model FLOPs utilisation) in the step log."""
from __future__ import annotations

# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s.
# Key: a substring of torch.cuda.get_device_name().
_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (e.g. a CPU): MFU is then not shown."""
    for key, table in _PEAKS.items():
        if key in device_name:
            return table.get(precision) or None
    return None


def current_device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
