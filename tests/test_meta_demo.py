"""`trellis meta` end to end on a shrunk config, in-process (real SentencePiece, Arrow shards,
DeepSpeed engines): pretraining on episodes, in-context evaluation at each k, fine-tuning
sweeps with their curves, and the results files."""
from __future__ import annotations

import json

import pytest

from trellis.launcher.config_loader import load_config
from trellis.launcher.jobs.meta.config import MetaDemoConfig
from trellis.launcher.jobs.meta.driver import run_demo

TINY = ["pretrain_episodes=300", "pretrain.steps=10", "pretrain.micro_batch_size=8",
        "pretrain.seq_len=64", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
        "model.max_seq_len=128", "tokenizer.vocab_size=400", "task.n_pool=32", "task.n_eval=8",
        "task.heldout_tables=[4]", "task.heldout_ops=[swap]", "shots=[0,1,2]",
        "finetune.sizes=[8,16]", "finetune.tasks=[lookup_heldout0,swap]", "sft.steps=40", "sft.lr=3e-3", "finetune.eval_every=10"]


@pytest.mark.integration
def test_meta_demo_end_to_end_on_a_shrunk_config(tmp_path):
    cfg = load_config(MetaDemoConfig, None, [f"run_dir={tmp_path}", *TINY])
    res = run_demo(cfg, local=True)

    assert res["shots"] == [0, 1, 2]
    assert set(res["in_context"]) == {"lookup_heldout0", "swap"}
    for by_k in res["in_context"].values():
        assert list(by_k) == ["0", "1", "2"]
        assert all(0.0 <= v <= 1.0 for v in by_k.values())
    # The split by "key among the prompt's examples": none at k=0; its two parts average back
    # to the task's exact match at every k.
    em, split = res["in_context"]["lookup_heldout0"], res["in_context_key_shown"]["lookup_heldout0"]
    assert split["0"] == {"shown": 0.0, "exact_shown": None, "exact_not_shown": em["0"]}
    for k, r in split.items():
        s = r["shown"]
        parts = s * (r["exact_shown"] or 0) + (1 - s) * (r["exact_not_shown"] or 0)
        assert abs(parts - em[k]) < 1e-9, (k, r, em)
    assert list(res["finetune"]["runs"]) == ["lookup_heldout0", "swap"]
    runs = res["finetune"]["runs"]["lookup_heldout0"]
    assert list(runs) == ["8", "16"] and list(res["finetune"]["runs"]["swap"]) == ["8", "16"]
    for n, r in runs.items():
        assert r["train_rows_scored"] == min(int(n), 8)  # task.n_eval
        assert all(0.0 <= r[m] <= 1.0 for m in ("val_exact", "train_exact", "train_exact_start"))
        c = r["curves"]
        assert c["val_step"] == [10.0, 20.0, 30.0, 40.0]  # eval_every and the last step
        assert len(c["val_loss"]) == 4 and c["train_loss"][-1] < c["train_loss"][0]
    # 40 steps on 8 rows: the fine-tuned model answers its own training rows better.
    assert runs["8"]["train_exact"] > runs["8"]["train_exact_start"], runs["8"]

    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    assert "| lookup_heldout0 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "meta_learning.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "icl" / "samples" / "lookup_heldout0_2shot.jsonl").is_file()

