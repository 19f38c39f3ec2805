"""Layer-kind registry: what deltatune needs to know about a base layer it adapts.

A *layer kind* answers, for one family of modules: its input and output sizes, how to read its
weight as a dense float tensor in the canonical ``(out_features, in_features, *kernel)`` layout,
and how to write such a tensor back in the module's own storage layout and dtype. Adapters never
look at the base class themselves; they ask the kind. Adding a new base (a quantized layer, a
tensor-parallel shard) means registering one kind, not writing a new adapter class.

Canonical layouts (``W`` such that the layer computes ``y = x @ W.T`` for linear kinds):

========================  ===============================  =====================================
kind                      module storage                   canonical ``W``
========================  ===============================  =====================================
``linear``                ``nn.Linear.weight (out, in)``   same
``conv1d_hf``             transformers ``Conv1D (in,out)`` transposed -> ``(out, in)``
``embedding``             ``nn.Embedding (num, dim)``      ``(dim, num)`` (out = dim, in = ids)
``conv1d`` / ``conv2d``   ``(out, in/groups, *k)``         same
========================  ===============================  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class LayerKind:
    """How to read and write one family of base layers (see module docstring)."""

    name: str
    matches: Callable[[nn.Module], bool]
    in_features: Callable[[nn.Module], int]
    out_features: Callable[[nn.Module], int]
    # (module) -> dense weight in canonical layout; may be a view of the storage for dense kinds
    get_weight: Callable[[nn.Module], torch.Tensor]
    # (module, canonical dense weight) -> None; casts to the module's storage dtype/layout
    set_weight: Callable[[nn.Module, torch.Tensor], None]
    linear_like: bool = True  # True for kinds that compute x @ W.T (+ b)
    priority: int = 0  # higher wins when several kinds match (quantized before plain)
    # True for kinds whose set_weight swaps in a new dense weight (and may change the module's
    # class) instead of writing into the storage in place: 4-bit kinds. merge.py then keeps the
    # original weight object (and class) untouched for an exact unmerge instead of copying it.
    replaces_weight: bool = False


_KINDS: list[LayerKind] = []


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Register ``kind``; kinds with a higher ``priority`` are tried first."""
    _KINDS[:] = [k for k in _KINDS if k.name != kind.name]
    _KINDS.append(kind)
    _KINDS.sort(key=lambda k: -k.priority)
    return kind


def layer_kind(module: nn.Module) -> Optional[LayerKind]:
    """The registered kind of ``module``, or ``None`` if deltatune cannot adapt it."""
    for k in _KINDS:
        if k.matches(module):
            return k
    return None


def supported_kind_names() -> list[str]:
    return [k.name for k in _KINDS]


def _is_hf_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight") and m.weight.dim() == 2


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


register_layer_kind(
    LayerKind(
        name="linear",
        matches=lambda m: isinstance(m, nn.Linear),
        in_features=lambda m: m.in_features,
        out_features=lambda m: m.out_features,
        get_weight=lambda m: m.weight,
        set_weight=lambda m, w: _assign(m.weight, w),
    )
)

register_layer_kind(
    LayerKind(
        name="conv1d_hf",
        matches=_is_hf_conv1d,
        in_features=lambda m: m.weight.shape[0],
        out_features=lambda m: m.weight.shape[1],
        get_weight=lambda m: m.weight.T,
        set_weight=lambda m, w: _assign(m.weight, w.T),
    )
)

register_layer_kind(
    LayerKind(
        name="embedding",
        matches=lambda m: isinstance(m, nn.Embedding),
        in_features=lambda m: m.num_embeddings,
        out_features=lambda m: m.embedding_dim,
        get_weight=lambda m: m.weight.T,
        set_weight=lambda m, w: _assign(m.weight, w.T),
        linear_like=False,
    )
)

for _name, _cls in (("conv1d", nn.Conv1d), ("conv2d", nn.Conv2d), ("conv3d", nn.Conv3d)):
    register_layer_kind(
        LayerKind(
            name=_name,
            matches=(lambda c: (lambda m: isinstance(m, c)))(_cls),
            in_features=lambda m: m.in_channels,
            out_features=lambda m: m.out_channels,
            get_weight=lambda m: m.weight,
            set_weight=lambda m, w: _assign(m.weight, w),
            linear_like=False,
        )
    )


def dense_weight(module: nn.Module, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The module's weight in canonical layout (see module docstring), not copied if dense.

    ``fan_in_fan_out=True`` declares that an ``nn.Linear`` stores its weight as ``(in, out)``
    (PEFT's flag); kinds that know their own layout ignore it.

    Raises:
        TypeError: the module is of no registered kind.
    """
    k = layer_kind(module)
    if k is None:
        raise TypeError(f"deltatune cannot read the weight of a {type(module).__name__}")
    w = k.get_weight(module)
    if fan_in_fan_out and k.name == "linear":
        w = w.T
    return w


def set_dense_weight(module: nn.Module, w: torch.Tensor, fan_in_fan_out: bool = False) -> None:
    """Write a canonical-layout weight back into ``module`` in its own storage dtype/layout."""
    k = layer_kind(module)
    if k is None:
        raise TypeError(f"deltatune cannot write the weight of a {type(module).__name__}")
    if fan_in_fan_out and k.name == "linear":
        w = w.T
    k.set_weight(module, w)
