"""The default task: English word inflection, from the lexicon inside the ``lemminflect`` wheel.

``lemminflect`` (MIT licence) ships ``resources/infl_lu.csv.gz``: about 40,000 lines
``lemma,category,form1,form2,...`` (forms in Penn-tag order: noun NNS; adj JJR,JJS; verb
VBD,VBN,VBG,VBZ), with ``/`` between alternative spellings. An empty VBN means "same as VBD"
(regular verbs); an empty adjective form means the word has no one-word comparative. The file is
read directly (the package is not imported; nothing is downloaded).

Each question is one chat turn, answered with one word::

    user:      Give the past tense of "walk".
    assistant: walked

Six forms: past tense, past participle, -ing form (verbs), plural (nouns), comparative and
superlative (adjectives). Only lowercase alphabetic lemmas and answers are used; nouns whose
only plural equals the lemma (mass nouns) are left out. A question's accepted answers are all the
lexicon's spellings (``reason`` -> ``reasons`` or ``reason``); training uses the first.

Split by lemma: a fixed 15% of the lemmas are held out (the same whatever ``--seed``), so no
held-out word (in any of its forms) is seen in training. Questions are drawn form-first (each of the six forms equally
likely), then a lemma. Metric: exact match of the greedy answer (see
:func:`deltatune.train.evaluate.normalize_answer`).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import random
import re
from dataclasses import dataclass
from typing import Optional

from .data import DataError, Example

FORMS = {
    # name: (category, index among the category's forms, question)
    "past": ("verb", 0, "Give the past tense of {w}."),
    "past_participle": ("verb", 1, "Give the past participle of {w}."),
    "ing": ("verb", 2, "Give the -ing form of {w}."),
    "plural": ("noun", 0, "Give the plural of {w}."),
    "comparative": ("adj", 0, "Give the comparative of {w}."),
    "superlative": ("adj", 1, "Give the superlative of {w}."),
}
# How the word is written in the question: "plain" (Give the plural of cat.) or "quoted" (Give the
# plural of "cat".). Quoted, the word is not preceded by a space, so its first token is the token
# the answer starts with (the answer follows the assistant header without a space); "quoted" also
# trains each answer in the word's own tokens followed by the rest ("l|oud|er", not the canonical
# "l|ou|der": see make_example), "quoted-canonical" trains the canonical tokens.
WORDINGS = ("quoted", "quoted-canonical", "plain")
HELD_OUT_LEMMA_FRACTION = 0.15
HELD_OUT_SEED = 0  # the held-out lemmas and words are fixed: they never depend on --seed
_WORD = re.compile(r"^[a-z]+$")


def lexicon_path() -> str:
    """Path of ``infl_lu.csv.gz`` inside the installed lemminflect package (found without importing it).

    Raises:
        DataError: lemminflect is not installed (``pip install lemminflect``) or lacks the file.
    """
    spec = importlib.util.find_spec("lemminflect")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default task needs the lemminflect package: pip install 'deltatune[train]'")
    p = os.path.join(list(spec.submodule_search_locations)[0], "resources", "infl_lu.csv.gz")
    if not os.path.isfile(p):
        raise DataError(f"lemminflect lexicon not found at {p}")
    return p


def read_lexicon(path: Optional[str] = None) -> dict:
    """form name -> {lemma: tuple of accepted answers}, for the six forms."""
    table: dict = {f: {} for f in FORMS}
    by_cat: dict = {}
    for f, (cat, idx, _) in FORMS.items():
        by_cat.setdefault(cat, []).append((f, idx))
    with gzip.open(path or lexicon_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(",")
            if len(parts) < 3:
                continue
            lemma, cat, forms = parts[0], parts[1], parts[2:]
            if cat not in by_cat or not _WORD.match(lemma):
                continue
            for fname, idx in by_cat[cat]:
                raw = forms[idx] if idx < len(forms) else ""
                if not raw and fname == "past_participle":
                    raw = forms[0] if forms else ""  # empty VBN = same as VBD
                spellings = tuple(s for s in raw.split("/") if s)
                if not spellings or not all(_WORD.match(s) for s in spellings):
                    continue
                if fname == "plural" and spellings == (lemma,):
                    continue
                table[fname].setdefault(lemma, spellings)
    return table


def make_example(form: str, lemma: str, answers: tuple, wording: str = "quoted") -> Example:
    """One question. The trained answer is the first accepted spelling that is not the bare lemma
    (``acne`` -> ``acnes``, though the lexicon also accepts ``acne``): a question is never trained to
    be answered with the word it asks about unless that is the only spelling; every spelling counts
    as right in evaluation. ``wording`` (:data:`WORDINGS`): ``quoted`` also trains the answer in
    the word's own tokens first (``meta["answer_prefix"]``,
    :func:`deltatune.train.data.align_answer_tokens`): the same text, but the model copies the
    question's tokens instead of re-spelling the stem; ``quoted-canonical`` quotes the word and keeps
    the answer's canonical tokens; ``plain`` neither."""
    if wording not in WORDINGS:
        raise DataError(f"task wording {wording!r} is not one of {', '.join(WORDINGS)}")
    word = lemma if wording == "plain" else f'"{lemma}"'
    aligned = wording == "quoted"  # the prompt's word then stands without a space: its tokens are its own
    q = FORMS[form][2].format(w=word)
    trained = next((a for a in answers if a != lemma), answers[0])
    return Example(
        messages=[{"role": "user", "content": q}, {"role": "assistant", "content": trained}],
        answers=[trained] + [a for a in answers if a != trained],
        where=f"task:{form}:{lemma}",
        meta={"form": form, "lemma": lemma, **({"answer_prefix": lemma} if aligned else {})},
    )


