"""The one routing point: which adapters act on a call, and the host entry points that ask it.

:func:`acting` is the only place that decides which adapters act on a call: none while the
model's adapters are disabled; otherwise the active adapters, in active order, that the host
carries on the asked side and that are not merged into its weight. Three entry points per host
consult it, all installed by :func:`attach` and removed by :func:`detach`:

* the input-side forward pre-hook: each acting ``side == "input"`` adapter maps the host's first
  input, ``x = adapter(x, None, call)`` ((IA)3 feed-forward scaling, OFT's rotation; a bottleneck
  adapter's tap of the residual stream, which reads ``x`` and returns it unchanged);
* the output-side forward hook: each acting ``side == "output"`` adapter maps the host's output,
  ``out = adapter(x, out, call)`` (LoRA adds ``s B A x``, (IA)3 scales, bottleneck and
  LLaMA-Adapter add their terms);
* the replacing forward (``modules_to_save`` copies, ``side == "replace"``): the last acting copy
  runs instead of the host.

Model-level methods (prompt tuning) ask :func:`acting_names` through their own top-model wiring.
"""

from __future__ import annotations

import copy
import types
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .adapters import STATE_ATTR, AdapterState, HostCall, get_state
from .targets import ADAPTERS, is_adapter_path, nearest_names

SIDES = ("input", "output", "replace")


def acting_names(st: Optional[AdapterState]) -> list:
    """The adapters that act on a call, in application order: none while disabled, else the active ones."""
    if st is None or st.disabled:
        return []
    return st.active


def acting(host: nn.Module, side: str) -> list:
    """THE routing decision for one host and side: ``[(name, adapter)]`` in application order.

    An adapter acts when :func:`acting_names` lists it (not disabled, active, in active order), the
    host carries it on ``side`` and it is not merged into the host's weight.
    """
    ads = host._modules.get(ADAPTERS)
    if ads is None:
        return []
    out = []
    for name in acting_names(host.__dict__.get(STATE_ATTR)):
        a = ads._modules.get(name)
        if a is not None and a.side == side and not a.merged:
            out.append((name, a))
    return out


def _first_input(args, kwargs) -> tuple[Optional[torch.Tensor], object]:
    """The host's first tensor input and where it came from (an index into args, or a kwarg name)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], "hidden_states"
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return v, k
    return None, None


def _input_hook(host: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a host: ``x = adapter(x, None, call)`` for each acting input-side adapter."""
    run = acting(host, "input")
    if not run:
        return None
    x, where = _first_input(args, kwargs)
    if x is None:
        return None
    call = HostCall(host, args, kwargs, x)
    for _, a in run:
        x = a(x, None, call)
    if where == 0:
        return (x,) + tuple(args[1:]), kwargs
    return args, {**kwargs, where: x}


