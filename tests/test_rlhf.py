"""RLHF on the embedded demo task: SFT, the reward model from rankings, PPO with four
worker groups (real Ray actors, real DeepSpeed engines), resume, and bad input.

One module fixture trains the tiny pretrain -> SFT -> RM chain once, in-process."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.jobs.pipeline.driver import run_stages
from trellis.launcher.jobs.pipeline.config import PipelineConfig
from trellis.launcher.jobs.ppo.config import PPOJobConfig

# Small enough for CI on 2 cores, large enough that every stage learns something.
STAGES = ["model.preset=gpt-tiny", "model.n_layer=2", "model.n_head=2", "model.d_model=64",
          "pretrain.steps=150", "pretrain.lr=3e-3", "sft.steps=120", "sft.lr=1e-3",
          "rm.steps=300", "rm.lr=1e-3", "task.n_comparison_prompts=600", "task.n_demonstrations=200",
          "comparisons_from=corrupt", "pretrain_lines=6000",
          "pretrain.micro_batch_size=16", "format_gate=0"]  # 150 steps teach the layout, not copying: the gate would stop it


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rlhf")
    cfg = load_config(PipelineConfig, None, [f"run_dir={root}", *STAGES])
    return run_stages(cfg, local=True, ppo_stage=False)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from trellis.parallel.worker_group import ensure_ray
    # The dashboard serves Ray's state API (ray.util.state), which the colocation test reads.
    ensure_ray(num_cpus=2, log_to_driver=False, include_dashboard=True)
    yield
    ray.shutdown()


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def ppo_job(chain: dict, run_dir: Path, *extra: str) -> PPOJobConfig:
    base = [f"run_dir={run_dir}", f"actor_init={chain['sft']}", f"reward_init={chain['rm']}",
            f"prompts={chain['task'] / 'prompts_train.jsonl'}",
            f"eval_prompts={chain['prompts_val']}", "ppo.prompts_per_iteration=64",
            "ppo.max_new_tokens=10", "ppo.max_prompt_len=24", "ppo.eval_prompts=64",
            "ppo.minibatches=4", "ppo.ppo_epochs=4", "ppo.temperature=0.7",
            "actor.optim.lr=1e-4", "critic.optim.lr=5e-4", "metrics.port=-1",
            "ppo.init_beta=0.02"]
    return load_config(PPOJobConfig, None, base + list(extra))


@pytest.mark.integration
def test_sft_learns_demonstrations(chain):
    ev = rows(chain["sft"] / "metrics" / "eval.csv")
    tr = rows(chain["sft"] / "metrics" / "train.csv")
    assert float(tr[-1]["loss"]) < float(tr[0]["loss"]) - 0.3
    assert float(ev[-1]["loss"]) < float(tr[0]["loss"])


@pytest.mark.integration
def test_reward_model_ranks_held_out_pairs(chain):
    ev = rows(chain["rm"] / "metrics" / "eval.csv")
    assert float(ev[-1]["accuracy"]) >= 0.85, ev[-1]


def test_tie_makes_no_pair():
    from trellis.data_pipeline.collate import ranking_pairs
    from trellis.rl.rm_loss import pairwise_rm_loss
    # D > C > A = B as ranks per response [A, B, C, D] = [2, 2, 1, 0]: 5 pairs, not 6.
    pairs = ranking_pairs([2, 2, 1, 0])
    assert sorted(pairs) == sorted([(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
    scores = torch.tensor([0.0, 0.0, 1.0, 2.0], requires_grad=True)
    loss, acc = pairwise_rm_loss(scores, torch.tensor(pairs), torch.zeros(5, dtype=torch.long))
    assert acc == 1.0 and loss.item() > 0
    loss.backward()
    assert scores.grad[0] == scores.grad[1]  # the tied pair got no gradient of its own


@pytest.mark.integration
def test_ppo_four_groups_separate_raises_reward_under_kl_bound(chain, tmp_path, ray_local):
    from trellis.launcher.jobs.ppo.driver import ppo
    cfg = ppo_job(chain, tmp_path, "train.steps=12", "placement=separate", "gold=demo",
                  "train.eval_every=4",
                  "actor.parallel.num_workers=2", "actor.parallel.zero_stage=2",
                  "critic.parallel.num_workers=2", "critic.parallel.zero_stage=1",
                  "reference.parallel.num_workers=2", "reward.parallel.num_workers=2",
                  *[f"{r}.parallel.cpus_per_worker=0.2"
                    for r in ("actor", "critic", "reference", "reward")])
    res = ppo(cfg)
    info = res["info"]
    pids = [w["pid"] for role in info.values() for w in role]
    assert len(set(pids)) == 8, info  # eight distinct processes
    stages = {role: {w["zero_stage"] for w in ws} for role, ws in info.items()}
    assert stages == {"actor": {2}, "critic": {1}, "reference": {3}, "reward": {3}}
    for role in ("reference", "reward"):  # ZeRO-3: each rank holds about half
        for w in info[role]:
            assert not w["trainable"]
            assert 0.4 <= w["local_params"] / w["global_params"] <= 0.6, info[role]
    start, end = res["start_eval"], res["end_eval"]
    # Measured: +0.17 (0.43 -> 0.60) at KL 1.8 with these settings (the RM scored at EOS).
    assert end["reward_mean"] > start["reward_mean"] + 0.1, (start["reward_mean"], end["reward_mean"])
    assert 0.0 <= end["kl_mean"] < 5.0
    # Gold next to the proxy on validation prompts (this tiny chain never learned to copy
    # the prompt's words, so its gold does not move: test_rlhf_direction.py checks that).
    evals = [json.loads(line) for line in open(tmp_path / "evals.jsonl")]
    assert [e["iteration"] for e in evals] == [0, 4, 8, 12]
    assert all(0.0 <= e["gold"] <= 1.0 for e in evals) and end["gold"] == evals[-1]["gold"]
    best = max(evals, key=lambda e: e["gold"])  # the first of equals: the earliest
    assert res["best"]["best_iteration"] == best["iteration"]
    meta = json.loads((tmp_path / "best" / "model.json").read_text())
    assert meta["evaluation"]["gold"] == best["gold"] and meta["criterion"] == "gold"
    log = rows(tmp_path / "metrics" / "ppo.csv")
    assert len(log) == 12
    for key in ("phase_seconds/generate", "phase_seconds/ref", "phase_seconds/reward",
                "phase_seconds/value", "phase_seconds/train", "actor/clip_fraction",
                "actor/approx_kl", "actor/entropy", "critic/value_loss", "explained_variance",
                "kl", "score", "response_length"):
        assert log[-1][key] != "", key


@pytest.mark.integration
def test_ppo_colocated_runs(chain, tmp_path, ray_local):
    import ray
    from ray.util.state import list_actors, list_placement_groups

    from trellis.launcher.jobs.ppo.driver import ppo
    address = ray.get_runtime_context().gcs_address
    names = [f"{r}/rank0" for r in ("actor", "critic", "reference", "reward")]

    def role_actors() -> dict:  # Ray's state API keeps DEAD actors with their placement group
        return {a.actor_id: a for n in names
                for a in list_actors(address, filters=[("name", "=", n)], detail=True)}

    before = set(role_actors())  # earlier tests in this module used the same actor names
    res = ppo(ppo_job(chain, tmp_path, "train.steps=2", "placement=colocate",
                      "ppo.eval_prompts=0"))
    assert res["iteration"] == 2
    assert len({w["pid"] for role in res["info"].values() for w in role}) == 4
    ours = [a for i, a in role_actors().items() if i not in before]
    assert sorted(a.name for a in ours) == sorted(names), ours
    pg_ids = {a.placement_group_id for a in ours}
    # placement=separate would give four placement groups, one per role ('<role>-pg')
    assert len(pg_ids) == 1 and None not in pg_ids, {a.name: a.placement_group_id for a in ours}
    pgs = list_placement_groups(address, filters=[("placement_group_id", "=", pg_ids.pop())],
                                detail=True)
    assert [pg.name for pg in pgs] == ["ppo-colocated"], pgs


@pytest.mark.integration
def test_rl_worker_sigkill_of_any_role_recovers_to_same_final_metrics(chain, tmp_path, ray_local):
    """Chaos: kill -9 of one worker of a randomly chosen role at a random iteration of PPO or
    GRPO (chosen by the chaos seed too: one run costs ~80 s), with train.max_failures=1: every
    role's group is restarted from the latest complete checkpoint and the run ends exactly
    where an uninterrupted run ends. GRPO (no critic group) samples as many responses per
    iteration: 8 prompts x 4."""
    import os
    import random
    import signal
    import threading
    import time

    import ray

    from trellis.launcher.jobs.ppo.driver import ppo
    from trellis.rl.ppo_trainer import roles_of
    seed = int(os.environ.get("TRELLIS_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    algorithm = rng.choice(["ppo", "grpo"])
    alg = [] if algorithm == "ppo" else [f"ppo.algorithm={algorithm}", "ppo.group_size=4",
                                         "ppo.prompts_per_iteration=8"]
    roles = roles_of(ppo_job(chain, tmp_path, *alg).ppo)
    role, after = rng.choice(roles), rng.randint(1, 4)
    print(f"chaos: TRELLIS_CHAOS_SEED={seed}: kill {algorithm} {role}/rank0 after iteration "
          f"{after}")
    common = ("train.steps=6", "checkpoint.every=2", "ppo.eval_prompts=0", "placement=separate",
              "ppo.prompts_per_iteration=32", "ppo.minibatches=2", "ppo.ppo_epochs=2",
              *alg, *[f"{r}.parallel.cpus_per_worker=0.2" for r in roles])
    straight = ppo(ppo_job(chain, tmp_path / "straight", *common))
    run = tmp_path / "killed"
    killed: list[int] = []

    def killer() -> None:  # SIGKILL the chosen worker once iteration `after` is logged
        log = run / "metrics" / "ppo.csv"
        deadline = time.time() + 3600  # ends the thread only; the kill is an event
        while time.time() < deadline and not killed:
            if log.exists() and len(rows(log)) >= after:
                pid = ray.get(ray.get_actor(f"{role}/rank0").pid.remote())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = ppo(ppo_job(chain, run, *common, "train.max_failures=1"))
    t.join(timeout=10)
    assert killed, f"{role} was never killed (seed {seed})"
    assert res["recoveries"] == 1 and res["step"] == 6, seed
    assert killed[0] not in {w["pid"] for w in res["info"][role]}  # a new worker
    keys = ["score", "kl", "actor/policy_loss", "response_length"] + \
        (["critic/value_loss"] if "critic" in roles else ["advantage_abs_mean"])
    for key in keys:
        assert abs(res[key] - straight[key]) <= 1e-5, (seed, key, res[key], straight[key])
    assert set(res["info"]) == set(roles)
    assert straight["recoveries"] == 0


@pytest.mark.integration
def test_ppo_failures_beyond_budget_fail_clearly(chain, tmp_path, ray_local):
    import os
    import signal
    import threading

    import ray

    from trellis.launcher.jobs.ppo.driver import ppo

    def killer() -> None:  # the reward worker dies as soon as it exists
        for _ in range(3000):
            try:
                pid = ray.get(ray.get_actor("reward/rank0").pid.remote(), timeout=10)
                os.kill(pid, signal.SIGKILL)
                return
            except Exception:
                threading.Event().wait(0.1)

    threading.Thread(target=killer, daemon=True).start()
    with pytest.raises(SystemExit, match="reward/rank0 died.*max_failures=0"):
        ppo(ppo_job(chain, tmp_path, "train.steps=200", "ppo.eval_prompts=0",
                    *[f"{r}.parallel.cpus_per_worker=0.2" for r in ("actor", "critic",
                                                                     "reference", "reward")]))


@pytest.mark.integration
@pytest.mark.parametrize("ptx", [False, True], ids=["plain", "ptx"])
def test_ppo_resume_reproduces_next_iteration(chain, tmp_path, ptx):
    """Stop after 2 of 3 iterations, resume: iteration 3 equals the uninterrupted run's. With
    PPO-ptx the pretraining stream resumes where it was (its loss would differ if replayed)."""
    from trellis.launcher.jobs.ppo.driver import ppo
    extra = ["train.steps=3", "ppo.eval_prompts=0"]
    if ptx:
        extra += ["ppo.ptx_coef=0.5", f"ppo.ptx_data={chain['task'].parent / 'data' / 'pretrain'}"]
    straight = tmp_path / "straight"
    ppo(ppo_job(chain, straight, *extra), local=True)
    resumed = tmp_path / "resumed"
    ppo(ppo_job(chain, resumed, *extra, "train.stop_after=2"), local=True)
    assert json.loads((resumed / "state" / "iter-000002.json").read_text())["iteration"] == 2
    ppo(ppo_job(chain, resumed, *extra), local=True)
    a, b = rows(straight / "metrics" / "ppo.csv"), rows(resumed / "metrics" / "ppo.csv")
    assert [r["step"] for r in b] == ["1", "2", "3"]
    keys = ["score", "kl", "actor/policy_loss", "critic/value_loss", "response_length"]
    for key in keys + (["actor/ptx_loss"] if ptx else []):
        assert abs(float(a[2][key]) - float(b[2][key])) <= 1e-5, (key, a[2][key], b[2][key])


@pytest.mark.integration
def test_prompt_longer_than_context_is_a_clear_error(chain, tmp_path):
    from trellis.launcher.jobs.ppo.driver import ppo
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "sort: apple fig ="}) + "\n" +
                    json.dumps({"prompt": "sort: " + " ".join(["apple"] * 40) + " ="}) + "\n")
    with pytest.raises(ConfigError, match=r"long.jsonl: prompt row 1 has \d+ tokens"):
        ppo(ppo_job(chain, tmp_path / "run", f"prompts={long}"), local=True)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        ppo(ppo_job(chain, tmp_path / "run2", "ppo.max_prompt_len=60"), local=True)


@pytest.mark.integration
def test_too_few_rows_fail_before_training_in_one_line(chain, tmp_path, capsys):
    from trellis.launcher.cli import main
    demos = tmp_path / "few.jsonl"
    demos.write_text("".join(json.dumps({"prompt": "sort: pear fig =", "response": "fig pear"})
                             + "\n" for _ in range(12)))
    base = ["sft", "--local", "--run-dir", str(tmp_path / "sft"), "--set", f"init_from={chain['sft']}",
            "--set", f"data.train={demos}", "--set", "metrics.port=-1"]
    assert main(base + ["--set", "parallel.micro_batch_size=16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config key 'data.train': 11 training rows are too few" in err
    assert not (tmp_path / "sft" / "checkpoints").exists()  # nothing trained
    assert main(base + ["--set", "data.val_fraction=0.01", "--set", "parallel.micro_batch_size=4",
                        "--set", "train.steps=2"]) == 0  # 1 held-out row: evaluated in a batch of 1


@pytest.mark.integration
def test_bad_comparisons_are_counted_and_named(chain, tmp_path, capsys):
    from trellis.launcher.jobs.finetune.driver import rm
    from trellis.launcher.jobs.finetune.config import RMJobConfig
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "sort: pear fig =", "responses": ["fig pear", "pear fig"], "ranking": [0, 1]}
    lines = [good] * 40 + [
        {"prompt": "sort: fig lime =", "responses": ["fig lime", ""], "ranking": [0, 1]},
        {"prompt": "sort: fig lime =", "responses": ["fig lime", "lime"], "ranking": [0, 1, 2]}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(RMJobConfig, None, [f"run_dir={tmp_path / 'rm'}", f"init_from={chain['sft']}",
                                          f"data.train={bad}", "train.steps=1", "metrics.port=-1",
                                          "parallel.micro_batch_size=4"])
    rm(cfg, local=True)
    err = capsys.readouterr().err
    assert "bad.jsonl:41" in err and "empty" in err
    assert "bad.jsonl:42" in err and "ranking" in err
    manifest = json.loads((tmp_path / "rm" / "data" / "train" / "manifest.json").read_text())
    assert manifest["skipped"] == {"empty": 1, "bad_ranking": 1}


@pytest.mark.integration
def test_pipeline_refuses_a_run_dir_made_with_another_task(chain):
    from trellis.launcher.jobs.pipeline.driver import prepare_task
    root = chain["task"].parent
    other = load_config(PipelineConfig, None, [f"run_dir={root}", *STAGES, "task.k_responses=5"])
    with pytest.raises(ConfigError, match="made with another task config"):
        prepare_task(other, root)
    same = load_config(PipelineConfig, None, [f"run_dir={root}", *STAGES])
    assert prepare_task(same, root)["demonstrations"].is_file()


# ---- the real-data path: HH-RLHF-format dialogues -> trellis rm -> trellis ppo ----------------
def _hh_rows(n: int, seed: int) -> list[dict]:
    """HH-format comparisons on the demo's vocabulary: the chosen last turn is the rule's
    answer, the rejected one a corruption; every third conversation has earlier turns, so its
    prompt is longer than the configs' max_prompt_len below."""
    import random

    from trellis.rl.demo_task import DemoTaskConfig, answer, corrupt, make_prompts
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(make_prompts(n, seed, "train", DemoTaskConfig())):
        history = "".join(f"\n\nHuman: {q}\n\nAssistant: {answer(q)}"
                          for q in make_prompts(3, seed * 1000 + i, "train")) if i % 3 == 0 else ""
        bad = corrupt(p, 2, rng)
        while bad == answer(p):
            bad = corrupt(p, 2, rng)
        conv = f"{history}\n\nHuman: {p}\n\nAssistant:"
        out.append({"chosen": f"{conv} {answer(p)}", "rejected": f"{conv} {bad}"})
    return out


