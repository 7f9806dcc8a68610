"""`trellis finetune`: a pretrained trunk plus a task head learns a separable generated task,
its exported transformers model gives the same logits, and bad rows fail in one line naming
the file and row. Real DeepSpeed engines (in-process), real SentencePiece, real Arrow."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.jobs.taskft.config import TaskFTJobConfig
from trellis.launcher.jobs.taskft.driver import finetune
from trellis.model import ModelConfig
from trellis.model.build import build_model
from trellis.model.io import save_module

POS = ["sun", "joy", "gold", "warm", "smile", "bright", "kind", "calm"]
NEG = ["rain", "cold", "dark", "grim", "sad", "storm", "harsh", "gloom"]
FILL = ["the", "day", "was", "and", "very", "a", "we", "felt", "it", "so"]


def sentence(rng: random.Random, cue: list[str]) -> str:
    words = [rng.choice(FILL) for _ in range(rng.randint(3, 6))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
    return " ".join(words)


def write_rows(path: Path, n: int, seed: int, pair: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randrange(2)
            row = {"text": sentence(rng, POS if y else NEG), "label": "pos" if y else "neg"}
            if pair:  # the label is whether the two sentences agree in mood
                z = rng.randrange(2)
                row["text2"] = sentence(rng, POS if z else NEG)
                row["label"] = "same" if y == z else "different"
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """A trellis weight dir per arch (random init: the task is separable by one word)."""
    root = tmp_path_factory.mktemp("taskft")
    rng = random.Random(0)
    text = [sentence(rng, POS + NEG) for _ in range(400)]
    tok = train_tokenizer(TokenizerConfig(vocab_size=300, byte_fallback=False), text,
                          root / "tokenizer.model")
    out = {}
    for arch in ("gpt", "bert"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                          max_seq_len=64)
        d = save_module(build_model(cfg, "lm" if arch == "gpt" else "mlm"), cfg,
                        "lm" if arch == "gpt" else "mlm", root / arch)
        (d / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
        out[arch] = d
    out["train"] = write_rows(root / "train.jsonl", 400, 1)
    out["val"] = write_rows(root / "val.jsonl", 100, 2)
    return out


def job(run_dir: Path, init: Path, *extra: str) -> TaskFTJobConfig:
    base = [f"run_dir={run_dir}", f"init_from={init}", "optim.lr=2e-3", "optim.warmup_steps=5",
            "train.steps=100", "train.eval_every=20", "train.log_every=20",
            "parallel.micro_batch_size=16", "metrics.port=-1", "data.max_len=32"]
    return load_config(TaskFTJobConfig, None, base + list(extra))


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_classifier_learns_separable_task_and_exports_same_logits(pretrained, tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    cfg = job(tmp_path / "run", pretrained[arch], f"data.train={pretrained['train']}",
              f"data.val={pretrained['val']}")
    res = finetune(cfg, local=True)
    print(f"\n{arch}: held-out accuracy {res['val_accuracy']:.3f} f1 {res['val_f1']:.3f} "
          f"(best {res['best_accuracy']:.3f} at step {res['best_step']})")
    assert res["best_accuracy"] >= 0.95
    hf_dir = Path(res["hf_dir"])
    conf = json.loads((hf_dir / "config.json").read_text())
    assert conf["id2label"] == {"0": "neg", "1": "pos"}
    # The same rows through transformers and through trellis's best weights.
    from trellis.data_pipeline.task_collate import TaskCollator
    from trellis.data_pipeline.task_rows import read_table
    from trellis.launcher.jobs.taskft.worker import load_task_model
    ours_model, _ = load_task_model(tmp_path / "run" / "best")
    b = TaskCollator()(read_table(tmp_path / "run" / "data" / "val.arrow").to_pylist()[:16])
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ours = ours_model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        kw = {"token_type_ids": b["token_type_ids"]} if arch == "bert" else {}
        ref = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw).logits
    diff = (ours - ref).abs().max().item()
    print(f"{arch}: exported classifier max |logit diff| vs transformers {diff:.3g}")
    assert diff <= 1e-5
    acc = (ref.argmax(-1) == b["label"].long()).float().mean().item()
    assert acc >= 0.9


@pytest.mark.integration
def test_sentence_pairs_regression_and_early_stop(pretrained, tmp_path):
    """Pairs with BERT segments; regression on the same rows (label as a number); early stop."""
    pairs = write_rows(tmp_path / "pairs.jsonl", 300, 3, pair=True)
    cfg = job(tmp_path / "pairs", pretrained["bert"], f"data.train={pairs}",
              "task.pair_field=text2", "data.val_fraction=0.2", "train.steps=40")
    res = finetune(cfg, local=True)
    assert set(json.loads((tmp_path / "pairs" / "hf" / "config.json").read_text())["label2id"]) \
        == {"different", "same"}
    assert 0.0 <= res["val_accuracy"] <= 1.0
    reg = tmp_path / "reg.jsonl"
    rows = [json.loads(line) for line in pretrained["train"].read_text().splitlines()]
    reg.write_text("".join(json.dumps({"text": r["text"], "y": 1.0 if r["label"] == "pos" else -1.0})
                           + "\n" for r in rows))
    cfg = job(tmp_path / "reg", pretrained["gpt"], f"data.train={reg}", "task.kind=regression",
              "task.label_field=y", "train.steps=200", "train.eval_every=10",
              "early_stop.patience=2", "early_stop.metric=loss")
    res = finetune(cfg, local=True)
    print(f"\nregression: pearson {res['val_pearson']:.3f}, stopped at step {res['step']}")
    assert res["val_pearson"] > 0.9
    assert res["step"] < 200 and "early_stop" in res


@pytest.mark.integration
def test_extractive_qa_learns_to_point_at_the_answer(pretrained, tmp_path):
    rng = random.Random(4)
    path = tmp_path / "qa.jsonl"
    with open(path, "w") as f:
        for _ in range(300):
            cue = rng.choice(POS)
            ctx = sentence(rng, [cue])
            f.write(json.dumps({"question": "which word is kind", "context": ctx,
                                "answer": {"text": cue, "start": ctx.index(cue)}}) + "\n")
    cfg = job(tmp_path / "qa", pretrained["bert"], f"data.train={path}", "task.kind=qa",
              "data.val_fraction=0.2", "train.steps=80")
    res = finetune(cfg, local=True)
    print(f"\nqa: exact match {res['val_exact_match']:.3f} f1 {res['val_f1']:.3f}")
    assert res["best_exact_match"] >= 0.8
    conf = json.loads((tmp_path / "qa" / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["BertForQuestionAnswering"]


@pytest.mark.parametrize("row,needle", [
    ({"txt": "a b", "label": "pos"}, "no field 'text'"),
    ({"text": "sun " * 80, "label": "pos"}, "exceed data.max_len"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_row(pretrained, tmp_path, row, needle):
    bad = tmp_path / "bad.jsonl"
    good = pretrained["train"].read_text().splitlines()[:20]
    bad.write_text("\n".join(good[:5] + [json.dumps(row)] + good[5:]) + "\n")
    cfg = job(tmp_path / "run", pretrained["gpt"], f"data.train={bad}")
    with pytest.raises(DataError) as e:
        finetune(cfg, local=True)
    msg = str(e.value)
    assert "\n" not in msg and f"{bad}:6" in msg and needle in msg


def test_unknown_label_in_val_and_bad_metric(pretrained, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "sun day", "label": "maybe"}) + "\n")
    cfg = job(tmp_path / "run", pretrained["gpt"], f"data.train={pretrained['train']}",
              f"data.val={val}")
    with pytest.raises(DataError, match=rf"{val}:1: label 'maybe' is not one of"):
        finetune(cfg, local=True)
    with pytest.raises(ConfigError, match="early_stop.metric"):
        job(tmp_path / "r", pretrained["gpt"], "data.train=x.jsonl", "early_stop.metric=pearson")