def _output_hook(host: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of a host: ``out = adapter(x, out, call)`` for each acting output-side adapter.

    Without autograd (inference), when no other hook can have seen the host's output (ours is the
    host's first forward hook, there are no global ones, and no acting adapter reads the base
    output), adapters with ``supports_inplace`` are told they may add into ``out`` in place:
    this saves a full copy of the output per layer.
    """
    run = acting(host, "output")
    if not run:
        return output
    x, _ = _first_input(args, kwargs)
    no_one_else_holds = (not torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                         and not _global_forward_hooks
                         and not any(a.uses_base_output for _, a in run)
                         and next(iter(host._forward_hooks.values())) is _output_hook)
    call = HostCall(host, args, kwargs, x, base_output=output)
    for _, a in run:
        call.inplace = no_one_else_holds and a.supports_inplace
        output = a(x, output, call)
        no_one_else_holds = call.inplace  # a new tensor from a non-in-place adapter is not assumed ours
    return output


def _replacing_forward(host: nn.Module, *args, **kwargs):
    """Forward of a host with ``modules_to_save`` copies: the last acting copy runs instead of the host."""
    run = acting(host, "replace")
    if run:
        return run[-1][1](*args, **kwargs)
    return type(host).forward(host, *args, **kwargs)


def _has_hook(hooks: dict, fn) -> bool:
    return any(h is fn for h in hooks.values())


def _remove_hook(host: nn.Module, fn) -> None:
    for hooks, extras in ((host._forward_hooks, (host._forward_hooks_with_kwargs, host._forward_hooks_always_called)),
                          (host._forward_pre_hooks, (host._forward_pre_hooks_with_kwargs,))):
        for k in [k for k, h in hooks.items() if h is fn]:
            del hooks[k]
            for d in extras:
                d.pop(k, None)


def attach(model: nn.Module, path: str, adapter_name: str, adapter: nn.Module) -> None:
    """Attach ``adapter`` to the module at ``path`` under ``adapter_name`` and record the host.

    Installs the host's routing entry point for the adapter's side once (input pre-hook, output
    hook, or the replacing forward). The adapter follows the host's train/eval mode.

    Raises:
        ValueError: the host already carries an adapter of that name; an unknown side.
    """
    if adapter.side not in SIDES:
        raise ValueError(f"adapter side must be one of {SIDES}, got {adapter.side!r}")
    st = get_state(model)
    host = model.get_submodule(path) if path else model
    if ADAPTERS not in host._modules:
        host.add_module(ADAPTERS, nn.ModuleDict())
    if adapter_name in host._modules[ADAPTERS]:
        raise ValueError(f"module {path!r} already has an adapter named {adapter_name!r}")
    host._modules[ADAPTERS][adapter_name] = adapter
    adapter.train(host.training)  # a new module starts in train mode; follow the host (eval => no dropout)
    host.__dict__[STATE_ATTR] = st
    rec = st.records[adapter_name]
    if path not in rec.hosts:
        rec.hosts.append(path)
    if adapter.side == "replace":
        if not isinstance(host.__dict__.get("forward"), types.MethodType):
            host.forward = types.MethodType(_replacing_forward, host)
    elif adapter.side == "input":
        if not _has_hook(host._forward_pre_hooks, _input_hook):
            host.register_forward_pre_hook(_input_hook, with_kwargs=True)
    elif not _has_hook(host._forward_hooks, _output_hook):
        host.register_forward_hook(_output_hook, with_kwargs=True)


def detach(host: nn.Module, adapter_name: str) -> Optional[nn.Module]:
    """Remove one adapter from ``host``; drop each routing entry point no remaining adapter needs,
    and the ``adapters`` child and state mark when none remains."""
    ads = host._modules.get(ADAPTERS)
    if ads is None or adapter_name not in ads._modules:
        return None
    mod = ads._modules.pop(adapter_name)
    sides = {a.side for a in ads._modules.values()}
    if "input" not in sides:
        _remove_hook(host, _input_hook)
    if "output" not in sides:
        _remove_hook(host, _output_hook)
    if "replace" not in sides and isinstance(host.__dict__.get("forward"), types.MethodType):
        del host.__dict__["forward"]
    if not ads._modules:
        del host._modules[ADAPTERS]
        host.__dict__.pop(STATE_ATTR, None)
    return mod


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module that carries adapters, in model order."""
    for name, mod in model.named_modules():
        ad = mod._modules.get(ADAPTERS)
        if isinstance(ad, nn.ModuleDict) and name.split(".")[-1] != ADAPTERS:
            yield name, mod


def iter_adapter_modules(model: nn.Module, adapter_name: Optional[str] = None):
    """(host path, host, adapter name, adapter module) of every attached adapter, in model order."""
    for hname, host in iter_hosts(model):
        for aname, amod in host._modules[ADAPTERS]._modules.items():
            if adapter_name is None or aname == adapter_name:
                yield hname, host, aname, amod


def make_module_copy(host: nn.Module) -> nn.Module:
    """A trainable deep copy of ``host`` for ``modules_to_save`` (``side == "replace"``), without
    deltatune's additions. The copy carries no hooks: the host's own hooks keep running around it."""
    ads = host._modules.pop(ADAPTERS, None)
    saved = {k: host.__dict__.pop(k) for k in list(host.__dict__) if k == "forward" or k.startswith("_deltatune")}
    try:
        c = copy.deepcopy(host)
    finally:
        if ads is not None:
            host._modules[ADAPTERS] = ads
        host.__dict__.update(saved)
    for d in (c._forward_hooks, c._forward_pre_hooks, c._forward_hooks_with_kwargs,
              c._forward_hooks_always_called, c._forward_pre_hooks_with_kwargs):
        d.clear()
    for p in c.parameters():
        p.requires_grad_(True)
    c.side, c.merged, c.merge_error = "replace", False, None
    c.uses_base_output = c.supports_inplace = False
    c.composes = "other"
    c.no_decay = tuple(n for n, _ in c.named_parameters())  # a copy's neutral value is the original, not 0
    return c


def attach_modules_to_save(model: nn.Module, config, adapter_name: str) -> list[str]:
    """Attach trainable copies of the modules named by ``config.modules_to_save``; return their paths.

    Hugging Face PEFT's rule (``peft.utils.other._set_trainable``): a plain string suffix match, so
    "norm" also takes every "input_layernorm"; kept so that files interoperate.

    Raises:
        ValueError: an entry matches no module (the message lists the nearest module names).
    """
    mts = config.modules_to_save or []
    names = []
    for name, mod in list(model.named_modules()):
        if name and any(name.endswith(m) for m in mts) and not is_adapter_path(name):
            attach(model, name, adapter_name, make_module_copy(mod))
            names.append(name)
    missing = [m for m in mts if not any(n.endswith(m) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing!r} match no module of the model; nearest module "
                         f"names: {', '.join(nearest_names(missing, [n for n, _ in model.named_modules() if n])) or '(none)'}")
    return names

