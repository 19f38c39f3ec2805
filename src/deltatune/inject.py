"""Attach adapters to a model, and manage them: active set, disable, delete, trainable report.

One mechanism serves every layer method. A targeted module (the *host*) keeps its own class, its
own parameters and their names; it gains a child ``adapters`` (an ``nn.ModuleDict`` keyed by adapter
name) and one forward hook that lets each active adapter change the host's output::

    out = host(x)                       # the untouched base computation
    for name in active adapters:        # LoRA adds scale * B(A(dropout(x))), IA3 scales, ...
        out = host.adapters[name](x, out, host=host)

So ``q_proj.weight`` stays ``q_proj.weight`` (a base checkpoint still loads into an adapted model)
and the adapter lives at ``q_proj.adapters.default.lora_A.weight``. ``modules_to_save`` copies are
stored the same way (``lm_head.adapters.default.weight``) and replace the host's computation while
their adapter is active.

Model-wide state (configs, the active set, the disabled flag) is one :class:`AdapterState` held as
``model._deltatune_state`` and shared by reference with every host.

:func:`inject` returns the same model object: there is no wrapper model.
"""

from __future__ import annotations

import contextlib
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .config import AdapterConfig

STATE_ATTR = "_deltatune_state"
ADAPTERS = "adapters"
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class AdapterState:
    """Model-wide adapter bookkeeping (one object per adapted model)."""

    configs: dict = field(default_factory=dict)  # name -> AdapterConfig
    active: list = field(default_factory=list)  # names, in application order
    disabled: bool = False


# ----------------------------------------------------------------------------- method registry

_METHODS: dict[type, Callable] = {}


def register_method(config_cls: type, injector: Callable) -> None:
    """Register ``injector(model, config, adapter_name, state, **options)`` for ``config_cls``."""
    _METHODS[config_cls] = injector


def _injector_for(config: AdapterConfig) -> Callable:
    from . import methods  # noqa: F401  (registers the built-in methods)

    for cls in type(config).__mro__:
        if cls in _METHODS:
            return _METHODS[cls]
    raise TypeError(f"no deltatune method is registered for {type(config).__name__}")


# ----------------------------------------------------------------------------- state access


def get_state(model: nn.Module, create: bool = False) -> Optional[AdapterState]:
    st = model.__dict__.get(STATE_ATTR)
    if st is None and create:
        st = AdapterState()
        model.__dict__[STATE_ATTR] = st
    return st


def _require_state(model: nn.Module) -> AdapterState:
    st = get_state(model)
    if st is None or not st.configs:
        raise ValueError("this model has no deltatune adapters: call deltatune.inject(model, config) first")
    return st


def adapter_names(model: nn.Module) -> list[str]:
    """Names of every adapter on ``model``, in the order they were added."""
    st = get_state(model)
    return list(st.configs) if st else []


def get_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    st = _require_state(model)
    if adapter_name not in st.configs:
        raise KeyError(f"no adapter named {adapter_name!r}; this model has {list(st.configs)}")
    return st.configs[adapter_name]


