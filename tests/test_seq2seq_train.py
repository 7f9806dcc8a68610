"""`trellis pretrain --set train.objective=seq2seq` through the real job: Ray actors, DeepSpeed
engines (ZeRO-2, gloo, world size 2), checkpoints, the generated language pair. Training lowers
the loss and raises held-out BLEU above the untrained model's; the run exports to a
MarianMTModel with the same logits."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from trellis.launcher.config_loader import load_config
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig
from trellis.launcher.jobs.pretrain.driver import pretrain

pytestmark = pytest.mark.integration

STEPS = 400  # the model learns the word order and agreement at about 300


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from trellis.parallel.worker_group import ensure_ray
    ensure_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def eval_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics" / "eval.csv") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics" / "train.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    run_dir = tmp_path_factory.mktemp("seq2seq")
    cfg = load_config(PretrainJobConfig, None, [
        f"run_dir={run_dir}", "train.objective=seq2seq", "model.arch=seq2seq",
        "model.n_layer=2", "model.n_head=4", "model.d_model=128", "model.d_ff=512",
        "model.vocab_size=600", "tokenizer.vocab_size=600", "model.max_seq_len=48",
        "data.seq_len=48", "parallel.num_workers=2", "parallel.zero_stage=2",
        "parallel.cpus_per_worker=0.4", "parallel.micro_batch_size=16", "optim.lr=1e-3",
        "optim.warmup_steps=40", f"train.steps={STEPS}", "train.log_every=1",
        f"train.eval_every={STEPS // 2}", "train.eval_batches=2", "train.bleu_pairs=64",
        "train.sample_translations=2", "checkpoint.every=200", "metrics.port=-1"])
    return run_dir, pretrain(cfg)


def test_seq2seq_training_lowers_loss_and_raises_bleu(run):
    run_dir, result = run
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 3.0, (losses[1], losses[STEPS])
    evals = eval_rows(run_dir)
    assert [int(e["step"]) for e in evals] == [STEPS // 2, STEPS]
    assert result["val_loss"] < evals[0]["loss"] < losses[1]
    print(f"BLEU untrained {result['untrained_bleu']:.1f} -> step {STEPS // 2} "
          f"{evals[0]['bleu']:.1f} -> step {STEPS} {result['val_bleu']:.1f}; chrF "
          f"{result['untrained_chrf']:.1f} -> {result['val_chrf']:.1f}")
    assert result["val_bleu"] > result["untrained_bleu"] + 20
    assert result["val_chrf"] > result["untrained_chrf"] + 20
    assert len(result["translations"]) == 2 and all(t["translation"] for t in result["translations"])


def test_trained_run_exports_to_marian_with_the_same_logits(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from trellis.launcher.jobs.export.driver import export
    from trellis.launcher.weights import consolidate_run
    from trellis.model.io import load_module

    run_dir, _ = run
    out = export(run_dir, tmp_path / "hf")
    hf = transformers.MarianMTModel.from_pretrained(out).eval()
    ours, cfg, _ = load_module(consolidate_run(run_dir, tmp_path / "trellis"))
    src = torch.tensor([[20, 31, 45, 3], [50, 61, 3, 0]])
    mask = (src != 0).long()
    dec = torch.tensor([[2, 40, 41], [2, 70, 71]])
    with torch.no_grad():
        diff = (ours.eval()(src, mask, dec) - hf(input_ids=src, attention_mask=mask,
                                                  decoder_input_ids=dec).logits).abs().max()
    assert float(diff) <= 1e-5
    assert (out / "tokenizer.model").is_file()
