"""parallel.precision=auto (the default): bf16 where the device computes it natively, fp32
elsewhere; the choice is one printed line; a tiny GPT trains to the same loss in bf16 as in
fp32 within a tolerance.
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
from trellis.parallel.precision import (CPU_BF16_MIN_WIDTH, bf16_support, describe_precision,
                                        model_width, resolve_precision)


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


def test_auto_keeps_narrow_models_in_fp32_on_cpu():
    """On a CPU, bf16 pays from CPU_BF16_MIN_WIDTH on (measured: d_model 64 1.16-1.31x of
    fp32's speed, 128 1.22-1.35x, 256 1.9-2.1x); on a GPU any width takes bf16."""
    native, _ = bf16_support()
    gpu = torch.cuda.is_available()
    narrow, wide = CPU_BF16_MIN_WIDTH // 2, CPU_BF16_MIN_WIDTH
    assert resolve_precision("auto", wide) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", narrow) == ("bf16" if native and gpu else "fp32")
    assert resolve_precision("bf16", narrow) == "bf16"  # an explicit choice stands
    if native and not gpu:
        assert describe_precision("auto", narrow).startswith("precision auto -> fp32 (CPU with")
        assert f"width {narrow} < {CPU_BF16_MIN_WIDTH}" in describe_precision("auto", narrow)


def test_model_width_is_d_model():
    for arch, head, d in (("gpt", "lm", 96), ("bert", "mlm", 160), ("gpt", "value", 128)):
        cfg = ModelConfig.from_preset("gpt-tiny", arch=arch, vocab_size=64, max_seq_len=16,
                                      d_model=d, n_head=4)
        assert model_width(build_model(cfg, head)) == d, (arch, head)
    assert model_width(torch.nn.Embedding(4, 4)) is None


@pytest.mark.integration
def test_the_engine_resolves_auto_from_the_models_width():
    from trellis.parallel.engine import Engine
    for d in (CPU_BF16_MIN_WIDTH // 2, CPU_BF16_MIN_WIDTH):
        cfg = ModelConfig.from_preset("gpt-tiny", vocab_size=64, max_seq_len=16, d_model=d,
                                      n_head=4, n_layer=1)
        engine = Engine(build_model(cfg), OptimConfig(), ParallelConfig(), total_steps=1)
        assert engine.requested_precision == "auto" and engine.width == d
        assert engine.precision == resolve_precision("auto", d) == engine.par.precision
        assert engine.config["bf16"]["enabled"] == (engine.precision == "bf16")
        dtype = next(engine.module.parameters()).dtype
        assert dtype == (torch.bfloat16 if engine.precision == "bf16" else torch.float32)


def test_auto_is_the_default_of_every_training_job():
    import dataclasses

    from trellis.launcher.registry import COMMANDS

    def parallels(cls: type) -> list[ParallelConfig]:  # the ParallelConfig defaults, nested
        out = []
        for f in dataclasses.fields(cls):
            if f.default_factory is dataclasses.MISSING:
                continue
            v = f.default_factory()
            if isinstance(v, ParallelConfig):
                out.append(v)
            elif dataclasses.is_dataclass(v):
                out += parallels(type(v))
        return out

    assert ParallelConfig().precision == "auto"
    for name in ("pretrain", "sft", "rm", "finetune", "ppo", "dpo", "eval"):
        pars = parallels(COMMANDS[name].config_class())
        assert pars and all(p.precision == "auto" for p in pars), name


@pytest.mark.integration
def test_bf16_and_auto_train_like_fp32_on_a_tiny_gpt():
    from trellis.parallel.engine import Engine
    cfg = ModelConfig.from_preset("gpt-tiny", vocab_size=64, max_seq_len=32)
    g = torch.Generator().manual_seed(0)
    # a learnable stream: each row counts up from a random start (mod 64)
    data = [(torch.randint(0, 64, (8, 1), generator=g) + torch.arange(17)) % 64
            for _ in range(30)]
    losses = {}
    for precision in ("fp32", "bf16", "auto"):
        torch.manual_seed(0)
        engine = Engine(build_model(cfg), OptimConfig(lr=3e-3, warmup_steps=2),
                        ParallelConfig(micro_batch_size=8, precision=precision), total_steps=30)
        assert engine.precision == resolve_precision(precision, cfg.d_model)
        dtype = next(engine.module.parameters()).dtype
        assert dtype == (torch.bfloat16 if engine.precision == "bf16" else torch.float32)
        run = []
        for x in data:
            loss = token_cross_entropy(engine(x[:, :-1]), x[:, 1:])
            engine.backward(loss)
            engine.step()
            run.append(loss.item())
        losses[precision] = run
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert fp32[-1] < 0.7 * fp32[0]  # it learned something
    tail = lambda r: sum(r[-5:]) / 5  # noqa: E731
    assert abs(tail(bf16) - tail(fp32)) < 0.05 * tail(fp32)
    assert bf16 != fp32  # bf16 really computed in bf16
    assert losses["auto"] == losses[resolve_precision("auto", cfg.d_model)]


@pytest.mark.integration
def test_bf16_at_stage0_accumulates_in_fp32_and_checkpoints_its_masters(tmp_path):
    """A trainable bf16 engine asked for ZeRO-0 runs DeepSpeed's BF16_Optimizer (stage 1):
    gradients accumulate over micro-batches in fp32, the checkpoint's consolidated weights
    are the fp32 masters (the live bf16 weights are them rounded), and a resumed engine
    continues the run exactly."""
    from trellis.parallel.engine import Engine
    cfg = ModelConfig.from_preset("gpt-tiny", vocab_size=64, max_seq_len=32)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 64, (4, 1), generator=g) + torch.arange(17)) % 64
            for _ in range(16)]
    par = ParallelConfig(micro_batch_size=4, grad_accum=2, precision="bf16", zero_stage=0)

    def engine() -> Engine:
        torch.manual_seed(0)
        return Engine(build_model(cfg), OptimConfig(lr=3e-3, warmup_steps=2), par,
                      total_steps=8)

    def train(e: Engine, batches: list[torch.Tensor]) -> list[float]:
        out = []
        for x in batches:
            loss = token_cross_entropy(e(x[:, :-1]), x[:, 1:])
            e.backward(loss)
            e.step()
            out.append(loss.item())
        return out

    a = engine()
    assert a.zero_stage == 1 and type(a._ds.optimizer).__name__ == "BF16_Optimizer"
    assert all(b.dtype == torch.float32 for b in a._ds.optimizer.fp32_groups_gradients_flat)
    # one rank: no gradient all-reduce, which changes nothing but the time it took; where
    # there is one, it runs in fp32 (bf16 would round the fp32-accumulated gradients)
    assert not a._ds.enable_backward_allreduce
    assert a._ds.communication_data_type == torch.float32
    reduced = engine()
    reduced._ds.enable_backward_allreduce = True
    first = train(a, data[:8])
    assert train(reduced, data[:8]) == first
    a.save(tmp_path)
    live = a.consolidated_state_dict()  # the bf16 weights, upcast
    masters = Engine.consolidate(tmp_path)
    assert set(masters) == set(live)
    assert all(torch.equal(m.bfloat16().float(), live[k]) for k, m in masters.items())
    assert any(not torch.equal(m, live[k]) for k, m in masters.items())
    rest = train(a, data[8:])
    b = engine()
    b.load(tmp_path)
    assert b.global_step == 4
    assert train(b, data[8:]) == rest


