"""`trellis eval`: multiple-choice scoring against a hand computation, rolling perplexity
against the full-document loss, deterministic few-shot prompts, data-parallel (Ray) results
equal to --local, and bad task files failing in one line naming the file and row."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import torch
import torch.nn.functional as F

from trellis.data_pipeline import eval_tasks as et
from trellis.data_pipeline.shards import DataError
from trellis.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from trellis.launcher.config_loader import load_config
from trellis.launcher.jobs.lmeval.config import EvalJobConfig
from trellis.launcher.jobs.lmeval.driver import evaluate
from trellis.model import GPT, ModelConfig
from trellis.model.io import save_module
from trellis.model.scoring import loglikelihoods, rolling_windows
from trellis.model.task_metrics import choose

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORDS = "red green blue cat dog bird one two three yes no up down".split()


def tiny_gpt(max_len: int = 48, vocab: int = 60, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32,
                           max_seq_len=max_len)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmeval")
    text = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    tok = train_tokenizer(TokenizerConfig(vocab_size=300, byte_fallback=False), text,
                          root / "tokenizer.model")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=64)
    torch.manual_seed(0)
    d = save_module(GPT(cfg), cfg, "lm", root / "gpt")
    (d / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    return d


def write_task(root: Path, name: str, rows: list[dict], **spec) -> Path:
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {"dataset": f"{name}.jsonl", **spec}
    path = root / f"{name}.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in body.items()) + "\n")
    return path


def color_rows(n: int) -> list[dict]:
    return [{"q": f"{WORDS[i % 3]} {WORDS[3 + i % 3]}", "label": i % 2,
             "options": ["yes", "no up down"]} for i in range(n)]


# ---- scoring -----------------------------------------------------------------------------
def test_multiple_choice_matches_hand_computation():
    model = tiny_gpt()
    ctx, choices = [9, 12, 15], [[20, 21], [22], [23, 24, 25]]
    got = loglikelihoods(model, [(ctx, c) for c in choices])
    for (ll, greedy), c in zip(got, choices):
        # By hand: one unpadded forward per prefix, log p of the next token, summed.
        want, argmax = 0.0, True
        for t in range(len(c)):
            prefix = torch.tensor([ctx + c[:t]])
            logp = F.log_softmax(model(prefix)[0, -1], -1)
            want += logp[c[t]].item()
            argmax &= int(logp.argmax()) == c[t]
        assert ll == pytest.approx(want, abs=1e-5)
        assert greedy == argmax
    # acc takes the largest sum; acc_norm the largest per byte of the choice's text.
    assert choose([-3.0, -4.0], ["ab", "abcdef"]) == (0, 1)
    assert choose([-1.0, -0.5, -1.6], ["x", "yy", "zzzzzzzz"]) == (1, 2)


def test_rolling_perplexity_equals_full_document_loss_when_it_fits():
    model = tiny_gpt(max_len=48)
    doc = torch.randint(8, 60, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = rolling_windows(doc, max_len=48)
    assert len(windows) == 1
    ll = sum(r[0] for r in loglikelihoods(model, windows))
    full = F.cross_entropy(model(torch.tensor([doc[:-1]]))[0], torch.tensor(doc[1:]),
                           reduction="sum").item()
    assert -ll == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("stride", [0, 5, 16])
def test_rolling_windows_score_every_token_once_within_context(stride):
    doc = list(range(100, 137))
    windows = rolling_windows(doc, max_len=16, stride=stride)
    assert [t for _, cont in windows for t in cont] == doc[1:]
    for ctx, cont in windows:
        assert len(ctx) >= 1 and len(ctx) + len(cont) - 1 <= 16
        assert doc[doc.index(cont[0]) - len(ctx):doc.index(cont[0])] == ctx


# ---- prompts -----------------------------------------------------------------------------
def test_few_shot_prompts_are_deterministic_per_seed(tmp_path):
    path = write_task(tmp_path, "mc", color_rows(20), output_type="multiple_choice",
                      description="Answer.", doc_to_text="Q: {q}\nA:",
                      doc_to_choice="{options}", doc_to_target="{label}")
    spec = et.load_task(path)
    docs = et.load_docs(spec, spec.dataset)
    a = et.shot_indices(len(docs), 4, 7, spec.name, 3, exclude_self=True)
    assert a == et.shot_indices(len(docs), 4, 7, spec.name, 3, exclude_self=True)
    assert 3 not in a and len(set(a)) == 4
    assert et.shot_indices(len(docs), 2, 7, spec.name, 3, True) == a[:2]  # nested over k
    assert any(et.shot_indices(len(docs), 4, s, spec.name, 3, True) != a for s in (8, 9, 10))
    prompt = et.build_prompt(spec, docs[3], [docs[i] for i in a[:1]])
    rows, shot = color_rows(20), a[0]
    answer = rows[shot]["options"][rows[shot]["label"]]
    assert prompt == f"Answer.\n\nQ: {rows[shot]['q']}\nA: {answer}\n\nQ: {rows[3]['q']}\nA:"


# ---- whole job ---------------------------------------------------------------------------
def tasks(root: Path) -> list[Path]:
    mc = write_task(root, "mc", color_rows(24), output_type="multiple_choice",
                    description="Answer.", doc_to_text="Q: {q}\nA:", doc_to_choice="{options}",
                    doc_to_target="{label}")
    gen = write_task(root, "gen", [{"w": WORDS[i % 5], "a": [WORDS[i % 5]]} for i in range(10)],
                     output_type="generate_until", doc_to_text="say {w}:",
                     doc_to_target="{a}", generation_kwargs={"until": ["\n", "."],
                                                              "max_gen_toks": 6})
    ppl = write_task(root, "ppl", [{"t": " ".join(WORDS * 6)}, {"t": "red cat up"}],
                     output_type="loglikelihood_rolling", doc_to_text="{t}")
    return [mc, gen, ppl]


def eval_job(run_dir: Path, model: Path, task_files: list[Path], *extra: str) -> EvalJobConfig:
    return load_config(EvalJobConfig, None, [f"run_dir={run_dir}", f"model={model}",
                                             f"tasks={json.dumps([str(t) for t in task_files])}",
                                             "shots=[0,1,3]", "batch_size=5", *extra])


@pytest.mark.integration
def test_data_parallel_eval_equals_local(model_dir, tmp_path):
    files = tasks(tmp_path)
    local = evaluate(eval_job(tmp_path / "local", model_dir, files), local=True)
    # A fresh local Ray on loopback (address="local": never another session's cluster).
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        dp = evaluate(eval_job(tmp_path / "dp", model_dir, files, "parallel.num_workers=2",
                               "parallel.cpus_per_worker=0.5"))
    finally:
        ray.shutdown()
    assert set(local) == {"mc", "gen", "ppl"} and set(local["mc"]) == {"0", "1", "3"}
    assert set(local["ppl"]) == {"0"}
    for task in local:
        for k in local[task]:
            for m, v in local[task][k].items():
                assert dp[task][k][m] == pytest.approx(v, rel=1e-6), (task, k, m)
    for name in ("mc_1shot", "mc_3shot", "gen_3shot", "ppl_0shot"):  # row by row
        mine, theirs = ([json.loads(x) for x in (tmp_path / d / "samples" / f"{name}.jsonl")
                         .read_text().splitlines()] for d in ("local", "dp"))
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            assert a.get("answer") == b.get("answer") and a.get("pred") == b.get("pred")
            if "loglik" in a:
                assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-6, abs=1e-6)
    assert (tmp_path / "dp" / "accuracy_vs_k.png").stat().st_size > 0
    saved = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert saved["mc"]["1"]["acc"] == dp["mc"]["1"]["acc"]
    assert "| mc | 3 |" in (tmp_path / "dp" / "results.md").read_text()


# ---- bad input ---------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_task_yaml_naming_a_missing_field(tmp_path):
    rows = color_rows(5)
    del rows[2]["q"]
    path = write_task(tmp_path, "mc", rows, output_type="multiple_choice",
                      doc_to_text="Q: {q}\nA:", doc_to_choice="{options}", doc_to_target="{label}")
    spec = et.load_task(path)
    with pytest.raises(DataError) as e:
        et.load_docs(spec, spec.dataset)
    _one_line(e, f"{tmp_path / 'mc.jsonl'}:3", "no field 'q'", str(path))


def test_choice_list_of_length_one(tmp_path):
    rows = color_rows(5)
    rows[4]["options"] = ["yes"]
    path = write_task(tmp_path, "mc", rows, output_type="multiple_choice",
                      doc_to_text="{q}", doc_to_choice="{options}", doc_to_target="{label}")
    spec = et.load_task(path)
    with pytest.raises(DataError) as e:
        et.load_docs(spec, spec.dataset)
    _one_line(e, f"{tmp_path / 'mc.jsonl'}:5", "at least 2 choices, got 1")


def test_input_longer_than_the_context(model_dir, tmp_path):
    rows = color_rows(4)
    rows[1]["q"] = " ".join(WORDS * 10)
    path = write_task(tmp_path, "mc", rows, output_type="multiple_choice",
                      doc_to_text="{q}", doc_to_choice="{options}", doc_to_target="{label}")
    with pytest.raises(DataError) as e:
        evaluate(eval_job(tmp_path / "run", model_dir, [path], "shots=[0]"), local=True)
    _one_line(e, f"{tmp_path / 'mc.jsonl'}:2", "exceeds the model's context of 64 tokens")
