"""The meta-learning demo's generated text (data_pipeline/meta_episodes.py): the rules, what
is held out never appearing in the pretraining text, the warm-up coming first, determinism by
seed, prompts that `trellis eval` builds in the pretraining format (the same SentencePiece
pieces), and one-line errors for bad configs."""
from __future__ import annotations

import json

import pytest

from trellis.data_pipeline import eval_tasks as et
from trellis.data_pipeline import meta_episodes as me
from trellis.data_pipeline.tokenizer import NEWLINE_ID, TokenizerConfig, train_tokenizer
from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.jobs.meta.config import MetaDemoConfig

SMALL = dict(n_eval=20, n_pool=200)


def test_rules_by_hand():
    w = ["pear", "fig", "apple"]
    assert me.apply("copy", w) == w
    assert me.apply("reverse", w) == ["apple", "fig", "pear"]
    assert me.apply("sort", w) == ["apple", "fig", "pear"]
    assert me.apply("first", w) == ["pear"] and me.apply("last", w) == ["apple"]
    assert me.apply("count", w) == ["three"]
    assert me.apply("swap", w) == ["apple", "fig", "pear"] and me.apply("swap", ["fig"]) == ["fig"]
    assert me.apply("lookup", ["fig", "owl", "Pear"], {"Fig": "red", "Pear": "blue"}) == ["blue"]
    assert me.example_line("count", w, ["three"]) == " pear fig apple -> three"
    # A lookup's capitalised key ends its input: the answer follows it directly.
    assert me.example_line("lookup", ["fig", "Pear"], ["blue"]) == " fig Pear blue"


def test_held_out_tables_and_task_types_never_appear_in_pretraining():
    cfg = me.MetaTaskConfig(**SMALL)
    episodes = me.pretrain_episodes(3000, cfg)
    held = [t.table for t in me.heldout_tasks(cfg) if t.op == "lookup"]
    assert [len(t) for t in held] == cfg.heldout_tables
    assert all(set(t.values()) <= set(me.COLOURS) for t in held)
    lookups = [ep for ep in episodes if ep.op == "lookup"]
    assert len(lookups) > 1000 and {ep.op for ep in episodes} == set(me.TRAIN_OPS)
    for ep in lookups:
        # What the text shows: each line's (key, answer); at most one held-out pair.
        shown = {(i[-1], o[0]) for i, o in ep.examples}
        assert all(o == [ep.table[i[-1]]] for i, o in ep.examples)
        assert all(w.islower() for i, _ in ep.examples for w in i[:-1])  # distractors
        for h in held:
            assert len(shown & set(h.items())) <= 1 and ep.table != h
    # Held-out task types: no episode applies them, their instruction is never written.
    assert not {ep.op for ep in episodes} & set(cfg.heldout_ops)
    text = "\n\n".join(me.render(ep) for ep in episodes)
    for op in cfg.heldout_ops:
        assert me.INSTRUCTIONS[op] not in text
    # Some episodes come without their instruction (solved from the examples alone).
    assert 0.3 < sum(ep.instruction for ep in episodes) / len(episodes) < 0.7


def test_warm_up_lookups_come_first():
    cfg = me.MetaTaskConfig(warmup_share=0.25, **SMALL)
    episodes = me.pretrain_episodes(400, cfg)
    warm, rest = episodes[:100], episodes[100:]
    assert all(ep.op == "lookup" and all(len(i) == 1 for i, _ in ep.examples) for ep in warm)
    later = [i for ep in rest if ep.op == "lookup" for i, _ in ep.examples]
    assert 0.35 < sum(len(i) > 1 for i in later) / len(later) < 0.65  # 1 - lookup_single
    assert {ep.op for ep in rest} == set(me.TRAIN_OPS)


def test_deterministic_by_seed(tmp_path):
    cfg = me.MetaTaskConfig(**SMALL)
    a = me.write_pretrain_corpus(tmp_path / "a", 200, cfg).read_bytes()
    b = me.write_pretrain_corpus(tmp_path / "b", 200, cfg).read_bytes()
    c = me.write_pretrain_corpus(tmp_path / "c", 200, me.MetaTaskConfig(seed=1, **SMALL)).read_bytes()
    assert a == b and a != c
    ha = me.write_heldout_tasks(tmp_path / "ha", cfg)
    hb = me.write_heldout_tasks(tmp_path / "hb", cfg)
    hc = me.write_heldout_tasks(tmp_path / "hc", me.MetaTaskConfig(seed=1, **SMALL))
    for name in me.heldout_names(cfg):
        ev = ha[name].with_name(f"{name}_eval.jsonl")
        assert ev.read_bytes() == (hb[name].parent / ev.name).read_bytes()
    assert json.loads(ha["meta"].read_text())["tasks"] != json.loads(hc["meta"].read_text())["tasks"]


