"""Real Ray actors forming gloo groups that train real DeepSpeed engines on a tiny LM.

One local Ray (num_cpus=2, loopback) per module; one 2-rank training group shared by the
ZeRO tests, plus short-lived groups for the 1-rank, Echo and crash cases.
"""
import os
import sys
import threading
import time

import pytest
import torch
from torch import nn

from trellis.parallel import checkpoint as ckpt
from trellis.parallel import dist
from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.engine import Engine
from trellis.parallel.worker_group import LocalGroup, WorkerDied, WorkerGroup, ensure_ray

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration

VOCAB, SEQ, GLOBAL_BATCH = 64, 16, 8
# Deadline for an event that should come within seconds (a death noticed, a start given up):
# generous on any machine, and well below the process group's 600 s collective timeout.
EVENT_DEADLINE_S = 300


class TinyLM(nn.Module):
    """Embedding -> 2-layer MLP -> vocab logits, per position: (B, T) -> (B, T, V)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, x):  # (B, T)
        return self.fc2(torch.relu(self.fc1(self.emb(x))))  # (B, T, V)


def global_batch(step: int) -> torch.Tensor:
    """Deterministic (GLOBAL_BATCH, SEQ+1) tokens for a step; next token = 5*tok+3 mod V."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    seq = [start]
    for _ in range(SEQ):
        seq.append((seq[-1] * 5 + 3) % VOCAB)
    return torch.cat(seq, dim=1)


class TinyTrainer:
    """Worker class: constructed in each actor as TinyTrainer(rank, world_size)."""

    def __init__(self, rank: int, world_size: int):
        torch.set_num_threads(1)  # same arithmetic in the driver (LocalGroup) and in actors
        self.rank, self.world = rank, world_size
        self.engine = None

    def build(self, par: dict, total_steps: int = 20, lr: float = 3e-2) -> int:
        # fp32 unless asked: these tests compare ranks and checkpoints bit for bit
        self.par = ParallelConfig(num_workers=self.world, **{"precision": "fp32", **par})
        torch.manual_seed(0)  # identical init on every rank
        self.engine = Engine(TinyLM(), OptimConfig(lr=lr, warmup_steps=2), self.par, total_steps)
        self.step_idx = 0
        return os.getpid()

    def _micro_batches(self, step: int):
        rows = global_batch(step)
        per_rank = GLOBAL_BATCH // self.world
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        mb = self.par.micro_batch_size
        assert per_rank == mb * self.par.grad_accum, "test plan must cover the global batch"
        return [mine[i:i + mb] for i in range(0, per_rank, mb)]

    def train(self, steps: int) -> dict:
        """`steps` optimizer steps; mean loss of each global batch (same on every rank)."""
        losses, t0 = [], time.perf_counter()
        for _ in range(steps):
            micro = []
            for mb in self._micro_batches(self.step_idx):
                logits = self.engine(mb[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), mb[:, 1:].reshape(-1))
                self.engine.backward(loss)
                info = self.engine.step()
                micro.append(loss.item())
            assert info["step"] == self.engine.global_step and "lr" in info and "grad_norm" in info
            losses.append(dist.all_reduce_mean(sum(micro) / len(micro)))
            self.step_idx += 1
        return {"losses": losses, "sec_per_step": (time.perf_counter() - t0) / steps}

    def numel(self) -> tuple[int, int]:
        return self.engine.local_param_numel(), self.engine.global_param_numel()

    def state_dict(self) -> dict:
        return self.engine.consolidated_state_dict()

    def save(self, run_dir: str, crash_rank: int = -1) -> str:
        state = {"step_idx": self.step_idx, "rank": self.rank}
        if self.rank == crash_rank:
            state = _DieWhenPickled(state)  # this process dies inside torch.save of rank_<r>.pt
        path = ckpt.save_checkpoint(run_dir, self.engine.global_step, {"model": self.engine},
                                    rank_state=state, keep_last=2)
        return str(path)

    def load(self, run_dir: str) -> int:
        restored = ckpt.load_checkpoint(ckpt.latest_complete(run_dir), {"model": self.engine})
        assert restored.state["rank"] == self.rank
        self.step_idx = restored.state["step_idx"]
        return restored.step


class _DieWhenPickled(dict):
    def __reduce__(self):
        os._exit(17)


