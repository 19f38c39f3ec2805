"""``deltatune chat``: an interactive conversation with a model + adapter (:class:`ChatSession`,
:func:`chat_loop`, :func:`run_chat`); answers are greedy by default or sampled
(:mod:`deltatune.train.sampling`).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from torch import nn

from .commands import load_with_adapter, to_stderr
from .config import TrainConfig, UsageError
from .data import ChatEncoder, end_of_turn_ids, pad_id_of
from .evaluate import evaluation_mode
from .pipeline import run_precision
from .sampling import check_sampling, generate_ids


class ChatSession:
    """A conversation with a model: :meth:`reply` adds a user message and the model's answer.

    Args:
        system: the system message (None: the chat template's default, if any).
        temperature / top_p / seed: as :func:`generate_ids` (seed: the first answer's; each later answer
            draws on from there).
        max_context: tokens the prompt may hold; the oldest turns are dropped to stay under it.
    """

    def __init__(self, model: nn.Module, tokenizer, *, system: Optional[str] = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None, precision=None,
                 max_context: Optional[int] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("this model's tokenizer has no chat template: deltatune chat needs one (use "
                             "deltatune generate for plain text)")
        check_sampling(temperature, top_p, max_new_tokens)
        self.model, self.tok, self.system = model, tokenizer, system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.precision = precision
        self.enc = ChatEncoder(tokenizer)
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.pad_id = pad_id_of(tokenizer)
        self.history: list = []
        self.turn = 0
        self.seed = seed  # None: each answer draws a fresh seed (sampling.generate_ids)
        cfg = getattr(model, "config", None)
        limit = max_context or getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_prompt = max(16, int(limit) - int(max_new_tokens))

    def messages(self, user: Optional[str] = None) -> list:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt for the next answer; the oldest exchanges go while it is longer than allowed."""
        ids = self.enc.prompt_ids(self.messages(user))
        while len(ids) > self.max_prompt and self.history:
            self.history = self.history[2:]
            ids = self.enc.prompt_ids(self.messages(user))
        return ids

    def reply(self, user: str) -> str:
        """The model's answer to ``user`` after the conversation so far (both are then part of it)."""
        ids = self.prompt_ids(user)
        seed = None if self.seed is None else self.seed + self.turn
        with evaluation_mode(self.model, self.precision):
            out = generate_ids(self.model, [ids], max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                               pad_id=self.pad_id, temperature=self.temperature, top_p=self.top_p, seed=seed)[0]
        answer = self.tok.decode(out, skip_special_tokens=True)
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        self.turn += 1
        return answer

    def reset(self) -> None:
        self.history = []


HELP = "type a message and press Enter; /reset starts over, /exit (or Ctrl-D) leaves"


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
              intro: str = "") -> int:
    """Talk on the terminal (``read`` a line, ``write`` the answer) until /exit or end of input; return
    the number of answers given."""
    if intro:
        write(intro)
    write(HELP)
    n = 0
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            write("(conversation reset)")
            continue
        write(f"assistant> {session.reply(text)}")
        n += 1
    return n


def interactive_read(prompt: str) -> str:
    """``input`` with the prompt on a terminal; plain lines from a pipe (no prompt echoed)."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_chat(adapter: Optional[str], model_path: Optional[str], *, system: Optional[str] = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
             device: Optional[str] = None, precision: str = "auto", read: Callable[[str], str] = interactive_read,
             write: Callable[[str], None] = print, log: Optional[Callable] = to_stderr) -> int:
    """Load the model (+ adapter, on the base it was trained on) and talk (:func:`chat_loop`); return the
    number of answers.

    Raises:
        UsageError: bad sampling values, a missing adapter or model, a tokenizer without chat template.
    """
    check_sampling(temperature, top_p, max_new_tokens)
    prec, dtype = run_precision(TrainConfig(device=device, precision=precision))
    model, tok, source = load_with_adapter(adapter, model_path, dtype, log, prec.device)
    session = ChatSession(model, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, precision=prec)
    how = "greedy" if temperature == 0 else f"temperature {temperature:g}, top-p {top_p:g}"
    intro = f"deltatune chat: {source.display}" + (f" + adapter {adapter}" if adapter else "") + f" ({how})"
    return chat_loop(session, read, write, intro)
