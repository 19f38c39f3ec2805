"""Merge adapters into base weights, unmerge them exactly, and unload.

Merging is explicit (never a side effect of ``eval()``) and guarded:

* the new weight is computed in float32 from the dense base weight (read through the layer-kind
  registry) and cast back to the base storage dtype, so a bf16 base stays bf16;
* ``safe_merge=True`` checks the result is finite before writing anything and raises otherwise;
* :func:`merge` keeps the original weight tensor aside, so :func:`unmerge` restores the base
  weights bit for bit (not by subtracting, which would leave rounding error);
* :func:`merge_and_unload` writes in place, keeps nothing aside, and returns a plain model.

An adapter module takes part by defining ``merge_into(host, w) -> w'`` for a float32 canonical
weight ``w`` (LoRA: ``w + delta``; IA3: ``w * l``). One that cannot be merged (bottleneck adapters)
defines ``merge_error``, a sentence saying why; merging it raises ``ValueError`` with it.
An adapter that also changes the bias (IA3 scaling a layer's output) defines
``merge_bias(host, b) -> b'`` for a float32 bias ``b``; the bias is kept aside and restored the same way.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .inject import ADAPTERS, STATE_ATTR, _require_state, detach, iter_adapter_modules, iter_hosts
from .layers import dense_weight, layer_kind, set_dense_weight

_BACKUP = "_deltatune_unmerged_weight"
_BACKUP_BIAS = "_deltatune_unmerged_bias"
_BACKUP_CLASS = "_deltatune_unmerged_class"


def _keep_weight(host: nn.Module) -> None:
    """Set the host's weight (and class) aside for :func:`unmerge`, once.

    Dense kinds get a writable copy to merge into. Kinds whose ``set_weight`` swaps in a new dense
    weight (4-bit kinds, ``LayerKind.replaces_weight``) keep the original object untouched; their
    module class may change on write (a bnb ``Linear4bit`` becomes an ``nn.Linear``), so the class
    is kept too.
    """
    if _BACKUP in host.__dict__:
        return
    orig = host._parameters["weight"]
    host.__dict__[_BACKUP] = orig
    host.__dict__[_BACKUP_CLASS] = type(host)
    kind = layer_kind(host)
    if not (kind is not None and kind.replaces_weight):
        host._parameters["weight"] = nn.Parameter(orig.detach().clone(), requires_grad=False)


def _merged_weight(host: nn.Module, adapter: nn.Module) -> torch.Tensor:
    fifo = getattr(adapter, "fan_in_fan_out", False)
    w = dense_weight(host, fifo).detach().to(torch.float32)
    if hasattr(adapter, "merge_into"):
        with torch.no_grad():
            return adapter.merge_into(host, w)
    with torch.no_grad():
        return w + adapter.delta_weight(host).to(w.dtype)


def unmerged_dense_weight(host: nn.Module, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The host's base weight as it was before any :func:`merge`, canonical layout (not copied).

    Equals :func:`deltatune.layers.dense_weight` when nothing is merged into ``host``. Adapters whose
    contribution depends on the base weight (DoRA's norm) read this, so that a merged neighbour on
    the same layer does not change them.
    """
    backup = host.__dict__.get(_BACKUP)
    if backup is None:
        return dense_weight(host, fan_in_fan_out)
    cur_w, cur_cls = host._parameters["weight"], type(host)
    host._parameters["weight"] = backup
    host.__class__ = host.__dict__.get(_BACKUP_CLASS, cur_cls)
    try:
        return dense_weight(host, fan_in_fan_out)
    finally:
        host._parameters["weight"] = cur_w
        host.__class__ = cur_cls


def _merged_bias(host: nn.Module, adapter: nn.Module) -> Optional[torch.Tensor]:
    """The new float32 bias for adapters that define ``merge_bias``; None when the bias is unchanged."""
    fn = getattr(adapter, "merge_bias", None)
    b = host._parameters.get("bias") if fn is not None else None
    if b is None:
        return None
    with torch.no_grad():
        return fn(host, b.detach().to(torch.float32))


def _write_bias(host: nn.Module, b: Optional[torch.Tensor], keep_original: bool) -> None:
    if b is None:
        return
    if keep_original and _BACKUP_BIAS not in host.__dict__:
        orig = host._parameters["bias"]
        host.__dict__[_BACKUP_BIAS] = orig
        host._parameters["bias"] = nn.Parameter(orig.detach().clone(), requires_grad=orig.requires_grad)
    with torch.no_grad():
        host._parameters["bias"].copy_(b.to(host._parameters["bias"].dtype))


def _restore_bias(host: nn.Module) -> None:
    orig = host.__dict__.pop(_BACKUP_BIAS, None)
    if orig is not None:
        host._parameters["bias"] = orig


