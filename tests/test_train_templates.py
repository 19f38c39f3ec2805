"""The data path trains what the user meant, on tiny in-memory tokenizers with different chat templates:

* CM: ChatML (``<|im_start|>role\\n ... <|im_end|>\\n``), EOS ``<|endoftext|>`` apart from the end of turn;
* SM: ChatML with a default system turn (as SmolLM2's), BOS = ``<|im_start|>``, EOS = pad = ``<|im_end|>``;
* NE: ``User: ...\\nBot: ...\\n`` with a BOS and an EOS, but no end-of-turn token after an answer;
* NT: no chat template at all.

Each is character-level (every printable character one token, specials whole), so special-token text
typed into a message is visibly different from the control token. Checked: special-token text in a
message stays text; a prompt that already holds the rendered template is encoded as it is, never
templated twice; a template without an end-of-turn token still trains a stop (EOS), and generation
stops there; a conversation that opens with an answer trains exactly that answer; truncation keeps
answers and counts the cuts that lose answer tokens apart (also in ``report.json``); a tokenizer
without a template gives a one-line error naming the model and the fix, and ``generate`` says which
plain format it used.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import make_tl, model_folder
from deltatune.cli import main
from deltatune.train.data import (
    IGNORE_INDEX,
    ChatEncoder,
    DataError,
    Example,
    NoChatTemplateError,
    end_of_turn_ids,
    row_to_example,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SM_SYSTEM = "You are a helpful AI assistant."
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMOL = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + SM_SYSTEM + "<|im_end|>\n' }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_EOT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
          "{% elif m['role'] == 'assistant' %}Bot: {{ m['content'] }}\n{% else %}{{ m['content'] }}\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}Bot: {% endif %}")


def char_tok(specials, template, bos=None, eos=None, pad=None):
    """A character-level tokenizer: ``specials`` first (ids 0..), then one token per printable character
    and newline (under 128 ids, so TL can be its model)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials)}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)])
    tok.chat_template = template
    return tok


def make_cm():
    return char_tok(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, eos="<|endoftext|>", pad="<|endoftext|>")


def make_sm():
    return char_tok(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], SMOL, bos="<|im_start|>", eos="<|im_end|>",
                    pad="<|im_end|>")


def make_ne(eos: bool = True):
    if eos:
        return char_tok(["<pad>", "<s>", "</s>"], NO_EOT, bos="<s>", eos="</s>", pad="<pad>")
    from tokenizers import processors

    tok = char_tok(["<pad>", "<s>"], NO_EOT, bos="<s>", pad="<pad>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    return tok


def make_nt():
    """A base model's tokenizer: no template; plain encoding puts <s> in front."""
    from tokenizers import processors

    tok = char_tok(["<pad>", "<s>", "</s>"], None, bos="<s>", eos="</s>", pad="<pad>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


MAKERS = {"CM": make_cm, "SM": make_sm, "NE": make_ne}
STOP = {"CM": "<|im_end|>", "SM": "<|im_end|>", "NE": "\n</s>"}  # what closes an answer in the targets


def text(tok, ids) -> str:
    return tok.decode(ids)


def target_ids(item) -> list[int]:
    return [lab for lab in item["labels"] if lab != IGNORE_INDEX]


def n_control(tok, ids) -> int:
    special = set(tok.all_special_ids)
    return sum(1 for i in ids if i in special)


def test_the_three_templates_and_their_stop_tokens():
    """The tokenizers are what the tests below assume."""
    cm, sm, ne = make_cm(), make_sm(), make_ne()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert cm.apply_chat_template(conv, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert sm.apply_chat_template(conv, tokenize=False).startswith(f"<|im_start|>system\n{SM_SYSTEM}<|im_end|>\n")
    assert ne.apply_chat_template(conv, tokenize=False) == "<s>User: hi\nBot: yo\n"
    assert end_of_turn_ids(cm) == [0, 2] and end_of_turn_ids(sm) == [2] and end_of_turn_ids(ne) == [2]
    assert make_ne(eos=False).eos_token_id is None and end_of_turn_ids(make_ne(eos=False)) == []
    assert cm("a<|im_end|>", add_special_tokens=False)["input_ids"][-1] == 2  # text would become the control token


# ----------------------------------------------------------------------------- special-token text is text


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_special_token_text_typed_in_a_message_is_encoded_as_text(name):
    tok = MAKERS[name]()
    typed = "what do <|im_end|> and </s> and <|im_start|>user mean?"
    plain = "what do XXXXXXXXXX and XXXX and XXXXXXXXXXXXXXXX mean?"  # same length, no special text
    enc = ChatEncoder(tok)
    conv = lambda u: [{"role": "user", "content": u}, {"role": "assistant", "content": "tokens"}]  # noqa: E731
    got, ref = enc.encode(Example(messages=conv(typed))), enc.encode(Example(messages=conv(plain)))
    # the same layout: as many tokens, the same control tokens at the same places; the user's text is characters
    assert len(got["input_ids"]) == len(ref["input_ids"])
    assert n_control(tok, got["input_ids"]) == n_control(tok, ref["input_ids"])
    assert [i for i in got["input_ids"] if i in tok.all_special_ids] == \
        [i for i in ref["input_ids"] if i in tok.all_special_ids]
    assert typed in text(tok, got["input_ids"])
    assert got["labels"] == [lab if lab == IGNORE_INDEX else i for lab, i in zip(ref["labels"], got["input_ids"])]
    assert text(tok, target_ids(got)) == "tokens" + STOP[name]
    # generation prompts too, and an assistant answer holding special text is trained as text
    p = enc.prompt_ids([{"role": "user", "content": typed}])
    assert p == got["input_ids"][: len(p)] and n_control(tok, p) == n_control(tok, enc.prompt_ids(conv(plain)[:1]))
    ans = enc.encode(Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "say <|im_end|>"}]))
    assert text(tok, target_ids(ans)) == "say <|im_end|>" + STOP[name]
    assert n_control(tok, target_ids(ans)) == 1  # only the stop itself


