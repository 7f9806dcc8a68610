"""parallel.precision=auto: bf16 where the device computes it natively, fp32 elsewhere; the
choice is one printed line; a tiny GPT trains to the same loss as fp32 within a tolerance.
Real DeepSpeed engines (world size 1, gloo)."""
from __future__ import annotations

import pytest
import torch

from trellis.model.build import build_model
from trellis.model.config import ModelConfig
from trellis.model.losses import token_cross_entropy
from trellis.parallel.batch import BatchPlan
from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.engine import ds_config
from trellis.parallel.precision import bf16_support, describe_precision, resolve_precision


def test_auto_follows_the_hardware_and_other_values_pass_through():
    native, why = bf16_support()
    assert resolve_precision("auto") == ("bf16" if native else "fp32")
    assert all(resolve_precision(p) == p for p in ("fp32", "bf16", "fp16"))
    line = describe_precision("auto")
    assert line.startswith(f"precision auto -> {resolve_precision('auto')} (") and why in line
    assert describe_precision("fp32") == "precision fp32"
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("fp8")
    par = ParallelConfig(precision="auto")
    cfg = ds_config(OptimConfig(), par, BatchPlan.from_config(par, 8))
    assert cfg["bf16"]["enabled"] == native and not cfg["fp16"]["enabled"]


@pytest.mark.integration
def test_auto_precision_trains_like_fp32_on_a_tiny_gpt():
    from trellis.parallel.engine import Engine
    cfg = ModelConfig.from_preset("gpt-tiny", vocab_size=64, max_seq_len=32)
    g = torch.Generator().manual_seed(0)
    # a learnable stream: each row counts up from a random start (mod 64)
    data = [(torch.randint(0, 64, (8, 1), generator=g) + torch.arange(17)) % 64
            for _ in range(30)]
    losses = {}
    for precision in ("fp32", "auto"):
        torch.manual_seed(0)
        engine = Engine(build_model(cfg), OptimConfig(lr=3e-3, warmup_steps=2),
                        ParallelConfig(micro_batch_size=8, precision=precision), total_steps=30)
        assert engine.precision == resolve_precision(precision)
        dtype = next(engine.module.parameters()).dtype
        assert dtype == (torch.bfloat16 if engine.precision == "bf16" else torch.float32)
        run = []
        for x in data:
            loss = token_cross_entropy(engine(x[:, :-1]), x[:, 1:])
            engine.backward(loss)
            engine.step()
            run.append(loss.item())
        losses[precision] = run
    fp32, auto = losses["fp32"], losses["auto"]
    assert fp32[-1] < 0.7 * fp32[0]  # it learned something
    tail = lambda r: sum(r[-5:]) / 5  # noqa: E731
    assert abs(tail(auto) - tail(fp32)) < 0.05 * tail(fp32)