def active_adapters(model: nn.Module) -> list[str]:
    st = get_state(model)
    return list(st.active) if st else []


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that hosts adapters."""
    for name, mod in model.named_modules():
        ad = mod._modules.get(ADAPTERS)
        if isinstance(ad, nn.ModuleDict) and name.split(".")[-1] != ADAPTERS:
            yield name, mod


def iter_adapter_modules(model: nn.Module, adapter_name: Optional[str] = None):
    """(host name, host, adapter name, adapter module) for every attached layer adapter."""
    for hname, host in iter_hosts(model):
        for aname, amod in host.adapters.items():
            if adapter_name is None or aname == adapter_name:
                yield hname, host, aname, amod


# ----------------------------------------------------------------------------- hooks


def _adapter_hook(host: nn.Module, args, kwargs, output):
    """The one forward hook of a host: ``out = adapter(x, out, host=host)`` per active adapter.

    ``x`` is the host's first positional input, or its first keyword input when it was called
    with keywords only. An adapter whose attribute ``uses_base_output`` is true (DoRA) also gets
    ``base_output=``, the host's own output before any adapter changed it.

    Without autograd (inference), when no other hook can have seen the host's output (ours is the
    first forward hook, there are no global ones, and no active adapter here needs the base
    output), adapters with ``supports_inplace`` are called with ``inplace=True`` and may add into
    ``out`` in place: this saves a full copy of the output per layer.
    """
    st: AdapterState = host.__dict__.get(STATE_ATTR)
    if st is None or st.disabled or not st.active:
        return output
    ads = host._modules.get(ADAPTERS)
    if ads is None:
        return output
    x = args[0] if args else next(iter(kwargs.values()), None)
    run = []
    owned = not torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not _global_forward_hooks
    for name in st.active:
        a = ads._modules.get(name)
        if a is None or getattr(a, "merged", False) or getattr(a, "replaces_host", False):
            continue
        run.append(a)
        owned = owned and not getattr(a, "uses_base_output", False)
    if owned:
        owned = next(iter(host._forward_hooks.values())) is _adapter_hook
    base = output
    for a in run:
        if owned and getattr(a, "supports_inplace", False):
            output = a(x, output, host=host, inplace=True)
        elif getattr(a, "uses_base_output", False):
            output = a(x, output, host=host, base_output=base)
            owned = False
        else:
            output = a(x, output, host=host)
            owned = False
    return output


def _has_adapter_hook(host: nn.Module) -> bool:
    return any(h is _adapter_hook for h in host._forward_hooks.values())


def _remove_adapter_hook(host: nn.Module) -> None:
    for k in [k for k, h in host._forward_hooks.items() if h is _adapter_hook]:
        del host._forward_hooks[k]
        host._forward_hooks_with_kwargs.pop(k, None)
        host._forward_hooks_always_called.pop(k, None)


def _replacing_forward(host: nn.Module, *args, **kwargs):
    """Forward of a host with ``modules_to_save`` copies: the active copy runs instead of the host."""
    st: AdapterState = host.__dict__.get(STATE_ATTR)
    if st is not None and not st.disabled:
        ads = host._modules.get(ADAPTERS)
        for name in reversed(st.active):
            a = ads._modules.get(name) if ads is not None else None
            if a is not None and getattr(a, "replaces_host", False):
                return a(*args, **kwargs)
    return type(host).forward(host, *args, **kwargs)


def attach(host: nn.Module, adapter_name: str, adapter: nn.Module, state: AdapterState) -> None:
    """Attach ``adapter`` to ``host`` under ``adapter_name`` and install the host's hook once.

    An adapter whose attribute ``replaces_host`` is true (``modules_to_save`` copies) runs instead
    of the host's own forward while active; every other adapter is called as
    ``adapter(x, out, host=host) -> new out`` after the host's forward.
    """
    if ADAPTERS not in host._modules:
        host.add_module(ADAPTERS, nn.ModuleDict())
    if adapter_name in host.adapters:
        raise ValueError(f"module already has an adapter named {adapter_name!r}")
    host.adapters[adapter_name] = adapter
    adapter.train(host.training)  # a new module starts in train mode; follow the host (eval => no dropout)
    host.__dict__[STATE_ATTR] = state
    if getattr(adapter, "replaces_host", False):
        if not isinstance(host.__dict__.get("forward"), types.MethodType):
            host.forward = types.MethodType(_replacing_forward, host)
    elif not _has_adapter_hook(host):
        host.register_forward_hook(_adapter_hook, with_kwargs=True)


def detach(host: nn.Module, adapter_name: str) -> Optional[nn.Module]:
    """Remove one adapter from ``host``; remove the hook and ``adapters`` child when none remain."""
    ads = host._modules.get(ADAPTERS)
    if ads is None or adapter_name not in ads:
        return None
    mod = ads[adapter_name]
    del ads[adapter_name]
    if len(ads) == 0:
        del host._modules[ADAPTERS]
        _remove_adapter_hook(host)
        if isinstance(host.__dict__.get("forward"), types.MethodType):
            del host.__dict__["forward"]
        host.__dict__.pop(STATE_ATTR, None)
    return mod


# ----------------------------------------------------------------------------- public API


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
    if hasattr(_MODULEDICT_PROBE, name):
        raise ValueError(
            f"adapter name {name!r} is reserved (an attribute of torch.nn.ModuleDict): pick another name"
        )


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
    st = get_state(model, create=True)
    if adapter_name in st.configs:
        raise ValueError(
            f"this model already has an adapter named {adapter_name!r}: pick another name or delete_adapter() it"
        )
    try:
        injector = _injector_for(config)
    except Exception:
        if not st.configs:
            model.__dict__.pop(STATE_ATTR, None)
        raise
    first = not st.configs
    emb_fn = getattr(model, "get_input_embeddings", None)
    emb = emb_fn() if callable(emb_fn) else None
    if "vocab_at_inject" not in st.__dict__ and emb is not None and hasattr(emb, "num_embeddings"):
        st.__dict__["vocab_at_inject"] = emb.num_embeddings
    grad_before = [(p, p.requires_grad) for p in model.parameters()] if first else []
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    n_hooks = len(st.__dict__.get("_trainable_hooks", []))
    try:
        injector(model, config, adapter_name, st, adapter_dtype=adapter_dtype, **options)
    except Exception:
        # leave nothing half-attached
        cleanup = st.__dict__.get("_delete_hooks", {}).pop(adapter_name, None)
        if cleanup is not None:
            cleanup(model)
        for _, host, aname, _ in list(iter_adapter_modules(model, adapter_name)):
            detach(host, aname)
        _forget_adapter(model, st, adapter_name, n_hooks)
        for p, g in grad_before:
            p.requires_grad_(g)
        if not st.configs:
            model.__dict__.pop(STATE_ATTR, None)
        raise
    st.configs[adapter_name] = config
    if first:
        st.active = [adapter_name]
        _install_checkpointing_input_hook(model, st, emb)
    _refresh_trainable(model)
    return model


def _gradient_checkpointing_on(model: nn.Module) -> bool:
    # transformers >= 5 names the flag is_activation_checkpointing (the old name warns); plain
    # modules: any submodule with gradient_checkpointing = True (transformers' own convention)
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if getattr(type(model), attr, None) is not None:
            flag = getattr(model, attr)
            if isinstance(flag, bool):
                return flag
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _install_checkpointing_input_hook(model: nn.Module, st: AdapterState, emb: Optional[nn.Module]) -> None:
    """Make the input-embedding output require grad while gradient checkpointing is on (case C10).

    Reentrant checkpointing rebuilds a block's graph only when one of the block's inputs requires
    grad. With the whole base frozen none does, the loss gets no ``grad_fn`` and the adapters inside
    the checkpointed blocks get no gradient. transformers >= 5 hooks the embeddings itself when
    checkpointing is enabled, earlier releases and other models do not, so deltatune does it for
    every adapted model, in either order (checkpointing enabled before or after :func:`inject`).
    The hook costs nothing without checkpointing and never makes a parameter trainable; it is
    removed with the last adapter.
    """
    import weakref

    if emb is None or "_ckpt_hook" in st.__dict__:
        return
    ref = weakref.ref(model)

    def hook(module, args, output):
        m = ref()
        if (m is not None and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.is_floating_point() and not output.requires_grad and _gradient_checkpointing_on(m)):
            output.requires_grad_(True)
        return output

    st.__dict__["_ckpt_hook"] = emb.register_forward_hook(hook)


def _forget_adapter(model: nn.Module, st: AdapterState, adapter_name: str, keep_hooks: Optional[int] = None) -> None:
    """Drop the model-wide bookkeeping of one adapter and restore the base tensors it changed."""
    owned = st.__dict__.get("_trainable_hook_owner", {}).pop(adapter_name, [])
    hooks = st.__dict__.get("_trainable_hooks", [])
    if keep_hooks is not None:
        del hooks[keep_hooks:]
    hooks[:] = [h for h in hooks if not any(h is o for o in owned)]
    st.__dict__.get("_hosts", {}).pop(adapter_name, None)
    release_base_parameters(model, st, adapter_name)


def _refresh_trainable(model: nn.Module) -> None:
    st = _require_state(model)
    for _, _, aname, amod in iter_adapter_modules(model):
        cfg = st.configs.get(aname)
        train = aname in st.active and not (cfg is not None and cfg.inference_mode)
        for p in amod.parameters():
            p.requires_grad_(train)
    for fn in list(st.__dict__.get("_trainable_hooks", [])):
        fn(model, st)


def add_trainable_hook(state: AdapterState, fn: Callable, adapter_name: Optional[str] = None) -> None:
    """Register ``fn(model, state)`` to run whenever trainability is recomputed (bias options...).

    With ``adapter_name``, the hook is removed when that adapter is deleted.
    """
    state.__dict__.setdefault("_trainable_hooks", []).append(fn)
    if adapter_name is not None:
        state.__dict__.setdefault("_trainable_hook_owner", {}).setdefault(adapter_name, []).append(fn)


# ----------------------------------------------------------------------------- base tensors changed in place


def keep_base_parameter(model: nn.Module, state: AdapterState, param_name: str, adapter_name: str) -> None:
    """Record base parameter ``param_name`` before ``adapter_name`` changes it in place.

    For adapters that train or rewrite base tensors (LoRA's ``bias="all"/"lora_only"``, the
    residual weights of PiSSA/OLoRA init). With the original kept (one copy per tensor):
    :func:`disable_adapter` computes exactly the base model, and deleting the last adapter that
    changed the tensor restores it (:func:`merge_and_unload` keeps the changed values instead).
    """
    snaps = state.__dict__.setdefault("_base_snapshots", {})
    if param_name in snaps:
        snaps[param_name][1].add(adapter_name)
        return
    p = model.get_parameter(param_name)
    snaps[param_name] = [p.detach().clone(), {adapter_name}]


def release_base_parameters(model: nn.Module, state: AdapterState, adapter_name: str, *, restore: bool = True) -> None:
    """Forget ``adapter_name``'s claims on kept base tensors; restore those no adapter claims now.

    ``restore=False`` (merge_and_unload) keeps the changed values in the model instead.
    """
    snaps = state.__dict__.get("_base_snapshots", {})
    for name in list(snaps):
        owners = snaps[name][1]
        if adapter_name not in owners:
            continue
        owners.discard(adapter_name)
        if not restore:
            del snaps[name]
        elif not owners:
            with torch.no_grad():
                model.get_parameter(name).copy_(snaps.pop(name)[0])


def _swap_base_parameters(model: nn.Module, state: AdapterState) -> None:
    """Exchange the kept originals with the current values (twice = no change)."""
    for name, entry in state.__dict__.get("_base_snapshots", {}).items():
        p = model.get_parameter(name)
        cur = p.data
        p.data = entry[0]
        entry[0] = cur


def set_adapter(model: nn.Module, adapter_name: Union[str, list]) -> None:
    """Make ``adapter_name`` (or a list of names, applied in order) the active adapter set.

    Active adapters apply in forward and are trainable; the others are frozen and skipped.
    Merged adapters that are not in the new set are unmerged first (with a warning), so the model
    computes exactly what the new set says.

    Raises:
        KeyError: an unknown name (the message lists the model's adapters).
        ValueError: a name given twice.
    """
    from .merge import merged_adapters, unmerge

    st = _require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for n in names:
        if n not in st.configs:
            raise KeyError(f"no adapter named {n!r}; this model has {list(st.configs)}")
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapter: {names} names an adapter twice; each adapter applies once")
    leaving = [n for n in merged_adapters(model) if n not in names]
    if leaving:
        warnings.warn(f"set_adapter: unmerging {leaving}, which are merged but no longer active", stacklevel=2)
        unmerge(model, adapter_names=leaving)
    st.active = names
    _refresh_trainable(model)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Context manager: inside it the model computes exactly the base model's output.

    Adapter contributions are skipped, ``modules_to_save`` copies are bypassed (the original
    modules run), base tensors an adapter changed in place (trained biases, PiSSA/OLoRA residual
    weights) hold their original values, and merged adapters are unmerged on entry (restoring the
    exact base weights) and merged again on exit. The previous state is restored also when the
    block raises.
    """
    from .merge import merged_adapters, merge, unmerge

    st = _require_state(model)
    remerge = merged_adapters(model)
    if remerge:
        unmerge(model)
    prev = st.disabled
    st.disabled = True
    if not prev:
        _swap_base_parameters(model, st)
    try:
        yield model
    finally:
        if not prev:
            _swap_base_parameters(model, st)
        st.disabled = prev
        if remerge:
            merge(model, adapter_names=remerge)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter (its modules, hooks and config). Unmerges it first if merged.

    Base tensors it changed in place (trained biases, PiSSA/OLoRA residuals) get their original
    values back unless another adapter still changes them. When the last adapter goes, the model
    is a plain base model again (its base parameters stay frozen; call ``requires_grad_(True)`` to
    train them).

    Raises:
        KeyError: no adapter of that name.
    """
    from .merge import merged_adapters, unmerge

    st = _require_state(model)
    if adapter_name not in st.configs:
        raise KeyError(f"no adapter named {adapter_name!r}; this model has {list(st.configs)}")
    if adapter_name in merged_adapters(model):
        unmerge(model, adapter_names=[adapter_name])
    cleanup = st.__dict__.get("_delete_hooks", {}).pop(adapter_name, None)
    if cleanup is not None:
        cleanup(model)
    for _, host, aname, _ in list(iter_adapter_modules(model, adapter_name)):
        detach(host, aname)
    _forget_adapter(model, st, adapter_name)
    del st.configs[adapter_name]
    st.active = [a for a in st.active if a != adapter_name]
    if not st.configs:
        handle = st.__dict__.pop("_ckpt_hook", None)
        if handle is not None:
            handle.remove()
        model.__dict__.pop(STATE_ATTR, None)
    else:
        _refresh_trainable(model)


def add_delete_hook(state: AdapterState, adapter_name: str, fn: Callable) -> None:
    """Register ``fn(model)`` to run when ``adapter_name`` is deleted (model-level methods)."""
    state.__dict__.setdefault("_delete_hooks", {})[adapter_name] = fn

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Total counts each tensor once (tied weights once)."""
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # 4-bit packed storage counts the parameters it represents
        n = getattr(p, "quant_numel", None) or n
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
