"""Evaluation: greedy generation, exact match, eval loss, token accuracy and perplexity.

Every evaluation runs inside :func:`evaluation_mode`: the model is put in eval mode (dropout off),
grad mode is off, and torch's RNG state is forked, so that an evaluation during training changes
neither the gradients, nor the mode of any module afterwards (each module gets back its own
``training`` flag), nor the random streams training draws from (C25).

Greedy generation is batched with LEFT padding built here from the prompts' lengths (the
tokenizer's ``padding_side`` is never consulted) and an attention mask, so each row's positions
count from its first real token and a batched answer equals the answer of the prompt run alone
(C21). Generation stops per row at an end-of-turn token (``eos`` and the chat template's
end-of-turn token, see :func:`deltatune.train.data.end_of_turn_ids`); the scored answer is the text
before the stop token, and nothing after it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
from typing import Optional, Sequence

import torch
from torch import nn

from ..routing import adapter_rows
from .data import ChatEncoder, Example, collate, end_of_turn_ids, pad_id_of
from .loss import token_loss_sum
from .precision import Precision, to_device


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, precision: Optional[Precision] = None):
    """Eval mode + ``torch.no_grad`` + forked RNG (torch and Python's ``random``) + the run's
    autocast (``precision``, default none); all restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            with torch.no_grad(), (precision.autocast() if precision is not None else contextlib.nullcontext()):
                yield model
        finally:
            for m, t in modes:
                m.training = t
            random.setstate(py_state)


def normalize_answer(text: str) -> str:
    """Lower-case, trimmed, without surrounding quotes/asterisks and final ``.``/``!`` (exact-match key)."""
    s = text.strip().strip("\"'`*").strip()
    while s and s[-1] in ".!":
        s = s[:-1].rstrip()
    return s.strip("\"'`*").strip().lower()


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    stop_ids: Sequence[int], pad_id: int, batch_size: int = 32,
                    return_first_logits: bool = False, adapter_names: Optional[Sequence[str]] = None):
    """Greedy continuations of tokenised prompts, batched with left padding.

    Args:
        prompts: lists of token ids (any lengths).
        stop_ids: tokens that end a row's answer (not included in the result).
        adapter_names: one adapter name (or "__base__") per prompt: rows of different adapters
            share batches (a mixed batch, :func:`deltatune.adapter_rows`). None: the active adapters.

    Returns:
        A list (prompt order) of lists of new token ids, cut before the first stop token; with
        ``return_first_logits`` also a list of the first step's logits, each (V,) float32.
    """
    from transformers import GenerationConfig

    stop = [int(s) for s in stop_ids]
    gen_cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                               eos_token_id=stop or None, pad_token_id=int(pad_id),
                               output_logits=return_first_logits, return_dict_in_generate=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    firsts: list = [None] * len(prompts)
    dev = next(model.parameters()).device
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), L), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            p = list(prompts[i])
            ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, L - len(p):] = 1
        rows = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen_cfg, **rows)
        seqs = out.sequences[:, L:].tolist()
        for r, i in enumerate(idx):
            row = seqs[r]
            cut = next((t for t, x in enumerate(row) if x in stop), len(row))
            results[i] = row[:cut]
            if return_first_logits:
                firsts[i] = out.logits[0][r].float().cpu()
    return (results, firsts) if return_first_logits else results


@torch.no_grad()
def loss_stats(model: nn.Module, items: Sequence[dict], pad_id: int, batch_size: int = 16,
               adapter_names: Optional[Sequence[str]] = None) -> dict:
    """Teacher-forced statistics over encoded items: ``loss`` (mean target CE, nats), ``perplexity``,
    ``token_accuracy`` (fraction of targets whose argmax is right), ``targets`` (count).
    ``adapter_names``: one per item, as :func:`greedy_generate`'s."""
    tot, n, right = 0.0, 0, 0
    dev = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        b = to_device(collate([items[i] for i in idx], pad_id), dev)
        with (contextlib.nullcontext() if adapter_names is None
              else adapter_rows(model, [adapter_names[i] for i in idx])):
            s, c, a = token_loss_sum(model, b, with_accuracy=True)
        tot += float(s)
        n += c
        right += a
    loss = tot / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if n else float("nan"),
            "token_accuracy": right / n if n else float("nan"), "targets": n}


