"""What the reward model scores and which weights a stage evaluates: each test here would
have caught a bug that made RLHF look worse than it was (issue 11's diagnosis)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trellis.data_pipeline.collate import PairCollator, ScoreCollator
from trellis.data_pipeline.tokenizer import EOS_ID, PAD_ID
from trellis.rl.experience import with_eos

VOCAB = 40


def _score_model(seed: int = 0):
    from trellis.model import GPT, ModelConfig
    from trellis.model.heads import ScoreModel
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    return ScoreModel(GPT(cfg)).eval()


def test_score_rows_end_at_eos_for_every_row():
    rows = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11]},
            {"prompt_ids": [5], "response_ids": [12]},
            {"prompt_ids": [5, 6], "response_ids": []}]
    b = ScoreCollator(max_len=16)(rows)
    ids, last = b["input_ids"], b["last_index"]
    assert ids[torch.arange(3), last].tolist() == [EOS_ID] * 3
    assert b["attention_mask"].sum(1).tolist() == (last + 1).tolist()
    assert ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, EOS_ID]  # the longest row keeps its EOS


def test_pair_rows_are_score_rows():
    rows = [{"prompt_ids": [5, 6], "responses_ids": [[8, 9, 10], [8]], "ranking": [0, 1]}]
    pairs = PairCollator(max_len=16)(rows)
    flat = ScoreCollator(max_len=16)([{"prompt_ids": [5, 6], "response_ids": r}
                                      for r in ([8, 9, 10], [8])])
    for k in ("input_ids", "attention_mask", "last_index"):
        assert torch.equal(pairs[k], flat[k])


class _Tok:
    """Token ids written as text: "5 6 7" <-> [5, 6, 7] (the RM sees exactly these ids)."""
    def encode(self, s: str) -> list[int]:
        return [int(x) for x in s.split()]


def test_rm_scores_read_the_eos_of_the_longest_row_too():
    from trellis.rl.policy_eval import rm_scores
    rm = _score_model()
    prompts, responses = ["5 6", "5 6"], ["8 9 10 11 12", "8"]
    got = rm_scores(rm, _Tok(), prompts, responses)
    want = torch.stack([rm(torch.tensor([[5, 6] + [int(x) for x in r.split()] + [EOS_ID]]))[0]
                        for r in responses])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_eos_appends_only_where_missing():
    ids = torch.tensor([[7, 8, EOS_ID], [7, 8, 9], [7, PAD_ID, PAD_ID], [PAD_ID] * 3])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()
    out, m = with_eos(ids, mask, EOS_ID)
    assert out.tolist() == [[7, 8, EOS_ID, 0], [7, 8, 9, EOS_ID], [7, EOS_ID, PAD_ID, 0],
                            [EOS_ID, PAD_ID, PAD_ID, 0]]
    assert m.sum(1).tolist() == [3, 4, 2, 1]


# ---- a re-run stage is evaluated with its new weights ---------------------------------------
def _train_and_save(run_dir, seed: int, step: int = 2):
    from trellis.launcher.weights import write_run_model
    from trellis.model import GPT, ModelConfig
    from trellis.parallel.checkpoint import save_checkpoint
    from trellis.parallel.config import OptimConfig, ParallelConfig
    from trellis.parallel.engine import Engine
    torch.manual_seed(seed)
    run_dir.mkdir(parents=True)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    engine = Engine(GPT(cfg), OptimConfig(lr=1e-2, warmup_steps=1),
                    ParallelConfig(zero_stage=0, micro_batch_size=2), total_steps=4)
    write_run_model(run_dir, dataclasses.asdict(cfg), "lm")
    save_checkpoint(run_dir, step, {"model": engine})
    return engine.consolidated_state_dict()


@pytest.mark.integration
def test_materialize_rebuilds_when_the_source_run_was_rerun(tmp_path):
    import shutil

    from trellis.launcher.weights import materialize
    from trellis.model.io import load_module
    run, dest = tmp_path / "sft", tmp_path / "eval" / "sft"
    first = _train_and_save(run, seed=0)
    assert materialize(run, dest) == dest
    shutil.rmtree(run)                      # the stage is re-run in the same run dir
    second = _train_and_save(run, seed=1)
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])
    module = load_module(materialize(run, dest))[0]
    torch.testing.assert_close(module.state_dict()["lm_head.weight"], second["lm_head.weight"],
                               rtol=0, atol=0)
    stamp = (dest / "model.json").stat().st_mtime_ns
    materialize(run, dest)                  # unchanged source: the copy is reused
    assert (dest / "model.json").stat().st_mtime_ns == stamp


# ---- best-of-n, selection, ensembles ---------------------------------------------------------
def test_best_of_n_by_hand():
    from trellis.rl.best_of_n import best_of_n_curve, bon_kl, rm_gold_agreement
    rm = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.7, 0.1, 0.3, 0.8]])
    gold = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 1.0, 0.4, 0.0]])
    c = {r["n"]: r for r in best_of_n_curve(rm, gold, ns=(1, 2, 4))}
    assert c[1]["gold"] == pytest.approx((1.0 + 0.2) / 2) and c[1]["kl"] == 0.0
    assert c[2]["gold"] == pytest.approx((0.0 + 0.2) / 2)        # picks 0.9 and 0.7
    assert c[4]["gold"] == pytest.approx((0.0 + 0.0) / 2)        # picks 0.9 and 0.8
    assert c[4]["gold_by_gold"] == pytest.approx(1.0)
    assert c[2]["rm"] == pytest.approx((0.9 + 0.7) / 2)
    assert bon_kl(16) == pytest.approx(2.7726 - 15 / 16, abs=1e-4)
    agree = rm_gold_agreement(rm, gold)
    # prompt 0: pairs by gold (0>1,0>2,0>3,2>1,3>1): RM right on 0>3 only... count by hand
    assert agree["pairs"] == 5 + 6
    right = [(0.1 > 0.9), (0.1 > 0.5), (0.1 > 0.2), (0.5 > 0.9), (0.2 > 0.9),
             (0.1 > 0.7), (0.1 > 0.3), (0.1 > 0.8), (0.7 > 0.8), (0.3 > 0.7), (0.3 > 0.8)]
    assert agree["pairwise_accuracy"] == pytest.approx(sum(right) / 11)


def test_all_equal_scores_pick_the_first_sample_and_give_no_nan():
    from trellis.rl.best_of_n import best_of_n_curve, rm_gold_agreement
    rm, gold = torch.zeros(3, 4), torch.ones(3, 4)
    assert all(r["gold"] == 1.0 for r in best_of_n_curve(rm, gold, ns=(1, 4)))
    assert rm_gold_agreement(rm, gold)["pairs"] == 0


def test_selection_keeps_the_best_within_the_kl_budget_and_stops_on_patience():
    from trellis.rl.selection import SelectionConfig, Selector
    s = Selector(SelectionConfig(kl_budget=5.0, patience=2), has_gold=True)
    assert s.key == "gold"
    assert s.update(0, {"gold": 0.5, "rm": 0.0, "kl": 0.0})
    assert s.update(5, {"gold": 0.6, "rm": 1.0, "kl": 2.0})
    assert not s.update(10, {"gold": 0.9, "rm": 2.0, "kl": 7.0})  # over the KL budget
    assert not s.should_stop()
    assert not s.update(15, {"gold": 0.55, "rm": 3.0, "kl": 3.0})
    assert s.should_stop() and s.best_iteration == 5
    t = Selector(SelectionConfig(), has_gold=False)
    t.load_state_dict(s.state_dict())
    assert t.best_iteration == 5 and t.since_best == 2
    assert t.key == "rm" and t.update(20, {"rm": 0.0, "rm_heldout": 0.7, "kl": 0.0})
    with pytest.raises(ValueError, match="gold"):
        Selector(SelectionConfig(criterion="gold"), has_gold=False)


def test_ensemble_reward_reductions():
    from trellis.rl.ppo_math import ensemble_reward
    s = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    assert ensemble_reward(s, "mean").tolist() == [2.0, 2.0]
    assert ensemble_reward(s, "min").tolist() == [1.0, 2.0]
    assert ensemble_reward(s, "mean_minus_std", 0.5).tolist() == [1.5, 2.0]
    assert ensemble_reward(s[:, :1], "min").tolist() == [1.0, 2.0]


def test_ensemble_scores_each_member():
    from trellis.model.heads import ScoreEnsemble
    a, b = _score_model(0), _score_model(1)
    ids = torch.tensor([[5, 6, 7, EOS_ID]])
    out = ScoreEnsemble([a, b])(ids)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out[:, 1], b(ids))


def test_shipped_rlhf_configs_load():
    from pathlib import Path

    from trellis.launcher.config_loader import load_config
    from trellis.launcher.jobs.finetune.config import RMJobConfig
    from trellis.launcher.jobs.pipeline.config import PipelineConfig
    from trellis.launcher.jobs.ppo.config import PPOJobConfig
    configs = Path(__file__).resolve().parents[1] / "launcher" / "configs"
    rm = load_config(RMJobConfig, str(configs / "hh_rm.yaml"), ["init_from=x", "data.train=y"])
    assert rm.data.max_prompt_len < rm.data.max_len
    ppo = load_config(PPOJobConfig, str(configs / "hh_ppo.yaml"),
                      ["actor_init=a", "reward_init=b", "prompts=c"])
    assert ppo.ppo.long_prompts == "truncate_left" and ppo.selection.criterion == "rm"
    pipe = load_config(PipelineConfig, str(configs / "pipeline.yaml"), [])
    assert not pipe.pretrain.packing and pipe.comparisons_from == "mixed"
