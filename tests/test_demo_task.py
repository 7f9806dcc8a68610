"""The embedded RLHF demo task: the rule, partial-credit scores, the simulated labeler (ties,
noise), disjoint and deterministic prompt sets, and files that the real SentencePiece
tokenizer and structured ingest accept."""
import json
import random

import pytest

from trellis.data_pipeline.structured import StructuredDataset, ingest_structured
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from trellis.rl import demo_task as d

SMALL = dict(n_demonstrations=30, n_comparison_prompts=20, n_train_prompts=50, n_eval_prompts=20)


def test_rule_answers_score_one_for_both_tasks():
    for kind in ("sort", "add"):
        cfg = d.DemoTaskConfig(kind=kind)
        for p in d.make_prompts(100, 1, "train", cfg):
            assert d.score(p, d.answer(p)) == 1.0
    assert d.answer("sort: pear fig apple =") == "apple fig pear"
    assert d.answer("add: 12+7 =") == "19"


def test_partial_credit_by_hand():
    p = "sort: pear fig apple ="
    assert d.score(p, "fig apple pear") == pytest.approx(2 / 3)   # one word misplaced
    assert d.score(p, "pear fig apple") == pytest.approx(1 / 3)   # reversed
    assert d.score(p, "apple fig") == pytest.approx(2 / 3)        # one missing
    assert d.score(p, "apple fig pear pear") == pytest.approx(3 / 4)  # one extra
    assert d.score(p, "") == 0.0 and d.score(p, "   ") == 0.0
    q = "add: 12+7 ="
    assert d.score(q, "19") == 1.0 and d.score(q, " 19") == 1.0
    assert d.score(q, "18") == pytest.approx(1 / 2)
    assert d.score(q, "119") == pytest.approx(2 / 3)
    assert d.score(q, "nineteen") == 0.0 and d.score(q, "") == 0.0


def test_corrupted_answers_score_less_the_more_they_are_corrupted():
    for kind in ("sort", "add"):
        cfg = d.DemoTaskConfig(kind=kind)
        prompts = d.make_prompts(200, 0, "train", cfg)
        rng = random.Random(0)
        means = [sum(d.score(p, d.corrupt(p, level, rng)) for p in prompts) / len(prompts)
                 for level in range(4)]
        assert means[0] == 1.0
        assert means[0] > means[1] > means[2] > means[3], (kind, means)


def test_labeler_ranks_with_ties():
    p = "sort: pear fig apple ="
    # A and B score 1/3, C 2/3, D 1  ->  D > C > A = B
    responses = ["pear fig apple", "kiwi apple", "fig apple pear", "apple fig pear"]
    assert [d.score(p, r) for r in responses] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    assert d.simulated_labeler(p, responses) == [2, 2, 1, 0]
    assert d.simulated_labeler(p, ["apple fig pear"] * 3) == [0, 0, 0]


def test_labeler_noise_is_seeded_and_changes_some_rankings():
    prompts = d.make_prompts(200, 0, "train")
    rng = random.Random(0)
    groups = [[d.corrupt(p, lv, rng) for lv in range(4)] for p in prompts]
    clean = [d.simulated_labeler(p, g) for p, g in zip(prompts, groups)]
    noisy = [d.simulated_labeler(p, g, random.Random(7), noise=0.3) for p, g in zip(prompts, groups)]
    again = [d.simulated_labeler(p, g, random.Random(7), noise=0.3) for p, g in zip(prompts, groups)]
    assert noisy == again
    changed = sum(a != b for a, b in zip(clean, noisy))
    assert 0.2 * len(prompts) < changed < len(prompts)
    with pytest.raises(ValueError, match="rng"):
        d.simulated_labeler(prompts[0], groups[0], None, noise=0.1)


def test_train_and_eval_prompts_disjoint_and_deterministic():
    for kind in ("sort", "add"):
        cfg = d.DemoTaskConfig(kind=kind)
        train = d.make_prompts(500, 3, "train", cfg)
        evals = d.make_prompts(100, 3, "eval", cfg)
        assert len(set(train)) == 500 and len(set(evals)) == 100
        key = lambda p: tuple(sorted(map(str, d.parse(p)[1])))  # noqa: E731  the item set
        assert not {key(p) for p in train} & {key(p) for p in evals}
        assert train == d.make_prompts(500, 3, "train", cfg)
        assert train != d.make_prompts(500, 4, "train", cfg)


def test_bad_prompts_and_impossible_requests_fail_clearly():
    with pytest.raises(ValueError, match="not a demo-task prompt: 'sort pear ='"):
        d.answer("sort pear =")
    with pytest.raises(ValueError, match="distinct eval prompts"):
        d.make_prompts(100, 0, "eval", d.DemoTaskConfig(n_words=4, min_items=2, max_items=2))
    with pytest.raises(ValueError, match="max_items"):
        d.DemoTaskConfig(n_words=4, max_items=5)


