"""The direction of RLHF's result on a small configuration of the whole pipeline, in-process:
pretraining learns the format (gate), and the PPO policy kept by selection is better than
the SFT policy at the task's own (gold) score on held-out prompts, not only on the reward
model's. The full-size figures, per task seed, come from bench/rlhf_seeds.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# A smaller task (10 words, 2-4 per prompt) so a short run learns to copy and to improve.
TINY = ["task.n_words=10", "task.min_items=2", "task.max_items=4", "task.eval_fraction=0.2",
        "task.n_eval_prompts=60", "task.n_val_prompts=60", "task.n_demonstrations=10",
        "task.n_comparison_prompts=300", "task.n_train_prompts=400", "pretrain_lines=4000",
        "pretrain.steps=400", "sft.steps=60", "sft.micro_batch_size=8", "rm.steps=150",
        "ppo_iterations=16", "ppo_eval_every=4", "ppo.prompts_per_iteration=32",
        "eval_prompts=60", "ppo_actor_lr=5e-5", "samples_shown=2"]
# Measured (2 shared cores): gate 100%, SFT gold 0.681 -> PPO 0.721, exact 18% -> 32%.


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from trellis.launcher.config_loader import load_config
    from trellis.launcher.jobs.pipeline.config import PipelineConfig
    from trellis.launcher.jobs.pipeline.driver import pipeline
    root = tmp_path_factory.mktemp("direction")
    yaml = Path(__file__).resolve().parents[1] / "launcher" / "configs" / "pipeline.yaml"
    cfg = load_config(PipelineConfig, str(yaml), [f"run_dir={root}", *TINY])
    return root, pipeline(cfg, local=True)


@pytest.mark.integration
def test_ppo_beats_sft_on_gold_not_only_on_the_rm(result, capsys):
    root, res = result
    p = res["policies"]
    assert res["format_gate"]["rate"] >= 0.5, res["format_gate"]
    assert p["ppo"]["gold"] > p["sft"]["gold"], p
    assert p["ppo"]["rm"] > p["sft"]["rm"], p
    on_disk = json.loads((root / "results.json").read_text())
    assert set(on_disk["policies"]) == {"pretrained", "sft", "ppo", "ppo_last", "bon_4", "bon_16"}
    for row in on_disk["policies"].values():
        assert {"gold", "exact", "rm", "kl"} <= set(row)
    assert [r["n"] for r in on_disk["bon_curve"]] == [1, 2, 4, 8, 16]
    assert on_disk["ppo_curve"][0]["iteration"] == 0 and on_disk["verdict"].startswith("verdict: PPO")
    assert on_disk["ppo_selected_iteration"] in [r["iteration"] for r in on_disk["ppo_curve"]]


@pytest.mark.integration
def test_results_give_the_gold_vs_kl_plot(result):
    from trellis.launcher.commands.plot import plot_run
    root, res = result
    assert [p.name for p in plot_run(root)] == ["gold_vs_kl.png"]
