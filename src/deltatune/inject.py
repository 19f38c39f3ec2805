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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

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


def _adapter_hook(host: nn.Module, args, output):
    st: AdapterState = host.__dict__.get(STATE_ATTR)
    if st is None or st.disabled or not st.active:
        return output
    ads = host._modules.get(ADAPTERS)
    if ads is None:
        return output
    x = args[0] if args else None
    for name in st.active:
        a = ads._modules.get(name)
        if a is None or getattr(a, "merged", False) or getattr(a, "replaces_host", False):
            continue
        output = a(x, output, host=host)
    return output


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
    host.__dict__[STATE_ATTR] = state
    if getattr(adapter, "replaces_host", False):
        if not isinstance(host.__dict__.get("forward"), types.MethodType):
            host.forward = types.MethodType(_replacing_forward, host)
    elif not any(h is _adapter_hook for h in host._forward_hooks.values()):
        host.register_forward_hook(_adapter_hook)


def detach(host: nn.Module, adapter_name: str) -> Optional[nn.Module]:
    """Remove one adapter from ``host``; remove the hook and ``adapters`` child when none remain."""
    ads = host._modules.get(ADAPTERS)
    if ads is None or adapter_name not in ads:
        return None
    mod = ads[adapter_name]
    del ads[adapter_name]
    if len(ads) == 0:
        del host._modules[ADAPTERS]
        for k in [k for k, h in host._forward_hooks.items() if h is _adapter_hook]:
            del host._forward_hooks[k]
        if isinstance(host.__dict__.get("forward"), types.MethodType):
            del host.__dict__["forward"]
        host.__dict__.pop(STATE_ATTR, None)
    return mod


# ----------------------------------------------------------------------------- public API


def validate_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' or '-' (no dots or spaces)"
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
            lists the nearest module names).
        TypeError: the config's method is unknown.
    """
    validate_adapter_name(adapter_name)
    st = get_state(model, create=True)
    if adapter_name in st.configs:
        raise ValueError(
            f"this model already has an adapter named {adapter_name!r}: pick another name or delete_adapter() it"
        )
    injector = _injector_for(config)
    first = not st.configs
    emb_fn = getattr(model, "get_input_embeddings", None)
    emb = emb_fn() if callable(emb_fn) else None
    if "vocab_at_inject" not in st.__dict__ and emb is not None and hasattr(emb, "num_embeddings"):
        st.__dict__["vocab_at_inject"] = emb.num_embeddings
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        injector(model, config, adapter_name, st, adapter_dtype=adapter_dtype, **options)
    except Exception:
        # leave nothing half-attached
        for _, host, aname, _ in list(iter_adapter_modules(model, adapter_name)):
            detach(host, aname)
        if not st.configs:
            model.__dict__.pop(STATE_ATTR, None)
        raise
    st.configs[adapter_name] = config
    if first:
        st.active = [adapter_name]
    _refresh_trainable(model)
    return model


def _refresh_trainable(model: nn.Module) -> None:
    st = _require_state(model)
    for _, _, aname, amod in iter_adapter_modules(model):
        cfg = st.configs.get(aname)
        train = aname in st.active and not (cfg is not None and cfg.inference_mode)
        for p in amod.parameters():
            p.requires_grad_(train)
    for fn in list(st.__dict__.get("_trainable_hooks", [])):
        fn(model, st)


def add_trainable_hook(state: AdapterState, fn: Callable) -> None:
    """Register ``fn(model, state)`` to run whenever trainability is recomputed (bias options...)."""
    state.__dict__.setdefault("_trainable_hooks", []).append(fn)


def set_adapter(model: nn.Module, adapter_name: Union[str, list]) -> None:
    """Make ``adapter_name`` (or a list of names, applied in order) the active adapter set.

    Active adapters apply in forward and are trainable; the others are frozen and skipped.

    Raises:
        KeyError: an unknown name (the message lists the model's adapters).
    """
    st = _require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for n in names:
        if n not in st.configs:
            raise KeyError(f"no adapter named {n!r}; this model has {list(st.configs)}")
    st.active = names
    _refresh_trainable(model)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Context manager: inside it the model computes exactly the base model's output.

    Adapter contributions are skipped, ``modules_to_save`` copies are bypassed (the original
    modules run), and merged adapters are unmerged on entry (restoring the exact base weights) and
    merged again on exit. The previous state is restored also when the block raises.
    """
    from .merge import merged_adapters, merge, unmerge

    st = _require_state(model)
    remerge = merged_adapters(model)
    if remerge:
        unmerge(model)
    prev = st.disabled
    st.disabled = True
    try:
        yield model
    finally:
        st.disabled = prev
        if remerge:
            merge(model, adapter_names=remerge)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter (its modules, hooks and config). Unmerges it first if merged.

    When the last adapter goes, the model is a plain base model again (its base parameters stay
    frozen; call ``requires_grad_(True)`` to train them).
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
    del st.configs[adapter_name]
    st.active = [a for a in st.active if a != adapter_name]
    if not st.configs:
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