class Echo:
    """A worker without an engine: rank bookkeeping and one gloo all-reduce."""

    def __init__(self, rank: int, world_size: int, tag: str = ""):
        self.rank, self.world, self.tag = rank, world_size, tag

    def whoami(self) -> tuple:
        return self.rank, self.world, self.tag, os.getpid()

    def fail(self) -> None:
        raise KeyError(f"no such thing on rank {self.rank}")

    def all_reduce(self, x: float) -> float:
        t = torch.tensor([x + self.rank])
        torch.distributed.all_reduce(t)
        return float(t.item())


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # Actors unpickle the worker classes by value: this test module is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ensure_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair():
    group = WorkerGroup(TinyTrainer, ParallelConfig(num_workers=2, cpus_per_worker=0.4),
                        role="zero-test")
    yield group
    group.shutdown()


def par2(stage: int) -> dict:
    return {"zero_stage": stage, "micro_batch_size": GLOBAL_BATCH // 2, "grad_accum": 1}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_lowers_loss_at_world_two(pair, stage):
    pair.call("build", par2(stage))
    out = pair.call("train", 20)
    losses = out[0]["losses"]
    assert out[0]["losses"] == out[1]["losses"]  # all-reduced: both ranks see the same mean
    assert losses[-1] < 0.5 * losses[0], losses
    print(f"ZeRO-{stage} ws2: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{out[0]['sec_per_step'] * 1e3:.1f} ms/step")
    local, total = zip(*pair.call("numel"))
    if stage == 3:
        assert total[0] == total[1] == sum(p.numel() for p in TinyLM().parameters())
        for n in local:
            assert abs(n / total[0] - 0.5) < 0.02, (local, total)
        print(f"ZeRO-3 local/global numel: {local} / {total[0]} = {local[0] / total[0]:.4f}")
    else:
        assert local == total


def test_zero3_consolidated_checkpoint_equals_gathered_params(pair, tmp_path):
    pair.call("build", par2(3))
    pair.call("train", 3)
    gathered = pair.call("state_dict")  # collective gather of the live ZeRO-3 params
    path = pair.call("save", str(tmp_path))[0]
    fp32 = Engine.consolidate(os.path.join(path, "model"))  # DeepSpeed's zero_to_fp32
    assert set(fp32) == set(gathered[0]) == set(TinyLM().state_dict())
    for k, v in fp32.items():
        assert v.dtype == torch.float32 and v.shape == gathered[0][k].shape
        assert torch.equal(v, gathered[0][k]) and torch.equal(v, gathered[1][k]), k


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_consolidates_the_fp32_masters_the_live_weights_round(pair, tmp_path, stage):
    """precision=bf16 (what auto picks on AMX CPUs and GPUs): the live weights are bf16, the
    export's source is the optimizer's fp32 masters, and the first rounds to the second.
    Stage 0 runs DeepSpeed's BF16_Optimizer (stage 1: masters split over the two ranks)."""
    pair.call("build", {**par2(stage), "precision": "bf16"})
    pair.call("train", 3)
    gathered = pair.call("state_dict")
    fp32 = Engine.consolidate(os.path.join(pair.call("save", str(tmp_path))[0], "model"))
    moved = 0
    for k, v in fp32.items():
        assert v.dtype == torch.float32
        assert torch.equal(v.bfloat16().float(), gathered[0][k]), k
        moved += int(not torch.equal(v, gathered[0][k]))
    assert moved > 0  # the masters keep digits the bf16 weights lack


def test_checkpoint_round_trip_at_world_two(pair, tmp_path):
    pair.call("build", par2(2))
    pair.call("train", 4)
    pair.call("save", str(tmp_path))
    after = pair.call("train", 3)[0]["losses"]
    pair.call("build", par2(2))  # fresh engine, different state until loaded
    assert pair.call("load", str(tmp_path)) == [4, 4]
    again = pair.call("train", 3)[0]["losses"]
    assert again == after
    marker = ckpt.read_marker(ckpt.latest_complete(tmp_path))
    assert marker["world_size"] == 2 and marker["step"] == 4


def test_two_ranks_match_one_rank_with_same_global_batch(pair):
    one_par = {"zero_stage": 2, "micro_batch_size": GLOBAL_BATCH // 2, "grad_accum": 2}
    with WorkerGroup(TinyTrainer, ParallelConfig(num_workers=1), role="single") as single:
        # Two groups at once: start both, then gather both.
        refs = pair.call_async("build", par2(2)), single.call_async("build", one_par)
        pair.get(refs[0]), single.get(refs[1])
        refs = pair.call_async("train", 10), single.call_async("train", 10)
        two, one = pair.get(refs[0])[0]["losses"], single.get(refs[1])[0]["losses"]
    assert len(one) == len(two) == 10, (one, two)  # zip below would hide a short list
    delta = max(abs(a - b) for a, b in zip(one, two))
    print(f"max |loss(1 rank, accum 2) - loss(2 ranks)| over 10 steps: {delta:.2e}")
    assert delta <= 1e-4, (one, two)
    # The same worker code in this process (no Ray) gives the same losses.
    with LocalGroup(TinyTrainer, ParallelConfig(num_workers=1)) as local:
        local.call("build", one_par)
        mine = local.call("train", 10)[0]["losses"]
    assert len(mine) == len(one), (one, mine)
    assert max(abs(a - b) for a, b in zip(one, mine)) <= 1e-6, (one, mine)


def test_group_identity_and_death_detection():
    with WorkerGroup(Echo, ParallelConfig(num_workers=2, cpus_per_worker=0.25,
                                          placement="SPREAD"),
                     role="echo", worker_kwargs={"tag": "t"}) as group:
        who = group.call("whoami")
        assert [w[:3] for w in who] == [(0, 2, "t"), (1, 2, "t")]
        pids = group.pids()
        assert len(set(pids)) == 2 and os.getpid() not in pids and pids == [w[3] for w in who]
        assert group.call("all_reduce", 1.0) == [3.0, 3.0]  # (1+0) + (1+1) over gloo
        assert group.call_scatter("all_reduce", [10.0, 20.0]) == [31.0, 31.0]
        for rank, name in enumerate(group.actor_names):
            assert name == f"echo/rank{rank}"
            assert ray.get(ray.get_actor(name).pid.remote()) == pids[rank]
        with pytest.raises(KeyError, match="no such thing on rank"):
            group.call("fail")  # a worker's own exception keeps its type
        group.kill_rank(1)
        # Rank 0 blocks in the collective; rank 1 is gone. The death must be reported, not
        # the collective's own timeout (600 s): a deadline well under it only fails when
        # WorkerDied never comes (TimeoutError), however slow the machine.
        with pytest.raises(WorkerDied) as err:
            group.get(group.call_async("all_reduce", 1.0), timeout_s=EVENT_DEADLINE_S)
        assert (err.value.role, err.value.rank) == ("echo", 1)


def test_rank_dying_mid_checkpoint_keeps_previous_complete(tmp_path):
    with WorkerGroup(TinyTrainer, ParallelConfig(num_workers=2), role="crash") as group:
        group.call("build", par2(1))
        group.call("train", 2)
        first = group.call("save", str(tmp_path))[0]
        group.call("train", 1)
        with pytest.raises(WorkerDied) as err:
            group.call("save", str(tmp_path), crash_rank=1)
        assert err.value.rank == 1
    assert str(ckpt.latest_complete(tmp_path)) == first
    leftovers = [p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()]
    assert sorted(leftovers) == [".tmp-step_3", "step_2"], leftovers
    assert not (ckpt.checkpoints_dir(tmp_path) / ".tmp-step_3" / ckpt.MARKER).exists()


def test_unplaceable_group_fails_with_resources_in_message():
    """start_timeout_s is honoured: the constructor gives up instead of waiting forever (run
    in a thread, so a constructor that never returns fails the test at the deadline)."""
    outcome: dict = {}

    def build():
        try:
            WorkerGroup(Echo, ParallelConfig(num_workers=2, cpus_per_worker=3.0), role="huge",
                        start_timeout_s=2)
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            outcome["error"] = e

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(EVENT_DEADLINE_S)
    assert not worker.is_alive(), f"WorkerGroup did not give up within {EVENT_DEADLINE_S} s"
    with pytest.raises(RuntimeError, match=r"group 'huge': placement group of 2 x \{'CPU': 3\.0\}"):
        raise outcome.get("error") or AssertionError("the unplaceable group was created")
    assert not [a for a in ray.util.list_named_actors() if a.startswith("huge/")]
