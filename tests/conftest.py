"""Test-wide environment: CPU DeepSpeed, Ray on loopback, JIT ops cached in build/."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Threads sleep instead of spinning when waiting: tests, actors and others share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
