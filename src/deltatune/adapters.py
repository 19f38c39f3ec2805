"""The adapter bookkeeping of a model, and the one routing point through which every adapter acts.

Declared state. Everything deltatune knows about a model's adapters lives in one
:class:`AdapterState` (``model._deltatune_state``): one :class:`AdapterRecord` per adapter (its
config, the modules that carry it, the base tensors it holds its own values of, its cleanup), the
active order, the disabled flag, the per-tensor :class:`BaseTensor` slots and the model-level hooks.
Nothing else is attached to the state.

Hosts. A targeted module (the *host*) keeps its own class, parameters and names; it gains a child
``adapters`` (``nn.ModuleDict`` keyed by adapter name) holding one :class:`LayerAdapter` per
adapter, so ``q_proj.weight`` stays ``q_proj.weight`` and the adapter's tensors sit at
``q_proj.adapters.<name>.<leaf>``.

Routing. :func:`acting` is the only place that decides which adapters act on a call: none while
the model's adapters are disabled; otherwise the active adapters, in active order, that the host
carries on the asked side and that are not merged into its weight. Three entry points per host
consult it, all installed by :func:`attach` and removed by :func:`detach`:

* the input-side forward pre-hook: each acting ``side == "input"`` adapter maps the host's first
  input, ``x = adapter(x, None, call)`` ((IA)3 feed-forward scaling; a bottleneck adapter's tap of
  the residual stream, which reads ``x`` and returns it unchanged);
* the output-side forward hook: each acting ``side == "output"`` adapter maps the host's output,
  ``out = adapter(x, out, call)`` (LoRA adds ``s B A x``, (IA)3 scales, bottleneck and
  LLaMA-Adapter add their terms);
* the replacing forward (``modules_to_save`` copies, ``side == "replace"``): the last acting copy
  runs instead of the host.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .config import AdapterConfig
from .targets import ADAPTERS, is_adapter_path, nearest_names

STATE_ATTR = "_deltatune_state"
MERGE_ATTR = "_deltatune_merge"  # on a host with merged adapters: its MergeBackup
SIDES = ("input", "output", "replace")


# ----------------------------------------------------------------------------- the adapter contract


@runtime_checkable
class LayerAdapter(Protocol):
    """What an adapter attached to a host provides (LoRA, (IA)3, bottleneck, LLaMA-Adapter, taps).

    Attributes:
        side: ``"output"`` (called after the host: ``adapter(x, out, call) -> new out``) or
            ``"input"`` (called before it: ``adapter(x, None, call) -> new x``). ``x`` is the host's
            first tensor input, ``out`` its output (a tensor, or a tuple for attention modules).
        merged: True while the adapter is folded into the host's weight (the hooks skip it).
        merge_error: None when the adapter can be merged, else the sentence saying why not.
        uses_base_output: the adapter reads ``call.base_output`` (the host's own output before any
            adapter changed it), e.g. DoRA.
        supports_inplace: the adapter may add into ``out`` in place when ``call.inplace`` is True.
        composes: how it changes ``out``: ``"add"`` (adds a term that does not depend on ``out``:
            LoRA, DoRA), ``"scale"`` (multiplies ``out`` per channel: (IA)3) or ``"other"``. Two
            adapters of the same ``"add"``/``"scale"`` kind commute; this decides which partial
            merges a host can represent (:mod:`deltatune.merge`).
        no_decay: names of its parameters whose neutral value is not 0 (DoRA magnitudes, (IA)3
            vectors, learned scalings): weight decay never applies to them (biases never decay).

    Methods:
        merge_into(host, w) -> w': the merged weight for the float32 canonical weight ``w``
            (out, in[, *k]) of the host; raises ``ValueError(merge_error)`` when not mergeable.
        merge_bias(host, b) -> b': the merged float32 bias (``b`` when the adapter leaves it).
    """

    side: str
    merged: bool
    merge_error: Optional[str]
    uses_base_output: bool
    supports_inplace: bool
    composes: str
    no_decay: tuple

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor: ...

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor: ...


class HostCall:
    """What the routing hooks hand an adapter about the host's current call.

    ``host``; ``args`` / ``kwargs`` of the call (as the host sees them); ``x``: its first tensor
    input; ``base_output``: the host's output before any adapter (output side only); ``inplace``:
    the adapter may write into ``out`` (no one else holds it: inference only).
    """

    __slots__ = ("host", "args", "kwargs", "x", "base_output", "inplace")

    def __init__(self, host, args, kwargs, x, base_output=None, inplace=False):
        self.host, self.args, self.kwargs, self.x = host, args, kwargs, x
        self.base_output, self.inplace = base_output, inplace


# ----------------------------------------------------------------------------- declared state


@dataclass
class BaseTensor:
    """A base parameter that some adapters hold their own values of (trained biases, PiSSA/OLoRA
    residual weights). The parameter holds the values of ``owner`` (None: the original);
    ``stash`` holds everyone else's (key None: the original)."""

    owner: Optional[str] = None
    stash: dict = field(default_factory=dict)


