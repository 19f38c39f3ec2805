"""The default word-inflection task from lemminflect's lexicon: parsing, split by lemma, sizes."""

from __future__ import annotations

import collections

import pytest

from deltatune.train.data import DataError, Example
from deltatune.train.task import FORMS, build_task, lexicon_path, make_example, read_lexicon


@pytest.fixture(scope="module")
def table():
    return read_lexicon()


def test_lexicon_is_read_from_the_wheel(table):
    assert lexicon_path().endswith("lemminflect/resources/infl_lu.csv.gz")
    assert table["past"]["walk"] == ("walked",)
    assert table["past_participle"]["walk"] == ("walked",)  # empty VBN = same as VBD
    assert table["past_participle"]["forsake"] == ("forsaken",)
    assert table["ing"]["run"] == ("running",)
    assert table["plural"]["child"] == ("children",)
    assert table["comparative"]["big"] == ("bigger",) and table["superlative"]["happy"] == ("happiest",)
    assert "reasons" in table["plural"]["reason"]
    assert "Aaron" not in table["plural"]  # lowercase words only
    assert "furniture" not in table["plural"]  # mass nouns (only plural = lemma) left out
    assert table["plural"]["advice"] == ("advices", "advice")
    assert sum(len(v) for v in table.values()) > 30000


def test_split_by_lemma_sizes_and_determinism():
    task = build_task(2400, 320, seed=0)
    assert len(task.train) == 2400 and len(task.eval) == 320
    train_lemmas = {e.meta["lemma"] for e in task.train}
    eval_lemmas = [e.meta["lemma"] for e in task.eval]
    assert len(set(eval_lemmas)) == 320  # distinct held-out words
    assert not train_lemmas & set(eval_lemmas)  # no held-out word is seen in training
    assert len({(e.meta["form"], e.meta["lemma"]) for e in task.train}) == 2400
    forms = collections.Counter(e.meta["form"] for e in task.train)
    assert set(forms) == set(FORMS) and min(forms.values()) > 300  # forms drawn evenly
    e = task.eval[0]
    assert e.messages[0]["role"] == "user" and e.messages[1]["content"] == e.answers[0]
    again = build_task(2400, 320, seed=0)
    assert [x.messages for x in again.eval] == [x.messages for x in task.eval]
    other = build_task(2400, 320, seed=1)  # another seed: other training questions, the same held-out words
    assert [x.messages for x in other.eval] == [x.messages for x in task.eval]
    assert [x.messages for x in other.train] != [x.messages for x in task.train]
    assert not {x.meta["lemma"] for x in other.train} & set(eval_lemmas)
    # the held-out questions depend on the eval size only; a longer list extends a shorter one
    big = build_task(100, 400, seed=0)
    assert [x.messages for x in big.eval[:320]] == [x.messages for x in task.eval]
    assert not {x.meta["lemma"] for x in big.eval} & train_lemmas


def test_too_many_questions_is_an_error():
    with pytest.raises(DataError, match="fewer than"):
        build_task(10, 10_000, seed=0)


def test_questions_quote_the_word_and_never_train_the_bare_word_as_a_plural(table):
    task = build_task(2400, 320, seed=0)
    q = task.train[0].messages[0]["content"]
    assert q.startswith("Give the ") and q.count('"') == 2 and q.endswith('".')
    plain = build_task(2400, 320, seed=0, wording="plain")
    assert plain.train[0].messages[0]["content"] == q.replace('"', "")
    def form_and_word(t):
        return [(e.meta["form"], e.meta["lemma"]) for e in t.eval]

    assert form_and_word(plain) == form_and_word(task)  # the wording changes only the text
    canonical = build_task(2400, 320, seed=0, wording="quoted-canonical")
    assert [e.messages for e in canonical.train] == [e.messages for e in task.train]
    assert all(e.meta["answer_prefix"] == e.meta["lemma"] for e in task.train + task.eval)
    assert not any("answer_prefix" in e.meta for e in canonical.train + plain.train)
    assert [e.messages for e in canonical.eval] == [e.messages for e in task.eval]  # quoted too
    one = make_example("comparative", "loud", ("louder",), "quoted-canonical")
    assert one.messages[0]["content"] == 'Give the comparative of "loud".' and "answer_prefix" not in one.meta
    assert "answer_prefix" not in make_example("comparative", "loud", ("louder",), "plain").meta
    assert make_example("comparative", "loud", ("louder",)).meta["answer_prefix"] == "loud"
    for e in task.train + task.eval:
        lemma, answer = e.meta["lemma"], e.messages[1]["content"]
        spellings = table[e.meta["form"]][lemma]
        assert set(e.answers) == set(spellings)  # every spelling still counts in evaluation
        if e.meta["form"] == "plural":
            assert answer != lemma  # "acne" -> "acnes" is trained, never "acne" -> "acne"
    advice = make_example("plural", "advice", table["plural"]["advice"])  # the lexicon: ("advices", "advice")
    assert advice.messages[1]["content"] == "advices" and advice.answers == ["advices", "advice"]
    with pytest.raises(DataError, match="wording"):
        build_task(10, 10, wording="fancy")


