"""Engine in this process (world size 1, gloo): accumulation, our AdamW/clip/schedule
semantics against a plain torch loop, frozen engines, activation-checkpointing hook, LocalGroup."""
import copy
import os

import pytest
import torch
from torch import nn

from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.engine import Engine, param_groups, zero_init_context
from trellis.parallel.schedule import make_lambda_lr
from trellis.parallel.worker_group import LocalGroup, WorkerDied

VOCAB = 32


class TinyLM(nn.Module):
    """(B, T) token ids -> (B, T, V) logits; a LayerNorm so some params skip weight decay."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, VOCAB)
        self.checkpointing = False

    def set_activation_checkpointing(self, on: bool) -> None:
        self.checkpointing = on

    def forward(self, x):  # (B, T)
        return self.out(torch.tanh(self.fc(self.norm(self.emb(x)))))  # (B, T, V)


def batches(n: int, rows: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, 9), generator=g) for _ in range(n)]


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


OPT = OptimConfig(lr=5e-2, weight_decay=0.1, warmup_steps=2, min_lr_ratio=0.2, grad_clip=0.3)


def reference_run(model: nn.Module, data, accum: int, steps: int) -> tuple[list, list]:
    """The same training in plain torch: AdamW on our param groups, LambdaLR, clip_grad_norm_."""
    opt = torch.optim.AdamW(param_groups(model, OPT.weight_decay), lr=OPT.lr,
                            betas=tuple(OPT.betas), eps=OPT.eps)
    sched = make_lambda_lr(OPT, steps)(opt)
    norms, lrs = [], []
    for s in range(steps):
        opt.zero_grad()
        for mb in data[s * accum:(s + 1) * accum]:
            (lm_loss(model(mb[:, :-1]), mb) / accum).backward()
        lrs.append(opt.param_groups[0]["lr"])
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)))
        opt.step()
        sched.step()
    return norms, lrs


@pytest.mark.parametrize("par", [
    {"zero_stage": 0}, {"zero_stage": 2},
    {"zero_stage": 2, "offload_optimizer": True},
    {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
], ids=["zero0", "zero2", "zero2-offload", "zero3-offload"])
@pytest.mark.integration
def test_engine_matches_plain_torch_adamw_clip_schedule_with_accumulation(par):
    steps, accum = 4, 2
    data = batches(steps * accum)
    ref = make_model()
    engine = Engine(copy.deepcopy(ref), OPT, ParallelConfig(micro_batch_size=4, grad_accum=accum,
                                                            precision="fp32", **par),
                    total_steps=steps)
    ref_norms, ref_lrs = reference_run(ref, data, accum, steps)
    infos = []
    for i, mb in enumerate(data):
        engine.backward(lm_loss(engine(mb[:, :-1]), mb))
        info = engine.step()
        if (i + 1) % accum:
            assert info == {}  # inside the accumulation window: no optimizer step
        else:
            infos.append(info)
    assert [i["step"] for i in infos] == [1, 2, 3, 4] and engine.global_step == 4
    assert [i["lr"] for i in infos] == pytest.approx(ref_lrs, rel=1e-9)
    assert [i["grad_norm"] for i in infos] == pytest.approx(ref_norms, rel=1e-5)
    assert max(ref_norms) > OPT.grad_clip  # clipping was really exercised
    got = engine.consolidated_state_dict()
    for k, v in ref.state_dict().items():
        assert torch.allclose(got[k], v, atol=2e-6), (k, (got[k] - v).abs().max())


@pytest.mark.integration
def test_bf16_engine_trains_close_to_fp32():
    data = batches(6)
    runs = {}
    for precision in ("fp32", "bf16"):
        engine = Engine(make_model(), OPT, ParallelConfig(zero_stage=2, precision=precision),
                        total_steps=6)
        runs[precision] = []
        for mb in data:
            loss = lm_loss(engine(mb[:, :-1]), mb)
            engine.backward(loss)
            info = engine.step()
            runs[precision].append(loss.item())
        assert info["grad_norm"] > 0
        assert next(engine.module.parameters()).dtype == getattr(torch, {"fp32": "float32"}.get(
            precision, "bfloat16"))
    assert max(abs(a - b) for a, b in zip(runs["fp32"], runs["bf16"])) < 0.05


@pytest.mark.integration
def test_frozen_engine_infers_without_optimizer(tmp_path):
    model = make_model(1)
    expected = model(batches(1)[0][:, :-1])
    engine = Engine(model, None, ParallelConfig(zero_stage=3, precision="fp32"), total_steps=0,
                    trainable=False)  # fp32: the toy model takes float features, compared at 1e-6
    assert "optimizer" not in engine.config
    # One frozen rank has nothing to partition: stage 0, no gather hooks (offload keeps 3).
    assert engine.zero_stage == 0 and not any(hasattr(p, "ds_id") for p in engine.module.parameters())
    with torch.no_grad():
        out = engine(batches(1)[0][:, :-1])
    assert torch.allclose(out, expected, atol=1e-6)
    assert not any(p.requires_grad for p in engine.module.parameters())
    with pytest.raises(RuntimeError, match="frozen"):
        engine.backward(out.sum())
    with pytest.raises(RuntimeError, match="frozen"):
        engine.step()


@pytest.mark.integration
def test_activation_checkpointing_hook_is_called_only_when_asked():
    on = Engine(make_model(), OPT, ParallelConfig(activation_checkpointing=True), total_steps=1)
    off = Engine(make_model(), OPT, ParallelConfig(), total_steps=1)
    assert on.module.checkpointing is True and off.module.checkpointing is False


@pytest.mark.integration
def test_parallel_activation_checkpointing_recomputes_gpt_blocks_same_grads():
    """parallel.activation_checkpointing (the one switch) sets the flag on the engine's GPT
    trunk; its blocks then run twice per step (forward + recompute in backward) and the
    gradients equal those without checkpointing."""
    from trellis.model import GPT, ModelConfig

    cfg = ModelConfig(arch="gpt", vocab_size=VOCAB, n_layer=3, n_head=2, d_model=32,
                      max_seq_len=16, dropout=0.1)
    mb = batches(1)[0]
    result = {}
    for on in (False, True):
        torch.manual_seed(0)
        engine = Engine(GPT(cfg), OPT, ParallelConfig(activation_checkpointing=on), total_steps=1)
        assert engine.module.activation_checkpointing is on
        calls = []
        for block in engine.module.h:
            block.register_forward_pre_hook(lambda *_: calls.append(1))
        engine.train()
        torch.manual_seed(1)  # same dropout masks in both runs
        engine.backward(lm_loss(engine(mb[:, :-1]), mb))
        grads = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
        result[on] = (len(calls), grads)
    assert result[False][0] == cfg.n_layer and result[True][0] == 2 * cfg.n_layer
    for n, g in result[False][1].items():
        assert torch.allclose(result[True][1][n], g, atol=1e-6), n


@pytest.mark.integration
def test_zero3_numel_and_zero_init_context_at_world_one():
    par = ParallelConfig(zero_stage=3, micro_batch_size=4)
    torch.manual_seed(0)
    with zero_init_context(par):
        model = TinyLM()  # built already partitioned: parameters are placeholders
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    engine = Engine(model, OPT, par, total_steps=3)
    n = sum(p.numel() for p in make_model().parameters())
    assert engine.global_param_numel() == n and engine.local_param_numel() == n  # one rank
    losses = []
    for mb in batches(3):
        loss = lm_loss(engine(mb[:, :-1]), mb)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.integration
def test_stage0_checkpoint_consolidates_and_load_needs_a_checkpoint(tmp_path):
    engine = Engine(make_model(), OPT, ParallelConfig(), total_steps=2)
    mb = batches(1)[0]
    engine.backward(lm_loss(engine(mb[:, :-1]), mb))
    engine.step()
    engine.save(tmp_path / "e", {"note": "x"})
    sd = Engine.consolidate(tmp_path / "e")
    live = engine.consolidated_state_dict()
    assert set(sd) == set(live) and all(torch.equal(sd[k], live[k]) for k in sd)
    assert engine.load(tmp_path / "e")["note"] == "x"
    with pytest.raises(FileNotFoundError, match="no engine checkpoint"):
        Engine.consolidate(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no engine checkpoint"):
        engine.load(tmp_path / "missing")


class Counter:
    """A worker class for LocalGroup: built as Counter(rank, world_size, start=...)."""

    def __init__(self, rank, world_size, start=0):
        self.rank, self.world, self.n = rank, world_size, start

    def add(self, k):
        self.n += k
        return self.n


@pytest.mark.integration
def test_local_group_interface_in_process():
    with LocalGroup(Counter, ParallelConfig(), worker_kwargs={"start": 5}) as group:
        assert group.call("add", 2) == [7]
        assert group.get(group.call_async("add", 1)) == [8]
        assert group.call_scatter("add", [10]) == [18]
        assert group.pids() == [os.getpid()] and group.actor_names == ["local/rank0"]
        with pytest.raises(ValueError, match="2 per-rank arguments for 1 rank"):
            group.call_scatter("add", [1, 2])
        group.kill_rank(0)
        with pytest.raises(WorkerDied, match="local/rank0 died"):
            group.call("add", 1)
    with pytest.raises(ValueError, match="LocalGroup runs one rank"):
        LocalGroup(Counter, ParallelConfig(num_workers=2))


@pytest.mark.integration
def test_worker_class_by_import_path():
    with LocalGroup("test_parallel_engine:Counter", ParallelConfig()) as group:
        assert group.call("add", 3) == [3]
    with pytest.raises(ValueError, match="worker class 'no_such_module:X'"):
        LocalGroup("no_such_module:X", ParallelConfig())
