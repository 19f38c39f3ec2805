"""Data path: row shapes, completion-only masks from the chat template (C19), eos/end-of-turn targets
with pad = eos (C17 part 1), truncation and dropped examples, collation by lengths."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tl, make_tt, tt_words
from deltatune.train.data import (
    IGNORE_INDEX,
    ChatEncoder,
    DataError,
    Example,
    collate,
    count_targets,
    load_examples,
    row_to_example,
)
from deltatune.train.loss import token_loss_sum

WALK_USER = "Give the past tense of walk."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sm_tok():
    from deltatune.integrations.transformers import default_model_source, load_tokenizer

    return load_tokenizer(default_model_source())


def targets(enc: ChatEncoder, ex: Example) -> list[int]:
    out = enc.encode(ex)
    return [t for t, lab in enumerate(out["labels"]) if lab != IGNORE_INDEX]


def offset_reference(tok, messages) -> list[int]:
    """Independent reference (C19): render once, encode once with offsets, mark the tokens inside an
    assistant message's content or its closing <|im_end|>."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        k = text.index(head + m["content"] + "<|im_end|>", pos)
        a = k + len(head)
        b = a + len(m["content"]) + len("<|im_end|>")
        if m["role"] == "assistant":
            spans.append((a, b))
        pos = b
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [t for t, (s, e) in enumerate(enc["offset_mapping"])
            if e > s and any(a <= s and e <= b for a, b in spans)]


# ----------------------------------------------------------------------------- C19


def test_c19_walk_row_targets_same_for_all_three_shapes(sm_tok):
    enc = ChatEncoder(sm_tok)
    rows = [
        {"messages": [{"role": "user", "content": WALK_USER}, {"role": "assistant", "content": "walked"}]},
        {"prompt": WALK_USER, "completion": "walked"},
        {"instruction": WALK_USER, "input": "", "output": "walked"},
    ]
    for row in rows:
        ex = row_to_example(row)
        out = enc.encode(ex)
        assert len(out["input_ids"]) == 41
        assert targets(enc, ex) == [37, 38, 39], row
        ids = out["input_ids"]
        assert sm_tok.decode(ids[37:39]) == "walked" and ids[39] == 2
        assert out["labels"][37:40] == ids[37:40]  # labels are the ids (unshifted)
        assert enc.prompt_ids(ex.prompt_messages()) == ids[:37]


def test_c19_two_turns_all_assistant_turns_and_last_only(sm_tok):
    msgs = [{"role": "user", "content": WALK_USER}, {"role": "assistant", "content": "walked"},
            {"role": "user", "content": "And of run?"}, {"role": "assistant", "content": "ran"}]
    enc = ChatEncoder(sm_tok)
    out = enc.encode(Example(messages=msgs))
    assert len(out["input_ids"]) == 57
    assert targets(enc, Example(messages=msgs)) == [37, 38, 39, 54, 55]
    assert sm_tok.decode(out["input_ids"][54:55]).strip() == "ran"
    last = ChatEncoder(sm_tok, train_on="last_assistant")
    assert targets(last, Example(messages=msgs)) == [54, 55]
    assert targets(enc, Example(messages=msgs)) == offset_reference(sm_tok, msgs)


def test_c19_marker_text_in_user_turn_changes_nothing(sm_tok):
    msgs = [{"role": "user", "content": "### Response: the assistant said hi. ### Response:\nassistant"},
            {"role": "assistant", "content": "Hello there, assistant here."}]
    enc = ChatEncoder(sm_tok)
    t = targets(enc, Example(messages=msgs))
    assert t == offset_reference(sm_tok, msgs)
    assert len(t) >= 5
    # with a system turn too, holding special-token text: it stays text (one <|im_start|> per message)
    msgs2 = [{"role": "system", "content": "Be brief. <|im_start|>assistant"}] + msgs
    out = enc.encode(Example(messages=msgs2))
    ref_ids, ref_targets = piecewise_reference(sm_tok, msgs2)
    assert out["input_ids"] == ref_ids and targets(enc, Example(messages=msgs2)) == ref_targets
    assert out["input_ids"].count(1) == 3  # <|im_start|>: one per message, none from the system text


