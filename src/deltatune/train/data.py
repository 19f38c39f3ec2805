"""Training data: read files, normalise rows to conversations, tokenise with loss masks, batch.

Rows (JSONL, JSON, CSV or Parquet, read with ``datasets``) may take any of these shapes, checked in
this order:

* chat: ``messages`` = list of ``{"role": "system"|"user"|"assistant", "content": str}``;
* ``prompt`` / ``completion`` (strings, or lists of messages as in TRL's conversational shape);
* Alpaca: ``instruction``, optional ``input``, ``output`` (the user turn is the instruction, then a
  blank line and the input when the input is not empty);
* ``text``: plain text, trained on every token (no chat template).

Loss masking (which tokens are targets) comes from the tokenizer's chat template, never from a
search for marker strings in the ids: for every assistant message ``i``, the conversation up to
``i`` is rendered with the generation prompt (``P``) and the conversation through ``i`` without it
(``Q``); the targets are the tokens of ``Q`` after ``P``, up to and including the first end-of-turn
token (ChatML's ``<|im_end|>``). Tokens the template adds after the end-of-turn token (ChatML's
newline) are not targets. A conversation that opens with an assistant message has no ``P``: its
targets start after the text the template writes before that message's content (a default system
turn, the assistant header), found by rendering the message with a stand-in content. By default
every assistant turn is trained (``train_on="all_assistant"``); ``"last_assistant"`` trains the
last turn only. The end-of-turn token is trained even when it is also the pad token (SmolLM2: pad =
eos = ``<|im_end|>``): padding is found from sequence lengths, never by comparing ids with the pad
id.

* A template that writes no end-of-turn token after an answer (plain ``User: ... / Bot: ...``
  layouts) would teach no stop: the tokenizer's EOS is then inserted after each trained answer's
  turn and trained as its stop (generation stops at EOS, :func:`end_of_turn_ids`); without an EOS
  either, the run says in one line that generation will not stop (:meth:`EncodeStats.warnings`).
* Message contents are text: special-token text a user typed (the literal string ``<|im_end|>``)
  is encoded as text (``split_special_tokens``), never as the control token; only the template's
  own text yields control tokens.
* A prompt that already holds the rendered chat template (a user message that ends with the
  template's generation header, e.g. ``<|im_start|>assistant``) is never templated a second time:
  alone or followed by its answer it is encoded as it is, its answer and the stop token (the
  template's end-of-turn token, else EOS) as targets; inside a longer conversation it is an error.
* Without a chat template, conversation rows are an error that names the model and the fix
  (:class:`NoChatTemplateError`); ``text`` rows need none.

Truncation to ``max_seq_len`` tokens (``truncation="prompt"``, the default): the template's text
after the last answer goes first; then the prompt is cut from its start (a leading BOS stays), so
that every answer token is kept; only when the answers alone do not fit does the prompt's end keep
half the room and the answers' end go. ``truncation="end"`` keeps the first ``max_seq_len`` tokens.
:class:`EncodeStats` counts examples that lost only non-target tokens apart from those that lost
answer tokens; an example left with no target (an empty answer, or an answer entirely cut) is
dropped and counted, never kept silently. The training report prints both.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Iterable, Optional, Sequence

import torch

from .._io import atomic_write_bytes

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Unreadable or malformed data; the message names the file, the row (1-based) and the field."""


@dataclass
class Example:
    """One training/evaluation example: either a conversation or a plain text.

    ``messages``: list of {"role", "content"} (chat); ``text``: plain text (no template);
    ``answers``: accepted answers for exact match (default: the last assistant content);
    ``where``: "file:row" for error messages; ``meta["answer_prefix"]`` (optional): text that the
    last assistant message begins with and that the prompt holds as a word of its own: the answer
    is then encoded with that text's own tokens first (:func:`align_answer_tokens`).
    """

    messages: Optional[list] = None
    text: Optional[str] = None
    answers: Optional[list] = None
    where: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def reference(self) -> Optional[str]:
        if self.answers:
            return self.answers[0]
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    def prompt_messages(self) -> Optional[list]:
        """The conversation before the last assistant turn (what generation starts from)."""
        if not self.messages:
            return None
        if self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return list(self.messages)


