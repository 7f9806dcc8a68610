"""data.prefetch: a background thread reads and collates micro-batches ahead of the trainer;
the items, their order and the stream's saved position are those of reading without it."""
from __future__ import annotations

import dataclasses
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from trellis.data_pipeline.collate import clm_collate
from trellis.data_pipeline.config import DataConfig
from trellis.data_pipeline.loader import batches
from trellis.data_pipeline.prefetch import prefetched
from trellis.data_pipeline.shards import make_token_dataset
from trellis.data_pipeline.stream import TokenStream

VOCAB, SEQ, MB = 256, 16, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    docs = [rng.integers(10, VOCAB, int(rng.integers(3, 40))).tolist() for _ in range(200)]
    d = tmp_path_factory.mktemp("prefetch") / "data"
    make_token_dataset(d, docs, docs_per_shard=41, vocab_size=VOCAB)
    return d


def test_items_in_order_bounded_ahead_errors_at_their_item_and_close_stops():
    made, closed = [], threading.Event()

    def source():
        try:
            for i in range(100):
                made.append(i)
                yield i
        finally:
            closed.set()
    it = prefetched(source(), depth=2, name="prefetch-t")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    assert len(made) <= 3 + 2 + 1  # consumed + queue + the one blocked on a full queue
    it.close()
    assert closed.is_set()  # the source was closed by its thread, which has ended
    assert not [t for t in threading.enumerate() if t.name == "prefetch-t"]

    def failing():
        yield from (1, 2)
        raise ValueError("bad shard")
    it = prefetched(failing(), depth=2)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="bad shard"):
        next(it)
    assert list(prefetched(iter(range(5)), depth=0)) == list(range(5))


def test_prefetched_batches_and_positions_equal_reading_when_asked(data_dir):
    cfg = DataConfig(seq_len=SEQ, prefetch=2)
    plain_cfg = dataclasses.replace(cfg, prefetch=0)
    ahead, plain = TokenStream(data_dir, cfg), TokenStream(data_dir, plain_cfg)
    a_it, p_it = iter(batches(ahead, MB, clm_collate)), iter(batches(plain, MB, clm_collate))
    for _ in range(5):
        a, p = next(a_it), next(p_it)
        assert all(torch.equal(a[k], p[k]) for k in ("input_ids", "labels", "attention_mask"))
        assert ahead.state_dict() == plain.state_dict()  # consumed, not read ahead
    state = ahead.state_dict()
    a_it.close()
    resumed = TokenStream(data_dir, cfg)
    resumed.load_state_dict(state)
    again = list(itertools.islice(batches(resumed, MB, clm_collate), 3))
    assert all(torch.equal(x["input_ids"], next(p_it)["input_ids"]) for x in again)
