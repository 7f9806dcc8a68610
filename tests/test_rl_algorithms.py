"""GRPO / RLOO / REINFORCE++ as advantage estimators on PPO's worker groups (no critic
group), DPO on ranked comparisons, and best-of-n sampling: hand-worked estimator and loss
examples, then real runs on a tiny pretrain -> SFT -> RM chain built once per module."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.jobs.ppo.config import PPOJobConfig
from trellis.rl.advantages import (discounted_returns, grpo_advantages, reinforce_pp_advantages,
                                   rloo_advantages)
from trellis.rl.dpo_loss import dpo_loss, pair_weights
from trellis.rl.ppo_math import aggregate, kl_loss

# A smaller chain than tests/test_rlhf.py's: these tests check mechanics, not learning depth.
STAGES = ["model.preset=gpt-tiny", "model.n_layer=2", "model.n_head=2", "model.d_model=64",
          "pretrain.steps=60", "pretrain.lr=3e-3", "sft.steps=60", "sft.lr=1e-3",
          "rm.steps=80", "rm.lr=1e-3", "task.n_comparison_prompts=200",
          "comparisons_from=corrupt", "pretrain_lines=2000", "format_gate=0"]


# ---- estimators, by hand ----------------------------------------------------------------------
def test_grpo_group_of_four_and_all_equal_group():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 3, deviations (-2, -1, 0, 3), unbiased std sqrt(14 / 3) = 2.1602
    std = math.sqrt(14 / 3)
    want = torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0, 0, 0, 0])
    adv = grpo_advantages(r, 4)
    assert torch.allclose(adv, want, atol=1e-5), adv
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal rewards: 0, not NaN
    dr = grpo_advantages(r, 4, scale_by_std=False)  # Dr. GRPO: mean-centred only
    assert torch.allclose(dr, torch.tensor([-2.0, -1, 0, 3, 0, 0, 0, 0]))


def test_rloo_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3
    want = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0])
    assert torch.allclose(rloo_advantages(r, 4), want, atol=1e-6)


def test_reinforce_pp_returns_whitened_over_the_batch():
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [0.0, -1.0, 7.0]])  # 7.0 sits on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ret = discounted_returns(rewards, mask, gamma=1.0)
    assert torch.allclose(ret, torch.tensor([[0.8, 0.9, 1.0], [-1.0, -1.0, 0.0]]))
    adv, _ = reinforce_pp_advantages(rewards, mask)
    real = torch.tensor([0.8, 0.9, 1.0, -1.0, -1.0])
    white = (real - real.mean()) / real.std()  # mean 0.14, unbiased std 1.0431
    assert torch.allclose(adv[mask.bool()], white, atol=1e-5)
    assert adv[1, 2] == 0
    score_only = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # every return is 1
    flat, _ = reinforce_pp_advantages(score_only, torch.ones(2, 3))
    assert torch.equal(flat, torch.zeros(2, 3))  # equal returns: 0, not NaN


def test_estimators_refuse_bad_groups():
    with pytest.raises(ValueError, match="do not form groups of 4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="at least 2 responses"):
        rloo_advantages(torch.zeros(4), 1)


def test_critic_free_experience_puts_the_kl_in_the_reward():
    from trellis.rl.experience import make_critic_free_experience
    B, P, R = 2, 2, 3
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]]).bool()
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.5, 0.0], [-1.0, -1.0, 0.0]])  # response 0 strays: KL 1.5
    exp, stats = make_critic_free_experience(
        torch.ones(B, P, dtype=torch.long), torch.ones(B, P).bool(),
        torch.ones(B, R, dtype=torch.long), mask, logp, ref, torch.tensor([1.0, 1.0]),
        "rloo", 2, beta=0.1, kl_in_reward=True)
    # R = (1 - 0.15, 1): RLOO advantages (-0.15, +0.15) on every real token
    assert torch.allclose(exp.advantages, torch.tensor([[-0.15, -0.15, 0], [0.15, 0.15, 0]]))
    assert torch.equal(exp.values, torch.zeros(B, R)) and abs(stats["kl"] - 0.75) < 1e-6


def test_loss_aggregations_and_kl_loss():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(aggregate(x, m, "token_mean")) == pytest.approx(2.0)     # 6 / 3 tokens
    assert float(aggregate(x, m, "seq_mean")) == pytest.approx(2.25)      # (1.5 + 3) / 2
    assert float(aggregate(x, m, "seq_sum_norm")) == pytest.approx(1.0)   # 6 / (2 * 3)
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    k3 = kl_loss(logp, ref, torch.ones(1, 1), "k3")
    assert float(k3.detach()) == pytest.approx(-0.5 + math.log(2), abs=1e-6)  # (r - 1) - log r, r = 1/2
    k3.backward()
    assert float(logp.grad) == pytest.approx(1 - 0.5, abs=1e-6)  # d/dlogp = 1 - r


def test_algorithm_config_errors():
    from trellis.rl.ppo_config import PPOConfig
    with pytest.raises(ValueError, match="grpo needs group_size >= 2"):
        PPOConfig(algorithm="grpo", group_size=1)
    assert PPOConfig(algorithm="rloo").group_size == 4 and PPOConfig().group_size == 1  # auto
    p = PPOConfig(algorithm="grpo", group_size=4, grpo_variant="dr_grpo")
    assert (p.kl_placement, p.policy_loss_agg, p.has_critic, p.rollout_rows) == \
        ("loss", "seq_sum_norm", False, 128)
    assert PPOConfig().kl_placement == "reward" and PPOConfig().policy_loss_agg == "token_mean"


def test_pipeline_rl_algorithms_config():
    from trellis.launcher.jobs.pipeline.config import PipelineConfig
    from trellis.launcher.jobs.pipeline.stages import ppo_config, rl_settings
    cfg = load_config(PipelineConfig, None, ["rl_algorithms=[ppo, grpo, rloo, reinforce_pp]",
                                             "ppo_actor_lr=1e-5", "rl_actor_lr={rloo: 3e-5}"])
    got = {a: (p.algorithm, p.prompts_per_iteration, p.group_size)
           for a in cfg.algorithms for p in [rl_settings(cfg, a)]}
    # every algorithm samples PPO's 64 responses per iteration
    assert got == {"ppo": ("ppo", 64, 1), "grpo": ("grpo", 16, 4), "rloo": ("rloo", 16, 4),
                   "reinforce_pp": ("reinforce_pp", 64, 1)}
    lr = {a: ppo_config(cfg, Path(a), Path("sft"), [Path("rm")], Path("p"), Path("v"),
                        algorithm=a).actor.optim.lr for a in ("ppo", "rloo")}
    assert lr == {"ppo": 1e-5, "rloo": 3e-5}
    auto = load_config(PipelineConfig, None, ["ppo.algorithm=grpo"])  # group_size auto: 4
    assert auto.algorithms == ["grpo"] and rl_settings(auto, "grpo").prompts_per_iteration == 16
    one = load_config(PipelineConfig, None, ["ppo.algorithm=grpo", "ppo.group_size=8"])
    assert one.algorithms == ["grpo"]
    g = rl_settings(one, "grpo")
    assert (g.prompts_per_iteration, g.group_size) == (8, 8)
    for sets, match in [
            (["rl_algorithms=[ppo, ppo]"], "rl_algorithms lists an algorithm twice"),
            (["rl_algorithms=[ppo, dqn]"], "'rl_algorithms\\[1\\]': 'dqn' is not allowed"),
            (["rl_algorithms=[ppo, grpo]", "rlhf_rounds=2"], "needs a single algorithm"),
            (["rl_algorithms=[dpo]", "rlhf_rounds=2"], "needs ppo, grpo, rloo or reinforce_pp"),
            (["rl_algorithms=[dpo]", "dpo.beta=0"], "'dpo.beta'"),
            (["rl_algorithms=[grpo]", "rl_group_size=5"], "grpo's 5 responses per prompt"),
            (["rl_actor_lr={dpo: 1e-5}"], "rl_actor_lr: dpo: 1e-05 \\(allowed: ppo")]:
        with pytest.raises(ConfigError, match=match):
            load_config(PipelineConfig, None, sets)


def test_verdict_names_the_best_algorithm_and_the_others():
    from trellis.launcher.jobs.pipeline.report import best_algorithm, verdict
    row = lambda gold, exact: {"gold": gold, "exact": exact}  # noqa: E731
    curve = lambda *golds: [{"iteration": 5 * i, "gold": g}  # noqa: E731
                            for i, g in enumerate(golds)]
    rl = {"ppo": {"curve": curve(0.7, 0.9, 0.8), "selected_iteration": 5},
          "grpo": {"curve": curve(0.7, 0.85), "selected_iteration": None},
          "rloo": {"curve": [], "selected_iteration": None}}
    held_out = {"ppo": row(0.7, 0), "grpo": row(0.9, 0), "rloo": row(0.95, 0)}
    assert best_algorithm(rl, held_out) == "ppo"  # chosen on validation, not held-out, prompts
    assert best_algorithm({"rloo": rl["rloo"], "x": rl["rloo"]}, held_out | {"x": row(0.1, 0)}) \
        == "rloo"  # no validation gold: held-out gold decides
    res = {"algorithm": "grpo", "algorithms": ["ppo", "grpo", "rloo"],
           "policies": {"sft": row(0.7, 0.2), "ppo": row(0.79, 0.4), "grpo": row(0.82, 0.45),
                        "rloo": row(0.68, 0.2), "bon_16": row(0.76, 0.36)}}
    v = verdict(res)
    assert v.startswith("verdict: GRPO beats SFT on the task's gold score: 0.700 -> 0.820"), v
    assert v.endswith("the others: PPO 0.790 (+0.090), RLOO 0.680 (-0.020)"), v


# ---- DPO, by hand ----------------------------------------------------------------------------
def test_dpo_loss_hand_computed():
    # pairs: 0 over 1, logits (-1 + 2) - (-1.5 + 1.5) = 1; 2 over 3, (-1 + 4) - (-2 + 3) = 2
    pol = torch.tensor([-1.0, -2.0, -1.0, -4.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.5, -2.0, -3.0])
    pairs = torch.tensor([[0, 1], [2, 3]])
    w = torch.tensor([0.5, 0.5])
    loss, s = dpo_loss(pol, ref, pairs, w, beta=0.5)
    want = 0.5 * (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-1.0)))  # -log sigma(b l)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    assert s["accuracy"] == 1.0 and s["reward_margin"] == pytest.approx(0.5 * (1 + 2) / 2)
    assert s["chosen_rewards"] == pytest.approx((0.25 + 0.5) / 2)
    assert s["chosen_logps"] == pytest.approx(-1.0) and s["rejected_logps"] == pytest.approx(-3.0)
    loss.backward()
    assert pol.grad[0] < 0 < pol.grad[1]  # descent raises the chosen, lowers the rejected
    cons, _ = dpo_loss(pol, ref, pairs[:1], torch.ones(1), beta=0.5, label_smoothing=0.1)
    assert float(cons.detach()) == pytest.approx(0.9 * math.log1p(math.exp(-0.5))
                                        + 0.1 * math.log1p(math.exp(0.5)), abs=1e-6)
    ipo, _ = dpo_loss(pol, ref, pairs, w, beta=0.5, loss_type="ipo")
    assert float(ipo.detach()) == pytest.approx(0.5 * (1 - 1) ** 2 + 0.5 * (2 - 1) ** 2)  # 1/(2b) = 1


def test_dpo_pairs_from_a_ranking():
    from trellis.launcher.jobs.dpo.data import dpo_batch
    rows = [{"prompt_ids": [9, 10], "responses_ids": [[11], [12, 13], [14]], "ranking": [1, 0, 2]},
            {"prompt_ids": [9], "responses_ids": [[11], [12]], "ranking": [0, 0]}]  # a tie
    seq, pairs = dpo_batch(rows, 8, 8)
    assert seq["response_ids"].shape == (5, 3)  # 5 responses, longest 2 tokens + EOS
    got = sorted(zip(pairs["chosen"].tolist(), pairs["rejected"].tolist()))
    assert got == [(0, 2), (1, 0), (1, 2)]  # all 3 pairs of the ranking; the tie makes none
    assert torch.allclose(pairs["weight"], torch.full((3,), 1 / 3))
    assert torch.allclose(pair_weights(torch.tensor([0, 0, 1]), "prompt"),
                          torch.tensor([0.25, 0.25, 0.5]))


def test_dpo_reference_group_must_match_the_policy_ranks():
    from trellis.launcher.jobs.dpo.config import DPOJobConfig
    with pytest.raises(ValueError, match="reference.parallel.num_workers 1 must equal"):
        load_config(DPOJobConfig, None, ["policy_init=x", "data.train=y",
                                         "policy.parallel.num_workers=2"])


def test_bon_bad_prompt_row_is_named(tmp_path):
    from trellis.launcher.jobs.bon.driver import read_prompts
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "sort: fig ="}\n{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:2: needs a non-empty string 'prompt'"):
        read_prompts(f)


# ---- real runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    from trellis.launcher.jobs.pipeline.config import PipelineConfig
    from trellis.launcher.jobs.pipeline.driver import run_stages
    root = tmp_path_factory.mktemp("rlalg")
    return run_stages(load_config(PipelineConfig, None, [f"run_dir={root}", *STAGES]),
                      local=True, ppo_stage=False)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def rl_job(chain: dict, run_dir: Path, algorithm: str, *extra: str):
    return load_config(PPOJobConfig, None, [
        f"run_dir={run_dir}", f"actor_init={chain['sft']}", f"reward_init={chain['rm']}",
        f"prompts={chain['task'] / 'prompts_train.jsonl'}", f"eval_prompts={chain['prompts_val']}",
        f"ppo.algorithm={algorithm}", "ppo.group_size=4", "ppo.prompts_per_iteration=8",
        "ppo.max_new_tokens=8", "ppo.max_prompt_len=24", "ppo.minibatches=2", "ppo.ppo_epochs=2",
        "ppo.temperature=0.7", "ppo.eval_prompts=0", "actor.optim.lr=1e-4", "metrics.port=-1",
        *extra])


@pytest.mark.integration
def test_grpo_on_ray_starts_no_critic_group(chain, tmp_path):
    import ray
    from ray.util.state import list_actors

    from trellis.launcher.jobs.ppo.driver import ppo
    from trellis.parallel.worker_group import ensure_ray
    ensure_ray(num_cpus=2, log_to_driver=False, include_dashboard=True)  # the state API
    try:
        res = ppo(rl_job(chain, tmp_path, "grpo", "train.steps=2", "ppo.eval_prompts=8",
                         "gold=demo", *[f"{r}.parallel.cpus_per_worker=0.3"
                                        for r in ("actor", "reference", "reward")]))
        address = ray.get_runtime_context().gcs_address
        names = {a.name for a in list_actors(address, detail=True, limit=1000)}
    finally:
        ray.shutdown()
    assert {"actor/rank0", "reference/rank0", "reward/rank0"} <= names, names
    assert not any(n and n.startswith("critic/") for n in names), names
    assert set(res["info"]) == {"actor", "reference", "reward"}
    assert res["iteration"] == 2 and not (tmp_path / "critic").exists()
    log = rows(tmp_path / "metrics" / "ppo.csv")
    assert len(log) == 2
    for key in ("actor/kl_loss", "actor/clip_fraction", "group_reward_std", "zero_std_groups",
                "phase_seconds/generate", "phase_seconds/reward", "phase_seconds/train"):
        assert log[-1][key] != "", key
    assert "critic/value_loss" not in log[-1] and "phase_seconds/value" not in log[-1]
    assert "gold" in res["end_eval"] and (tmp_path / "best" / "model.json").is_file()


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_resume_reproduces_next_iteration(chain, tmp_path, algorithm):
    from trellis.launcher.jobs.ppo.driver import is_done, ppo
    straight = ppo(rl_job(chain, tmp_path / "straight", algorithm, "train.steps=3"), local=True)
    assert set(straight["info"]) == {"actor", "reference", "reward"}
    job = rl_job(chain, tmp_path / "resumed", algorithm, "train.steps=3", "train.stop_after=2")
    ppo(job, local=True)
    assert not is_done(job)
    ppo(rl_job(chain, tmp_path / "resumed", algorithm, "train.steps=3"), local=True)
    a, b = rows(tmp_path / "straight" / "metrics" / "ppo.csv"), \
        rows(tmp_path / "resumed" / "metrics" / "ppo.csv")
    assert [r["step"] for r in b] == ["1", "2", "3"]
    for key in ("score", "kl", "actor/policy_loss", "advantage_abs_mean", "response_length"):
        assert abs(float(a[2][key]) - float(b[2][key])) <= 1e-5, (key, a[2][key], b[2][key])


@pytest.mark.integration
def test_pipeline_runs_one_rl_stage_per_algorithm(chain):
    """rl_algorithms: one RL stage per algorithm from the same SFT policy and RM, each in its
    own run dir, none with a critic; DPO on the RM's comparisons; the table has a row per
    algorithm (and the _last row of the online ones), the verdict the best."""
    from trellis.launcher.jobs.dpo.config import DPOJobConfig
    from trellis.launcher.jobs.pipeline.config import PipelineConfig
    from trellis.launcher.jobs.pipeline.driver import run_stages
    from trellis.launcher.jobs.pipeline.report import best_algorithm, evaluate
    root = chain["sft"].parent
    cfg = load_config(PipelineConfig, None, [
        f"run_dir={root}", *STAGES, "rl_algorithms=[grpo, dpo]", "ppo_iterations=2",
        "ppo_eval_every=0", "ppo.prompts_per_iteration=16", "ppo.max_new_tokens=8",
        "dpo_stage.steps=3", "dpo.prompts_per_step=8", "eval_prompts=8", "samples_shown=1",
        "precision=fp32"])  # 3 DPO steps move bf16 weights less than their rounding
    dirs = run_stages(cfg, local=True)
    assert dirs["rl"] == {"grpo": root / "grpo", "dpo": root / "dpo"}
    ran = load_config(PPOJobConfig, str(root / "grpo" / "config.yaml"), [])
    assert (ran.ppo.algorithm, ran.ppo.prompts_per_iteration, ran.ppo.group_size) == ("grpo", 4, 4)
    assert ran.actor_init == str(chain["sft"]) and not (root / "grpo" / "critic").exists()
    ran = load_config(DPOJobConfig, str(root / "dpo" / "config.yaml"), [])
    assert ran.policy_init == str(chain["sft"]) and ran.train.steps == 3
    assert ran.data.train == str(root / "task" / "comparisons.jsonl")  # the RM's data
    res = evaluate(cfg, dirs, None)
    assert {"grpo", "grpo_last", "dpo"} <= set(res["policies"])
    assert "dpo_last" not in res["policies"]
    # DPO moved the policy: its held-out KL to SFT is no longer 0.
    assert res["policies"]["dpo"]["kl"] > 0, res["policies"]["dpo"]
    # DPO is scored on the validation prompts too, so the best is picked on equal ground.
    assert [r["iteration"] for r in res["rl"]["grpo"]["curve"]] == [0, 2]
    assert [r["iteration"] for r in res["rl"]["dpo"]["curve"]] == [3]
    best = res["algorithm"]
    assert best == best_algorithm(res["rl"], res["policies"])
    other = ({"grpo", "dpo"} - {best}).pop().upper()
    assert res["verdict"].startswith(f"verdict: {best.upper()} ")
    assert f"the others: {other} " in res["verdict"]


def dpo_job(chain: dict, run_dir: Path, *extra: str):
    from trellis.launcher.jobs.dpo.config import DPOJobConfig
    return load_config(DPOJobConfig, None, [
        f"run_dir={run_dir}", f"policy_init={chain['sft']}",
        f"data.train={chain['task'] / 'comparisons.jsonl'}", "data.val_fraction=0.2",
        "dpo.prompts_per_step=16", "dpo.max_prompt_len=16", "dpo.max_response_len=12",
        "dpo.beta=0.5", "policy.optim.lr=3e-4", "metrics.port=-1", "train.log_every=1",
        "train.eval_every=0", *extra])


@pytest.mark.integration
def test_dpo_loss_falls_and_heldout_implicit_reward_accuracy_rises(chain, tmp_path):
    from trellis.launcher.jobs.dpo.driver import dpo
    res = dpo(dpo_job(chain, tmp_path, "train.steps=30"), local=True)
    log = rows(tmp_path / "metrics" / "dpo.csv")
    first, last = [float(r["loss"]) for r in log[:5]], [float(r["loss"]) for r in log[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.05, (first, last)
    start, end = res["start_eval"], res["end_eval"]
    print("dpo held-out", {k: (round(start[k], 3), round(end[k], 3)) for k in start})
    # The policy starts as the reference: every implicit reward is 0 (ties count wrong).
    assert start["accuracy"] == 0.0 and start["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert end["accuracy"] >= 0.65 and end["loss"] < start["loss"], end
    assert end["chosen_rewards"] > end["rejected_rewards"]
    for key in ("reward_margin", "chosen_logps", "rejected_logps", "pairs_per_second"):
        assert log[-1][key] != "", key


@pytest.mark.integration
def test_dpo_precomputed_reference_matches_the_group_and_resumes(chain, tmp_path):
    from trellis.launcher.jobs.dpo.driver import dpo, is_done
    # fp32: the two reference paths batch rows differently, which bf16 rounds differently
    fp32 = ("policy.parallel.precision=fp32", "reference.parallel.precision=fp32")
    group = dpo(dpo_job(chain, tmp_path / "group", "train.steps=3", *fp32), local=True)
    pre = dpo(dpo_job(chain, tmp_path / "pre", "train.steps=3", "dpo.reference=precompute",
                      *fp32), local=True)
    assert set(group["info"]) == {"policy", "reference"} and set(pre["info"]) == {"policy"}
    assert (tmp_path / "pre" / "reference_logps.json").is_file()
    for key in ("loss", "accuracy", "chosen_logps"):  # the same numbers, batch padding aside
        assert abs(group[key] - pre[key]) <= 1e-4, (key, group[key], pre[key])
    job = dpo_job(chain, tmp_path / "resumed", "train.steps=3", "dpo.reference=precompute",
                  "train.stop_after=2", *fp32)
    dpo(job, local=True)
    assert not is_done(job)
    dpo(dpo_job(chain, tmp_path / "resumed", "train.steps=3", "dpo.reference=precompute",
                *fp32), local=True)
    a, b = rows(tmp_path / "pre" / "metrics" / "dpo.csv"), \
        rows(tmp_path / "resumed" / "metrics" / "dpo.csv")
    assert [r["step"] for r in b] == ["1", "2", "3"]
    for key in ("loss", "reward_margin", "chosen_logps", "rejected_logps"):
        assert abs(float(a[2][key]) - float(b[2][key])) <= 1e-5, (key, a[2][key], b[2][key])


@pytest.mark.integration
def test_bon_writes_an_sft_set_of_the_rm_picks(chain, tmp_path):
    from trellis.data_pipeline.structured import StructuredDataset
    from trellis.data_pipeline.tokenizer import Tokenizer
    from trellis.launcher.cli import main
    from trellis.launcher.jobs.finetune.driver import prepare_rows
    from trellis.model.io import load_module
    from trellis.rl.policy_eval import rm_scores
    out = tmp_path / "picks.jsonl"
    code = main(["bon", "--run-dir", str(tmp_path), "--set", f"policy={chain['sft']}",
                 "--set", f"reward={chain['rm']}", "--set", f"prompts={chain['prompts_val']}",
                 "--set", "max_prompts=12", "--set", "n=4", "--set", "max_new_tokens=8",
                 "--set", f"out={out}", "--set", "gold=demo"])
    assert code == 0
    picks = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(picks) <= 12 and all(p["response"] for p in picks)
    tok = Tokenizer(chain["tokenizer"])
    rm = load_module(tmp_path / "init" / "reward", head="score")[0]
    again = rm_scores(rm, tok, [p["prompt"] for p in picks], [p["response"] for p in picks])
    assert torch.allclose(again, torch.tensor([p["score"] for p in picks]), atol=1e-4)
    ds = StructuredDataset(prepare_rows(str(out), "demonstrations", tok, tmp_path / "ingested"))
    assert len(ds) == len(picks)  # an SFT demonstrations set as it is
