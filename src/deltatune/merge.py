"""Merge adapters into base weights and unmerge them exactly.

Merging is explicit (never a side effect of ``eval()``) and guarded:

* a host's merged weight is always composed from its ORIGINAL weight, in float32, by applying
  its merged adapters in the one order the forward applies them (:func:`merge_order`): the
  output-side adapters in the active order, then the input-side ones (which scale the input that
  the base and every output-side adapter read). So any stack of adapters, merged together or one
  by one, in any order, gives what the unmerged forward computes;
* the result is cast back to the base storage dtype (a bf16 base stays bf16); the original weight
  (and bias, and class: 4-bit kinds become dense on write) is kept aside
  (:class:`~deltatune.adapters.MergeBackup`), so :func:`unmerge` restores it bit for bit (not by
  subtracting, which would leave rounding error);
* ``safe_merge=True`` checks every merged weight is finite before anything is written.

An adapter takes part through the :class:`~deltatune.adapters.LayerAdapter` contract:
``merge_into(host, w) -> w'`` for a float32 canonical weight (LoRA: ``w + delta``; (IA)3:
``w * l``), ``merge_bias(host, b) -> b'``, and ``merge_error`` (a sentence) when it cannot be merged.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .adapters import ADAPTERS, MERGE_ATTR, MergeBackup, get_state, require_state

from .routing import iter_hosts
from .geometry import GEOMETRY
from .layers import dense_weight, layer_kind, set_dense_weight


def unmerged_dense_weight(host: nn.Module) -> torch.Tensor:
    """The host's base weight as it was before any :func:`merge`, canonical layout (not copied).

    Equals :func:`deltatune.layers.dense_weight` when nothing is merged into ``host``. Adapters whose
    contribution depends on the base weight (DoRA's norm) read this, so that a merged neighbour on
    the same layer does not change them.
    """
    backup = host.__dict__.get(MERGE_ATTR)
    if backup is None:
        return dense_weight(host)
    cur_w, cur_cls = host._parameters["weight"], type(host)
    host._parameters["weight"] = backup.weight
    host.__class__ = backup.cls
    try:
        return dense_weight(host)
    finally:
        host._parameters["weight"] = cur_w
        host.__class__ = cur_cls


def is_merged(host: nn.Module) -> bool:
    """True while some adapter is merged into ``host``'s weight."""
    return MERGE_ATTR in host.__dict__


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters currently merged into the base weights (in model order)."""
    out = []
    for _, host in iter_hosts(model):
        for n, a in host._modules[ADAPTERS]._modules.items():
            if a.merged and n not in out:
                out.append(n)
    return out


def merge_order(host: nn.Module, active: list) -> list:
    """``[(name, adapter)]`` of the host's mergeable-side adapters in the order their weights compose:
    output-side adapters in the active order (inactive ones after, in the order added), then the
    input-side ones in reverse: the forward maps ``x`` by the input-side adapters in the active
    order, so the last of them to act sits next to the weight (``W R2^T R1^T`` for rotations ``R1``
    then ``R2``, as OFT's; per-channel scalings commute either way)."""
    ads = host._modules[ADAPTERS]._modules
    ranked = [n for n in active if n in ads] + [n for n in ads if n not in active]
    return ([(n, ads[n]) for n in ranked if ads[n].side == "output"]
            + [(n, ads[n]) for n in reversed(ranked) if ads[n].side == "input"])


def unrepresentable(host: nn.Module, active: list, merged: set) -> Optional[str]:
    """Why ``host`` cannot compute its forward with exactly the adapters ``merged`` folded into its
    weight and the other active ones running unmerged; None when it can.

    The output hook runs the unmerged output-side adapters after the (merged) host, so every merged
    one acts before every unmerged one; the input pre-hook runs the unmerged input-side adapters
    before it, so every merged one acts after every unmerged one. That equals the forward where the
    two commute: an unmerged output-side adapter followed (in the active order) by a merged one, or
    a merged input-side adapter followed by an unmerged one, must compose the same way (both add a
    term, or both scale: see ``LayerAdapter.composes``; a rotation, ``"other"``, commutes with
    nothing), and a merged input-side adapter (it maps what every output-side adapter reads) needs
    them all merged.
    """
    order = [(n, a) for n, a in merge_order(host, active) if n in active]
    out = [(n, a) for n, a in order if a.side == "output"]
    for i, (u, ua) in enumerate(out):
        if u in merged:
            continue
        bad = [m for m, a in out[i + 1:] if m in merged and not (a.composes == ua.composes != "other")]
        if bad:
            return (f"the merged {bad[0]!r} follows the unmerged {u!r} in the active order, and one of them scales "
                    "what the other adds")
        if any(n in merged for n, a in order if a.side == "input"):
            return f"a merged input-side adapter scales the input that the unmerged {u!r} reads"
    inp = [(n, a) for n in active for m, a in order if m == n and a.side == "input"]  # in the active order
    for i, (m, ma) in enumerate(inp):
        if m not in merged:
            continue
        bad = [u for u, a in inp[i + 1:] if u not in merged and not (a.composes == ma.composes != "other")]
        if bad:
            return (f"the unmerged {bad[0]!r} follows the merged {m!r} in the active order on the input side, and "
                    "the two do not commute")
    return None


def _check_merged_sets(model: nn.Module, merged_after) -> None:
    """Raise ``ValueError`` (nothing changed) when a merge/unmerge would leave a host that cannot
    reproduce the forward; ``merged_after(host) -> set of names``."""
    st = get_state(model)
    for hname, host in iter_hosts(model):
        why = unrepresentable(host, st.active, merged_after(host))
        if why:
            raise ValueError(f"cannot merge only part of the adapters on {hname}: {why}; merge them together "
                             "(merge() merges every active adapter) or unmerge them together")


def _compose(host: nn.Module, adapters: list) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(float32 weight, float32 bias or None when unchanged) of ``host`` with ``adapters`` merged,
    from its original weight and bias."""
    w = unmerged_dense_weight(host).detach().to(torch.float32)
    backup = host.__dict__.get(MERGE_ATTR)
    b0 = backup.bias if backup is not None and backup.bias is not None else host._parameters.get("bias")
    b = None if b0 is None else b0.detach().to(torch.float32)
    changed = False
    with torch.no_grad():
        for _, a in adapters:
            w = a.merge_into(host, w)
            if b is not None:
                b2 = a.merge_bias(host, b)
                changed, b = changed or b2 is not b, b2
    return w, (b if changed else None)


def _keep_original(host: nn.Module, with_bias: bool) -> None:
    """Set the host's weight (and class, and bias when a merge changes it) aside, once each."""
    backup = host.__dict__.get(MERGE_ATTR)
    if backup is None:
        orig = host._parameters["weight"]
        backup = host.__dict__[MERGE_ATTR] = MergeBackup(weight=orig, cls=type(host))
        kind = layer_kind(host)
        if not kind.replaces_weight:  # 4-bit kinds swap in a new dense weight and leave the original as it is
            host._parameters["weight"] = nn.Parameter(orig.detach().clone(), requires_grad=False)
    if with_bias and backup.bias is None:
        orig_b = host._parameters["bias"]
        backup.bias = orig_b
        host._parameters["bias"] = nn.Parameter(orig_b.detach().clone(), requires_grad=orig_b.requires_grad)


def _write(host: nn.Module, w: torch.Tensor, b: Optional[torch.Tensor], keep_original: bool) -> None:
    if keep_original:
        _keep_original(host, b is not None)
    set_dense_weight(host, w)
    if b is not None:
        with torch.no_grad():
            host._parameters["bias"].copy_(b.to(host._parameters["bias"].dtype))


def _restore(host: nn.Module) -> None:
    backup = host.__dict__.pop(MERGE_ATTR, None)
    if backup is None:
        return
    host._parameters["weight"] = backup.weight
    if type(host) is not backup.cls:
        host.__class__ = backup.cls  # a 4-bit layer that was merged as a dense nn.Linear
    if backup.bias is not None:
        host._parameters["bias"] = backup.bias


def _mergeable(adapter: nn.Module, name: str, hname: str) -> bool:
    if adapter.side == "replace":
        return False
    if adapter.merge_error:
        raise ValueError(f"adapter {name!r} on {hname} cannot be merged: {adapter.merge_error}")
    return True


def names_to_merge(model: nn.Module, adapter_names: Optional[Iterable[str]]) -> list:
    """The adapters a merge concerns (default: the active ones), checked.

    Raises:
        KeyError: an unknown name. ValueError: a method whose config refuses merging (prompt
            methods: nothing of theirs lives in a weight), with the reason; an adapter that changes
            base tensors in place (PiSSA/OLoRA, trained biases) while another one's values are in them.
    """
    st = require_state(model)
    names = list(st.active if adapter_names is None else adapter_names)
    for n in names:
        if n not in st.records:
            raise KeyError(f"no adapter named {n!r}; this model has {list(st.records)}")
        cfg = st.records[n].config
        if cfg.merge_error:
            raise ValueError(f"adapter {n!r} ({cfg.peft_type}) cannot be merged: {cfg.merge_error}")
        foreign = [t for t in st.records[n].base_tensors if st.base_tensors[t].owner != n]
        if foreign:
            raise ValueError(f"adapter {n!r} changes the base tensor {foreign[0]!r} in place but is not the active "
                             f"adapter holding it: set_adapter({n!r}) before merging it")
    return names


def _plan(model: nn.Module, names: list, with_merged: bool) -> list:
    """``[(host path, host, [(name, adapter)] in merge order)]``: per host, the named mergeable
    adapters (plus those merged already, ``with_merged``). Raises before anything is written."""
    st = get_state(model)
    plan = []
    for hname, host in iter_hosts(model):
        order = merge_order(host, st.active)
        new = [(n, a) for n, a in order if n in names and not a.merged and _mergeable(a, n, hname)]
        if new:
            plan.append((hname, host, [(n, a) for n, a in order if (n, a) in new or (with_merged and a.merged)]))
    return plan


def _check_finite(plan: list) -> None:
    """Raise ``ValueError`` before anything is written if a merged weight or bias is not finite
    (one host's float32 result at a time)."""
    for hname, host, adapters in plan:
        for k in range(1, len(adapters) + 1):  # each adapter in turn, so an overflow of the sum is caught too
            w, b = _compose(host, adapters[:k])
            if not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                raise ValueError(
                    f"safe_merge: merging adapter {adapters[k - 1][0]!r} into {hname} gives non-finite weights "
                    "(NaN or inf); nothing was merged. Check the adapter tensors for NaN/inf (diverged training?)"
                )


def merge(model: nn.Module, adapter_names: Optional[Iterable[str]] = None, *, safe_merge: bool = False) -> None:
    """Merge adapters (default: the active ones) into the base weights, reversibly.

    Each adapted weight ``W`` (any dtype) becomes ``cast(f32 composition of W and its merged
    adapters)`` (module docstring); the original tensor is kept aside so :func:`unmerge` restores
    it exactly. Merged adapters are skipped by the forward hooks, so outputs are unchanged up to
    rounding.

    Raises:
        ValueError: ``safe_merge`` and a merged weight is not finite (nothing is written); an
            adapter cannot be merged (bottleneck adapters, LLaMA-Adapter, prompt methods), with
            the reason; the merged set would not reproduce the forward (:func:`unrepresentable`:
            e.g. an (IA)3 output scaling merged while a LoRA before it in the active order is not).
        KeyError: an unknown adapter name.
    """
    names = names_to_merge(model, adapter_names)
    plan = _plan(model, names, with_merged=True)
    _check_merged_sets(model, lambda h: {n for n, a in h._modules[ADAPTERS]._modules.items() if a.merged or n in names})
    if safe_merge:
        _check_finite(plan)
    for _, host, adapters in plan:
        w, b = _compose(host, adapters)
        _write(host, w, b, keep_original=True)
        for _, a in adapters:
            a.merged = True


def unmerge(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> None:
    """Undo :func:`merge` for ``adapter_names`` (default: all merged), restoring weights exactly.

    Adapters merged into the same layer that are not named stay merged (recomposed from the original).

    Raises:
        ValueError: what stays merged cannot reproduce the forward (:func:`unrepresentable`);
            nothing is changed then.
    """
    names = None if adapter_names is None else set(adapter_names)
    st = get_state(model)
    if names is not None:
        _check_merged_sets(model, lambda h: {n for n, a in h._modules[ADAPTERS]._modules.items()
                                             if a.merged and n not in names})
    for _, host in iter_hosts(model):
        merged = [(n, a) for n, a in merge_order(host, st.active if st else []) if a.merged]
        if not merged or (names is not None and not any(n in names for n, _ in merged)):
            continue
        stay = [] if names is None else [(n, a) for n, a in merged if n not in names]
        _restore(host)
        for _, a in merged:
            a.merged = False
        if stay:
            w, b = _compose(host, stay)
            _write(host, w, b, keep_original=True)
            for _, a in stay:
                a.merged = True


def refresh(model: nn.Module, host_paths: Iterable[str]) -> None:
    """Recompose the merged weight of each of these hosts from its (changed) original tensors."""
    st = get_state(model)
    for path in dict.fromkeys(host_paths):
        host = model.get_submodule(path) if path else model
        if not is_merged(host):
            continue
        merged = [(n, a) for n, a in merge_order(host, st.active) if a.merged]
        _restore(host)
        w, b = _compose(host, merged)
        _write(host, w, b, keep_original=True)


def bake(model: nn.Module, names: list, *, safe_merge: bool = False) -> None:
    """Merge ``names`` into the base weights for good (nothing kept aside; every adapter unmerged
    first), and copy their ``modules_to_save`` copies' values into the modules they copy. Tied
    tensors are untied first, so the other module keeps its own values. The adapters stay attached
    (:func:`deltatune.merge_and_unload` removes them next)."""
    for hname, host in iter_hosts(model):  # refuse before anything changes
        for n, a in host._modules[ADAPTERS]._modules.items():
            if n in names:
                _mergeable(a, n, hname)
    unmerge(model)
    plan = _plan(model, names, with_merged=False)
    if safe_merge:
        _check_finite(plan)
    shared = _shared_parameter_ids(model)
    for _, host in iter_hosts(model):
        for n, copy in host._modules[ADAPTERS]._modules.items():
            if n in names and copy.side == "replace":
                with torch.no_grad():
                    for key, t in copy.state_dict().items():
                        _untie_if_shared(model, host, key, shared)
                        own = host.get_parameter(key) if key in dict(host.named_parameters()) else host.get_buffer(key)
                        own.copy_(t.to(own.dtype))
    for _, host, adapters in plan:
        w, b = _compose(host, adapters)
        _untie_if_shared(model, host, "weight", shared)
        _write(host, w, b, keep_original=False)


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
    the adapter model computed. The host gets its own parameter instead, and the model's config is
    told the embeddings are no longer tied (transformers: ``tie_word_embeddings=False``), so that
    saving and reloading keeps both.
    """
    mod_path, _, leaf = key.rpartition(".")
    owner = host.get_submodule(mod_path) if mod_path else host
    p = owner._parameters.get(leaf)
    if p is None or id(p) not in shared:
        return
    owner._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    GEOMETRY.untie_embeddings(model)
    warnings.warn(
        f"merge_and_unload: {key} of {type(host).__name__} was tied to another module's weight; it now has its "
        "own merged copy (tie_word_embeddings set to False) so the merged model computes what the adapter did",
        stacklevel=4,
    )