# ----------------------------------------------------------------------------- reading files


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL/JSON/CSV/Parquet file (no network). JSON Lines and JSON are read here (a JSON
    file holds a list of rows, or JSON Lines); CSV and Parquet with ``datasets``, whose own log lines
    are kept off the terminal (the error says what they said).

    Raises:
        DataError: a missing file, a folder, an unknown extension, an empty or binary file, text that is
            not UTF-8, a line that is not JSON, a row that is not an object, or a file ``datasets``
            cannot parse; one line naming the file (and the line) and the fix.
    """
    if os.path.isdir(path):
        raise DataError(f"data file {path} is a folder: give a file (.jsonl, .json, .csv or .parquet)")
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_EXTENSIONS:
        raise DataError(f"data file {path}: unknown extension {ext!r}; use one of {', '.join(DATA_EXTENSIONS)}")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path} is empty")
    if DATA_EXTENSIONS[ext] == "json":
        return _read_json_rows(path, ext)
    if ext == ".csv":
        _check_text(path)
    return _read_with_datasets(path, DATA_EXTENSIONS[ext])


def _check_text(path: str) -> None:
    """Refuse a text data file that holds NUL bytes (a binary file) or is not UTF-8 (naming where)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"data file {path} is not UTF-8 text (byte {offset + e.start}: {e.reason}): save it "
                                "as UTF-8") from None
            if b"\0" in chunk:
                raise DataError(f"data file {path} is not text (it holds NUL bytes at byte {offset + chunk.index(0)}): "
                                "give a JSON Lines, JSON, CSV or Parquet file")
            if not chunk:
                return
            offset += len(chunk)


def _read_json_rows(path: str, ext: str) -> list[dict]:
    _check_text(path)
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    if ext == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # else: JSON Lines in a .json file
                raise DataError(f"data file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                                "give a list of row objects, or one object per line") from None
        else:
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise DataError(f"data file {path} holds a JSON {type(data).__name__}: give a list of row objects")
            for i, r in enumerate(data):
                if not isinstance(r, dict):
                    raise DataError(f"{path}: row {i + 1} is a JSON {type(r).__name__}, not an object with fields")
            return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON (column {e.colno}: {e.msg}): give one JSON "
                            "object per line") from None
        if not isinstance(r, dict):
            raise DataError(f"{path}: line {lineno} is a JSON {type(r).__name__}, not an object with fields")
        rows.append(r)
    return rows


