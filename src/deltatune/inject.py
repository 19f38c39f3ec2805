"""Add adapters to a model, remove them, and keep what trains and what the base tensors hold right.

:func:`inject` creates the adapter's :class:`~deltatune.adapters.AdapterRecord` and hands it to
the method's injector (registered with :func:`register_method`), which attaches modules to hosts
through :func:`deltatune.adapters.attach` and fills the record. :func:`remove` is the one path
that takes an adapter away again (``delete_adapter`` and a failed ``inject`` both use it).

Trainability follows one rule (:meth:`AdapterRecord.trains`): an adapter's parameters require
grad while it is active and not loaded for inference; the base stays frozen, except the base
biases that a training adapter trains (LoRA's ``bias`` option).

Base tensors changed in place. Some adapters change base parameters themselves: LoRA's
``bias="all"/"lora_only"`` trains base biases, PiSSA/OLoRA init rewrites the base weight into a
residual. Each such adapter holds its own values of those tensors (a
:class:`~deltatune.adapters.BaseTensor` slot); a parameter holds the values of the one active
adapter that claims it, and its original values otherwise (no adapter claiming it is active, or
adapters are disabled). So an inactive adapter never changes what the others compute, and two
adapters that change the same base tensor cannot be active together (:func:`check_base_conflicts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Union

import torch
from torch import nn

from .adapters import (
    BASE_ROW,
    STATE_ATTR,
    AdapterRecord,
    AdapterState,
    BaseTensor,
    get_record,
    get_state,
    require_state,
    unmerged_parameter,
)
from .config import AdapterConfig
from .geometry import GEOMETRY
from .routing import AdapterNamesKeyword, detach

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# ----------------------------------------------------------------------------- method registry


@dataclass(frozen=True)
class MethodSpec:
    """A method's entry points: ``inject(model, config, record, *, adapter_dtype, **options)`` fills
    the record; optional ``to_disk(model, name, config) -> {file key: tensor}`` and
    ``from_disk(model, name, config, tensors) -> leftover tensors`` for tensors outside the
    per-layer key rule (prompt methods, VeRA's shared projections; a ``to_disk`` key may also
    replace a per-layer one, e.g. AdaLoRA's rank-pruned matrices); optional
    ``train_hook(model, name, config, total_steps) -> TrainHook or None`` for a method that acts
    during training (AdaLoRA's rank allocator: see :class:`TrainHook`)."""

    inject: Callable
    to_disk: Optional[Callable] = None
    from_disk: Optional[Callable] = None
    train_hook: Optional[Callable] = None


class TrainHook(Protocol):
    """What a method that acts during training gives the training loop (one object per training run
    and adapter, made by its ``MethodSpec.train_hook`` from the run's number of optimizer steps;
    :func:`train_hooks` collects them).

    Methods:
        loss_term(model) -> tensor or None: a term added to the loss of every optimizer step
            (AdaLoRA's orthogonality regulariser). The loop adds it to each micro-batch's loss
            weighted by that micro-batch's share of the window's target tokens, so the step's
            gradient gets it exactly once whatever the batch/accumulation split.
        after_step(model, step, total_steps): called after each optimizer step, before the
            gradients are cleared (``step``: 0-based index of the step just taken; ``total_steps``:
            the run's number of optimizer steps). AdaLoRA scores and prunes ranks here.
    """

    def loss_term(self, model: nn.Module) -> Optional[torch.Tensor]: ...

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None: ...


_METHODS: dict[type, MethodSpec] = {}


def register_method(config_cls: type, injector: Callable, *, to_disk: Optional[Callable] = None,
                    from_disk: Optional[Callable] = None, train_hook: Optional[Callable] = None) -> None:
    """Register a method for ``config_cls`` (and, through the class hierarchy, its subclasses)."""
    _METHODS[config_cls] = MethodSpec(injector, to_disk, from_disk, train_hook)


def method_for(config: AdapterConfig) -> MethodSpec:
    """The registered :class:`MethodSpec` of ``config``'s class (or of its nearest base class).

    Raises:
        TypeError: no method is registered for it.
    """
    for cls in type(config).__mro__:
        if cls in _METHODS:
            return _METHODS[cls]
    raise TypeError(f"no deltatune method is registered for {type(config).__name__}")


# ----------------------------------------------------------------------------- reading the state


def adapter_names(model: nn.Module) -> list[str]:
    """Names of every adapter on ``model``, in the order they were added."""
    st = get_state(model)
    return list(st.records) if st else []


def get_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    """The config of ``adapter_name``. Raises ``ValueError`` (no adapters) or ``KeyError`` (unknown name)."""
    return get_record(model, adapter_name).config


def active_adapters(model: nn.Module) -> list[str]:
    st = get_state(model)
    return list(st.active) if st else []


_MODULEDICT_PROBE = nn.ModuleDict()


def validate_adapter_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` can name an adapter.

    Allowed: letters, digits, ``_`` and ``-``, and not an attribute of ``nn.ModuleDict`` (such as
    "training" or "keys"), which torch refuses as a child name. The name never reaches a file key,
    so names like "lora" or "lora_A" are safe (PEFT issue #2252).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' or '-' (no dots or spaces)"
        )
    if name == BASE_ROW:
        raise ValueError(f"adapter name {name!r} is reserved: it names the base model in mixed batches; "
                         "pick another name")
    if hasattr(_MODULEDICT_PROBE, name):
        raise ValueError(
            f"adapter name {name!r} is reserved (an attribute of torch.nn.ModuleDict): pick another name"
        )


# ----------------------------------------------------------------------------- inject / remove


def inject(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
    *,
    adapter_dtype: Union[None, str, torch.dtype] = None,
    **options,
) -> nn.Module:
    """Add an adapter described by ``config`` to ``model`` in place and return the same object.

    The base model's parameters are frozen; the new adapter's parameters (and its
    ``modules_to_save`` copies) are trainable when it is active. The first adapter added becomes
    active; later ones are added inactive (select them with :func:`set_adapter`), as in PEFT.

    Args:
        model: any ``nn.Module`` (a transformers model or a plain module).
        config: a method config (``LoraConfig``, ``IA3Config``, ...).
        adapter_name: letters, digits, ``_`` and ``-``.
        adapter_dtype: dtype of the new adapter tensors. Default ``None``: float32 (inputs are cast
            to the adapter dtype at the adapter boundary and results cast back to the base
            output's dtype, so a bf16 base trains fp32 adapters without dtype errors). ``"base"``:
            the dtype of the host's weight.
        **options: method-specific options passed to the method's injector (e.g. ``tokenizer=`` for
            prompt tuning's TEXT init); a method that takes none raises ``TypeError``.

    Raises:
        ValueError: the name is invalid or taken, or the config matches no module (the message
            lists the nearest module names). On any error the model is left as it was (no
            adapter attached, ``requires_grad`` flags and base weights restored).
        TypeError: the config's method is unknown.
    """
    validate_adapter_name(adapter_name)
    st = get_state(model)
    if st is not None and adapter_name in st.records:
        raise ValueError(
            f"this model already has an adapter named {adapter_name!r}: pick another name or delete_adapter() it"
        )
    spec = method_for(config)
    first = st is None or not st.records
    st = get_state(model, create=True)
    grad_before = [(p, p.requires_grad) for p in model.parameters()] if first else []
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
        st.model_hooks["adapter_names"] = AdapterNamesKeyword(model)  # model(..., adapter_names=[...])
        for setup in GEOMETRY.on_first_adapter:
            setup(model, st)
    rec = st.records[adapter_name] = AdapterRecord(adapter_name, config)
    try:
        spec.inject(model, config, rec, adapter_dtype=adapter_dtype, **options)
    except BaseException:
        remove(model, adapter_name)  # leave nothing half-attached
        for p, g in grad_before:
            p.requires_grad_(g)
        raise
    if first:
        st.active = [adapter_name]
    sync_base_tensors(model)
    refresh_trainable(model)
    return model


def remove(model: nn.Module, adapter_name: str) -> None:
    """Take ``adapter_name`` off the model: its cleanups, its modules on every host, its claims on
    base tensors (restored when no one else claims them), its record. When it was the last adapter,
    the model-level hooks and the state go too. The adapter must not be merged (see
    :func:`deltatune.delete_adapter`, which unmerges first)."""
    st = get_state(model)
    rec = st.records.get(adapter_name) if st is not None else None
    if rec is None:
        return
    for fn in reversed(rec.cleanup):
        fn(model)
    for path in rec.hosts:
        detach(model.get_submodule(path) if path else model, adapter_name)
    st.active = [a for a in st.active if a != adapter_name]
    release_base_tensors(model, adapter_name)
    del st.records[adapter_name]
    if not st.records:
        for h in st.model_hooks.values():
            h.remove()
        st.model_hooks.clear()
        model.__dict__.pop(STATE_ATTR, None)
    else:
        sync_base_tensors(model)
        refresh_trainable(model)


# ----------------------------------------------------------------------------- what trains


def train_hooks(model: nn.Module, total_steps: int) -> list:
    """The :class:`TrainHook` of every adapter that trains (active, not loaded for inference) and
    whose method registered a ``train_hook``; a training loop calls this once per run of
    ``total_steps`` optimizer steps."""
    st = get_state(model)
    hooks = []
    for rec in (st.records.values() if st is not None else ()):
        make = method_for(rec.config).train_hook
        if make is not None and rec.trains(st):
            h = make(model, rec.name, rec.config, total_steps)
            if h is not None:
                hooks.append(h)
    return hooks


def refresh_trainable(model: nn.Module) -> None:
    """Apply the trainable rule to every adapter's parameters and to the base biases they train."""
    st = require_state(model)
    biases = set()
    for rec in st.records.values():
        train = rec.trains(st)
        for p in rec.parameters(model):
            p.requires_grad_(train)
        if train:
            biases.update(rec.bias_params)
    params = dict(model.named_parameters())
    for n in st.trained_biases | biases:
        if n in params:
            params[n].requires_grad_(n in biases)
    st.trained_biases = biases


def parameter_groups(model: nn.Module) -> tuple[list, list]:
    """(decay, no_decay): the trainable parameters split by their neutral value.

    Weight decay pulls a tensor towards 0, which is right only where 0 is the tensor's neutral
    value (LoRA A/B, bottleneck projections, prompt embeddings and encoders, LLaMA-Adapter prompts
    and gates). Magnitudes (DoRA), scaling vectors ((IA)3), learned scalings, ``modules_to_save``
    copies (neutral: the original module) and every bias never decay; each adapter module names its
    exceptions in ``no_decay``. A trainable base tensor outside any adapter (full fine-tuning)
    decays when it is a matrix (linear and embedding weights), never when it is a vector
    (normalisation scales, whose neutral value is 1, and biases).
    """
    st = get_state(model)
    no_decay, adapter = set(), set()
    for rec in (st.records.values() if st is not None else ()):
        for _, mod in rec.adapter_modules(model):
            own = dict(mod.named_parameters())
            adapter.update(id(p) for p in own.values())
            no_decay.update(id(own[n]) for n in mod.no_decay if n in own)
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (id(p) in no_decay or name == "bias" or name.endswith(".bias")
                or (id(p) not in adapter and p.dim() < 2)):
            keep.append(p)
        else:
            decay.append(p)
    return decay, keep


# ----------------------------------------------------------------------------- base tensors changed in place


def claim_base_tensor(model: nn.Module, rec: AdapterRecord, param_name: str) -> nn.Parameter:
    """Give ``rec``'s adapter its own values of base parameter ``param_name`` (a copy of the
    original), and make the parameter hold them until :func:`sync_base_tensors`; return the
    parameter, which the injector may now change in place (a PiSSA residual, a trained bias)."""
    st = get_state(model)
    slot = st.base_tensors.setdefault(param_name, BaseTensor())
    _set_owner(model, param_name, slot, None)
    p = unmerged_parameter(model, param_name)
    slot.stash[None] = p.data
    p.data = p.data.clone()
    slot.owner = rec.name
    if param_name not in rec.base_tensors:
        rec.base_tensors.append(param_name)
    return p


def _set_owner(model: nn.Module, param_name: str, slot: BaseTensor, owner: Optional[str]) -> bool:
    if slot.owner == owner:
        return False
    p = unmerged_parameter(model, param_name)
    slot.stash[slot.owner] = p.data
    p.data = slot.stash.pop(owner)
    slot.owner = owner
    return True


def check_base_conflicts(st: AdapterState, names: Iterable[str]) -> None:
    """Raise ``ValueError`` when two of ``names`` change the same base tensor (see module docstring)."""
    seen: dict = {}
    for n in names:
        rec = st.records.get(n)
        for t in (rec.base_tensors if rec is not None else ()):
            if t in seen and seen[t] != n:
                raise ValueError(
                    f"adapters {seen[t]!r} and {n!r} both change the base tensor {t!r} in place (trained biases, "
                    "PiSSA/OLoRA residual weights), so neither could compute what it computes alone: activate "
                    "one of them at a time")
            seen[t] = n


def sync_base_tensors(model: nn.Module) -> list[str]:
    """Make every claimed base parameter hold the values of its one acting claimant (else the
    original); return the names of the parameters whose values changed."""
    st = get_state(model)
    acting = [] if st is None or st.disabled else st.active
    changed = []
    for pname, slot in (st.base_tensors.items() if st is not None else ()):
        owner = next((n for n in acting if pname in st.records[n].base_tensors), None)
        if _set_owner(model, pname, slot, owner):
            changed.append(pname)
    return changed


def base_tensor_value(model: nn.Module, adapter_name: str, param_name: str) -> torch.Tensor:
    """``adapter_name``'s own values of a base tensor it claims (the parameter's, when it holds them)."""
    slot = get_state(model).base_tensors[param_name]
    if slot.owner == adapter_name:
        return unmerged_parameter(model, param_name).data
    return slot.stash[adapter_name]


def release_base_tensors(model: nn.Module, adapter_name: str, *, keep: bool = False) -> None:
    """Drop ``adapter_name``'s claims on base tensors; a tensor no one claims any more holds its
    original values again. ``keep=True`` (merge_and_unload): where the adapter's values are in the
    parameter, they stay there for good (the original is dropped)."""
    st = get_state(model)
    for pname in list(st.base_tensors):
        slot = st.base_tensors[pname]
        if slot.owner != adapter_name and adapter_name not in slot.stash:
            continue
        if slot.owner == adapter_name:
            if keep:
                slot.stash.pop(None, None)
                slot.owner = None
            else:
                _set_owner(model, pname, slot, None)
        slot.stash.pop(adapter_name, None)
        if slot.owner is None and not slot.stash:
            del st.base_tensors[pname]


# ----------------------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Total counts each tensor once (tied weights once);
    4-bit packed storage counts the weights it represents."""
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "quant_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``"trainable params: N || all params: M || trainable%: P"`` (PEFT's line)."""
    t, n = count_parameters(model)
    line = f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / max(n, 1):.4f}"
    print(line)
    return line
