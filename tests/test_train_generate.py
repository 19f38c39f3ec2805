"""Batched greedy evaluation equals one-at-a-time (C21 part 2, on TL + TT), stop tokens, exact match."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tl, make_tt, tt_words
from deltatune.train.data import ChatEncoder, Example
from deltatune.train.evaluate import Evaluator, evaluation_mode, exact_match, greedy_generate, normalize_answer


pytestmark = pytest.mark.usefixtures("one_thread")


def five_prompts(tok):
    enc = ChatEncoder(tok)
    prompts = [enc.prompt_ids([{"role": "user", "content": tt_words(range(10 + k, 10 + k + n))}])
               for k, n in enumerate((1, 9, 4, 6, 2))]
    assert sorted(len(p) for p in prompts) == [5, 6, 8, 10, 13]
    return prompts


def test_c21_batched_equals_single_tokens_and_first_logits():
    tok = make_tt()
    model = make_tl()
    prompts = five_prompts(tok)
    with evaluation_mode(model):
        batched, first_b = greedy_generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=0, batch_size=5,
                                           return_first_logits=True)
        singles = [greedy_generate(model, [p], max_new_tokens=6, stop_ids=[], pad_id=0, return_first_logits=True)
                   for p in prompts]
        direct = [model(torch.tensor([p])).logits[0, -1] for p in prompts]
    for b, (s, f1), fb, d in zip(batched, singles, first_b, direct):
        assert b == s[0] and len(b) == 6
        assert float((fb - f1[0]).abs().max()) < 1e-5
        assert float((fb - d).abs().max()) < 1e-5  # positions count from each row's first real token
    # teeth: right padding (the fault) would change at least one row's first-step logits
    L = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    with torch.no_grad():
        bad = model(ids, attention_mask=(ids != 0).long()).logits[:, -1]
    assert max(float((bad[i] - direct[i]).abs().max()) for i in range(5)) > 1e-3


def test_c21_stop_token_ends_one_row_while_others_go_on():
    tok = make_tt()
    model = make_tl()
    prompts = five_prompts(tok)
    with evaluation_mode(model):
        free = greedy_generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=0)
        stop = free[0][2]  # the token row 0 emits third
        cut = greedy_generate(model, prompts, max_new_tokens=6, stop_ids=[stop], pad_id=0, batch_size=5)
    for f, c in zip(free, cut):
        k = f.index(stop) if stop in f else len(f)
        assert c == f[:k]  # nothing after the stop token, and the stop token itself excluded
    assert len(cut[0]) == free[0].index(stop) <= 2
    assert any(len(c) == 6 for c in cut)


def test_c21_metric_same_for_batch_sizes_and_padding_side():
    tok = make_tt()
    model = make_tl()
    enc = ChatEncoder(tok)
    users = [tt_words(range(20 + k, 20 + k + 1 + k % 9)) for k in range(20)]
    prompts = [enc.prompt_ids([{"role": "user", "content": u}]) for u in users]
    with evaluation_mode(model):
        outs = greedy_generate(model, prompts, max_new_tokens=3, stop_ids=[2, 5], pad_id=0, batch_size=1)
    # references: the model's own single-row answers for even rows, a wrong word for odd rows
    examples = []
    for k, (u, o) in enumerate(zip(users, outs)):
        ref = tok.decode(o, skip_special_tokens=True) if k % 2 == 0 else "w127 w127 w127 w127"
        examples.append(Example(messages=[{"role": "user", "content": u}, {"role": "assistant", "content": ref}]))
    scores = []
    for bs, side in ((1, "left"), (16, "left"), (16, "right"), (7, "right")):
        tok.padding_side = side
        ev = Evaluator(tok, examples, enc, batch_size=bs, max_new_tokens=3)
        ev.max_new_tokens = 3
        scores.append(ev(model)["metric"])
    assert scores == [0.5] * 4


def test_normalize_and_exact_match():
    assert normalize_answer("  Walked.\n") == "walked"
    assert normalize_answer('"ran"') == "ran"
    assert exact_match("Children", ["children"])
    assert not exact_match("The past tense of walk is walked.", ["walked"])
    assert exact_match("fast", ["fasts", "fast"])