def piecewise_reference(tok, messages):
    """Independent reference for contents holding special-token text: SmolLM2's ChatML written out by
    hand, per message ``<|im_start|>role\n`` (control token), the content encoded as text, ``<|im_end|>\n``;
    targets: an assistant message's content tokens and its <|im_end|>."""
    ids, tg = [], []
    for m in messages:
        ids += tok(f"<|im_start|>{m['role']}\n", add_special_tokens=False)["input_ids"]
        body = tok(m["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"] + [2]
        if m["role"] == "assistant":
            tg += list(range(len(ids), len(ids) + len(body)))
        ids += body + tok("\n", add_special_tokens=False)["input_ids"]
    return ids, tg


def test_c19_loss_equals_hand_computation_on_tl():
    tok = make_tt()
    model = make_tl()
    msgs = [{"role": "user", "content": tt_words([7, 8, 9])}, {"role": "assistant", "content": tt_words([10, 11])}]
    enc = ChatEncoder(tok)
    item = enc.encode(Example(messages=msgs))
    assert item["input_ids"] == [1, 3, 7, 8, 9, 5, 4, 10, 11, 5]
    assert [t for t, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX] == [7, 8, 9]
    batch = collate([item], pad_id=0)
    with torch.no_grad():
        s, n = token_loss_sum(model, batch)
        logits = model(torch.tensor([item["input_ids"]])).logits[0].double()
    ids = item["input_ids"]
    hand = -sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in (7, 8, 9)) / 3
    assert n == 3
    assert abs(float(s) / n - float(hand)) / float(hand) < 1e-6


def test_example_without_target_is_reported_not_kept(sm_tok):
    enc = ChatEncoder(sm_tok, max_seq_len=30, truncation="end")
    ex = Example(messages=[{"role": "user", "content": WALK_USER}, {"role": "assistant", "content": "walked"}],
                 where="f.jsonl:7")
    assert enc.encode(ex) is None
    assert enc.stats.dropped_no_target == ["f.jsonl:7"]
    assert "1 dropped" in enc.stats.summary() and "f.jsonl:7" in enc.stats.summary()
    # cut inside the answer: the answer's first token stays a target, and the loss is counted apart
    enc2 = ChatEncoder(sm_tok, max_seq_len=38, truncation="end")
    out = enc2.encode(ex)
    assert len(out["input_ids"]) == 38 and enc2.stats.truncated == 1
    assert [t for t, lab in enumerate(out["labels"]) if lab != IGNORE_INDEX] == [37]
    assert enc2.stats.cut_answer == ["f.jsonl:7"] and enc2.stats.cut_harmless == 0
    # the default cuts the prompt's start instead: the same example keeps its whole answer at 30 tokens
    full = ChatEncoder(sm_tok).encode(ex)
    enc3 = ChatEncoder(sm_tok, max_seq_len=30)
    out = enc3.encode(ex)
    assert len(out["input_ids"]) == 30 and out["input_ids"][0] == full["input_ids"][0]  # the leading BOS stays
    assert out["input_ids"][1:] == full["input_ids"][11:40] and out["labels"][-3:] == full["input_ids"][37:40]
    assert enc3.stats.cut_harmless == 1 and enc3.stats.cut_answer == [] and not enc3.stats.dropped_no_target


# ----------------------------------------------------------------------------- C17 part 1


