"""A LoRA adapter from the weight difference of a fully fine-tuned model: :func:`extract_lora`.

For every targeted layer (default: every linear layer but the output head, as ``"all-linear"``)
the difference of the tuned and the base weight, ``dW = W_tuned - W_base`` (float32, canonical
layout (out, in[, *k])), flattened to (out, in * prod k), is cut to its best rank-``r``
approximation by a truncated SVD ``dW ~ U_r S_r V_r^T`` (Eckart-Young: the least Frobenius error
of any rank-r matrix), stored as ``B = U_r sqrt(S_r)`` (out, r) and ``A = sqrt(S_r) V_r^T`` (r, in)
with scaling 1 (``lora_alpha == r``), so ``B A`` is that approximation. The share of the
difference's energy kept, ``sum_{i<r} s_i^2 / sum_i s_i^2`` (1.0: the difference had rank <= r),
is reported per layer. Layers whose weight did not change get no adapter. Tensors the adapter
cannot carry (changed biases, norms, untargeted embeddings or head) are listed as not represented,
with their relative change ``||dW|| / ||W_base||``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from .inject import inject
from .layers import dense_weight, layer_kind
from .methods.lora import LoraConfig
from .targets import find_targets, is_adapter_path


@dataclass
class LayerReport:
    """One layer of an extraction: its path, the rank used, the Frobenius norm of ``dW`` and the
    share of its energy (squared singular values) the rank-``rank`` factors keep."""

    module: str
    rank: int
    delta_norm: float
    energy_kept: float


@dataclass
class ExtractionReport:
    """What :func:`extract_lora` did. ``layers``: one :class:`LayerReport` per adapted layer (model
    order); ``energy_kept``: over all of them (sum of kept / sum of total squared singular values);
    ``unchanged``: targeted layers whose weight did not change (no adapter); ``not_represented``:
    changed base tensors outside the adapter, ``{name: relative change}``."""

    rank: int
    layers: list = field(default_factory=list)
    energy_kept: float = 1.0
    unchanged: list = field(default_factory=list)
    not_represented: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def extract_lora(base: nn.Module, tuned: nn.Module, r: int, adapter_name: str = "default", *,
                 target_modules="all-linear", exclude_modules=None) -> ExtractionReport:
    """Add to ``base`` the LoRA adapter ``adapter_name`` of rank (at most) ``r`` that best
    approximates ``tuned - base`` layer by layer (module docstring); return the report.

    Args:
        base: the model the tuned one started from (adapters it has are left alone); changed in
            place: the new adapter is added (active when it is the first one).
        tuned: the fine-tuned model, same architecture (not changed).
        r: the largest rank per layer (a layer smaller than r gets its full rank).
        target_modules / exclude_modules: which layers get the adapter, as in :class:`LoraConfig`
            (default ``"all-linear"``: every linear layer but the output head).

    Raises:
        ValueError: ``r`` is not a positive integer; a targeted layer is missing from ``tuned`` or
            has another shape; no targeted layer changed (nothing to extract).
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"rank must be a positive integer, got {r!r}")
    paths = find_targets(base, LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules))
    tuned_modules = dict(tuned.named_modules())
    report = ExtractionReport(rank=r)
    factors, kept, total = {}, 0.0, 0.0
    for path in paths:
        host = base.get_submodule(path)
        other = tuned_modules.get(path)
        if other is None or layer_kind(other) is None:
            raise ValueError(f"the tuned model has no layer {path!r} like the base's: is it the same architecture?")
        w0 = dense_weight(host).detach().float()
        w1 = dense_weight(other).detach().float().to(w0.device)
        if w1.shape != w0.shape:
            raise ValueError(f"{path}: the tuned weight has shape {tuple(w1.shape)}, the base's {tuple(w0.shape)}")
        dw = (w1 - w0).reshape(w0.shape[0], -1)
        if not torch.any(dw):
            report.unchanged.append(path)
            continue
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        k = min(r, S.shape[0])
        root = S[:k].sqrt()
        B, A = U[:, :k] * root, root[:, None] * Vh[:k]
        energy = S.square()
        kept += float(energy[:k].sum())
        total += float(energy.sum())
        factors[path] = (A.reshape(k, *w0.shape[1:]), B)
        report.layers.append(LayerReport(path, k, float(energy.sum().sqrt()), float(energy[:k].sum() / energy.sum())))
    if not factors:
        raise ValueError(f"no targeted layer differs between the base and the tuned model ({len(paths)} compared): "
                         "is the tuned model the base itself?")
    report.energy_kept = kept / total if total else 1.0
    report.not_represented = _changed_elsewhere(base, tuned, set(factors))
    pattern = {_exact(p): a.shape[0] for p, (a, _) in factors.items() if a.shape[0] != r}
    inject(base, LoraConfig(r=r, lora_alpha=r, target_modules=list(factors), rank_pattern=pattern,
                            alpha_pattern=dict(pattern), init_lora_weights=False), adapter_name)
    with torch.no_grad():
        for path, (A, B) in factors.items():
            ad = base.get_submodule(path).adapters[adapter_name]
            if ad.kind == "embedding":
                ad.lora_embedding_A.copy_(A)
                ad.lora_embedding_B.copy_(B)
            else:
                ad.lora_A.weight.copy_(A.reshape(ad.lora_A.weight.shape))
                ad.lora_B.weight.copy_(B.reshape(ad.lora_B.weight.shape))
    return report


def _exact(path: str) -> str:
    """A rank_pattern key that matches ``path`` only (PEFT reads the keys as regexes)."""
    return re.escape(path)


def _changed_elsewhere(base: nn.Module, tuned: nn.Module, adapted: set) -> dict:
    """{parameter name: ||dW|| / ||W||} of the base parameters that changed and that the adapter
    does not carry (anything but the weights of the adapted layers)."""
    theirs = dict(tuned.named_parameters())
    out = {}
    for name, p in base.named_parameters():
        if is_adapter_path(name) or name not in theirs:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in adapted and leaf == "weight":
            continue
        q = theirs[name]
        if q.shape == p.shape and not torch.equal(p.detach().cpu(), q.detach().cpu()):
            d = (q.detach().float().cpu() - p.detach().float().cpu()).norm().item()
            out[name] = d / max(p.detach().float().norm().item(), 1e-12) if math.isfinite(d) else float("inf")
    return out