@pytest.mark.integration
def test_hh_dialogues_train_an_rm_then_ppo_selects_by_a_heldout_rm(chain, tmp_path, capsys):
    from trellis.launcher.jobs.finetune.config import RMJobConfig
    from trellis.launcher.jobs.finetune.driver import rm
    from trellis.launcher.jobs.ppo.driver import ppo
    train, test = tmp_path / "hh_train.jsonl", tmp_path / "hh_test.jsonl"
    for path, n, seed in ((train, 240, 1), (test, 16, 2)):
        path.write_text("".join(json.dumps(r) + "\n" for r in _hh_rows(n, seed)))
    rm_dirs = []
    for seed in (0, 1):  # the reward, and a held-out judge with another seed
        cfg = load_config(RMJobConfig, "launcher/configs/hh_rm.yaml", [
            f"run_dir={tmp_path / f'rm{seed}'}", f"seed={seed}", f"init_from={chain['sft']}",
            f"data.train={train}", "data.max_len=48", "data.max_prompt_len=32",
            "parallel.zero_stage=0", "optim.lr=1e-3", "optim.warmup_steps=5",
            "train.steps=60", "train.eval_every=0", "metrics.port=-1"])
        rm(cfg, local=True)
        rm_dirs.append(cfg.run_dir)
    out = capsys.readouterr().out
    assert "80 of 240 rows keep only the last data.max_prompt_len=32 prompt tokens" in out, out
    acc = float(rows(Path(rm_dirs[0]) / "metrics" / "eval.csv")[-1]["accuracy"])
    assert acc >= 0.8, acc  # held-out pairs: the chosen answer is the rule's
    job = load_config(PPOJobConfig, "launcher/configs/hh_ppo.yaml", [
        f"run_dir={tmp_path / 'ppo'}", f"actor_init={chain['sft']}", f"reward_init={rm_dirs[0]}",
        f"heldout_reward={rm_dirs[1]}", f"prompts={train}", f"eval_prompts={test}",
        "ppo.max_prompt_len=32", "ppo.max_new_tokens=10", "ppo.prompts_per_iteration=16",
        "ppo.eval_prompts=16", "ppo.ppo_epochs=1", "ppo.minibatches=2", "train.steps=2",
        "train.eval_every=1", "placement=colocate", "metrics.port=-1",
        *[f"{r}.parallel.zero_stage=0" for r in ("actor", "critic")]])
    res = ppo(job, local=True)
    out = capsys.readouterr().out
    assert "80 of 240 prompts keep only their last ppo.max_prompt_len=32 tokens" in out, out
    evals = [json.loads(line) for line in open(tmp_path / "ppo" / "evals.jsonl")]
    assert [e["iteration"] for e in evals] == [0, 1, 2]
    assert all("rm_heldout" in e and "gold" not in e for e in evals)
    best = max(evals, key=lambda e: e["rm_heldout"])  # selection by the judge, not the proxy
    assert res["best"]["best_iteration"] == best["iteration"]
    meta = json.loads((tmp_path / "ppo" / "best" / "model.json").read_text())
    assert meta["iteration"] == best["iteration"] and meta["criterion"] == "rm"


