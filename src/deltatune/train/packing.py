"""Padding-free batches: several examples back to back in one row, each attending only to itself.

:func:`pack` lays a micro-batch's examples end to end in one row of ``L = sum of lengths`` tokens
(no padding at all): ``position_ids`` restart at 0 for every example and there is no attention
mask, so the model builds a block-diagonal causal mask from the positions (transformers'
packed-sequence support: every example attends only to its own earlier tokens), and each example
keeps its own label mask, with its first position never a target. The loss of a packed batch is
the loss of the padded batch, term for term (:func:`packing_agrees` checks it on the model before
a run relies on it).

Packing suits methods that act per token (LoRA and its family, (IA)3, bottleneck adapters,
LLaMA-Adapter). Prompt methods put virtual tokens in front of each sequence, so their batches stay
padded.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .data import IGNORE_INDEX, collate
from .evaluate import evaluation_mode
from .loss import token_loss_sum
from .precision import to_device


def pack(items: Sequence[dict], pad_id: int = 0) -> dict:
    """One row of the examples ``items`` (``{"input_ids", "labels"}`` lists) back to back.

    Returns ``input_ids`` (1, L) long, ``position_ids`` (1, L) long (0.. per example), ``labels``
    (1, L) long (unshifted, -100 off target and at every example's first position),
    ``attention_mask`` None, ``lengths`` (B,) of the examples. ``pad_id`` is unused (no padding).
    """
    ids, pos, labels, lengths = [], [], [], []
    for it in items:
        n = len(it["input_ids"])
        ids += it["input_ids"]
        pos += range(n)
        labels += [IGNORE_INDEX] + list(it["labels"][1:])  # nothing predicts an example's first token
        lengths.append(n)
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([pos], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long), "attention_mask": None,
            "lengths": torch.tensor(lengths)}


@torch.no_grad()
def packing_agrees(model: nn.Module, items: Sequence[dict], pad_id: int, precision, rtol: float = 2e-3) -> bool:
    """Whether ``model`` gives a packed batch of ``items`` the loss of the padded batch (within
    ``rtol``, relative): a model that ignores ``position_ids`` or attends across examples fails.
    The model is run in eval mode (restored after); nothing else changes."""
    if len(items) < 2:
        return True
    with evaluation_mode(model), precision.autocast():
        padded, n1 = token_loss_sum(model, to_device(collate(items, pad_id), precision.device))
        packed, n2 = token_loss_sum(model, to_device(pack(items), precision.device))
    a, b = float(padded), float(packed)
    return n1 == n2 and abs(a - b) <= rtol * max(abs(a), 1e-6)

