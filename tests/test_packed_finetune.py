"""Packed fine-tuning (data.packing): the rows of a micro-batch laid end to end in blocks
with block-diagonal attention give the padded path's loss on the same rows (SFT and RM,
through the real GPT), no token sees another row, positions restart per row, a row over
the block budget is a one-line error, and packed sft/rm jobs run end to end and learn.

Rows are the embedded demo task's, encoded by a real SentencePiece tokenizer, plus longer
free-text rows so lengths vary and some rows are cut at max_len."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from trellis.data_pipeline.collate import PairCollator, SFTCollator
from trellis.data_pipeline.packed_collate import (PackedPairCollator, PackedSFTCollator,
                                                  best_blocks, first_fit_decreasing)
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.jobs.finetune.config import RMJobConfig, SFTJobConfig
from trellis.model.build import build_model
from trellis.model.config import ModelConfig
from trellis.model.io import save_module
from trellis.model.losses import token_cross_entropy
from trellis.model.packed import segment_positions
from trellis.rl.demo_task import DemoTaskConfig, write_demo_data, write_pretrain_corpus
from trellis.rl.rm_loss import pairs_from_collator, pairwise_rm_loss

MAX_LEN, MAX_PROMPT = 48, 24
LONG = ("The quick brown fox jumps over the lazy dog while the farmer sorts his fruit: "
        "apple fig pear kiwi lime plum date grape melon peach mango lemon olive guava berry.")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("packed")
    data = write_demo_data(root / "data", DemoTaskConfig(n_demonstrations=64,
                                                         n_comparison_prompts=48,
                                                         n_train_prompts=10, n_eval_prompts=10))
    corpus = write_pretrain_corpus(root / "corpus", 1000)
    tok = train_tokenizer(TokenizerConfig(vocab_size=512), [corpus.read_text(), LONG],
                          root / "tokenizer.model")
    cfg = ModelConfig(arch="gpt", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64,
                      max_seq_len=64)
    torch.manual_seed(0)
    init = save_module(build_model(cfg, "lm"), cfg, "lm", root / "init")
    (init / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    demos = [json.loads(line) for line in open(data["demonstrations"])]
    comps = [json.loads(line) for line in open(data["comparisons"])]
    return {"root": root, "tok": tok, "cfg": cfg, "init": init, "data": data,
            "demos": demos, "comps": comps}


def sft_rows(assets: dict) -> list[dict]:
    """12 demonstrations and 4 long free-text rows (cut at MAX_LEN / MAX_PROMPT)."""
    tok = assets["tok"]
    rows = [{"prompt": d["prompt"], "prompt_ids": tok.encode(d["prompt"]),
             "response_ids": tok.encode(d["response"])} for d in assets["demos"][:12]]
    for at, n in ((1, 120), (5, 80), (9, 40), (13, 10)):
        rows.insert(at, {"prompt": LONG[:n], "prompt_ids": tok.encode(LONG[:n]),
                         "response_ids": tok.encode(LONG[-n:])})
    return rows


def lm(assets: dict, head: str = "lm") -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(assets["cfg"], head)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to b's largest magnitude."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def test_positions_restart_and_blocks_respect_the_budget():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    lengths = [5, 9, 2, 7, 3, 3, 10]
    blocks = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in blocks for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in blocks)
    assert len(blocks) == 4  # 39 tokens in 10-token blocks: 4 is the least possible

    def positions(lens: list[int]) -> int:  # packed blocks x width
        blocks = best_blocks(lens, 48)
        assert sorted(i for b in blocks for i in b) == list(range(len(lens)))
        return len(blocks) * max(sum(lens[i] for i in b) for b in blocks)

    like, mixed = [13, 12, 14, 12, 13, 14, 12, 13], [30, 6, 28, 8, 25, 10, 5, 20]
    assert positions(like) <= 8 * 14  # never more than padding
    assert positions(mixed) <= 3 * 48 < 0.7 * 8 * 30


def test_packed_sft_loss_and_gradients_equal_padded(assets):
    rows = sft_rows(assets)
    padded = SFTCollator(MAX_LEN, MAX_PROMPT)(rows)
    packed = PackedSFTCollator(MAX_LEN, MAX_PROMPT)(rows)
    assert padded["input_ids"].shape[1] == MAX_LEN  # a long row was cut to max_len
    assert packed["input_ids"].numel() < 0.8 * padded["input_ids"].numel()
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    losses, grads = [], []
    for b in (padded, packed):
        model = lm(assets)
        extra = {"segment_ids": b["segment_ids"]} if "segment_ids" in b else {}
        loss = token_cross_entropy(model(b["input_ids"], attention_mask=b["attention_mask"],
                                         **extra), b["labels"])
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel(losses[1], losses[0]) < 1e-5, losses
    assert rel(grads[1], grads[0]) < 1e-4


def test_packed_rm_scores_and_loss_equal_padded(assets):
    tok = assets["tok"]
    rows = [{"prompt": c["prompt"], "prompt_ids": tok.encode(c["prompt"]),
             "responses_ids": [tok.encode(r) for r in c["responses"]], "ranking": c["ranking"]}
            for c in assets["comps"][:6]]
    rows[2]["responses_ids"][1] = tok.encode(LONG)  # cut at max_len: scored at its last token
    padded = PairCollator(MAX_LEN, MAX_PROMPT)(rows)
    packed = PackedPairCollator(MAX_LEN, MAX_PROMPT)(rows)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    model = lm(assets, "score").eval()
    s_pad = model(padded["input_ids"], attention_mask=padded["attention_mask"])  # (N,)
    s_pack = model(packed["input_ids"], attention_mask=packed["attention_mask"],
                   segment_ids=packed["segment_ids"], score_index=packed["score_index"])
    assert s_pack.shape == s_pad.shape and rel(s_pack, s_pad) < 1e-5
    last_ids = packed["input_ids"].flatten()[packed["score_index"]]
    assert torch.equal(last_ids, padded["input_ids"][torch.arange(len(s_pad)),
                                                     padded["last_index"]])
    losses = [pairwise_rm_loss(s, *pairs_from_collator(b), "prompt")[0]
              for s, b in ((s_pad, padded), (s_pack, packed))]
    assert rel(losses[1], losses[0]) < 1e-5


def test_no_attention_across_segments(assets):
    """Segment B's logits do not move when segment A's tokens change, and equal B's logits
    alone in a row (its positions restart at 0)."""
    model = lm(assets).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(7, 300, (13,), generator=g), torch.randint(7, 300, (9,), generator=g)
    seg = torch.tensor([1] * 13 + [2] * 9 + [0] * 3)[None]  # (1, 25)

    def logits(first: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([first, b, torch.zeros(3, dtype=torch.long)])[None]
        with torch.no_grad():
            return model(ids, segment_ids=seg)[0]  # (25, V)

    base, changed = logits(a), logits(torch.randint(7, 300, (13,), generator=g))
    assert not torch.allclose(base[:13], changed[:13])  # A's own logits did change
    assert torch.equal(base[13:22], changed[13:22])
    with torch.no_grad():
        alone = model(b[None])[0]
    assert rel(base[13:22], alone) < 1e-5


def test_row_over_the_block_budget_is_a_one_line_error(assets):
    rows = sft_rows(assets)[:2]  # a demonstration, then a long row
    with pytest.raises(ValueError) as e:
        PackedSFTCollator(MAX_LEN, MAX_PROMPT, block_len=20)(rows)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"row 1 ({LONG[:40]!r}) has 48 tokens")
    assert "more than the packing block of 20 (data.pack_len)" in msg
    base = [f"init_from={assets['init']}", "data.train=x.jsonl", "data.packing=true"]
    with pytest.raises(ConfigError, match="data.pack_len 32 must be 0 or at least data.max_len 48"):
        load_config(SFTJobConfig, None, base + ["data.max_len=48", "data.pack_len=32"])


def test_blocks_wider_than_the_model_context_fail_before_training(assets, tmp_path):
    with pytest.raises(ConfigError, match="'data.pack_len': packed blocks of 96 tokens exceed "
                                          "the model's max_seq_len 64"):
        run_job(assets, "sft", tmp_path / "run", "data.packing=true", "data.pack_len=96")
    assert not (tmp_path / "run" / "checkpoints").exists()


def train_log(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics" / "train.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def run_job(assets: dict, kind: str, run_dir: Path, *extra: str) -> list[dict[str, float]]:
    from trellis.launcher.jobs.finetune.driver import rm, sft
    job, cls, source = {"sft": (sft, SFTJobConfig, "demonstrations"),
                        "rm": (rm, RMJobConfig, "comparisons")}[kind]
    cfg = load_config(cls, None, [
        f"run_dir={run_dir}", f"init_from={assets['init']}", f"data.train={assets['data'][source]}",
        "data.val_fraction=0", f"data.max_len={MAX_LEN}", f"data.max_prompt_len={MAX_PROMPT}",
        "parallel.micro_batch_size=8", "metrics.port=-1", "train.log_every=1",
        "parallel.precision=fp32",  # packed vs padded to 1e-5: bf16 rounding would dominate
        "train.eval_every=0", "optim.lr=2e-3", "optim.warmup_steps=0", *extra])
    job(cfg, local=True)
    return train_log(run_dir)


@pytest.mark.integration
def test_packed_sft_job_learns_like_the_padded_one(assets, tmp_path):
    packed = run_job(assets, "sft", tmp_path / "packed", "train.steps=24", "data.packing=true")
    padded = run_job(assets, "sft", tmp_path / "padded", "train.steps=24")
    assert len(packed) == len(padded) == 24
    assert "block_fill" not in padded[0] and min(r["block_fill"] for r in packed) > 0.6
    for a, b in zip(packed, padded):  # the same rows and updates, up to float rounding
        assert abs(a["loss"] - b["loss"]) < 1e-5 * b["loss"], (a, b)
    assert packed[-1]["loss"] < packed[0]["loss"] - 1.0, (packed[0], packed[-1])


@pytest.mark.integration
def test_packed_rm_job_learns_like_the_padded_one(assets, tmp_path):
    packed = run_job(assets, "rm", tmp_path / "packed", "train.steps=24", "data.packing=true")
    padded = run_job(assets, "rm", tmp_path / "padded", "train.steps=24")
    assert len(packed) == len(padded) == 24
    assert "block_fill" not in padded[0] and min(r["block_fill"] for r in packed) > 0.6
    for a, b in zip(packed, padded):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * b["loss"], (a, b)
        assert a["accuracy"] == b["accuracy"]
    assert packed[-1]["loss"] < packed[0]["loss"] - 0.1, (packed[0], packed[-1])