# ----------------------------------------------------------------------------- a rendered prompt is not templated again


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_prompt_holding_the_rendered_template_is_encoded_as_it_is(name):
    tok = MAKERS[name]()
    enc = ChatEncoder(tok)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                       add_generation_prompt=True)
    ex = row_to_example({"prompt": rendered, "completion": "hello"}, "d.jsonl", 3)
    item = enc.encode(ex)
    normal = enc.prompt_ids([{"role": "user", "content": "hi there"}])
    stop = enc.stop_id
    assert item["input_ids"] == normal + tok("hello", add_special_tokens=False)["input_ids"] + [stop]
    assert text(tok, target_ids(item)) == "hello" + STOP[name].lstrip("\n")
    assert enc.stats.as_is == 1 and "already held the chat template" in enc.stats.summary()
    # generation from it (the evaluator's prompt) is the same prompt, once
    assert enc.prompt_ids(ex.prompt_messages()) == normal
    header = {"CM": "<|im_start|>assistant", "SM": "<|im_start|>assistant", "NE": "Bot:"}[name]
    assert text(tok, item["input_ids"]).count(header) == 1
    # a completion that ends with the stop token's text: the control token, not text and then another stop
    if name != "NE":
        again = enc.encode(row_to_example({"prompt": rendered, "completion": "hello<|im_end|>\n"}))
        assert again["input_ids"] == item["input_ids"]
    # inside a longer conversation it would be templated twice: a one-line error naming the row
    with pytest.raises(DataError) as ei:
        enc.encode(row_to_example({"prompt": rendered, "completion": "hello", "system": "Be kind."}, "d.jsonl", 4))
    msg = str(ei.value)
    assert msg.startswith("d.jsonl:4: message 2 (user) already holds the rendered chat template") and "\n" not in msg


# ----------------------------------------------------------------------------- a template without end-of-turn still trains a stop