def test_every_form_keeps_its_share_when_its_words_run_out(table):
    """9,600 questions: the adjective forms (673 training words each) start a second and third pass
    instead of dropping out, so each form still holds about a sixth; each pass is distinct; the first
    2,400 are what a 2,400-question task draws (nothing changes before a form runs out)."""
    small, task = build_task(2400, 320, seed=0), build_task(9600, 320, seed=0)
    forms = collections.Counter(e.meta["form"] for e in task.train)
    assert set(forms) == set(FORMS) and min(forms.values()) > 1400, forms
    held = {e.meta["lemma"] for e in task.eval}
    comp = [e.meta["lemma"] for e in task.train if e.meta["form"] == "comparative"]
    pool = [lem for lem in table["comparative"] if lem not in held]
    assert len(comp) > 2 * len(set(comp)) and not set(comp) & held
    first_pass = comp[:len(set(comp))]
    assert len(set(first_pass)) == len(first_pass)  # every word once before any repeats
    assert [e.messages for e in task.train[:2400]] == [e.messages for e in small.train]
    assert [e.messages for e in task.eval] == [e.messages for e in small.eval]
    assert len(set(comp)) <= len(pool)


@pytest.mark.integration
def test_answers_are_trained_in_the_question_words_own_tokens(smollm):
    """SmolLM2's tokenizer spells "louder" l|ou|der but the question's "loud" l|oud: the default task
    trains l|oud|er (the same text), so the answer starts with the question's tokens; every target
    decodes to the same string as the canonical encoding; quoted-canonical keeps the canonical tokens;
    plain text rows and a prefix the answer does not start with change nothing."""
    from deltatune.train.data import ChatEncoder, align_answer_tokens

    _, tok = smollm
    enc = ChatEncoder(tok)
    aligned, canonical = build_task(64, 64, seed=0), build_task(64, 64, seed=0, wording="quoted-canonical")

    def targets(item):
        return [i for i, lab in zip(item["input_ids"], item["labels"]) if lab != -100]

    changed = 0
    for a, c in zip(aligned.train + aligned.eval, canonical.train + canonical.eval):
        ta, tc = targets(enc.encode(a)), targets(enc.encode(c))
        assert tok.decode(ta) == tok.decode(tc) == a.messages[1]["content"] + "<|im_end|>"
        word = list(tok(a.meta["lemma"], add_special_tokens=False)["input_ids"])
        if ta != tc:
            changed += 1
            assert ta[:1] == word[:1]  # the answer opens with the question word's first token
        assert tc == list(tok(c.messages[1]["content"], add_special_tokens=False)["input_ids"]) + ta[-1:]
    assert changed > 0.4 * 128
    louder = Example(messages=[{"role": "user", "content": 'Give the comparative of "loud".'},
                               {"role": "assistant", "content": "louder"}], meta={"answer_prefix": "loud"})
    item = enc.encode(louder)
    assert tok.convert_ids_to_tokens(targets(item))[:-1] == ["l", "oud", "er"]
    ids, labels = enc.chat_ids_and_labels(louder.messages)
    assert align_answer_tokens(tok, ids, labels, "louder", "quiet") == (ids, labels)  # no shared start
