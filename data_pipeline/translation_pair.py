"""A generated language pair for translation demos and tests: English-like sentences and their
translation into a made-up language that differs the way real pairs do.

    source:  the young dogs watch the dark quiet book
    target:  me pesuir benoai va diku lafoa buvua muraont

Rules (a fixed seed makes the same lexicon and sentences everywhere):

* vocabulary: every English stem has its own invented word;
* word order: subject - object - (place phrase) - verb (English is SVO), adjectives after
  their noun, postpositions after their noun phrase;
* agreement: each noun has a grammatical gender; determiners take a form per definiteness,
  gender and number, adjectives a suffix per gender and number, nouns a plural suffix, and
  the verb a suffix for its subject's number.

A sentence has a subject, a verb, an object, optionally a place phrase; a noun phrase has
a determiner, up to two adjectives and a noun. Written as JSONL {source, target}.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NOUNS = ["dog", "cat", "bird", "horse", "child", "farmer", "teacher", "doctor", "king",
         "queen", "friend", "river", "tree", "house", "garden", "city", "boat", "apple",
         "book", "letter", "window", "mountain", "road", "table"]
IRREGULAR_PLURALS = {"child": "children", "city": "cities"}
ADJECTIVES = ["big", "small", "old", "young", "red", "green", "happy", "quiet", "tall",
              "dark", "bright", "strange"]
VERBS = ["see", "like", "find", "follow", "carry", "draw", "watch", "help", "visit", "paint",
         "remember", "call"]
PLACES = ["near", "behind", "under"]
# Target inflections: adjective suffix and determiner by (gender, plural).
ADJ_SUFFIX = {("m", False): "u", ("f", False): "a", ("m", True): "ui", ("f", True): "ai"}
NOUN_PLURAL = {"m": "en", "f": "ir"}
VERB_SUFFIX = {False: "at", True: "ont"}


def _word(rng: random.Random, syllables: int, taken: set[str]) -> str:
    """A new pronounceable word (consonant-vowel syllables) not used before."""
    while True:
        w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
        if w not in taken:
            taken.add(w)
            return w


@dataclass(frozen=True)
class Lexicon:
    nouns: dict[str, tuple[str, str]]  # English -> (stem, gender)
    adjectives: dict[str, str]
    verbs: dict[str, str]
    places: dict[str, str]
    determiners: dict[tuple[bool, str, bool], str]  # (definite, gender, plural) -> word

    @classmethod
    def build(cls, seed: int) -> "Lexicon":
        rng, taken = random.Random(f"lexicon-{seed}"), set()
        return cls(
            nouns={n: (_word(rng, 2, taken), rng.choice("mf")) for n in NOUNS},
            adjectives={a: _word(rng, 2, taken) for a in ADJECTIVES},
            verbs={v: _word(rng, 2, taken) for v in VERBS},
            places={p: _word(rng, 1, taken) for p in PLACES},
            determiners={(d, g, pl): _word(rng, 1, taken) for d in (True, False)
                         for g in "mf" for pl in (False, True)})


def _noun_phrase(rng: random.Random, lex: Lexicon) -> tuple[list[str], list[str], bool]:
    """(English words, target words, plural?) of a random noun phrase."""
    noun, plural, definite = rng.choice(NOUNS), rng.random() < 0.4, rng.random() < 0.6
    adjs = rng.sample(ADJECTIVES, rng.choice([0, 0, 1, 1, 2]))
    det = "the" if definite else ("some" if plural else "a")
    en_noun = IRREGULAR_PLURALS.get(noun, noun + "s") if plural else noun
    stem, gender = lex.nouns[noun]
    tgt = [lex.determiners[(definite, gender, plural)],
           stem + (NOUN_PLURAL[gender] if plural else "")]
    tgt += [lex.adjectives[a] + ADJ_SUFFIX[(gender, plural)] for a in adjs]
    return [det, *adjs, en_noun], tgt, plural


def sentence_pair(rng: random.Random, lex: Lexicon) -> tuple[str, str]:
    """One random (source, target) pair."""
    s_en, s_tg, s_plural = _noun_phrase(rng, lex)
    o_en, o_tg, _ = _noun_phrase(rng, lex)
    verb = rng.choice(VERBS)
    en_verb = verb if s_plural else (verb + "es" if verb.endswith(("sh", "ch")) else verb + "s")
    tg_verb = lex.verbs[verb] + VERB_SUFFIX[s_plural]
    en, tg = [*s_en, en_verb, *o_en], [*s_tg, *o_tg]
    if rng.random() < 0.35:
        place = rng.choice(PLACES)
        p_en, p_tg, _ = _noun_phrase(rng, lex)
        en += [place, *p_en]
        tg += [*p_tg, lex.places[place]]
    return " ".join(en), " ".join(tg + [tg_verb])


def write_language_pair(out_dir: str | Path, n_train: int = 6000, n_val: int = 300,
                        seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and val.jsonl ({source, target} per line; no held-out source also
    occurs in training); returns their paths. The same seed gives the same files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lex, rng = Lexicon.build(seed), random.Random(f"sentences-{seed}")
    val: dict[str, str] = {}
    while len(val) < n_val:  # distinct held-out sources
        src, tgt = sentence_pair(rng, lex)
        val.setdefault(src, tgt)
    train: list[tuple[str, str]] = []
    while len(train) < n_train:
        src, tgt = sentence_pair(rng, lex)
        if src not in val:
            train.append((src, tgt))
    splits = [train, list(val.items())]
    paths = (out / "train.jsonl", out / "val.jsonl")
    for path, rows in zip(paths, splits):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
        tmp.replace(path)
    return paths