def metric_by_form(hits: Sequence[bool], examples: Sequence[Example]) -> Optional[dict]:
    """form -> fraction of hits, for examples that carry a ``meta["form"]`` (the default task's
    inflections); None when none does."""
    by: dict = {}
    for h, e in zip(hits, examples):
        f = e.meta.get("form") if e.meta else None
        if f is not None:
            by.setdefault(f, []).append(bool(h))
    return {f: sum(v) / len(v) for f, v in by.items()} or None


class Evaluator:
    """Scores a model on held-out examples: exact match of greedy answers (chat examples with a
    reference answer) or teacher-forced token accuracy (plain text), plus the eval loss.

    Args:
        examples: held-out :class:`Example` s; the first ``size`` are used.
        encoder: the training :class:`ChatEncoder` (same template and masking).
        metric: "exact_match", "token_accuracy" or "auto" (exact match when every example is a
            conversation ending in an assistant answer).
        max_new_tokens: generation length; raised to fit the longest reference answer + 1.
        precision: the run's device and autocast (:mod:`deltatune.train.precision`); default float32.
        adapter_names: one adapter name (or "__base__") per example, scored in mixed batches; the
            result then also has ``by_adapter``: ``{name: {"metric", "n", "eval_loss"}}``. None: the
            active adapters.
    """

    def __init__(self, tokenizer, examples: Sequence[Example], encoder: ChatEncoder, *, metric: str = "auto",
                 size: Optional[int] = None, loss_size: Optional[int] = 64, batch_size: int = 64,
                 max_new_tokens: int = 8, precision: Optional[Precision] = None,
                 adapter_names: Optional[Sequence[str]] = None):
        self.tok = tokenizer
        self.precision = precision
        self.examples = list(examples)[: size] if size else list(examples)
        self.names = None if adapter_names is None else list(adapter_names)[: len(self.examples)]
        if not self.examples:
            raise ValueError("no held-out examples to evaluate on")
        self.encoder = encoder
        self.pad_id = pad_id_of(tokenizer)
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.batch_size = int(batch_size)
        chat = all(e.messages is not None and e.reference is not None for e in self.examples)
        if metric == "auto":
            metric = "exact_match" if chat else "token_accuracy"
        if metric == "exact_match" and not chat:
            raise ValueError("exact_match needs conversations that end in an assistant answer")
        self.metric_name = metric
        scored = self.examples[: loss_size] if loss_size and self.metric_name == "exact_match" else self.examples
        items, names = [], []
        for i, e in enumerate(scored):
            enc = encoder.encode(e)
            if enc is not None:
                items.append(enc)
                names.append(None if self.names is None else self.names[i])
        self.loss_items = items
        self.loss_names = None if self.names is None else names
        if self.metric_name == "exact_match":
            self.prompts = [encoder.prompt_ids(e.prompt_messages()) for e in self.examples]
            longest = max(len(self.tok(e.reference, add_special_tokens=False)["input_ids"]) for e in self.examples)
            self.max_new_tokens = max(int(max_new_tokens), longest + 1)

    def answers(self, model: nn.Module) -> list[str]:
        """Greedy answer texts (stop token excluded), in example order."""
        with evaluation_mode(model, self.precision):
            outs = greedy_generate(model, self.prompts, max_new_tokens=self.max_new_tokens,
                                   stop_ids=self.stop_ids, pad_id=self.pad_id, batch_size=self.batch_size,
                                   adapter_names=self.names)
        return [self.tok.decode(o, skip_special_tokens=True) for o in outs]

    def __call__(self, model: nn.Module, step: int = 0) -> dict:
        """``{"metric", "metric_name", "eval_loss", "n", "samples"}`` (samples: first 5 answers); with
        ``adapter_names`` also ``by_adapter``: ``{name: {"metric", "n", "eval_loss"}}``."""
        with evaluation_mode(model, self.precision):
            per = self._loss_by_adapter(model)
            st = per[None] if None in per else _pooled(list(per.values())) if per else {}
            res = {"step": step, "metric_name": self.metric_name, "eval_loss": st.get("loss")}
            if self.metric_name == "exact_match":
                preds = self.answers(model)
                hits = [exact_match(p, e.answers or [e.reference]) for p, e in zip(preds, self.examples)]
                res["metric"] = sum(hits) / len(hits)
                res["n"] = len(hits)
                res["metric_by_form"] = metric_by_form(hits, self.examples)
                res["samples"] = [
                    {"prompt": e.prompt_messages()[-1]["content"], "answer": p, "expected": e.reference}
                    for p, e in list(zip(preds, self.examples))[:5]]
            else:
                res["metric"] = st.get("token_accuracy")
                res["n"] = len(self.loss_items)
            if self.names is not None:
                res["by_adapter"] = {}
                for n in dict.fromkeys(self.names):
                    mine = per.get(n, {})
                    if self.metric_name == "exact_match":
                        got = [h for h, m in zip(hits, self.names) if m == n]
                        metric, count = sum(got) / len(got), len(got)
                    else:
                        metric, count = mine.get("token_accuracy"), self.loss_names.count(n)
                    res["by_adapter"][n] = {"metric": metric, "n": count, "eval_loss": mine.get("loss")}
        return res

    def _loss_by_adapter(self, model: nn.Module) -> dict:
        """{adapter name (None: the active ones): :func:`loss_stats` of its loss items}."""
        if not self.loss_items:
            return {}
        if self.names is None:
            return {None: loss_stats(model, self.loss_items, self.pad_id, batch_size=16)}
        out = {}
        for n in dict.fromkeys(self.loss_names):
            items = [it for it, m in zip(self.loss_items, self.loss_names) if m == n]
            out[n] = loss_stats(model, items, self.pad_id, batch_size=16, adapter_names=[n] * len(items))
        return out