@dataclass
class AdapterRecord:
    """Everything one adapter consists of, filled by its method's injector.

    Fields:
        name, config: the adapter's name and config.
        hosts: paths of the modules that carry a piece of it in their ``adapters`` child (layer
            adapters, taps, ``modules_to_save`` copies), in model order.
        modules: paths of its modules that hang elsewhere (a prompt module in
            ``model.prompt_adapters``).
        bias_params: base biases it trains and saves (LoRA's ``bias`` option).
        base_tensors: base parameters it holds its own values of (see :class:`BaseTensor`).
        carries_embeddings: embedding modules whose full weights its file carried (saved again).
        cleanup: ``fn(model)`` run when the adapter is removed, before its modules are detached.
    """

    name: str
    config: AdapterConfig
    hosts: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    bias_params: list = field(default_factory=list)
    base_tensors: list = field(default_factory=list)
    carries_embeddings: list = field(default_factory=list)
    cleanup: list = field(default_factory=list)

    def trains(self, state: "AdapterState") -> bool:
        """The trainable rule: an adapter trains while it is active and not loaded for inference."""
        return self.name in state.active and not self.config.inference_mode

    def adapter_modules(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of every module of this adapter."""
        for h in self.hosts:
            ads = model.get_submodule(h)._modules.get(ADAPTERS)
            if ads is not None and self.name in ads._modules:
                yield f"{h}.{ADAPTERS}.{self.name}" if h else f"{ADAPTERS}.{self.name}", ads._modules[self.name]
        for p in self.modules:
            yield p, model.get_submodule(p)

    def parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        seen = set()
        for _, m in self.adapter_modules(model):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


@dataclass
class AdapterState:
    """Model-wide adapter bookkeeping (one object per adapted model, ``model._deltatune_state``).

    Fields: ``records`` (name -> :class:`AdapterRecord`, in the order added), ``active`` (names, in
    application order), ``disabled``, ``base_tensors`` (parameter name -> :class:`BaseTensor`),
    ``model_hooks`` (name -> object with ``remove()``: hooks on the top model, e.g. the prompt
    wiring and the gradient-checkpointing input hook), ``vocab_at_inject`` (input-embedding rows
    when the first adapter was added), ``trained_biases`` (base biases made trainable by the last
    trainability update).
    """

    records: dict = field(default_factory=dict)
    active: list = field(default_factory=list)
    disabled: bool = False
    base_tensors: dict = field(default_factory=dict)
    model_hooks: dict = field(default_factory=dict)
    vocab_at_inject: Optional[int] = None
    trained_biases: set = field(default_factory=set)

    @property
    def configs(self) -> dict:
        """name -> config of every adapter (a new dict; change configs through the records)."""
        return {n: r.config for n, r in self.records.items()}


@dataclass
class MergeBackup:
    """What :mod:`deltatune.merge` set aside on a host while adapters are merged into it: the
    original weight and bias objects and the host's class (4-bit kinds become dense on write)."""

    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    cls: Optional[type] = None


def get_state(model: nn.Module, create: bool = False) -> Optional[AdapterState]:
    st = model.__dict__.get(STATE_ATTR)
    if st is None and create:
        st = AdapterState()
        model.__dict__[STATE_ATTR] = st
    return st


def require_state(model: nn.Module) -> AdapterState:
    """The model's state. Raises ``ValueError`` when the model has no adapters."""
    st = get_state(model)
    if st is None or not st.records:
        raise ValueError("this model has no deltatune adapters: call deltatune.inject(model, config) first")
    return st


def get_record(model: nn.Module, adapter_name: str = "default") -> AdapterRecord:
    """The :class:`AdapterRecord` of ``adapter_name``.

    Raises:
        ValueError: the model has no adapters. KeyError: no adapter of that name (lists them).
    """
    st = require_state(model)
    if adapter_name not in st.records:
        raise KeyError(f"no adapter named {adapter_name!r}; this model has {list(st.records)}")
    return st.records[adapter_name]


def unmerged_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter object ``name`` of the base model as it is without merges (a merged host's
    weight/bias is its kept original)."""
    path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    backup = owner.__dict__.get(MERGE_ATTR)
    kept = getattr(backup, leaf, None) if backup is not None and leaf in ("weight", "bias") else None
    return kept if kept is not None else owner._parameters[leaf]


# ----------------------------------------------------------------------------- the routing point


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


# ----------------------------------------------------------------------------- helpers for injectors


def resolve_dtype(adapter_dtype: Union[None, str, torch.dtype], reference: Optional[torch.Tensor]) -> torch.dtype:
    """dtype of new adapter tensors: float32 by default; ``"base"``: the floating dtype of
    ``reference`` (a host weight), else float32; a dtype or its name as given."""
    if adapter_dtype is None:
        return torch.float32
    if adapter_dtype == "base":
        return reference.dtype if isinstance(reference, torch.Tensor) and reference.is_floating_point() else torch.float32
    if isinstance(adapter_dtype, str):
        return getattr(torch, adapter_dtype)
    return adapter_dtype


def module_device(module: nn.Module, recurse: bool = True) -> torch.device:
    """Device for new adapter tensors beside ``module``: its first parameter's (CPU for meta or none)."""
    dev = next((p.device for p in module.parameters(recurse=recurse)), torch.device("cpu"))
    return torch.device("cpu") if dev.type == "meta" else dev


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