@dataclass
class InflectionTask:
    """The default task's train and held-out questions (deterministic for a seed)."""

    train: list
    eval: list
    n_train_lemmas: int
    n_eval_lemmas: int

    name = "inflection"
    metric_name = "exact_match"


def build_task(train_size: int = 2400, eval_size: int = 320, seed: int = 0, path: Optional[str] = None,
               wording: str = "quoted") -> InflectionTask:
    """``train_size`` training questions and ``eval_size`` held-out questions (distinct words).

    The lemmas are split once, with :data:`HELD_OUT_SEED` (never ``seed``): 15% held out, and no
    held-out lemma appears in training in any form. Held-out questions use distinct held-out lemmas
    and depend only on ``eval_size`` (the first N of a larger fixed set are the same), so every run
    and ``deltatune eval`` score the same words. Training questions are (form, lemma) pairs of
    training lemmas, drawn with ``seed``, form first, so each form keeps a sixth of them: distinct
    until a form's words are used up, then that form starts another pass over its words in a new
    order (the two adjective forms have 673 training words each, the verb forms 5,487 and plurals
    12,397, so beyond about 4,000 questions the comparatives and superlatives repeat first; before this,
    a used-up form dropped out and a large ``train_size`` held ever fewer adjectives).
    ``wording``: see :data:`WORDINGS`.

    Raises:
        DataError: the lexicon cannot supply that many distinct held-out words; an unknown wording.
    """
    if wording not in WORDINGS:
        raise DataError(f"task wording {wording!r} is not one of {', '.join(WORDINGS)}")
    table = read_lexicon(path)
    lemmas = sorted({lem for f in table.values() for lem in f})
    held = set(random.Random(HELD_OUT_SEED).sample(lemmas, int(len(lemmas) * HELD_OUT_LEMMA_FRACTION)))
    forms = list(FORMS)

    def draw(n, allowed, distinct_lemma: bool, rng: random.Random, repeat: bool = False):
        pools = {f: sorted(lem for lem in table[f] if lem in allowed) for f in forms}
        for f in forms:
            rng.shuffle(pools[f])
        out, used_lemmas = [], set()  # each pool holds a form's words once: a pass never repeats a question
        cursor = {f: 0 for f in forms}
        while len(out) < n:
            if repeat:  # a used-up form starts a new pass over its words, in a new order
                for f in forms:
                    if cursor[f] == len(pools[f]) and pools[f]:
                        rng.shuffle(pools[f])
                        cursor[f] = 0
            open_forms = [f for f in forms if cursor[f] < len(pools[f])]
            if not open_forms:
                raise DataError(f"the inflection lexicon has fewer than {n} distinct questions for this split")
            f = rng.choice(open_forms)
            lem = pools[f][cursor[f]]
            cursor[f] += 1
            if distinct_lemma and lem in used_lemmas:
                continue
            used_lemmas.add(lem)
            out.append(make_example(f, lem, table[f][lem], wording))
        return out

    train_lemmas = set(lemmas) - held
    # separate streams: the held-out questions depend on neither train_size nor seed
    train = draw(int(train_size), train_lemmas, distinct_lemma=False, rng=random.Random(f"train-{seed}"), repeat=True)
    ev = draw(int(eval_size), held, distinct_lemma=True, rng=random.Random(f"eval-{HELD_OUT_SEED}"))
    return InflectionTask(train=train, eval=ev, n_train_lemmas=len(train_lemmas), n_eval_lemmas=len(held))