def test_eval_prompts_are_episodes_with_the_same_pieces(tmp_path):
    cfg = me.MetaTaskConfig(**SMALL)
    paths = me.write_heldout_tasks(tmp_path, cfg, shots=[0, 2])
    spec = et.load_task(paths["lookup_heldout0"])
    assert spec.num_fewshot == [0, 2]
    docs, pool = et.load_docs(spec, spec.dataset), et.load_docs(spec, spec.fewshot_split)
    assert (len(docs), len(pool)) == (cfg.n_eval, cfg.n_pool)
    assert not {d.text for d in docs} & {d.text for d in pool}  # no evaluated input is a shot
    prompt = et.build_prompt(spec, docs[0], pool[:2])
    lines = prompt.split("\n")
    assert lines[0] == me.INSTRUCTIONS["lookup"]
    table = me.heldout_tasks(cfg)[0].table
    rows = [d.text.split() for d in (*pool[:2], docs[0])]
    assert all(words[-1] in table for words in rows)
    # Prompt + answer is, character for character, an episode of the held-out table.
    episode = me.Episode("lookup", [(w, me.apply("lookup", w, table)) for w in rows], table)
    assert prompt + spec.target_delimiter + docs[0].refs[0] == me.render(episode)

    # ... and tokenizes as one: the answer is one piece after the prompt's own pieces, and a
    # key is the same piece on the first line of an episode without its instruction.
    corpus = me.write_pretrain_corpus(tmp_path / "corpus", 2000, cfg)  # the demo's tokenizer
    tok = train_tokenizer(TokenizerConfig(vocab_size=512), corpus.read_text().split("\n\n"),
                          tmp_path / "tok.model")
    ctx, answer = et.encode_continuation(tok, prompt, spec.target_delimiter, docs[0].refs[0])
    assert ctx + answer == tok.encode(me.render(episode)) and len(answer) == 1
    bare = me.Episode("lookup", [(["Kiwi"], ["red"]), (["Kiwi"], ["red"])], {"Kiwi": "red"}, False)
    ids = tok.encode(me.render(bare))
    assert me.render(bare) == "Kiwi red\n Kiwi red" and ids == ids[:2] + [NEWLINE_ID] + ids[:2]
    assert {tok.id_to_piece(i) for i in tok.encode(" ".join(table))} == {"▁" + k for k in table}


@pytest.mark.parametrize("override, key", [
    ("shots=[0,1,300]", "shots"),                      # k larger than the labelled pool
    ("finetune.sizes=[8,4097]", "finetune.sizes"),     # more labelled rows than exist
    ("finetune.tasks=[reverse]", "finetune.tasks"),   # not a held-out task
    ("task.heldout_ops=[reverse]", "heldout_ops"),     # a pretrained op cannot be held out
    ("task.max_table=13", "max_table"),                # more keys than colours
    ("task.n_colours=3", "n_colours"),                 # 4-key tables need 4 colours
    ("task.heldout_tables=[2,13]", "heldout_tables"),  # a held-out table larger than the colours
])
def test_bad_config_is_one_line_naming_the_key(override, key):
    sets = ["task.n_pool=200"] if override.startswith("shots") else []
    with pytest.raises(ConfigError) as e:
        load_config(MetaDemoConfig, None, [*sets, override])
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


def test_too_many_rows_asked_of_a_small_input_space():
    cfg = me.MetaTaskConfig(max_items=2, n_words=8, n_eval=10, n_pool=100, heldout_tables=[4])
    # 4 one-word inputs (the held-out table's keys) + 4 x 7 two-word ones
    with pytest.raises(ValueError, match="lookup_heldout0: only 32 distinct inputs exist"):
        me.heldout_rows(me.heldout_tasks(cfg)[0], cfg)
