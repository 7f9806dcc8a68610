"""TokenStream: rank/worker sharding without overlap or gaps, deterministic shuffling, packing,
mixing, exact resume. Real Arrow shards in temp dirs; real DataLoader worker processes."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from trellis.data_pipeline.config import DataConfig, SourceConfig
from trellis.data_pipeline.loader import batches
from trellis.data_pipeline.shards import DataError, make_token_dataset
from trellis.data_pipeline.stream import DataStateError, TokenStream

EOS = 3


def tagged_docs(n: int, seed: int = 0, base: int = 10) -> list[list[int]]:
    """Document i is made only of token base+i, so a token names its document."""
    rng = np.random.default_rng(seed)
    return [[base + i] * int(rng.integers(1, 45)) for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    d = tmp_path_factory.mktemp("stream")
    docs = tagged_docs(300)
    make_token_dataset(d / "a", docs, docs_per_shard=37, vocab_size=1000)
    return d / "a", docs


def corpus_counter(docs: list[list[int]]) -> Counter:
    c = Counter(t for d in docs for t in d)
    c[EOS] += len(docs)
    return c


def epoch_tokens(stream: TokenStream, B: int, workers: int) -> Counter:
    """Tokens delivered in one finite epoch, counting each packed token once: every token is
    an input once (sequential: a block's last id is the next block's first, so the very last
    one of each consumer is counted here; shuffled samples wrap around the epoch's sequence)."""
    got, last = Counter(), {}
    for b in batches(stream, B):
        for row, n in zip(b["input_ids"].tolist(), b["num_tokens"].tolist()):
            got.update(row[:n - 1])
            last[b["consumer"]] = row[n - 1]
    if stream.order == "sequential":
        got.update(last.values())
    assert len(last) == max(1, workers)
    return got


@pytest.mark.parametrize("order", ["shuffled", "sequential"])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_epoch_covers_corpus_exactly_once(data, world, workers, order):
    path, docs = data
    cfg = DataConfig(seq_len=16, shuffle_buffer=8, loader_workers=workers, order=order)
    total, seen_docs = Counter(), []
    for rank in range(world):
        got = epoch_tokens(TokenStream(path, cfg, rank, world, infinite=False), 3, workers)
        seen_docs.append(set(got) - {EOS})
        total += got
    assert total == corpus_counter(docs)  # no gaps, no duplicates
    if order == "shuffled":  # samples, not documents, are dealt: a document may span two
        return
    for i in range(world):
        for j in range(i + 1, world):
            assert not seen_docs[i] & seen_docs[j], "a document reached two ranks"


def first_ids(stream: TokenStream, n: int, B: int = 4) -> torch.Tensor:
    it = stream.iter_batches(B)
    return torch.cat([next(it)["input_ids"] for _ in range(n)])


def test_same_seed_same_order_new_epoch_new_order(data):
    path, _ = data
    cfg = DataConfig(seq_len=16, shuffle_buffer=16, seed=5)
    a = first_ids(TokenStream(path, cfg), 10)
    assert torch.equal(a, first_ids(TokenStream(path, cfg), 10))
    s = TokenStream(path, cfg)
    s.set_epoch(1)
    assert not torch.equal(a, first_ids(s, 10))
    assert not torch.equal(a, first_ids(TokenStream(path, dataclasses.replace(cfg, seed=6)), 10))
    unshuffled = first_ids(TokenStream(path, dataclasses.replace(cfg, shuffle=False)), 1)
    assert unshuffled[0, 0].item() == 10  # manifest order starts with document 0


def test_infinite_stream_rolls_into_next_epoch(data):
    path, docs = data
    s = TokenStream(path, DataConfig(seq_len=32, shuffle_buffer=4))
    total = sum(len(d) + 1 for d in docs)
    it = s.iter_batches(8)
    for _ in range(total // (8 * 32) + 2):
        next(it)
    assert s.epoch == 1 and s.state_dict()["workers"][0]["epoch"] == [1]


@pytest.mark.parametrize("workers,packing,n_sources", [(0, True, 1), (0, True, 2), (0, False, 2),
                                                       pytest.param(2, True, 1, marks=pytest.mark.integration),
                                                       pytest.param(2, True, 2, marks=pytest.mark.integration)])
def test_resume_mid_epoch_is_bit_exact(tmp_path, workers, packing, n_sources):
    rng = np.random.default_rng(1)
    docs = [rng.integers(10, 900, int(rng.integers(1, 60))).tolist() for _ in range(80)]
    make_token_dataset(tmp_path / "a", docs, 29, vocab_size=1000)
    make_token_dataset(tmp_path / "b", docs[:20], 11, vocab_size=1000, source="b")
    sources = [SourceConfig("a", str(tmp_path / "a"), 1.0),
               SourceConfig("b", str(tmp_path / "b"), 0.5)][:n_sources]
    cfg = DataConfig(sources=sources, seq_len=16, shuffle_buffer=8, loader_workers=workers,
                     packing=packing)
    keys = ("input_ids", "num_tokens")
    ref_it = iter(batches(TokenStream(None, cfg, 1, 2), 4))
    ref = [next(ref_it) for _ in range(40)]
    loader = batches(TokenStream(None, cfg, 1, 2), 4)
    it = iter(loader)
    for _ in range(17):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    del it
    fresh = batches(TokenStream(None, cfg, 1, 2), 4)
    fresh.load_state_dict(state)
    it2 = iter(fresh)
    rest = [next(it2) for _ in range(23)]
    for a, b in zip(ref[17:], rest):
        for k in keys:
            assert torch.equal(a[k], b[k]), k
    assert ref[-1]["epoch"] >= 1  # the run crossed an epoch boundary (reshuffled order)


def test_block_iteration_state_and_workers_match_in_process(data):
    path, _ = data
    cfg = DataConfig(seq_len=8, shuffle_buffer=8, loader_workers=2)
    in_proc = first_ids(TokenStream(path, cfg), 12, B=2)
    it = iter(batches(TokenStream(path, cfg), 2))
    with_workers = torch.cat([next(it)["input_ids"] for _ in range(12)])
    assert torch.equal(in_proc, with_workers)
    # per-block iteration resumes too
    s = TokenStream(path, DataConfig(seq_len=8))
    blocks = iter(s)
    head = [next(blocks) for _ in range(5)]
    s2 = TokenStream(path, DataConfig(seq_len=8))
    s2.load_state_dict(s.state_dict())
    ref = iter(TokenStream(path, DataConfig(seq_len=8)))
    expect = [next(ref) for _ in range(8)][5:]
    got = [next(iter(s2)) for _ in range(1)] + [b for _, b in zip(range(2), iter(s2))]
    assert head[0]["input_ids"].shape == (9,)
    assert [g["input_ids"].tolist() for g in got] == [e["input_ids"].tolist() for e in expect]


def test_packing_blocks(tmp_path):
    docs = [[10] * 3, [11] * 5, [12] * 30, [13] * 2]
    make_token_dataset(tmp_path, docs, 2, vocab_size=1000)
    cfg = DataConfig(seq_len=8, shuffle=False)
    b = next(TokenStream(tmp_path, cfg).iter_batches(2))
    ids = b["input_ids"]
    assert set(b) == {"input_ids", "num_tokens", "epoch", "step", "consumer"}
    assert ids.shape == (2, 9) and ids[0, -1] == ids[1, 0]             # overlap by one token
    assert ids.tolist() == [[10, 10, 10, EOS, 11, 11, 11, 11, 11],
                            [11, EOS, 12, 12, 12, 12, 12, 12, 12]]
    # unpacked: each row starts a document (or continues one), padded after its EOS
    u = next(TokenStream(tmp_path, dataclasses.replace(cfg, packing=False)).iter_batches(4))
    assert u["num_tokens"].tolist() == [4, 6, 9, 9]
    assert u["input_ids"][:2].tolist() == [[10, 10, 10, EOS, 0, 0, 0, 0, 0],
                                          [11, 11, 11, 11, 11, EOS, 0, 0, 0]]
    assert u["input_ids"][2].tolist() == [12] * 9 and u["input_ids"][3, 0] == 12  # doc 2 goes on


def test_mixing_weights_count_tokens(tmp_path):
    make_token_dataset(tmp_path / "a", [[10] * 5] * 400, 100, 1000, source="a")
    make_token_dataset(tmp_path / "b", [[11] * 50] * 40, 10, 1000, source="b")
    cfg = DataConfig(sources=[SourceConfig("a", str(tmp_path / "a"), 3.0),
                              SourceConfig("b", str(tmp_path / "b"), 1.0)], seq_len=64)
    ids = first_ids(TokenStream(None, cfg), 40, B=8)[:, :-1]
    a, b = (ids == 10).sum().item() + 0.0, (ids == 11).sum().item()
    share_a = a / (a + b)  # EOS excluded: 5/6 of a's tokens vs 50/51 of b's
    assert abs(share_a - 3 * 5 / 6 / (3 * 5 / 6 + 50 / 51)) < 0.02
    docs_cfg = dataclasses.replace(cfg, mix_by="documents")
    ids = first_ids(TokenStream(None, docs_cfg), 40, B=8)[:, :-1]
    a_docs, b_docs = (ids == 10).sum().item() / 5, (ids == 11).sum().item() / 50
    assert abs(a_docs / (a_docs + b_docs) - 0.75) < 0.03


def test_val_split_is_disjoint_from_train(data):
    path, docs = data
    cfg = DataConfig(seq_len=16, val_fraction=0.1)
    train = set(epoch_tokens(TokenStream(path, cfg, infinite=False), 4, 0)) - {EOS}
    val = set(epoch_tokens(TokenStream(path, cfg, split="val", infinite=False), 4, 0)) - {EOS}
    assert not train & val and len(train | val) == len(docs)
    assert 0.08 < len(val) / len(docs) < 0.15
    with pytest.raises(DataError, match="no validation data"):
        TokenStream(path, DataConfig(), split="val")


def test_state_refuses_other_world_size(data):
    path, _ = data
    s = TokenStream(path, DataConfig(seq_len=8), rank=0, world_size=2)
    next(s.iter_batches(2))
    with pytest.raises(DataStateError, match="world_size=2 but this run has world_size=4"):
        TokenStream(path, DataConfig(seq_len=8), rank=0, world_size=4).load_state_dict(s.state_dict())
    with pytest.raises(DataStateError, match="loader_workers"):
        TokenStream(path, DataConfig(seq_len=8, loader_workers=2), 0, 2).load_state_dict(s.state_dict())


def test_too_many_readers_is_a_clear_error(tmp_path):
    make_token_dataset(tmp_path, [[10, 11]] * 3, 3, 1000)
    with pytest.raises(DataError, match="3 documents cannot feed 4 readers"):
        TokenStream(tmp_path, DataConfig(), rank=0, world_size=4)


def test_uint32_tokens_for_large_vocab(tmp_path):
    docs = [[70_000 + i, 5 + i] for i in range(20)]
    m = make_token_dataset(tmp_path, docs, 7, vocab_size=80_000)
    assert m["token_dtype"] == "uint32"
    ids = first_ids(TokenStream(tmp_path, DataConfig(seq_len=4, shuffle=False)), 1, B=1)
    assert ids[0].tolist() == [70_000, 5, EOS, 70_001, 6]


def text_dataset(path: Path, text: str) -> None:
    """`text` as one document of character ids (id = code point + 4, capped), so a row of
    ids decodes back to the stretch of text it was cut from."""
    ids = np.minimum(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), 250) + 4
    make_token_dataset(path, [ids.tolist()], 1, vocab_size=256)


def row_offsets(text: str, batch: dict) -> list[int]:
    """Where each row's inputs start in `text` (its first occurrence)."""
    rows = (batch["input_ids"][:, :-1] - 4).tolist()
    capped = "".join(chr(min(ord(c), 250)) for c in text)
    return [capped.find("".join(map(chr, r))) for r in rows]


def test_shuffled_rows_of_a_long_document_come_from_far_apart(tmp_path):
    """One long document (the embedded pydoc topics, ~465K characters): sequential order cuts
    a batch from B adjacent stretches; shuffled order from all over it, with block
    boundaries that move every epoch, and a position of a few integers."""
    from pydoc_data.topics import topics
    text = "".join(topics[k] for k in sorted(topics))
    text_dataset(tmp_path, text)
    T, B = 64, 8
    seq = next(TokenStream(tmp_path, DataConfig(seq_len=T, order="sequential")).iter_batches(B))
    off = row_offsets(text, seq)
    assert off == [off[0] + r * T for r in range(B)]  # adjacent chunks of one stretch
    s = TokenStream(tmp_path, DataConfig(seq_len=T))
    assert s.order == "shuffled"
    it = s.iter_batches(B)
    for _ in range(3):
        off = sorted(row_offsets(text, next(it)))
        assert min(off) >= 0  # every row is a stretch of the text
        assert min(b - a for a, b in zip(off, off[1:])) > 4 * T  # no two rows adjacent
        assert off[-1] - off[0] > len(text) / 4  # spread over the document
    state = s.state_dict()["workers"][0]
    assert state == {"epoch": [0], "pos": [3 * B], "counts": [3 * B * T], "step": 3,
                     "done": False}

    def phase(epoch: int) -> int:  # rows start at s + j*T (s: the epoch's random offset)
        st = TokenStream(tmp_path, DataConfig(seq_len=T), epoch=epoch)
        got = Counter(o % T for o in row_offsets(text, next(st.iter_batches(4 * B))))
        (s0, n), = got.most_common(1)  # (a repeated stretch may be found earlier in the text)
        assert n >= 3 * B
        return s0
    assert phase(0) != phase(1)  # block boundaries moved
    with pytest.raises(DataStateError, match="order=shuffled but this run has order=sequential"):
        TokenStream(tmp_path, DataConfig(seq_len=T, order="sequential")).load_state_dict(
            s.state_dict())