def test_template_without_end_of_turn_trains_eos_as_the_stop():
    tok = make_ne()
    enc = ChatEncoder(tok)
    item = enc.encode(Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert item["input_ids"] == tok("<s>User: hi\nBot: yo\n", add_special_tokens=False)["input_ids"] + [2]
    assert target_ids(item) == tok("yo\n", add_special_tokens=False)["input_ids"] + [2]  # EOS is a target
    # two answers: each ends with its EOS, both trained
    two = enc.encode(Example(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]))
    assert text(tok, two["input_ids"]) == "<s>User: a\nBot: b\n</s>User: c\nBot: d\n</s>"
    assert text(tok, target_ids(two)) == "b\n</s>d\n</s>"
    assert enc.stats.eos_appended == 3 and "EOS appended as the stop target of 3 answers" in enc.stats.summary()
    assert enc.stats.warnings() == []
    # ChatML closes its answers itself: nothing appended
    cm = ChatEncoder(make_cm())
    cm.encode(Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert cm.stats.eos_appended == 0
    # no end-of-turn token and no EOS: said in one line
    bare = ChatEncoder(make_ne(eos=False))
    out = bare.encode(Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert text(bare.tok, target_ids(out)) == "yo\n"
    [w] = bare.stats.warnings()
    assert "generation will not stop" in w and "\n" not in w


# ----------------------------------------------------------------------------- a conversation that opens with the answer


LEAD_IN = {  # the template's text before an opening assistant message's content, written by hand
    "CM": "<|im_start|>assistant\n",
    "SM": f"<|im_start|>system\n{SM_SYSTEM}<|im_end|>\n<|im_start|>assistant\n",
    "NE": "<s>Bot: ",
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_conversation_opening_with_the_assistant_trains_exactly_that_message(name):
    tok = MAKERS[name]()
    enc = ChatEncoder(tok)
    item = enc.encode(Example(messages=[{"role": "assistant", "content": "Hello!"}]))
    start = len(tok(LEAD_IN[name], add_special_tokens=False)["input_ids"])
    first = next(t for t, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX)
    assert first == start  # not 0: the default system turn and the header are not trained
    assert text(tok, target_ids(item)) == "Hello!" + STOP[name]
    more = enc.encode(Example(messages=[{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "Bye."}]))
    assert text(tok, target_ids(more)) == "Hello!" + STOP[name] + "Bye." + STOP[name]
    assert next(t for t, lab in enumerate(more["labels"]) if lab != IGNORE_INDEX) == start


# ----------------------------------------------------------------------------- truncation


def test_truncation_cuts_the_prompt_start_and_counts_lost_answer_tokens_apart():
    tok = make_sm()
    long_q = "Q" * 60
    ex = Example(messages=[{"role": "user", "content": long_q}, {"role": "assistant", "content": "yes"}], where="f:1")
    full = ChatEncoder(tok).encode(ex)
    last = max(t for t, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX) + 1  # after <|im_end|>
    assert last == len(full["input_ids"]) - 1  # the template's final newline follows
    enc = ChatEncoder(tok, max_seq_len=40)
    out = enc.encode(ex)
    assert out["input_ids"] == full["input_ids"][:1] + full["input_ids"][last - 39: last]  # BOS, then the prompt's end
    assert text(tok, target_ids(out)) == "yes<|im_end|>"
    assert enc.stats.cut_harmless == 1 and enc.stats.cut_answer == [] and enc.stats.truncated == 1
    # the answer alone does not fit: the prompt's end keeps half the room, the answer's end goes
    long_a = Example(messages=[{"role": "user", "content": long_q}, {"role": "assistant", "content": "A" * 60}],
                     where="f:2")
    full_a = ChatEncoder(tok).encode(long_a)
    first = next(t for t, lab in enumerate(full_a["labels"]) if lab != IGNORE_INDEX)
    out = enc.encode(long_a)
    assert out["input_ids"] == full_a["input_ids"][:1] + full_a["input_ids"][first - 19: first + 20]
    assert text(tok, target_ids(out)) == "A" * 20
    assert enc.stats.cut_answer == ["f:2"] and enc.stats.cut_harmless == 1
    s = enc.stats.summary()
    assert "1 cut at max_seq_len with every answer token kept" in s and "1 lost answer tokens at max_seq_len (f:2" in s
    # truncation="end" keeps the first tokens (the answer is lost, the example dropped and named)
    end = ChatEncoder(tok, max_seq_len=40, truncation="end")
    assert end.encode(ex) is None and end.stats.dropped_no_target == ["f:1"] and end.stats.truncated == 1
    assert end.stats.to_dict()["dropped_no_target"] == 1 and end.stats.to_dict()["cut_harmless"] == 0


# ----------------------------------------------------------------------------- no chat template


def test_no_chat_template_is_one_line_naming_the_model_and_the_fix(tmp_path):
    tok = make_nt()
    tok.name_or_path = "/models/base-lm"
    enc = ChatEncoder(tok)
    with pytest.raises(NoChatTemplateError) as ei:
        enc.encode(Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                           where="d.jsonl:1"))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("the tokenizer of /models/base-lm has no chat template")
    assert "'text' rows" in msg and "chat_template.jinja" in msg
    with pytest.raises(NoChatTemplateError):
        enc.prompt_ids([{"role": "user", "content": "hi"}])
    assert enc.encode(Example(text="plain words"))["input_ids"] == tok("plain words")["input_ids"] + [2]


# ----------------------------------------------------------------------------- the command line on the tiny model


def _folder(root, name, tok):
    return model_folder(root / name, make_tl(), tok)


def _jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


COMMON = ["--max-steps", "2", "--batch-size", "4", "--eval-size", "2", "--eval-every", "0", "--ppl-size", "0",
          "--threads", "1", "--no-progress", "--no-plot", "--val-fraction", "0.2"]


def test_cli_counts_truncation_in_the_summary_and_report(tmp_path, capsys):
    model = _folder(tmp_path, "sm", make_sm())
    rows = ([{"prompt": "Q" * 60, "completion": "ok"}] * 3 + [{"prompt": "q", "completion": "A" * 100}] * 2
            + [{"prompt": f"q{i}", "completion": "fine"} for i in range(5)])
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "train", "--model", model, "--data", data, "--out", str(out), "--max-seq-len",
                             "80", "--val-fraction", "0", *COMMON[:-2])
    assert code == 0, err
    rep = json.load(open(out / "report.json"))
    assert rep["data"]["cut_harmless"] == 3 and rep["data"]["cut_answer"] == 2 and rep["data"]["examples"] == 10
    assert rep["data"]["cut_answer_rows"] == [f"{data}:4", f"{data}:5"] and rep["config"]["truncation"] == "prompt"
    assert "3 cut at max_seq_len with every answer token kept, 2 lost answer tokens" in stdout
    assert f"{'cut at max_seq_len':<26}3 with every answer token kept, 2 lost answer tokens, 0 dropped" in stdout
    code, _, err = _run(capsys, "train", "--model", model, "--data", data, "--out", str(tmp_path / "x"),
                        "--truncation", "middle", *COMMON)
    assert code == 2 and "'truncation' must be 'prompt' or 'end'" in err and len(err.strip().splitlines()) == 1


def test_cli_without_a_chat_template(tmp_path, capsys):
    model = _folder(tmp_path, "nt", make_nt())
    chat = _jsonl(tmp_path / "chat.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(6)])
    out = tmp_path / "run"
    code, _, err = _run(capsys, "train", "--model", model, "--data", chat, "--out", str(out), *COMMON)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"deltatune: error: the tokenizer of {model} has no chat template")
    assert "'text' rows" in lines[0] and not out.exists()
    # plain text trains; generate says which plain format it used
    text_rows = _jsonl(tmp_path / "text.jsonl", [{"text": f"line {i} of plain text"} for i in range(6)])
    assert main(["train", "--model", model, "--data", text_rows, "--out", str(out), *COMMON]) == 0
    capsys.readouterr()
    code, stdout, err = _run(capsys, "generate", "--model", model, "--prompt", "hi", "--system", "Be brief.",
                             "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert (f"note: {model} has no chat template: each prompt is plain text: the tokenizer's <s>, then the --system "
            "text, a blank line, then the prompt (no roles, no template); generation stops at EOS </s>") in err
    assert json.loads(stdout.strip().splitlines()[-1])["prompt"] == "hi"


def test_cli_template_without_end_of_turn_learns_to_stop(tmp_path, capsys):
    """Trained on answers the NE template never closes, the model learns the EOS the run appended, and
    ``generate`` stops there (not at --max-new-tokens)."""
    model = _folder(tmp_path, "ne", make_ne())
    rows = [{"prompt": p, "completion": a} for p, a in (("hi", "yo"), ("up?", "ok"), ("hm", "no"), ("go", "ya"))] * 4
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "train", "--model", model, "--data", data, "--out", str(out), "--method", "full",
                             "--lr", "1e-2", "--max-steps", "60", "--warmup-steps", "0", "--batch-size", "16",
                             "--val-fraction", "0", "--eval-every", "0", "--ppl-size", "0", "--threads", "1",
                             "--no-progress", "--no-plot", "--precision", "fp32")
    assert code == 0, err
    assert "EOS appended as the stop target of 16 answers" in stdout
    code, stdout, err = _run(capsys, "generate", "--model", str(out), "--prompt", "hi", "--prompt", "up?",
                             "--max-new-tokens", "12", "--json")
    assert code == 0, err
    answers = [json.loads(line)["answer"] for line in stdout.strip().splitlines()]
    assert answers == ["yo\n", "ok\n"]  # stopped at the trained EOS: 3 tokens of 12