def _mergeable(host, adapter, name, hname):
    if getattr(adapter, "replaces_host", False):
        return False
    err = getattr(adapter, "merge_error", None)
    if err:
        raise ValueError(f"adapter {name!r} on {hname} cannot be merged: {err}")
    if not (hasattr(adapter, "merge_into") or hasattr(adapter, "delta_weight")):
        raise ValueError(f"adapter {name!r} on {hname} ({type(adapter).__name__}) cannot be merged")
    return True


def _write(host, w, fifo):
    set_dense_weight(host, w, fifo)


def _check_finite(plan) -> None:
    """Raise ``ValueError`` before anything is written if merging ``plan`` gives a non-finite
    weight or bias anywhere. Each layer's adapters are applied in turn to a float32 copy, as
    the real merge will, so an overflow of the sum is caught too; memory stays one layer."""
    by_host: dict[int, list] = {}
    for item in plan:
        by_host.setdefault(id(item[1]), []).append(item)
    for items in by_host.values():
        host = items[0][1]
        w = dense_weight(host, getattr(items[0][3], "fan_in_fan_out", False)).detach().to(torch.float32)
        b = host._parameters.get("bias")
        b = None if b is None else b.detach().to(torch.float32)
        for hname, _, aname, amod in items:
            with torch.no_grad():
                w = amod.merge_into(host, w) if hasattr(amod, "merge_into") else w + amod.delta_weight(host).float()
                if b is not None and hasattr(amod, "merge_bias"):
                    b = amod.merge_bias(host, b)
            if not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                raise ValueError(
                    f"safe_merge: merging adapter {aname!r} into {hname} gives non-finite weights (NaN or inf); "
                    "nothing was merged. Check the adapter tensors for NaN/inf (diverged training?)"
                )


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters currently merged into the base weights (in model order)."""
    out = []
    for _, _, aname, amod in iter_adapter_modules(model):
        if getattr(amod, "merged", False) and aname not in out:
            out.append(aname)
    return out


def _names_to_merge(st, adapter_names) -> list:
    """The adapters a merge concerns (default: the active ones), checked.

    Raises:
        KeyError: an unknown name. ValueError: a method whose config refuses merging (prompt
            methods: nothing of theirs lives in a weight), with the reason.
    """
    names = list(st.active if adapter_names is None else adapter_names)
    for n in names:
        if n not in st.configs:
            raise KeyError(f"no adapter named {n!r}; this model has {list(st.configs)}")
        refusal = getattr(st.configs[n], "MERGE_REFUSAL", None)
        if refusal:
            raise ValueError(f"adapter {n!r} ({st.configs[n].peft_type}) cannot be merged: {refusal}")
    return names


def merge(model: nn.Module, adapter_names: Optional[Iterable[str]] = None, *, safe_merge: bool = False) -> None:
    """Merge adapters (default: the active ones) into the base weights, reversibly.

    Each adapted weight ``W`` (any dtype) becomes ``cast(f32(W) + delta)``; the original tensor is
    kept aside so :func:`unmerge` restores it exactly. Merged adapters are skipped by the forward
    hooks, so outputs are unchanged up to rounding.

    Raises:
        ValueError: ``safe_merge`` and a merged weight is not finite (nothing is written for that
            layer); or an adapter cannot be merged (bottleneck adapters), with the reason.
        KeyError: an unknown adapter name.
    """
    st = _require_state(model)
    names = _names_to_merge(st, adapter_names)
    plan = []
    for hname, host, aname, amod in iter_adapter_modules(model):
        if aname in names and not getattr(amod, "merged", False) and _mergeable(host, amod, aname, hname):
            plan.append((hname, host, aname, amod))
    if safe_merge:
        _check_finite(plan)
    for hname, host, aname, amod in plan:
        new = _merged_weight(host, amod)
        new_b = _merged_bias(host, amod)
        _write_bias(host, new_b, keep_original=True)
        _keep_weight(host)
        _write(host, new, getattr(amod, "fan_in_fan_out", False))
        amod.merged = True


def unmerge(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> None:
    """Undo :func:`merge` for ``adapter_names`` (default: all merged), restoring weights exactly.

    Adapters merged into the same layer that are not named are merged again afterwards.
    """
    names = None if adapter_names is None else set(adapter_names)
    for hname, host in iter_hosts(model):
        merged = [(n, a) for n, a in host.adapters.items() if getattr(a, "merged", False)]
        if not merged or (names is not None and not any(n in names for n, _ in merged)):
            continue
        backup = host.__dict__.pop(_BACKUP, None)
        if backup is None:
            raise RuntimeError(f"{hname} is marked merged but holds no original weight to restore")
        host._parameters["weight"] = backup
        cls = host.__dict__.pop(_BACKUP_CLASS, None)
        if cls is not None and type(host) is not cls:
            host.__class__ = cls  # a 4-bit layer that was merged as a dense nn.Linear
        _restore_bias(host)
        for n, a in merged:
            a.merged = False
        again = [n for n, _ in merged if names is not None and n not in names]
        if again:
            for n in again:
                a = host.adapters[n]
                new = _merged_weight(host, a)
                _write_bias(host, _merged_bias(host, a), keep_original=True)
                _keep_weight(host)  # keeps the true original when several re-merge
                _write(host, new, getattr(a, "fan_in_fan_out", False))
                a.merged = True


def merge_and_unload(model: nn.Module, adapter_names: Optional[Iterable[str]] = None, *,
                     safe_merge: bool = False, requantize: bool = False) -> nn.Module:
    """Merge adapters (default: active) for good and remove every adapter; return the plain model.

    Weights are written in place in their own dtype (bf16 stays bf16); ``modules_to_save`` copies
    of the merged adapters replace their originals' values. The returned object is the same
    model, with no deltatune hooks, children or state left; its parameters keep the
    ``requires_grad`` they had (frozen).

    A 4-bit base layer (see :func:`deltatune.quantize_base`) is dequantized, merged in float32 and
    becomes a dense ``nn.Linear`` of the weight's dtype before quantization (bf16 stays bf16):
    the result reproduces the adapter model.
    ``requantize=True`` writes those layers back into 4 bits (the same format) and warns with the
    number of layers and the largest weight error that rounding caused
    (:func:`deltatune.quant.requantize_merged`).

    Raises:
        ValueError: as :func:`merge`.
    """
    from .inject import release_base_parameters

    st = _require_state(model)
    names = _names_to_merge(st, adapter_names)
    unmerge(model)
    items = [it for it in iter_adapter_modules(model) if it[2] in names]
    plan = [it for it in items if not getattr(it[3], "replaces_host", False) and _mergeable(it[1], it[3], it[2], it[0])]
    if safe_merge:
        _check_finite(plan)
    shared = _shared_parameter_ids(model)
    for hname, host, aname, amod in items:
        if getattr(amod, "replaces_host", False):
            # the trained copy's values become the module's own
            with torch.no_grad():
                for key, t in amod.state_dict().items():
                    if key.startswith(ADAPTERS + ".") or f".{ADAPTERS}." in key:
                        continue
                    _untie_if_shared(model, host, key, shared)
                    own = host.get_parameter(key) if key in dict(host.named_parameters()) else host.get_buffer(key)
                    own.copy_(t.to(own.dtype))
            continue
    for hname, host, aname, amod in plan:
        new = _merged_weight(host, amod)
        new_b = _merged_bias(host, amod)
        _untie_if_shared(model, host, "weight", shared)
        _write(host, new, getattr(amod, "fan_in_fan_out", False))
        _write_bias(host, new_b, keep_original=False)
    for n in names:  # base tensors the merged adapters trained (biases, PiSSA residuals) stay as trained
        release_base_parameters(model, st, n, restore=False)
    unload(model)
    if requantize:
        from .quant import requantize_merged

        requantize_merged(model)
    return model


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that several modules hold (tied weights, e.g. GPT-2's wte and lm_head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def _untie_if_shared(model: nn.Module, host: nn.Module, key: str, shared: set[int]) -> None:
    """Give ``host`` its own copy of parameter ``key`` when the tensor is tied to another module.

    Writing a merged value into a tied tensor would change the other module too (a LoRA on the
    input embedding would also move the output head), so the merged model would not compute what
    the adapter model computed. The host gets its own parameter instead; a transformers config's
    ``tie_word_embeddings`` is set to False so that saving and reloading keeps both.
    """
    mod_path, _, leaf = key.rpartition(".")
    owner = host.get_submodule(mod_path) if mod_path else host
    p = owner._parameters.get(leaf)
    if p is None or id(p) not in shared:
        return
    owner._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if text_cfg is not None and getattr(text_cfg, "tie_word_embeddings", False):
            text_cfg.tie_word_embeddings = False
    warnings.warn(
        f"merge_and_unload: {key} of {type(host).__name__} was tied to another module's weight; it now has its "
        "own merged copy (tie_word_embeddings set to False) so the merged model computes what the adapter did",
        stacklevel=3,
    )


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged first); return the model."""
    from .inject import delete_adapter, get_state

    st = get_state(model)
    if st is None:
        return model
    unmerge(model)
    for name in list(st.configs):
        delete_adapter(model, name)
    for _, host in list(iter_hosts(model)):
        for aname in list(host.adapters):
            detach(host, aname)
    model.__dict__.pop(STATE_ATTR, None)
    return model


def has_dense_weight(module: nn.Module) -> bool:
    return layer_kind(module) is not None
