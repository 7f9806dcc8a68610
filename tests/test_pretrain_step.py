"""The pretraining step's data path and options: token ids travel as int32 and the loss equals
the int64 path's; the next micro-batch is prepared by a prefetch thread while the step runs,
and a resume is still exact; train.compile's compiled step gives eager's loss.

Real Arrow shards and real DeepSpeed engines (world size 1, in-process)."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from trellis.data_pipeline.config import DataConfig
from trellis.data_pipeline.shards import make_token_dataset
from trellis.data_pipeline.stream import TokenStream
from trellis.launcher.config_loader import load_config
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig

VOCAB, SEQ, MB = 256, 16, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, VOCAB, int(rng.integers(3, 40))).tolist() for _ in range(200)]
    d = tmp_path_factory.mktemp("step") / "data"
    make_token_dataset(d, docs, docs_per_shard=41, vocab_size=VOCAB)
    return d


def job(run_dir: Path, *extra: str) -> PretrainJobConfig:
    return load_config(PretrainJobConfig, None, [
        f"run_dir={run_dir}", "model.preset=gpt-tiny", f"model.vocab_size={VOCAB}",
        "model.max_seq_len=32", f"data.seq_len={SEQ}", f"parallel.micro_batch_size={MB}",
        "optim.lr=3e-3", "train.steps=20", "train.sample_tokens=0", *extra])


def make_worker(cfg: PretrainJobConfig, data_dir: Path):
    from trellis.launcher.jobs.pretrain.worker import PretrainWorker
    return PretrainWorker(0, 1, dataclasses.asdict(cfg), str(data_dir), None, cfg.run_dir)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch-rank")]


@pytest.mark.parametrize("kw", [{}, {"order": "sequential"}, {"packing": False}],
                         ids=["shuffled", "sequential", "unpacked"])
def test_stream_ids_are_int32(data_dir, kw):
    s = TokenStream(data_dir, DataConfig(seq_len=SEQ, **kw))
    assert s.token_dtype == np.int32
    b = next(s.iter_batches(MB))
    assert b["input_ids"].dtype == torch.int32 and b["input_ids"].shape == (MB, SEQ + 1)
    assert next(iter(s))["input_ids"].dtype == torch.int32


@pytest.mark.integration
def test_int32_batches_give_the_int64_paths_loss(tmp_path, data_dir):
    """The same steps fed int32 host batches (the stream's) and int64 ones: same losses,
    bit for bit (the ids are widened on the device before the model and the loss)."""
    narrow = make_worker(job(tmp_path / "a", "parallel.grad_accum=2"), data_dir)
    wide = make_worker(job(tmp_path / "b", "parallel.grad_accum=2"), data_dir)
    first = narrow.next_batch()
    assert first["input_ids"].dtype == torch.int32 and first["labels"].dtype == torch.int32
    ref = {k: v.long() for k, v in first.items()}
    assert torch.equal(narrow.loss(first)[0], wide.loss(ref)[0])
    wide.next_batch()  # both streams past the first batch
    nxt = wide.next_batch
    wide.next_batch = lambda: {k: v.long() for k, v in nxt().items()}
    for _ in range(3):
        assert narrow.train_step()["loss"] == wide.train_step()["loss"]


@pytest.mark.integration
def test_prefetched_training_resumes_exactly_and_stops_its_thread(tmp_path, data_dir):
    """data.prefetch=2: the thread reads ahead of the trainer, yet a checkpoint holds the
    position of the batches consumed, so 3 + resume + 3 steps == 6 steps, loss for loss, and
    equal to reading without prefetch."""
    before = set(prefetch_threads())  # (earlier tests' workers may not be collected yet)
    full = make_worker(job(tmp_path / "a", "parallel.grad_accum=2"), data_dir)
    losses_full = [full.train_step()["loss"] for _ in range(6)]
    assert set(prefetch_threads()) - before  # the thread runs while the worker reads
    plain = make_worker(job(tmp_path / "p", "parallel.grad_accum=2", "data.prefetch=0"),
                        data_dir)
    assert [plain.train_step()["loss"] for _ in range(6)] == losses_full
    stopped = make_worker(job(tmp_path / "b", "parallel.grad_accum=2"), data_dir)
    for _ in range(3):
        stopped.train_step()
    path = stopped.save(3)
    assert stopped.data_state()["workers"][0]["step"] == 6  # 6 micro-batches consumed
    resumed = make_worker(job(tmp_path / "b", "parallel.grad_accum=2"), data_dir)
    assert resumed.resume(path) == 3
    assert [resumed.train_step()["loss"] for _ in range(3)] == \
        pytest.approx(losses_full[3:], rel=1e-5)
    for w in (full, stopped, resumed):
        w._it.close()  # what a new read (a resume) does: the thread ends before it returns
    assert not set(prefetch_threads()) - before


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="this torch has no torch.compile")
def test_compiled_step_matches_eager(tmp_path, data_dir):
    """Engine.compile (what train.compile calls) on the same steps: eager's losses within
    float tolerance. The aot_eager backend traces with dynamo and AOT autograd as inductor
    does but skips code generation (cold inductor on this model: ~80 s of C++ builds)."""
    eager = make_worker(job(tmp_path / "e"), data_dir)
    compiled = make_worker(job(tmp_path / "c"), data_dir)
    compiled.engine.compile(backend="aot_eager")
    for _ in range(3):
        a, b = eager.train_step()["loss"], compiled.train_step()["loss"]
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    # sampling runs eagerly (a KV cache's growing shapes): the same greedy continuation
    assert compiled.sample([11, 12, 13], 6, eos_id=3) == eager.sample([11, 12, 13], 6, eos_id=3)


def test_compile_under_zero3_is_refused_at_load_time(tmp_path):
    from trellis.launcher.config_loader import ConfigError
    with pytest.raises(ConfigError, match=r"train.compile needs parallel.zero_stage <= 2"):
        job(tmp_path, "train.compile=true", "parallel.zero_stage=3")
