"""An adapted model's lifecycle: choose the active adapters, disable them, delete them, unload.

These operations sit above both :mod:`deltatune.inject` (records, trainability, base tensors) and
:mod:`deltatune.merge` (weights), because each keeps the two consistent: a merged adapter that
stops acting is unmerged first, and a merged layer whose original tensors change (an adapter's
own bias or residual weight comes or goes) is recomposed.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Optional, Union

from torch import nn

from .adapters import STATE_ATTR, get_state, require_state

from .routing import detach, iter_hosts
from .inject import check_base_conflicts, refresh_trainable, release_base_tensors, remove, sync_base_tensors
from .merge import bake, merge, merged_adapters, names_to_merge, refresh, unmerge, unrepresentable
from .quant import requantize_merged


def _sync(model: nn.Module) -> None:
    """Base tensors to their acting claimants' values; merged layers over them recomposed."""
    changed = sync_base_tensors(model)
    if changed:
        refresh(model, [p.rpartition(".")[0] for p in changed])


def set_adapter(model: nn.Module, adapter_name: Union[str, list]) -> None:
    """Make ``adapter_name`` (or a list of names, applied in order) the active adapter set.

    Active adapters apply in forward (in this order) and are trainable; the others are frozen and
    skipped. Merged adapters that are not in the new set are unmerged first (with a warning), so
    the model computes exactly what the new set says.

    Raises:
        KeyError: an unknown name (the message lists the model's adapters).
        ValueError: a name given twice; two of the names change the same base tensor in place.
    """
    st = require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for n in names:
        if n not in st.records:
            raise KeyError(f"no adapter named {n!r}; this model has {list(st.records)}")
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapter: {names} names an adapter twice; each adapter applies once")
    check_base_conflicts(st, names)
    merged = merged_adapters(model)
    stay = [n for n in merged if n in names]
    if any(unrepresentable(h, names, set(stay)) for _, h in iter_hosts(model)):
        stay = []  # the new order cannot run over what would stay merged
    leaving = [n for n in merged if n not in stay]
    if leaving:
        warnings.warn(f"set_adapter: unmerging {leaving}, which are merged but no longer active (or no longer "
                      "first in the new order)", stacklevel=2)
        unmerge(model)
    st.active = names
    _sync(model)
    if leaving and stay:
        merge(model, adapter_names=stay)
    refresh_trainable(model)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Context manager: inside it the model computes exactly the base model's output.

    Adapter contributions are skipped, ``modules_to_save`` copies are bypassed (the original
    modules run), base tensors an adapter changed in place (trained biases, PiSSA/OLoRA residual
    weights) hold their original values, and merged adapters are unmerged on entry (restoring the
    exact base weights) and merged again on exit. The previous state is restored also when the
    block raises.
    """
    st = require_state(model)
    remerge = merged_adapters(model)
    if remerge:
        unmerge(model)
    prev = st.disabled
    st.disabled = True
    _sync(model)
    try:
        yield model
    finally:
        st.disabled = prev
        _sync(model)
        if remerge:
            merge(model, adapter_names=remerge)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter (its modules, hooks and config). Unmerges it first if merged.

    Base tensors it changed in place (trained biases, PiSSA/OLoRA residuals) get their original
    values back unless another acting adapter holds them. When the last adapter goes, the model
    is a plain base model again (its base parameters stay frozen; call ``requires_grad_(True)`` to
    train them).

    Raises:
        KeyError: no adapter of that name.
    """
    st = require_state(model)
    if adapter_name not in st.records:
        raise KeyError(f"no adapter named {adapter_name!r}; this model has {list(st.records)}")
    if adapter_name in merged_adapters(model):
        unmerge(model, adapter_names=[adapter_name])
    remove(model, adapter_name)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged first); return the model."""
    st = get_state(model)
    if st is None:
        return model
    unmerge(model)
    for name in list(st.records):
        delete_adapter(model, name)
    for _, host in list(iter_hosts(model)):  # nothing the records missed stays behind
        for aname in list(host._modules["adapters"]._modules):
            detach(host, aname)
    model.__dict__.pop(STATE_ATTR, None)
    return model


def merge_and_unload(model: nn.Module, adapter_names: Optional[Iterable[str]] = None, *,
                     safe_merge: bool = False, requantize: bool = False) -> nn.Module:
    """Merge adapters (default: active) for good and remove every adapter; return the plain model.

    Weights are written in place in their own dtype (bf16 stays bf16), composed exactly as
    :func:`deltatune.merge` composes them (the forward's order, from the original weights);
    ``modules_to_save`` copies of the merged adapters replace their originals' values; base
    tensors the merged adapters changed in place (trained biases, PiSSA residuals) keep their
    values. The returned object is the same model, with no deltatune hooks, children or state
    left; its parameters keep the ``requires_grad`` they had (frozen).

    A 4-bit base layer (see :func:`deltatune.quantize_base`) is dequantized, merged in float32 and
    becomes a dense ``nn.Linear`` of the weight's dtype before quantization (bf16 stays bf16):
    the result reproduces the adapter model. ``requantize=True`` writes those layers back into 4
    bits (the same format) and warns with the number of layers and the largest weight error that
    rounding caused (:func:`deltatune.quant.requantize_merged`).

    Raises:
        ValueError: as :func:`merge` (nothing is changed then).
    """
    names = names_to_merge(model, adapter_names)
    bake(model, names, safe_merge=safe_merge)
    for n in names:
        release_base_tensors(model, n, keep=True)
    unload(model)
    if requantize:
        requantize_merged(model)
    return model
