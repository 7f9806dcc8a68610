"""bench/gpu.py runs where no GPU is: one clear fallback line, then the same three parts
(training with MFU or 'n/a', KV-cache generation per batch size, one PPO iteration) on the
CPU with a tiny model. Figures are not checked (benchmarks print, never assert)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_gpu_bench_runs_and_falls_back_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32",
                     "--gen-batches", "1,4", "--gen-tokens", "8"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert out.splitlines()[0].startswith("no CUDA GPU here: CPU fallback")
    train = next(line for line in out.splitlines() if line.startswith("train:"))
    assert "tokens/s" in train and "MFU" in train
    assert "generate: batch    1" in out and "generate: batch    4" in out
    ppo = next(line for line in out.splitlines() if line.startswith("ppo: one iteration"))
    assert "generate" in ppo and "update" in ppo and "policy_loss" in ppo