def _read_with_datasets(path: str, builder: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    said: list = []

    class _Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    logger = logging.getLogger("datasets")
    handler, old_level, old_propagate = _Keep(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    saved = [(h, h.level) for h in logger.handlers if h is not handler]
    for h, _ in saved:
        h.setLevel(logging.CRITICAL + 1)
    try:
        ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train")
        return [dict(r) for r in ds]
    except Exception as e:  # datasets raises many types; report one line
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        msg = (str(cause).strip().splitlines() or said[-1:] or [type(cause).__name__])[0]
        raise DataError(f"data file {path} could not be read as {builder.upper()}: {msg}") from None
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        logger.setLevel(old_level)
        for h, level in saved:
            h.setLevel(level)


def _message_list(value, path: str, row: int, field_name: str) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{path}: row {row}: field {field_name!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{path}: row {row}: field {field_name!r}[{j}] must have 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{path}: row {row}: field {field_name!r}[{j}].role is {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{path}: row {row}: field {field_name!r}[{j}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def _text(row: dict, name: str, path: str, i: int, allow_empty: bool = False) -> str:
    v = row.get(name)
    if not isinstance(v, str):
        raise DataError(f"{path}: row {i}: field {name!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{path}: row {i}: field {name!r} is empty")
    return v


def row_to_example(row: dict, path: str = "<data>", i: int = 1) -> Example:
    """Normalise one row (any supported shape) into an :class:`Example`.

    Raises:
        DataError: the row has no known shape, or a field has the wrong type or is empty.
    """
    where = f"{path}:{i}"
    has = {k for k, v in row.items() if v is not None}
    if "messages" in has:
        msgs = _message_list(row["messages"], path, i, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{path}: row {i}: field 'messages' has no assistant message to train on")
        return Example(messages=msgs, where=where)
    if "prompt" in has or "completion" in has:
        for name in ("prompt", "completion"):
            if name not in has:
                raise DataError(f"{path}: row {i}: field {name!r} is missing (rows with 'prompt' need 'completion')")
        p, c = row["prompt"], row["completion"]
        msgs = _message_list(p, path, i, "prompt") if isinstance(p, (list, tuple)) else [
            {"role": "user", "content": _text(row, "prompt", path, i)}]
        if isinstance(c, (list, tuple)):
            msgs += _message_list(c, path, i, "completion")
        else:
            msgs.append({"role": "assistant", "content": _text(row, "completion", path, i)})
        if isinstance(row.get("system"), str) and row["system"].strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": row["system"]})
        return Example(messages=msgs, where=where)
    if "instruction" in has or "output" in has:
        for name in ("instruction", "output"):
            if name not in has:
                raise DataError(f"{path}: row {i}: field {name!r} is missing (Alpaca rows need instruction and output)")
        instr = _text(row, "instruction", path, i)
        inp = row.get("input")
        if inp is not None and not isinstance(inp, str):
            raise DataError(f"{path}: row {i}: field 'input' must be a string")
        user = instr + ("\n\n" + inp if inp and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", path, i)}]
        return Example(messages=msgs, where=where)
    if "text" in has:
        return Example(text=_text(row, "text", path, i), where=where)
    raise DataError(
        f"{path}: row {i}: no known fields (messages | prompt+completion | instruction+output | text); "
        f"it has {sorted(has) or 'none'}"
    )


ADAPTER_FIELD = "adapter"  # a row's adapter choice (deltatune eval/generate with several --adapter)


def load_examples(path: str) -> list[Example]:
    """Every row of ``path`` as an :class:`Example` (rows numbered from 1 in errors); a row's
    ``adapter`` field (the adapter that answers it) goes into ``meta["adapter"]``."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    out = []
    for i, r in enumerate(rows):
        ex = row_to_example(r, path, i + 1)
        choice = r.get(ADAPTER_FIELD)
        if choice is not None:
            if not isinstance(choice, str) or not choice.strip():
                raise DataError(f"{path}: row {i + 1}: field {ADAPTER_FIELD!r} must be an adapter name, got {choice!r}")
            ex.meta[ADAPTER_FIELD] = choice.strip()
        out.append(ex)
    return out


def examples_from_rows(rows, name: str = "data") -> list[Example]:
    """Rows held in memory (a list of dicts in any shape :func:`row_to_example` reads, or any iterable of
    mappings such as a ``datasets.Dataset``) as :class:`Example` s; errors name ``name`` and the row
    (1-based), as for a file.

    Raises:
        DataError: not an iterable of mappings (a pandas DataFrame: pass ``df.to_dict("records")``), no
            rows, or a row of no known shape.
    """
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise DataError(f"{name} must be a file path or a list of rows (dicts), got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            hint = " (for a pandas DataFrame pass df.to_dict('records'))" if hasattr(rows, "to_dict") else ""
            raise DataError(f"{name}: row {i + 1} is a {type(row).__name__}, not a dict of fields{hint}")
        out.append(row_to_example(dict(row), name, i + 1))
    if not out:
        raise DataError(f"{name} has no rows")
    return out


def write_rows_jsonl(path: str, rows) -> None:
    """Write rows held in memory as JSON lines (so that a run trained on them can be evaluated again).

    Raises:
        DataError: a value JSON cannot hold (the row is named).
    """
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(dict(row), ensure_ascii=False))
        except (TypeError, ValueError) as e:
            raise DataError(f"row {i + 1} cannot be written as JSON ({e}): give plain strings, numbers and lists") from None
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def split_examples(examples: list, val_fraction: float, seed: int, max_eval: Optional[int] = None):
    """(train, held-out): a seeded random ``val_fraction`` of the rows (at least 1; about ``max_eval`` at most).

    Rows with the same prompt (the conversation before its last answer, or the same text) go to
    the same side, so a duplicated row never leaks from training into the held-out set; the held-out
    side then holds at least the requested number of rows where the duplicates allow.
    """
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    groups: dict = {}
    for i, e in enumerate(examples):
        key = json.dumps(e.prompt_messages(), sort_keys=True) if e.messages is not None else e.text
        groups.setdefault(key, []).append(i)
    members = list(groups.values())  # in order of first appearance
    if len(members) < 2:
        return list(examples), []
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(members), generator=g).tolist()
    n = max(1, int(round(len(examples) * val_fraction)))
    if max_eval:
        n = min(n, max_eval)
    held_idx: list = []
    for k, gi in enumerate(perm[:-1]):  # at least one group stays for training
        if len(held_idx) >= n:
            break
        held_idx += members[gi]
    held = set(held_idx)
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# ----------------------------------------------------------------------------- tokenising


class NoChatTemplateError(DataError):
    """Conversations given to a tokenizer without a chat template (the message names the model and the fix)."""


TRUNCATIONS = ("prompt", "end")
_SENTINEL = "zqxdtcontent{}xqz"  # stands for a message's content in a probe rendering


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    dec = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, t in dec.items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def _special_texts(tokenizer) -> list[str]:
    """The texts the tokenizer turns into special (control) tokens, longest first."""
    out = {t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if isinstance(t, str) and t}
    dec = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for t in dec.values():
        if getattr(t, "special", False) and getattr(t, "content", ""):
            out.add(t.content)
    return sorted(out, key=len, reverse=True)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def model_name_of(tokenizer) -> str:
    """The model folder (or name) a tokenizer was loaded from, for messages."""
    return str(getattr(tokenizer, "name_or_path", "") or "this model")


def no_template_message(tokenizer) -> str:
    return (f"the tokenizer of {model_name_of(tokenizer)} has no chat template, so conversation rows (messages | "
            "prompt+completion | instruction+output) cannot be laid out: give plain 'text' rows (trained on every "
            "token), use a chat model (e.g. an -Instruct folder), or add a template to the model folder "
            "(chat_template.jinja, or 'chat_template' in tokenizer_config.json)")


def template_end_of_turn(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant message's content (ChatML's
    ``<|im_end|>``), found by rendering a probe conversation; None when it writes none there."""
    if not has_chat_template(tokenizer):
        return None
    probe = "zqxprobe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False)
    except Exception:
        return None
    k = text.rfind(probe)
    if k < 0:
        return None
    rest = _encode(tokenizer, text[k + len(probe):])
    return int(rest[0]) if rest and rest[0] in _special_ids(tokenizer) else None


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that close an assistant turn (the stop tokens of chat generation).

    The tokenizer's eos token, plus the special token the chat template writes right after an
    assistant message's content (:func:`template_end_of_turn`), when there is one.
    """
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    t = template_end_of_turn(tokenizer)
    if t is not None and t not in ids:
        ids.append(t)
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of template text: special-token text becomes the special token."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_text(tokenizer, text: str) -> list[int]:
    """Ids of message text: special-token text stays text (``split_special_tokens``)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's TemplateError, raise_exception(...) of the template
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"the chat template of {model_name_of(tokenizer)} refuses this conversation "
                        f"(roles {[m['role'] for m in messages]}): {msg}") from None


def _content_parts(tokenizer, messages, generation_prompt: bool, text: str) -> Optional[list]:
    """``[(is_content, piece)]`` that join to ``text`` (the rendering of ``messages``): the template's own
    text and each message's content apart, found by rendering the conversation with a stand-in for each
    content. None when the template does not write each content once, as it is or stripped."""
    probe = [{**m, "content": _SENTINEL.format(j)} for j, m in enumerate(messages)]
    try:
        ptext = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:
        return None
    pieces, pos = [], 0
    for j in range(len(messages)):
        s = _SENTINEL.format(j)
        k = ptext.find(s, pos)
        if k < 0 or ptext.count(s) != 1:
            return None
        pieces += [(None, ptext[pos:k]), (j, None)]
        pos = k + len(s)
    pieces.append((None, ptext[pos:]))
    for how in (lambda c: c, str.strip):
        parts = [(j is not None, seg if j is None else how(messages[j]["content"])) for j, seg in pieces]
        if "".join(p for _, p in parts) == text:
            return parts
    return None


@dataclass
class EncodeStats:
    """What tokenising a data set cut, dropped or added (shown in the run's summary and ``report.json``).

    ``truncated``: examples longer than ``max_seq_len``; of those, ``cut_harmless`` lost only tokens
    that are not targets (the prompt's start, the template's text after the last answer), and
    ``cut_answer`` ("file:row") lost answer tokens but kept some; ``dropped_no_target`` ("file:row")
    were left with no target at all (also an empty answer). ``eos_appended``: answers whose stop target
    is the tokenizer's EOS, appended because the chat template writes no end-of-turn token after an
    answer; ``no_stop``: answers trained with no stop token (no end-of-turn token and no EOS);
    ``as_is``: prompts that already held the rendered chat template, encoded as they are.
    """

    kept: int = 0
    truncated: int = 0
    cut_harmless: int = 0
    cut_answer: list = field(default_factory=list)
    dropped_no_target: list = field(default_factory=list)
    eos_appended: int = 0
    no_stop: int = 0
    as_is: int = 0

    @staticmethod
    def _rows(rows: list) -> str:
        return ", ".join(rows[:5]) + (", ..." if len(rows) > 5 else "")

    def summary(self) -> str:
        s = f"{self.kept} examples"
        if self.cut_harmless:
            s += f", {self.cut_harmless} cut at max_seq_len with every answer token kept"
        if self.cut_answer:
            s += (f", {len(self.cut_answer)} lost answer tokens at max_seq_len ({self._rows(self.cut_answer)}; "
                  "raise --max-seq-len)")
        if self.dropped_no_target:
            s += f", {len(self.dropped_no_target)} dropped with no target token left ({self._rows(self.dropped_no_target)})"
        if self.as_is:
            s += f", {self.as_is} prompts already held the chat template (encoded as they are)"
        if self.eos_appended:
            s += (f", EOS appended as the stop target of {self.eos_appended} answers (the chat template writes "
                  "no end-of-turn token after an answer)")
        return s

    def warnings(self) -> list[str]:
        out = []
        if self.no_stop:
            out.append(f"{self.no_stop} answers are trained with no stop token (the chat template writes no "
                       "end-of-turn token after an answer and the tokenizer has no EOS): generation will not stop "
                       "before --max-new-tokens")
        return out

    def to_dict(self) -> dict:
        return {"examples": self.kept, "truncated": self.truncated, "cut_harmless": self.cut_harmless,
                "cut_answer": len(self.cut_answer), "cut_answer_rows": self.cut_answer[:20],
                "dropped_no_target": len(self.dropped_no_target), "dropped_rows": self.dropped_no_target[:20],
                "eos_appended": self.eos_appended, "no_stop": self.no_stop, "prompts_as_is": self.as_is}


def _n_targets(labels: list) -> int:
    return sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)


def align_answer_tokens(tok, ids: list, labels: list, answer: str, prefix: str) -> tuple[list, list]:
    """``ids``/``labels`` with the answer's target tokens re-spelt so that they begin with the tokens
    of ``prefix`` (as the prompt spells it, a word of its own) and go on with the rest of the answer:
    ``louder`` is canonically ``l|ou|der`` while the prompt's ``loud`` is ``l|oud``; trained as
    ``l|oud|er``, the model copies the prompt's tokens and appends a suffix instead of re-spelling
    the stem. The decoded text is the same string. The longest prefix of ``prefix`` that the answer
    begins with and that ends on one of ``prefix``'s own token boundaries is used (``drowsy`` ->
    ``drowsier`` keeps the tokens of ``drows`` when ``y`` is a token of its own); nothing changes when
    there is none or when the answer's canonical tokens are not found among the targets.

    Args:
        ids, labels: one encoded conversation (labels IGNORE_INDEX off-target), lists of int.
        answer: the last assistant message's text; prefix: the word it should start from.
    """
    canon, word = _encode_text(tok, answer), _encode_text(tok, prefix)
    for keep in range(len(word), 0, -1):  # the longest token-aligned head of the word that the answer starts with
        head = tok.decode(word[:keep])
        if answer.startswith(head) and _encode_text(tok, head) == word[:keep]:
            break
    else:
        return ids, labels
    if not canon:
        return ids, labels
    new = word[:keep] + (_encode_text(tok, answer[len(head):]) if answer[len(head):] else [])
    if new == canon or tok.decode(new) != tok.decode(canon):
        return ids, labels
    n = len(canon)
    for i in range(len(ids) - n, -1, -1):  # the last place the answer's tokens stand as targets
        if ids[i:i + n] == canon and labels[i:i + n] == canon:
            return ids[:i] + new + ids[i + n:], labels[:i] + new + labels[i + n:]
    return ids, labels


class ChatEncoder:
    """Tokenise examples into ``{"input_ids", "labels"}`` with completion-only loss (see module doc).

    Args:
        tokenizer: a transformers tokenizer; chat examples need a chat template.
        max_seq_len: examples are cut to this many tokens.
        train_on: "all_assistant" (every assistant turn is a target) or "last_assistant".
        truncation: "prompt" (cut the prompt from its start, before any answer token) or "end".
    """

    def __init__(self, tokenizer, max_seq_len: int = 256, train_on: str = "all_assistant",
                 truncation: str = "prompt"):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        self.tok = tokenizer
        self.max_seq_len = int(max_seq_len)
        self.train_on = train_on
        self.truncation = truncation
        self.eot = set(end_of_turn_ids(tokenizer))
        t_eot = template_end_of_turn(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_id = t_eot if t_eot is not None else (int(eos) if eos is not None else None)
        self.special_texts = _special_texts(tokenizer)
        self._gen_header: Optional[str] = None
        self.stats = EncodeStats()

    # -- chat
    def _require_template(self) -> None:
        if not has_chat_template(self.tok):
            raise NoChatTemplateError(no_template_message(self.tok))

    def _has_special_text(self, messages) -> bool:
        return any(s in m["content"] for m in messages for s in self.special_texts)

    def _conv(self, messages, generation_prompt: bool, split: bool):
        """(text, ids, offsets or None) of a rendered conversation; with ``split`` each message's content
        is encoded as text (special-token text in it stays text) and the offsets come with the ids."""
        text = _render(self.tok, messages, generation_prompt)
        if not split:
            return text, _encode(self.tok, text), None
        parts = _content_parts(self.tok, messages, generation_prompt, text)
        if parts is None:
            found = next(s for s in self.special_texts if any(s in m["content"] for m in messages))
            raise DataError(f"a message holds the text of the special token {found!r}, and the chat template of "
                            f"{model_name_of(self.tok)} changes message contents, so it cannot be kept as text: "
                            "remove it from the data")
        ids, offs, pos = [], [], 0
        for is_content, piece in parts:
            if piece:
                enc = self.tok(piece, add_special_tokens=False, split_special_tokens=is_content,
                               return_offsets_mapping=True)
                ids += enc["input_ids"]
                offs += [(a + pos, b + pos) for a, b in enc["offset_mapping"]]
            pos += len(piece)
        return text, ids, offs

    def generation_header(self) -> str:
        """The text the template adds for a generation prompt (ChatML: ``<|im_start|>assistant``), stripped."""
        if self._gen_header is None:
            probe = [{"role": "user", "content": "zqxprobe"}]
            try:
                a, b = (_render(self.tok, probe, g) for g in (False, True))
            except DataError:
                a, b = "", ""
            self._gen_header = b[len(a):].strip() if b.startswith(a) else ""
        return self._gen_header

    def rendered_prompt(self, messages: list) -> bool:
        """True when the conversation is a prompt that already holds the rendered chat template (a user
        message ending with the generation header), alone or followed by its answer: it is encoded as it
        is, never templated a second time.

        Raises:
            DataError: such a message within any other conversation (it would be templated twice).
        """
        g = self.generation_header()
        if not g:
            return False
        hits = [j for j, m in enumerate(messages) if m["role"] == "user" and m["content"].rstrip().endswith(g)]
        if not hits:
            return False
        if hits == [0] and len(messages) <= 2 and all(m["role"] == "assistant" for m in messages[1:]):
            return True
        j = hits[0]
        raise DataError(f"message {j + 1} (user) already holds the rendered chat template (it ends "
                        f"with {g!r}) inside a longer conversation, which would template it twice: give plain message "
                        "texts, or the rendered prompt alone as 'prompt' with its 'completion'")

    def _as_is(self, messages: list) -> tuple[list[int], list[int]]:
        """A rendered prompt encoded as it is (its special-token text is the template's), then its answer as
        text and the stop token (the template's end-of-turn token, else EOS) as targets."""
        ids = _encode(self.tok, messages[0]["content"])
        labels = [IGNORE_INDEX] * len(ids)
        self.stats.as_is += 1
        if len(messages) == 1:
            return ids, labels
        answer = messages[1]["content"]
        if self.stop_id is not None:
            stop_text = self.tok.convert_ids_to_tokens(self.stop_id)
            if isinstance(stop_text, str) and stop_text and answer.rstrip().endswith(stop_text):
                answer = answer.rstrip()[: -len(stop_text)]
        a = _encode_text(self.tok, answer)
        if self.stop_id is not None:
            a = a + [self.stop_id]
        else:
            self.stats.no_stop += 1
        return ids + a, labels + a

    def chat_ids_and_labels(self, messages: list) -> tuple[list[int], list[int]]:
        """Full (untruncated) ids and labels of a conversation; labels are IGNORE_INDEX off-target."""
        self._require_template()
        if self.rendered_prompt(messages):
            return self._as_is(messages)
        split = self._has_special_text(messages)
        full_text, ids, offs = self._conv(messages, False, split)
        labels = [IGNORE_INDEX] * len(ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        open_ends = []
        for i in turns:
            start, stop, closed = self._turn_span(messages, i, full_text, ids, offs, split)
            labels[start:stop] = ids[start:stop]
            if not closed and stop > start:
                open_ends.append(stop)
        eos = getattr(self.tok, "eos_token_id", None)
        for end in reversed(open_ends):  # the template closes no answer: the tokenizer's EOS is the stop
            if eos is None:
                self.stats.no_stop += 1
                continue
            ids.insert(end, int(eos))
            labels.insert(end, int(eos))
            self.stats.eos_appended += 1
        return ids, labels

    def _lead_in(self, message: dict) -> str:
        """The template's text before the content of a conversation's first message (e.g. a default system
        turn and the assistant header)."""
        text = _render(self.tok, [{**message, "content": _SENTINEL.format(0)}], False)
        k = text.find(_SENTINEL.format(0))
        return text[:k] if k >= 0 else ""

    def _turn_span(self, messages, i, full_text, ids, offs, split) -> tuple[int, int, bool]:
        """(start, stop, closed): ``[start, stop)`` are assistant turn ``i``'s targets in ``ids`` (its content
        and its end-of-turn token); ``closed``: an end-of-turn token ends them (else they run to the turn's end)."""
        if i > 0:
            p_text, p = self._conv(messages[:i], True, split)[:2]
        else:  # the conversation opens with this answer: what the template writes before it is not a target
            p_text = self._lead_in(messages[0])
            p = _encode(self.tok, p_text) if p_text else []
        q_text, q = self._conv(messages[: i + 1], False, split)[:2]
        if q[: len(p)] == p and ids[: len(q)] == q:
            start, end = len(p), len(q)
        elif full_text.startswith(q_text) and q_text.startswith(p_text):
            # the tokens merge across the turn boundary: fall back to character offsets
            if offs is None:
                offs = self.tok(full_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            start = next((t for t, (a, b) in enumerate(offs) if a >= len(p_text) and b > a), len(ids))
            end = next((t for t, (a, b) in enumerate(offs) if a >= len(q_text)), len(ids))
        else:
            raise DataError(
                "the chat template does not render this conversation incrementally (turn "
                f"{i} changes earlier text); use train_on=last_assistant or plain 'text' rows"
            )
        for t in range(start, end):
            if ids[t] in self.eot:
                return start, t + 1, True
        return start, end, False

    def prompt_ids(self, messages: list) -> list[int]:
        """Ids of a generation prompt (the conversation, then the assistant header); a prompt that already
        holds the rendered template as it is."""
        self._require_template()
        if self.rendered_prompt(messages):
            return _encode(self.tok, messages[0]["content"])
        return self._conv(messages, True, self._has_special_text(messages))[1]

    # -- any example
    def _fit(self, ids: list, labels: list) -> tuple[list, list]:
        """``ids``/``labels`` cut to ``max_seq_len`` (module docstring: truncation)."""
        M = self.max_seq_len
        if len(ids) <= M:
            return ids, labels
        tgt = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
        if self.truncation == "end" or not tgt:
            return ids[:M], labels[:M]
        first, last = tgt[0], tgt[-1] + 1
        if last <= M:  # only the template's text after the last answer goes
            return ids[:last], labels[:last]
        bos = getattr(self.tok, "bos_token_id", None)
        head = 1 if bos is not None and ids[0] == bos and first > 1 else 0
        room = M - head
        if last - (first - 1) <= room:  # the answers fit after at least one prompt token: cut the prompt's start
            s = last - room
        else:  # the answers alone do not fit: the prompt's end keeps half the room, the answers' end goes
            s = first - min(first - head, max(1, room // 2))
        return ids[:head] + ids[s: s + room], labels[:head] + labels[s: s + room]

    def encode(self, ex: Example) -> Optional[dict]:
        """``{"input_ids": list[int], "labels": list[int]}`` cut to max_seq_len, or None (no target left)."""
        try:
            if ex.messages is not None:
                ids, labels = self.chat_ids_and_labels(ex.messages)
                if ex.meta.get("answer_prefix") and ex.messages[-1]["role"] == "assistant":
                    ids, labels = align_answer_tokens(self.tok, ids, labels, ex.messages[-1]["content"],
                                                      ex.meta["answer_prefix"])
            else:
                ids = list(self.tok(ex.text, add_special_tokens=True)["input_ids"])
                if self.tok.eos_token_id is not None and (not ids or ids[-1] != self.tok.eos_token_id):
                    ids.append(int(self.tok.eos_token_id))
                bos = getattr(self.tok, "bos_token_id", None)
                labels = [IGNORE_INDEX if (t == 0 and x == bos) else x for t, x in enumerate(ids)]
        except NoChatTemplateError:
            raise
        except DataError as e:
            if ex.where:
                raise DataError(f"{ex.where}: {e}") from None
            raise
        before = _n_targets(labels)
        cut = len(ids) > self.max_seq_len
        ids, labels = self._fit(ids, labels)
        after = _n_targets(labels)
        self.stats.truncated += int(cut)
        # a target at position 0 has no prediction; count targets that can carry loss
        if not after:
            self.stats.dropped_no_target.append(ex.where or "?")
            return None
        if cut and after < before:
            self.stats.cut_answer.append(ex.where or "?")
        elif cut:
            self.stats.cut_harmless += 1
        self.stats.kept += 1
        return {"input_ids": ids, "labels": labels}

    def encode_all(self, examples: Iterable[Example]) -> list[dict]:
        out = []
        for ex in examples:
            e = self.encode(ex)
            if e is not None:
                out.append(e)
        return out


# ----------------------------------------------------------------------------- batching


def collate(items: Sequence[dict], pad_id: int = 0) -> dict:
    """Right-pad a list of encoded examples into tensors.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (1 on real tokens, from the
    lengths), ``labels`` (B, T) long (IGNORE_INDEX on padding and non-targets; NOT shifted: the label
    at t is the token the model must predict at t from positions < t), ``lengths`` (B,).
    """
    lengths = [len(it["input_ids"]) for it in items]
    T = max(lengths)
    B = len(items)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, it in enumerate(items):
        n = lengths[b]
        ids[b, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(it["labels"], dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": torch.tensor(lengths)}


def count_targets(batch: dict) -> int:
    """Number of target tokens of a collated batch (labels at positions >= 1 that are not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pad_id_of(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid) if pid is not None else 0