def test_write_demo_data_files_are_disjoint_deterministic_and_ingestable(tmp_path):
    cfg = d.DemoTaskConfig(seed=5, **SMALL)
    paths = d.write_demo_data(tmp_path / "a", cfg)
    again = d.write_demo_data(tmp_path / "b", cfg)
    for name in ("demonstrations", "comparisons", "prompts_train", "prompts_eval"):
        assert paths[name].read_bytes() == again[name].read_bytes(), name
    rows = {n: [json.loads(x) for x in paths[n].read_text().splitlines()]
            for n in ("demonstrations", "comparisons", "prompts_train", "prompts_eval")}
    assert [len(rows[n]) for n in rows] == [30, 20, 50, 20]
    sets = [{r["prompt"] for r in rows[n]} for n in rows]
    assert sum(map(len, sets)) == len(set().union(*sets))  # no prompt used twice
    assert all(d.split_of(r["prompt"]) == "eval" for r in rows["prompts_eval"])
    assert all(r["response"] == d.answer(r["prompt"]) for r in rows["demonstrations"])
    for c in rows["comparisons"]:
        assert len(c["responses"]) == 4
        assert c["ranking"] == d.simulated_labeler(c["prompt"], c["responses"])
    meta = json.loads(paths["meta"].read_text())
    assert meta["empty_responses"] == 0 and 0 < meta["mean_comparison_score"] < 1

    # real tokenizer trained on the pretraining corpus; structured ingest keeps every row
    corpus = d.write_pretrain_corpus(tmp_path, 1000, cfg)
    tok = train_tokenizer(TokenizerConfig(vocab_size=64, byte_fallback=False),
                          corpus.read_text().splitlines(), tmp_path / "tok.model")
    for kind in ("demonstrations", "comparisons"):
        m = ingest_structured(kind, [str(paths[kind])], tok, tmp_path / kind, verbose=False)
        assert m["skipped"] == {} and len(StructuredDataset(tmp_path / kind, tok)) == len(rows[kind])
    # no leading space in responses: prompt ids + response ids == ids of the pretraining line
    for r in rows["demonstrations"]:
        line = r["prompt"] + " " + r["response"]
        assert tok.encode(r["prompt"]) + tok.encode(r["response"]) == tok.encode(line)


def test_write_demo_data_with_a_sampling_policy(tmp_path):
    cfg = d.DemoTaskConfig(**SMALL)
    seen = {}

    def sample_fn(prompts, k):
        seen["k"] = k
        return [[d.answer(p), "fig", d.answer(p), "pear pear"][:k] for p in prompts]

    paths = d.write_demo_data(tmp_path, cfg, sample_fn)
    comps = [json.loads(x) for x in paths["comparisons"].read_text().splitlines()]
    assert seen["k"] == 4 and all(c["ranking"][0] == c["ranking"][2] == 0 for c in comps)
    assert json.loads(paths["meta"].read_text())["sampled"] is True
    with pytest.raises(ValueError, match="4 responses"):
        d.write_demo_data(tmp_path, cfg, lambda prompts, k: [["x"]] * len(prompts))


def test_pretrain_corpus_teaches_format_not_answer(tmp_path):
    cfg = d.DemoTaskConfig(seed=2)
    lines = d.write_pretrain_corpus(tmp_path, 2000, cfg).read_text().splitlines()
    assert len(lines) == 2000
    correct = 0
    for line in lines:
        prompt, resp = line.split(" = ")
        prompt += " ="
        assert d.split_of(prompt) == "train"
        assert sorted(resp.split()) == sorted(d.parse(prompt)[1])  # a permutation of its words
        correct += d.score(prompt, resp) == 1.0
    assert correct / len(lines) < 0.2  # about 1/n! of lines happen to be sorted
    add = d.write_pretrain_corpus(tmp_path / "add", 200, d.DemoTaskConfig(kind="add"))
    assert all(x.split(" = ")[1].isdigit() for x in add.read_text().splitlines())


def test_val_and_eval_prompts_share_no_item_set_with_each_other_or_train(tmp_path):
    cfg = d.DemoTaskConfig(n_demonstrations=20, n_comparison_prompts=20, n_train_prompts=50,
                           n_eval_prompts=60, n_val_prompts=60)
    paths = d.write_demo_data(tmp_path, cfg)
    sets = {}
    for name in ("prompts_train", "prompts_val", "prompts_eval"):
        rows = [json.loads(line)["prompt"] for line in open(paths[name])]
        assert {d.split_of(p) for p in rows} == {name.split("_")[1]}
        sets[name] = {frozenset(d.parse(p)[1]) for p in rows}
    assert not sets["prompts_val"] & sets["prompts_eval"]
    assert not (sets["prompts_val"] | sets["prompts_eval"]) & sets["prompts_train"]