def _pooled(stats: list) -> dict:
    """One :func:`loss_stats` result from several (weighted by their target counts)."""
    n = sum(s["targets"] for s in stats)
    if not n:
        return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "targets": 0}
    loss = sum(s["loss"] * s["targets"] for s in stats if s["targets"]) / n
    acc = sum(s["token_accuracy"] * s["targets"] for s in stats if s["targets"]) / n
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": acc, "targets": n}


# ----------------------------------------------------------------------------- general-text perplexity


def chitchat_path() -> str:
    """``dataset.json`` inside the installed ``chitchat-dataset`` wheel (MIT; not imported, not downloaded)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("perplexity needs the chitchat-dataset package: pip install 'deltatune[train]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "dataset.json")


def general_conversations(n: int = 48, max_turns: int = 6) -> list[Example]:
    """A fixed set of ``n`` everyday conversations from the chitchat data set.

    Conversations are taken in order of their (sorted) ids, those with at least 4 turns; each turn
    joins one speaker's consecutive messages with spaces; turns alternate user/assistant, starting
    with the user, cut to ``max_turns``.
    """
    with open(chitchat_path(), encoding="utf-8") as fh:
        data = json.load(fh)
    out = []
    for key in sorted(data):
        turns = [" ".join(u["text"].strip() for u in t if u.get("text", "").strip()) for t in data[key]["messages"]]
        turns = [t for t in turns if t][:max_turns]
        if len(turns) < 4:
            continue
        if len(turns) % 2:
            turns = turns[:-1]
        msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        out.append(Example(messages=msgs, where=f"chitchat:{key}"))
        if len(out) >= n:
            break
    return out


class PerplexityProbe:
    """Perplexity (exp of mean target CE) of the assistant turns of the fixed chitchat set.

    Without a chat template the conversations are scored as plain text ("A: ... / B: ..." lines).
    """

    def __init__(self, tokenizer, n: int = 48, max_seq_len: int = 256, precision: Optional[Precision] = None):
        self.precision = precision
        convs = general_conversations(n)
        enc = ChatEncoder(tokenizer, max_seq_len=max_seq_len, train_on="all_assistant")
        if not getattr(tokenizer, "chat_template", None):
            convs = [Example(text="\n".join(("A: " if m["role"] == "user" else "B: ") + m["content"]
                                            for m in c.messages), where=c.where) for c in convs]
        self.items = enc.encode_all(convs)
        self.pad_id = pad_id_of(tokenizer)
        self.n = len(self.items)

    def __call__(self, model: nn.Module) -> float:
        with evaluation_mode(model, self.precision):
            return loss_stats(model, self.items, self.pad_id, batch_size=8)["perplexity"]
