"""Combine LoRA adapters into a new one: :func:`add_weighted_adapter` (Hugging Face PEFT's semantics).

Each source adapter ``i`` (weight ``w_i``, scaling ``s_i``: ``alpha / r`` or ``alpha / sqrt(r)``)
contributes to every layer it adapts; a layer only some sources adapt combines those. The result
is an ordinary LoRA adapter of the model (saved, loaded, merged, routed like any other) whose
scaling is 1 (``lora_alpha == r`` on every layer, never rsLoRA): the sources' scalings and the
weights are folded into its tensors, so its config never applies a scale a second time.

Per layer, with ``A_i`` (r_i, in[, *k]) / ``B_i`` (out, r_i[, 1...]) the source tensors
(``lora_embedding_A`` (r_i, num) / ``lora_embedding_B`` (dim, r_i) on embeddings) and
``dW_i = s_i B_i A_i`` (out, in[, *k]) their weight updates:

* ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` (rows), ``B = [B_1, B_2, ...]`` (columns), rank
  ``sum r_i``: exactly ``sum_i w_i dW_i``.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A tensors are
  merged with weights ``sign(w_i s_i) sqrt|w_i s_i|`` and the B tensors with ``sqrt|w_i s_i|``, each
  side by the named task-vector rule (below); every source on a layer must have the same rank.
  ``B A`` is not ``sum_i w_i dW_i`` (cross terms): a rough, cheap combination.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the updates
  ``dW_i`` are merged by the rule (``svd``: the weighted sum), flattened to (out, in * prod k), and
  cut to rank ``svd_rank`` (default: the largest source rank; at most min(out, in * prod k)) by a
  full SVD ``U S V^T``: ``B = U_r S_r``, ``A = V_r^T`` (optionally clamped to the ``svd_clamp``
  quantile of their entries, as PEFT).

Task-vector rules on tensors ``t_i`` with weights ``v_i`` (float32):

* linear: ``sum_i v_i t_i``;
* magnitude_prune: each ``t_i`` keeps its ``int(density * numel)`` largest-magnitude entries, then linear;
* ties (Yadav et al., "TIES-Merging", arXiv:2306.01708): prune by magnitude, elect each entry's sign
  from the pruned tensors (``"total"``: the sign of their sum; ``"frequency"``: the commoner sign),
  then the mean of the weighted entries that agree with it (``sum / count``, count at least 1);
* dare_linear / dare_ties (Yu et al., "Language Models are Super Mario" (DARE), arXiv:2311.03099):
  each entry is kept with probability ``density`` (``torch.bernoulli``, drawn from ``generator``,
  default torch's global generator, in model order, adapter order, A then B, as PEFT) and rescaled by
  ``1 / density``; then linear / the TIES sign election and disjoint mean.

``density`` >= 1 prunes nothing. As in PEFT, a single source adapter is always combined linearly
(so ``svd_rank`` and ``density`` do not apply to it), and one adapter at weight 1.0 by ``cat`` or
``linear`` gives back that adapter (its product ``B A`` times its scaling; rsLoRA too).

Sources must be LoRA adapters without ``modules_to_save`` copies, trained base biases (``bias``)
or rewritten base weights (PiSSA/OLoRA init), which a combination cannot carry; DoRA adapters are
refused (a magnitude renormalises each row, so no weighted sum of DoRA updates is a DoRA update);
``lora_bias`` sources are combined by ``cat``, ``linear`` and ``svd`` (the new ``lora_B`` bias is
``sum_i w_i s_i b_i``, exact for ``cat`` and ``svd``) and refused by the pruning rules.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from .adapters import get_record, require_state
from .inject import inject
from .methods.lora import LoraAdapter, LoraConfig
from .targets import ADAPTERS

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_RULE_OF = {"linear": "linear", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
            "magnitude_prune": "magnitude_prune", "svd": "linear", "ties_svd": "ties",
            "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}
_WITH_BIAS = ("cat", "linear", "svd")


# ----------------------------------------------------------------------------- task-vector rules


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def random_prune_tensor(t: torch.Tensor, density: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE's drop-and-rescale: each entry kept with probability ``density``, then divided by it."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Mask (bool, like ``stacked`` (n, ...)) of the entries whose sign is the elected one:
    ``"total"``: the sign of the sum over dim 0; ``"frequency"``: the sign most entries have (ties: +)."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def merge_task_tensors(rule: str, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: Optional[float],
                       majority_sign_method: str = "total", generator: Optional[torch.Generator] = None
                       ) -> torch.Tensor:
    """One tensor from ``tensors`` (same shape, float32) and ``weights`` by ``rule`` (module docstring)."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if rule in ("ties", "dare_ties"):
        agree = majority_sign(stacked, majority_sign_method)
        return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1).to(stacked.dtype)
    return (stacked * w).sum(0)