@pytest.mark.integration
def test_hh_prompt_over_the_limit_is_an_error_by_default(chain, tmp_path):
    from trellis.launcher.jobs.ppo.driver import ppo
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _hh_rows(6, 3)))
    job = ppo_job(chain, tmp_path / "ppo", f"prompts={path}", "eval_prompts=",
                  "ppo.prompts_per_iteration=2", "ppo.minibatches=1", "ppo.max_prompt_len=32")
    with pytest.raises(ConfigError, match=r"prompt row 0 has \d+ tokens, more than "
                                          r"ppo.max_prompt_len 32 \(or set ppo.long_prompts"):
        ppo(job, local=True)


@pytest.mark.integration
def test_format_gate_stops_the_pipeline_in_one_line(chain, capsys):
    from trellis.launcher.cli import main
    # The chain's run dir: pretraining is done (skipped); its 150 steps did not teach copying.
    root = chain["pretrain"].parent
    code = main(["pipeline", "--local", "--set", f"run_dir={root}",
                 *[a for kv in STAGES if not kv.startswith("format_gate")
                   for a in ("--set", kv)], "--set", "format_gate=0.99"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "trellis pipeline: error: the pretrained policy's answers use exactly the " \
           "prompt's words for only" in err and "(format_gate 99%)" in err
