"""Sampled or greedy generation for ``deltatune generate`` and ``deltatune chat``.

Sampling: ``temperature`` > 0 divides the logits before the softmax, ``top_p`` < 1 keeps the smallest
set of tokens whose probabilities sum to at least ``top_p`` (nucleus sampling), ``seed`` makes the
draws repeatable (without it, a fresh seed each call; torch's RNG is forked, so nothing else's stream
moves). ``temperature == 0`` is
greedy decoding, the same path evaluation uses (:func:`deltatune.train.evaluate.greedy_generate`).
Prompts are batched with left padding built from their lengths, as in evaluation, and each answer stops
at the first end-of-turn token.
"""

from __future__ import annotations

import secrets
from typing import Optional, Sequence

import torch
from torch import nn

from .config import UsageError
from .evaluate import greedy_generate


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Raise :class:`UsageError` for values no generation can use (named, with the valid range)."""
    if not (temperature >= 0):
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (0 < top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: Optional[int] = None, batch_size: int = 16,
                 adapter_names: Optional[Sequence[str]] = None) -> list[list[int]]:
    """New token ids for each prompt (a list of ids), cut before the first stop token; greedy when
    ``temperature`` is 0, else sampled (see the module docstring). ``adapter_names``: one adapter
    name (or ``"__base__"``) per prompt, rows of different adapters batched together
    (:func:`deltatune.adapter_rows`); None: the active adapters.

    Returns:
        One list of int token ids per prompt, in prompt order.
    """
    check_sampling(temperature, top_p, max_new_tokens)
    if temperature == 0:
        return greedy_generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                               batch_size=batch_size, adapter_names=adapter_names)
    from transformers import GenerationConfig

    stop = [int(s) for s in stop_ids]
    cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=True, temperature=float(temperature),
                           top_p=float(top_p), top_k=0, num_beams=1, eos_token_id=stop or None,
                           pad_token_id=int(pad_id))
    dev = next(model.parameters()).device
    results: list = [None] * len(prompts)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        # a fresh seed unless one is given (whatever seeded torch before, e.g. a training run, does not repeat)
        torch.manual_seed(int(seed) if seed is not None else secrets.randbits(63))
        for k in range(0, len(prompts), batch_size):
            idx = list(range(k, min(k + batch_size, len(prompts))))
            L = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), L), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, L - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[r, L - len(prompts[i]):] = 1
            rows = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg, **rows)
            for r, i in enumerate(idx):
                row = out[r, L:].tolist()
                results[i] = row[: next((t for t, x in enumerate(row) if x in stop), len(row))]
    return results
