"""Atomic checkpoints in this process (world size 1): layout, marker, resume round trip,
crash leftovers ignored, keep_last pruning, world-size check, per-rank state rules."""
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from trellis.parallel import checkpoint as ckpt
from trellis.parallel.config import CheckpointConfig, OptimConfig, ParallelConfig
from trellis.parallel.engine import Engine
from trellis.parallel.rng import rng_state, seed_all, set_rng_state

VOCAB = 32


def make_engine(seed: int) -> Engine:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, VOCAB))
    return Engine(model, OptimConfig(lr=1e-2, warmup_steps=1), ParallelConfig(zero_stage=1),
                  total_steps=20)


def train(engine: Engine, steps: int) -> list[float]:
    """Batches drawn from the global torch RNG, so resuming must restore it too."""
    losses = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 9))
        loss = nn.functional.cross_entropy(engine(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def engine():
    return make_engine(0)


@pytest.mark.integration
def test_save_layout_marker_and_resume_round_trip(engine, tmp_path):
    seed_all(3)
    train(engine, 3)
    path = ckpt.save_checkpoint(tmp_path, 3, {"model": engine},
                                rank_state={"data": {"shard": 2, "offset": 17}, "tokens": 12345})
    assert path == tmp_path / "checkpoints" / "step_3" == ckpt.latest_complete(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model", "rank_0.pt"]
    assert (path / "model" / "engine").is_dir()
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1 and marker["engines"] == ["model"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_3"]  # no temp left
    expected = train(engine, 4)

    other = make_engine(1)  # different weights, optimizer state and RNG position
    seed_all(99)
    restored = ckpt.load_checkpoint(ckpt.latest_complete(tmp_path), {"model": other})
    assert restored.step == 3 and other.global_step == 3
    assert restored.state == {"data": {"shard": 2, "offset": 17}, "tokens": 12345}
    assert train(other, 4) == expected  # weights, Adam moments, lr schedule and RNG all restored


@pytest.mark.integration
def test_crash_mid_write_leaves_previous_checkpoint_latest(engine, tmp_path):
    first = ckpt.save_checkpoint(tmp_path, 1, {"model": engine})

    class Exploding(dict):
        def __reduce__(self):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):  # after the engine shards were written
        ckpt.save_checkpoint(tmp_path, 2, {"model": engine}, rank_state=Exploding(a=1))
    tmp = tmp_path / "checkpoints" / ".tmp-step_2"
    assert (tmp / "model" / "engine").is_dir() and not (tmp / "COMPLETE").exists()
    # A step dir renamed into place whose marker never landed is not complete either.
    (tmp_path / "checkpoints" / "step_5").mkdir()
    (tmp_path / "checkpoints" / "step_6").mkdir()
    (tmp_path / "checkpoints" / "step_6" / "COMPLETE").write_text("{trunc")
    assert ckpt.latest_complete(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_5", {"model": engine})
    # The next save of that step replaces the leftovers.
    again = ckpt.save_checkpoint(tmp_path, 2, {"model": engine})
    assert ckpt.latest_complete(tmp_path) == again and not tmp.exists()


@pytest.mark.integration
def test_keep_last_prunes_old_and_leftover_dirs(engine, tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_1").mkdir(parents=True)  # crashed save
    (tmp_path / "checkpoints" / "step_2").mkdir()  # renamed, never marked
    for step in (1, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, step, {"model": engine}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert [s for s, _ in ckpt.list_complete(tmp_path)] == [4, 5]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        ckpt.prune(tmp_path, 0)


@pytest.mark.integration
def test_load_at_other_world_size_or_missing_engine_is_a_clear_error(engine, tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 7, {"model": engine})
    with pytest.raises(ValueError, match="has no engine named critic"):
        ckpt.load_checkpoint(path, {"critic": engine})
    marker = json.loads((path / "COMPLETE").read_text())
    (path / "COMPLETE").write_text(json.dumps({**marker, "world_size": 2}))  # as if 2 ranks wrote it
    with pytest.raises(ValueError, match=r"written by 2 ranks but this job has 1; resume with "
                                         r"num_workers=2"):
        ckpt.load_checkpoint(path, {"model": engine})


@pytest.mark.integration
def test_rank_state_must_be_weights_only_loadable(engine, tmp_path):
    with pytest.raises(TypeError, match=r"rank_state\.data\.reader: Generator cannot be checkpointed"):
        ckpt.save_checkpoint(tmp_path, 1, {"model": engine},
                             rank_state={"data": {"reader": torch.Generator()}})
    assert ckpt.latest_complete(tmp_path) is None


def test_rng_states_survive_weights_only_load(tmp_path):
    seed_all(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(2))
    seed_all(6)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_when_to_save_and_resume():
    every3 = CheckpointConfig(every=3)
    assert [s for s in range(1, 11) if ckpt.should_save(s, every3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if ckpt.should_save(s, CheckpointConfig(), 10)] == [10]
    assert ckpt.resume_path("/nonexistent/run", CheckpointConfig()) is None
