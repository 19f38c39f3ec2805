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
newline) are not targets. By default every assistant turn is trained (``train_on="all_assistant"``);
``"last_assistant"`` trains the last turn only. The end-of-turn token is trained even when it is
also the pad token (SmolLM2: pad = eos = ``<|im_end|>``): padding is found from sequence lengths,
never by comparing ids with the pad id.

Sequences are cut at ``max_seq_len`` tokens (the end is dropped). An example left with no target
(an empty answer, or an answer entirely beyond ``max_seq_len``) is dropped and counted in
:attr:`EncodeStats`, which the training report prints; it is never kept silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

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
    ``where``: "file:row" for error messages.
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
    """Rows of a JSONL/JSON/CSV/Parquet file, read with ``datasets`` (no network).

    Raises:
        DataError: missing file, unknown extension, or a file ``datasets`` cannot parse.
    """
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_EXTENSIONS:
        raise DataError(f"data file {path}: unknown extension {ext!r}; use one of {', '.join(DATA_EXTENSIONS)}")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(DATA_EXTENSIONS[ext], data_files=os.path.abspath(path), split="train")
    except Exception as e:  # datasets raises many types; report one line
        msg = str(e).strip().splitlines()
        raise DataError(f"data file {path} could not be read: {msg[0] if msg else type(e).__name__}") from None
    return [dict(r) for r in ds]


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


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    dec = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, t in dec.items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that close an assistant turn (the stop tokens of chat generation).

    The tokenizer's eos token, plus the special token the chat template writes right after an
    assistant message's content (found by rendering a probe conversation), when there is one.
    """
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None):
        probe = "zqxprobe"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False)
        except Exception:
            text = ""
        k = text.rfind(probe)
        if k >= 0:
            rest = _encode(tokenizer, text[k + len(probe):])
            special = _special_ids(tokenizer)
            if rest and rest[0] in special and rest[0] not in ids:
                ids.append(int(rest[0]))
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@dataclass
class EncodeStats:
    """What tokenising a data set dropped or cut (shown in the report)."""

    kept: int = 0
    truncated: int = 0
    dropped_no_target: list = field(default_factory=list)  # "file:row" of dropped examples

    def summary(self) -> str:
        s = f"{self.kept} examples"
        if self.truncated:
            s += f", {self.truncated} cut at max_seq_len"
        if self.dropped_no_target:
            few = ", ".join(self.dropped_no_target[:5])
            s += f", {len(self.dropped_no_target)} dropped with no target token left ({few}"
            s += ", ...)" if len(self.dropped_no_target) > 5 else ")"
        return s


class ChatEncoder:
    """Tokenise examples into ``{"input_ids", "labels"}`` with completion-only loss (see module doc).

    Args:
        tokenizer: a transformers tokenizer; chat examples need a chat template.
        max_seq_len: examples are cut to this many tokens.
        train_on: "all_assistant" (every assistant turn is a target) or "last_assistant".
    """

    def __init__(self, tokenizer, max_seq_len: int = 256, train_on: str = "all_assistant"):
        self.tok = tokenizer
        self.max_seq_len = int(max_seq_len)
        self.train_on = train_on
        self.eot = set(end_of_turn_ids(tokenizer))
        self.stats = EncodeStats()

    # -- chat
    def chat_ids_and_labels(self, messages: list) -> tuple[list[int], list[int]]:
        """Full (untruncated) ids and labels of a conversation; labels are IGNORE_INDEX off-target."""
        if not getattr(self.tok, "chat_template", None):
            raise DataError("this tokenizer has no chat template: give plain 'text' rows, or a model with a template")
        full_text = _render(self.tok, messages, False)
        ids = _encode(self.tok, full_text)
        labels = [IGNORE_INDEX] * len(ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        for i in turns:
            start, stop = self._turn_span(messages, i, full_text, ids)
            labels[start:stop] = ids[start:stop]
        return ids, labels

    def _turn_span(self, messages, i, full_text, ids) -> tuple[int, int]:
        """[start, stop) of assistant turn ``i``'s targets in ``ids``: its content and end-of-turn token."""
        p_text = _render(self.tok, messages[:i], True) if i > 0 else ""
        q_text = _render(self.tok, messages[: i + 1], False)
        p = _encode(self.tok, p_text) if p_text else []
        q = _encode(self.tok, q_text)
        if q[: len(p)] == p and ids[: len(q)] == q:
            start, end = len(p), len(q)
        elif full_text.startswith(q_text) and q_text.startswith(p_text):
            # the tokens merge across the turn boundary: fall back to character offsets
            enc = self.tok(full_text, add_special_tokens=False, return_offsets_mapping=True)
            offs = enc["offset_mapping"]
            start = next((t for t, (a, b) in enumerate(offs) if a >= len(p_text) and b > a), len(ids))
            end = next((t for t, (a, b) in enumerate(offs) if a >= len(q_text)), len(ids))
        else:
            raise DataError(
                "the chat template does not render this conversation incrementally (turn "
                f"{i} changes earlier text); use train_on=last_assistant or plain 'text' rows"
            )
        stop = end
        for t in range(start, end):
            if ids[t] in self.eot:
                stop = t + 1
                break
        return start, stop

    def prompt_ids(self, messages: list) -> list[int]:
        """Ids of a generation prompt (the conversation, then the assistant header)."""
        return _encode(self.tok, _render(self.tok, messages, True))

    # -- any example
    def encode(self, ex: Example) -> Optional[dict]:
        """``{"input_ids": list[int], "labels": list[int]}`` cut to max_seq_len, or None (no target left)."""
        if ex.messages is not None:
            ids, labels = self.chat_ids_and_labels(ex.messages)
        else:
            ids = list(self.tok(ex.text, add_special_tokens=True)["input_ids"])
            if self.tok.eos_token_id is not None and (not ids or ids[-1] != self.tok.eos_token_id):
                ids.append(int(self.tok.eos_token_id))
            bos = getattr(self.tok, "bos_token_id", None)
            labels = [IGNORE_INDEX if (t == 0 and x == bos) else x for t, x in enumerate(ids)]
        if len(ids) > self.max_seq_len:
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            self.stats.truncated += 1
        # a target at position 0 has no prediction; count targets that can carry loss
        if not any(lab != IGNORE_INDEX for lab in labels[1:]):
            self.stats.dropped_no_target.append(ex.where or "?")
            return None
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
