"""data.loader_workers is real in pretraining: with W > 0 the pretrain worker reads its
micro-batches through a torch DataLoader with W worker processes (spawned), trains on exactly
the batches of the same stream read in-process with W consumers, and resumes exactly (the
saved position is what the trainer received, not what the workers read ahead).

Real Arrow shards, real DeepSpeed engines (world size 1 in-process; 2 Ray actors)."""
from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trellis.data_pipeline.collate import clm_collate
from trellis.data_pipeline.config import DataConfig
from trellis.data_pipeline.loader import batches
from trellis.data_pipeline.shards import make_token_dataset
from trellis.data_pipeline.stream import TokenStream
from trellis.launcher.config_loader import load_config
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig

VOCAB, SEQ, MB = 256, 16, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, VOCAB, int(rng.integers(3, 40))).tolist() for _ in range(200)]
    d = tmp_path_factory.mktemp("lw") / "data"
    make_token_dataset(d, docs, docs_per_shard=41, vocab_size=VOCAB)
    return d


def job(run_dir: Path, workers: int, *extra: str) -> PretrainJobConfig:
    return load_config(PretrainJobConfig, None, [
        f"run_dir={run_dir}", "model.preset=gpt-tiny", f"model.vocab_size={VOCAB}",
        "model.max_seq_len=32", f"data.seq_len={SEQ}", "data.shuffle_buffer=16",
        f"data.loader_workers={workers}", f"parallel.micro_batch_size={MB}",
        "optim.lr=3e-3", "train.steps=20", "train.sample_tokens=0", *extra])


def make_worker(cfg: PretrainJobConfig, data_dir: Path, rank: int = 0, world: int = 1):
    from trellis.launcher.jobs.pretrain.worker import PretrainWorker
    return PretrainWorker(rank, world, dataclasses.asdict(cfg), str(data_dir), None, cfg.run_dir)


def recording(worker) -> list[dict]:
    """Make `worker` record every micro-batch its loss (i.e. training) sees."""
    seen, loss = [], worker.loss

    def wrapped(batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return loss(batch)
    worker.loss = wrapped
    return seen


def direct(cfg: DataConfig, data_dir: Path, n: int, rank: int = 0, world: int = 1) -> list[dict]:
    """The same stream read in this process (W consumers round-robin), CLM-collated."""
    it = TokenStream(data_dir, cfg, rank=rank, world_size=world).iter_batches(MB)
    return [clm_collate(b) for b in itertools.islice(it, n)]


def same(a: list[dict], b: list[dict]) -> bool:
    keys = ("input_ids", "labels", "attention_mask")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in keys)


def loader_children(pid: int) -> list[int]:
    """Pids of DataLoader worker processes (spawned children) of process `pid`."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(p.name))
    return out


def test_worker_batches_needs_workers_and_records_what_was_delivered(data_dir):
    cfg = DataConfig(seq_len=SEQ, shuffle_buffer=16, loader_workers=2)
    ref = list(itertools.islice(TokenStream(data_dir, cfg).iter_batches(MB), 6))
    s = TokenStream(data_dir, cfg)
    it = iter(batches(s, MB))
    got = [next(it) for _ in range(3)]  # the workers have read ahead by now
    state = s.state_dict()
    assert state["next_worker"] == 1 and state["workers"][0]["step"] == 2
    assert state["workers"][1]["step"] == 1
    it.close()
    resumed = TokenStream(data_dir, cfg)
    resumed.load_state_dict(state)
    got += list(itertools.islice(resumed.iter_batches(MB), 3))  # in-process from there
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ref, got))
    with pytest.raises(ValueError, match="loader_workers >= 1"):
        TokenStream(data_dir, DataConfig(seq_len=SEQ)).worker_batches(MB)


@pytest.mark.integration
def test_pretrain_worker_trains_on_the_stream_batches_through_worker_processes(tmp_path,
                                                                               data_dir):
    cfg = job(tmp_path, 2)
    w = make_worker(cfg, data_dir)
    seen = recording(w)
    before = set(loader_children(os.getpid()))  # (workers start with the first batch)
    w.train_step()
    children = set(loader_children(os.getpid())) - before
    assert len(children) == 2  # W DataLoader worker processes while training
    for _ in range(5):
        w.train_step()
    assert same(seen, direct(cfg.data, data_dir, 6))  # (a): the documented order
    w._open_batches()  # a new read (as at a resume) stops the old workers
    assert not set(loader_children(os.getpid())) & children


@pytest.mark.integration
def test_pretrain_resume_with_loader_workers_is_exact(tmp_path, data_dir):
    cfg = job(tmp_path / "a", 2, "parallel.grad_accum=2")
    full = make_worker(cfg, data_dir)
    seen_full = recording(full)
    losses_full = [full.train_step()["loss"] for _ in range(6)]
    stopped = make_worker(job(tmp_path / "b", 2, "parallel.grad_accum=2"), data_dir)
    for _ in range(3):
        stopped.train_step()  # the workers read ahead of these 6 micro-batches
    path = stopped.save(3)
    del stopped
    resumed = make_worker(job(tmp_path / "b", 2, "parallel.grad_accum=2"), data_dir)
    assert resumed.resume(path) == 3
    seen_resumed = recording(resumed)
    losses_resumed = [resumed.train_step()["loss"] for _ in range(3)]
    assert same(seen_resumed, seen_full[6:])  # (b): the same subsequent batches
    assert losses_resumed == pytest.approx(losses_full[3:], rel=1e-5)


@pytest.mark.integration
def test_loader_workers_in_ray_actors(tmp_path, data_dir):
    """World size 2 in Ray actors, 2 DataLoader workers each: every rank's batches are its
    own stream's (rank r of 2, W = 2), and the worker processes are the actors' children."""
    ray = pytest.importorskip("ray")
    from trellis.parallel.worker_group import WorkerGroup, ensure_ray

    cfg = job(tmp_path, 2, "parallel.num_workers=2", "parallel.cpus_per_worker=0.4")
    started = not ray.is_initialized()
    ensure_ray(num_cpus=2, log_to_driver=False)
    group = None
    try:
        group = WorkerGroup("trellis.launcher.jobs.pretrain.worker:PretrainWorker", cfg.parallel,
                            role="lw", worker_kwargs={
                                "cfg": dataclasses.asdict(cfg), "data_dir": str(data_dir),
                                "val_dir": None, "run_dir": str(tmp_path)})
        pids = group.call("pid")
        got = [group.call("next_batch") for _ in range(4)]  # [step][rank]
        for rank in range(2):
            mine = [step[rank] for step in got]
            assert same(mine, direct(cfg.data, data_dir, 4, rank, 2)), rank
        for pid in pids:
            assert len(loader_children(pid)) == 2
        assert all(r["loss"] > 0 for r in group.call("train_step"))
    finally:
        if group is not None:
            group.shutdown()
        if started:
            ray.shutdown()