def test_cpu_bf16_attention_is_differentiated_in_fp32_below_512_keys():
    """torch's CPU flash attention differentiates slowly in bf16 at short lengths, so
    model.layers.attention computes it in fp32 there (bf16 in and out); generation (no grad)
    and long sequences keep the bf16 kernel."""
    import torch.nn.functional as F

    from trellis.model.layers import CPU_BF16_ATTN_FP32_BELOW, _attend_in_fp32, attention
    g = torch.Generator().manual_seed(0)

    def qkv(T: int, grad: bool) -> list[torch.Tensor]:
        return [torch.randn(2, 2, T, 8, generator=g).bfloat16().requires_grad_(grad)
                for _ in range(3)]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(16, True)
    out = attention(q, k, v, None, causal=True, dropout=0.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sdpa(q.float(), k.float(), v.float()).bfloat16())
    assert not torch.equal(out, sdpa(q, k, v))  # the bf16 kernel rounds differently
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    assert _attend_in_fp32(q, k)
    assert not _attend_in_fp32(*qkv(16, False)[:2])  # generation: the bf16 kernel
    assert not _attend_in_fp32(*qkv(CPU_BF16_ATTN_FP32_BELOW, True)[:2])
    assert not _attend_in_fp32(*[t.float() for t in qkv(16, True)[:2]])