# ----------------------------------------------------------------------------- the adapter


def _parts(ad: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(A, B, lora_B bias or None) of a LoRA adapter module, detached float32."""
    if ad.kind == "embedding":
        return ad.lora_embedding_A.detach().float(), ad.lora_embedding_B.detach().float(), None
    bias = ad.lora_B.bias
    return (ad.lora_A.weight.detach().float(), ad.lora_B.weight.detach().float(),
            None if bias is None else bias.detach().float())


def _check_sources(model: nn.Module, adapters: Sequence[str], combination_type: str) -> list:
    st = require_state(model)
    recs = []
    for n in adapters:
        if n not in st.records:
            raise ValueError(f"no adapter named {n!r} to combine; this model has {list(st.records)}")
        rec = get_record(model, n)
        cfg = rec.config
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; it is not supported for {n!r} "
                             f"({cfg.peft_type})")
        why = ("DoRA adapters: their magnitude vector renormalises each row, so no weighted sum of DoRA updates is "
               "a DoRA update (merge_and_unload them instead)" if cfg.use_dora else
               "adapters with modules_to_save copies (a combined adapter cannot carry trained module copies)"
               if cfg.modules_to_save else
               f"adapters that train base biases (bias={cfg.bias!r})" if cfg.bias != "none" else
               "adapters that rewrite base weights (PiSSA/OLoRA init): their updates are against another base"
               if rec.base_tensors else
               f"lora_bias adapters with combination_type={combination_type!r} (pruning has no rule for the bias): "
               f"use {', '.join(_WITH_BIAS)}" if cfg.lora_bias and combination_type not in _WITH_BIAS else None)
        if why:
            raise ValueError(f"add_weighted_adapter is not supported for {why}; {n!r} is one")
        recs.append(rec)
    return recs


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         density: Optional[float] = None, majority_sign_method: str = "total", *,
                         svd_clamp: Optional[float] = None, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Add the LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (module docstring).

    Args:
        adapters / weights: source adapter names and one finite weight each (negative subtracts).
        combination_type: one of :data:`COMBINATION_TYPES`.
        svd_rank: rank of the ``*svd`` results (default: the largest source rank).
        density: share of entries kept by ``ties``, ``dare_*`` and ``magnitude_prune*`` (0..1; needed there).
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
        svd_clamp: quantile (0..1) at which the ``*svd`` results' entries are clamped (None: no clamp).
        generator: the random generator of DARE's masks (default: torch's global one).

    The new adapter is added inactive and frozen (``set_adapter`` it); its tensors have the first
    source's dtype; the sources are unchanged. Returns the model.

    Raises:
        ValueError: the name is taken or invalid; an unknown source, combination type, majority
            sign method; weights that are not one finite number per adapter; a missing or bad
            ``density`` / ``svd_rank`` / ``svd_clamp``; different ranks on a layer for the linear
            rules; a source this cannot combine exactly (DoRA, ``modules_to_save``, trained biases,
            PiSSA/OLoRA; ``lora_bias`` with a pruning rule), naming it and the reason. Nothing is
            added then.
    """
    st = require_state(model)
    if adapter_name in st.records:
        raise ValueError(f"this model already has an adapter named {adapter_name!r}: pick another name")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not one of {', '.join(COMBINATION_TYPES)}")
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    weights = [weights] if isinstance(weights, (int, float)) else list(weights)
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"{adapters} names an adapter twice: give it one weight")
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one adapter is its own weighted copy
    rule = _RULE_OF.get(combination_type)  # None for cat
    if rule not in (None, "linear") and (
            density is None or not isinstance(density, (int, float)) or not 0 <= density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs density, the share of entries kept "
                         f"(0..1), got {density!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    recs = _check_sources(model, adapters, combination_type)

    hosts: dict = {}  # path -> [(source index, adapter module)] in source order
    for i, rec in enumerate(recs):
        for path in rec.hosts:
            ad = model.get_submodule(path)._modules[ADAPTERS]._modules.get(rec.name)
            if isinstance(ad, LoraAdapter):
                hosts.setdefault(path, []).append((i, ad))
    if not hosts:
        raise ValueError(f"adapters {adapters} adapt no layer (nothing to combine)")
    order = [n for n, _ in model.named_modules() if n in hosts]  # model order (PEFT's, for DARE's draws)
    svd_r = svd_rank or max(max([r.config.r, *r.config.rank_pattern.values()]) for r in recs)
    new = {}
    for path in order:
        present = hosts[path]
        parts = [_parts(ad) for _, ad in present]
        scaled = [weights[i] * ad.scaling for i, ad in present]  # w_i s_i
        if combination_type == "cat":
            A = torch.cat([ws * a for ws, (a, _, _) in zip(scaled, parts)], dim=0)
            B = torch.cat([b for _, b, _ in parts], dim=1)
        elif combination_type.endswith("svd"):
            host = model.get_submodule(path)
            deltas = [ad.delta_weight(host).detach() for _, ad in present]  # s_i B_i A_i, float32
            dw = merge_task_tensors(rule, deltas, [weights[i] for i, _ in present], density, majority_sign_method,
                                    generator)
            A, B = _svd_factors(dw, svd_r, parts[0][0], parts[0][1], svd_clamp)
        else:
            ranks = {a.shape[0] for a, _, _ in parts}
            if len(ranks) > 1:
                raise ValueError(f"combination_type={combination_type!r} needs one rank per layer, but {path} has "
                                 f"ranks {[a.shape[0] for a, _, _ in parts]} ({[recs[i].name for i, _ in present]}): "
                                 "use 'cat' or an svd type for adapters of different ranks")
            wa = [math.copysign(math.sqrt(abs(v)), v) for v in scaled]
            wb = [math.sqrt(abs(v)) for v in scaled]
            A = merge_task_tensors(rule, [a for a, _, _ in parts], wa, density, majority_sign_method, generator)
            B = merge_task_tensors(rule, [b for _, b, _ in parts], wb, density, majority_sign_method, generator)
        biases = [(v, bb) for v, (_, _, bb) in zip(scaled, parts) if bb is not None]
        bias = sum(v * bb for v, bb in biases) if biases else None
        new[path] = (A, B, bias)

    ranks = {p: a.shape[0] for p, (a, _, _) in new.items()}
    R = max(ranks.values())
    first = recs[0].config
    pattern = {re.escape(p): r for p, r in ranks.items() if r != R}  # exactly these layers
    config = LoraConfig(r=R, lora_alpha=R, target_modules=order, rank_pattern=pattern, alpha_pattern=dict(pattern),
                        lora_dropout=first.lora_dropout, lora_bias=any(r.config.lora_bias for r in recs),
                        init_lora_weights=False, task_type=first.task_type,
                        base_model_name_or_path=first.base_model_name_or_path)
    dtype = next(hosts[order[0]][0][1].parameters()).dtype
    inject(model, config, adapter_name, adapter_dtype=dtype)
    with torch.no_grad():
        for path, (A, B, bias) in new.items():
            ad = model.get_submodule(path)._modules[ADAPTERS]._modules[adapter_name]
            if ad.kind == "embedding":
                ad.lora_embedding_A.copy_(A)
                ad.lora_embedding_B.copy_(B)
            else:
                ad.lora_A.weight.copy_(A.view_as(ad.lora_A.weight))
                ad.lora_B.weight.copy_(B.view_as(ad.lora_B.weight))
                if ad.lora_B.bias is not None:
                    ad.lora_B.bias.copy_(bias if bias is not None else torch.zeros_like(ad.lora_B.bias))
    return model


def _svd_factors(dw: torch.Tensor, rank: int, a_like: torch.Tensor, b_like: torch.Tensor,
                 clamp: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``min(rank, out, in * prod k)`` with ``B A`` the best approximation of ``dw``
    (out, in[, *k]); shaped like the source tensors ``a_like`` / ``b_like`` but for the rank."""
    flat = dw.reshape(dw.shape[0], -1)
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, S.shape[0])
    B, A = U[:, :r] * S[:r], Vh[:r]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A.reshape(r, *a_like.shape[1:]), B.reshape(b_like.shape[0], r, *b_like.shape[2:])