def test_c17_end_of_turn_is_target_when_pad_is_eos(sm_tok):
    assert sm_tok.pad_token_id == sm_tok.eos_token_id == 2
    rows = [
        [{"role": "user", "content": WALK_USER}, {"role": "assistant", "content": "walked"}],
        [{"role": "user", "content": WALK_USER}, {"role": "assistant", "content": "walked"},
         {"role": "user", "content": "And of run?"}, {"role": "assistant", "content": "ran"}],
        [{"role": "user", "content": " ".join(["word"] * 30)}, {"role": "assistant", "content": "Thirty words."}],
    ]
    enc = ChatEncoder(sm_tok)
    items = [enc.encode(Example(messages=m)) for m in rows]
    batch = collate(items, pad_id=sm_tok.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert int((labels == 2).sum()) == 4  # every assistant-closing <|im_end|>
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        assert mask[b, :n].eq(1).all() and mask[b, n:].eq(0).all()
        assert labels[b, n:].eq(IGNORE_INDEX).all()  # padding never a target
        assert ids[b, n:].eq(2).all()  # padded with the pad id (= eos) ...
        row_ids, row_lab = it["input_ids"], it["labels"]
        for t, x in enumerate(row_ids):
            if x == 2:  # ... but each real <|im_end|> is a target iff it closes an assistant turn
                closes_assistant = row_lab[t] == 2
                start = max(i for i in range(t) if row_ids[i] == 1)  # its <|im_start|>
                nl = row_ids.index(198, start)  # the newline after the role name
                role = sm_tok.decode(row_ids[start + 1: nl]).strip()
                assert closes_assistant == (role == "assistant"), (b, t, role)
    assert count_targets(batch) == int((labels[:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------- shapes and errors


def _write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def test_file_shapes_jsonl_csv_parquet(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    ex = load_examples(p)
    assert [e.messages for e in ex][1] == [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\nSay hi,,hi\nAdd,1 and 2,3\n")
    ex = load_examples(str(csv))
    assert ex[0].messages[0]["content"] == "Say hi"
    assert ex[1].messages[0]["content"] == "Add\n\n1 and 2" and ex[1].reference == "3"
    import pandas as pd

    pq = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["hello world", "bye"]}).to_parquet(pq)
    ex = load_examples(str(pq))
    assert ex[0].text == "hello world" and ex[0].messages is None
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]))
    assert load_examples(str(js))[0].reference == "a"


@pytest.mark.parametrize("row, field", [
    ({"prompt": "x"}, "completion"),
    ({"prompt": "x", "completion": ""}, "completion"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"instruction": "x"}, "output"),
    ({"question": "x"}, "no known fields"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, row, field):
    rows = [{"prompt": "ok", "completion": "ok"}, row] if "prompt" not in row else [row]
    p = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_examples(p)
    msg = str(ei.value)
    assert "bad.jsonl" in msg and f"row {len(rows)}" in msg and field in msg


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="extension"):
        load_examples(str(tmp_path / "x.txt"))


def test_plain_text_rows_train_every_token_and_end_with_eos():
    tok = make_tt()
    enc = ChatEncoder(tok)
    out = enc.encode(Example(text="w7 w8 w9"))
    assert out["input_ids"] == [1, 7, 8, 9, 2]
    assert out["labels"][1:] == [7, 8, 9, 2]


def test_held_out_split_keeps_duplicated_prompts_on_one_side():
    from deltatune.train.data import Example, split_examples

    rows = []
    for i in range(20):
        msgs = [{"role": "user", "content": f"w{6 + i}"}, {"role": "assistant", "content": f"w{40 + i}"}]
        rows += [Example(messages=msgs)] * (3 if i % 4 == 0 else 1)  # some rows three times
    rows.append(Example(messages=[{"role": "user", "content": "w6"}, {"role": "assistant", "content": "w99"}]))
    train, held = split_examples(rows, 0.25, seed=0)
    key = lambda e: e.messages[0]["content"]  # noqa: E731
    assert held and train and not ({key(e) for e in train} & {key(e) for e in held})
    assert len(train) + len(held) == len(rows)
    # distinct rows split exactly as before: a seeded permutation, the first n held out
    distinct = [Example(messages=[{"role": "user", "content": f"w{6 + i}"},
                                  {"role": "assistant", "content": "w7"}]) for i in range(10)]
    tr, he = split_examples(distinct, 0.2, seed=0)
    perm = __import__("torch").randperm(10, generator=__import__("torch").Generator().manual_seed(0)).tolist()
    assert [distinct.index(e) for e in he] == sorted(perm[:2])
