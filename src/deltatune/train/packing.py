"""Batches without wasted work: packed rows, and a shared prefix computed once.

* :func:`pack` puts a micro-batch's examples into as few rows as fit, none longer than the
  longest example (first fit, longest first), so the padding of the right-padded batch becomes
  real tokens of other examples while no row's attention grows beyond a padded row's.
  ``position_ids`` restart at 0 for every example and there is no attention mask, so the model
  builds a block-diagonal causal mask from the positions (transformers' packed-sequence support):
  every example attends only to its own earlier tokens and keeps its own label mask, and its
  first position is never a target. A row's leftover slots hold padding that forms its own
  sequence after the last example (never attended by a real token; never a target).
* :func:`share_prefix` notices that the rows of a micro-batch begin with the same tokens (on the
  default task every question starts with the chat template's system turn and "Give the": 26 of
  about 43 tokens) that hold no target. The prefix then runs once, as a row of its own; its
  keys and values are broadcast to every row (their gradients summed back), and the rows run only
  their suffixes on top (:func:`deltatune.train.loss.token_loss_sum`). No anchor does this.

Both give the loss of the padded batch, term for term (:func:`batching_agrees` checks it on the
model before a run relies on it). Both suit methods that act per token (LoRA and its family,
(IA)3, bottleneck adapters, LLaMA-Adapter); prompt methods put virtual tokens in front of each
sequence, so their batches stay padded.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .data import IGNORE_INDEX, collate
from .evaluate import evaluation_mode
from .loss import token_loss_sum
from .precision import to_device

MIN_SHARED_PREFIX = 4  # tokens: below this the second model call costs more than it saves


def pack(items: Sequence[dict], pad_id: int = 0) -> dict:
    """The examples ``items`` (``{"input_ids", "labels"}`` lists) in packed rows (module docstring).

    Returns ``input_ids`` (R, L) long, ``position_ids`` (R, L) long (0.. per example), ``labels``
    (R, L) long (unshifted, -100 off target, at every example's first position and on padding),
    ``attention_mask`` None, ``lengths`` (B,) of the examples. When no two examples fit in one
    row this is :func:`deltatune.train.data.collate`'s padded batch.
    """
    cap = max(len(it["input_ids"]) for it in items)
    rows: list = []
    for it in sorted(items, key=lambda it: -len(it["input_ids"])):
        row = next((r for r in rows if sum(len(x["input_ids"]) for x in r) + len(it["input_ids"]) <= cap), None)
        if row is None:
            rows.append([it])
        else:
            row.append(it)
    if len(rows) == len(items):
        return collate(items, pad_id)
    L = max(sum(len(x["input_ids"]) for x in r) for r in rows)
    ids = torch.full((len(rows), L), int(pad_id), dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        t = 0
        for it in row:
            n = len(it["input_ids"])
            ids[i, t:t + n] = torch.tensor(it["input_ids"])
            pos[i, t:t + n] = torch.arange(n)
            labels[i, t + 1:t + n] = torch.tensor(it["labels"][1:])  # nothing predicts an example's first token
            t += n
        pos[i, t:] = torch.arange(L - t)  # the leftover slots: a padding sequence of their own
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "attention_mask": None,
            "lengths": torch.tensor([len(it["input_ids"]) for it in items])}


def shared_prefix_length(items: Sequence[dict]) -> int:
    """How many leading tokens every example shares before its first target (at least one token of
    each example stays after it)."""
    ids = [it["input_ids"] for it in items]
    n = min(len(x) for x in ids) - 1
    p = 0
    while p < n and all(x[p] == ids[0][p] for x in ids):
        p += 1
    first = min(next((t for t, lab in enumerate(it["labels"]) if t > 0 and lab != IGNORE_INDEX), len(it["labels"]))
                for it in items)
    return max(0, min(p, first - 1))


def share_prefix(items: Sequence[dict], pad_id: int = 0) -> Optional[dict]:
    """A micro-batch whose rows share their first P tokens, none a target (module docstring):
    ``prefix_ids`` (1, P) long, and the suffixes collated as :func:`deltatune.train.data.collate`
    does (``input_ids``, ``attention_mask``, ``labels`` (B, S)), ``lengths`` (B,) of the whole
    examples. None when fewer than :data:`MIN_SHARED_PREFIX` tokens are shared (or one row)."""
    p = shared_prefix_length(items) if len(items) > 1 else 0
    if p < MIN_SHARED_PREFIX:
        return None
    b = collate([{"input_ids": it["input_ids"][p:], "labels": it["labels"][p:]} for it in items], pad_id)
    b["prefix_ids"] = torch.tensor([items[0]["input_ids"][:p]], dtype=torch.long)
    b["lengths"] = b["lengths"] + p
    return b


def batching_agrees(model: nn.Module, items: Sequence[dict], pad_id: int, precision,
                    make_batch: Callable, rtol: float = 2e-3) -> bool:
    """Whether ``model`` gives ``make_batch(items)`` (packed rows, a shared prefix) the loss of the
    padded batch, within ``rtol`` relative: a model that ignores ``position_ids`` or attends across
    examples fails. The losses are computed as training computes them (grad mode on: the same
    attention kernels), in eval mode (no dropout; restored after); no gradient is taken."""
    other = make_batch(items)
    if len(items) < 2 or other is None:
        return True
    with evaluation_mode(model, precision), torch.enable_grad():
        padded, n1 = token_loss_sum(model, to_device(collate(items, pad_id), precision.device))
        mine, n2 = token_loss_sum(model, to_device(other, precision.device))
    a, b = float(padded.detach()), float(mine.detach())
    return n1 == n2 and abs(a - b) <= rtol * max(abs(a), 1e-6)
