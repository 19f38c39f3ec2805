"""The one routing point: which adapters act on a call, on which rows, and the host entry points that ask it.

:func:`acting` is the only place that decides which adapters act on a call: none while the
model's adapters are disabled; otherwise the active adapters, in active order, that the host
carries on the asked side and that are not merged into its weight. In a *mixed batch* (a
:class:`~deltatune.adapters.RowPlan` set by :func:`adapter_rows`, or by the ``adapter_names=``
keyword of ``model(...)`` / ``model.generate(...)``) each row names one adapter (or
``"__base__"``): the adapters acting are those the rows name, each on its own rows only, and the
active set does not matter. Three entry points per host consult it, all installed by
:func:`attach` and removed by :func:`detach`:

* the input-side forward pre-hook: each acting ``side == "input"`` adapter maps the host's first
  input, ``x = adapter(x, None, call)`` ((IA)3 feed-forward scaling, OFT's rotation; a bottleneck
  adapter's tap of the residual stream, which reads ``x`` and returns it unchanged);
* the output-side forward hook: each acting ``side == "output"`` adapter maps the host's output,
  ``out = adapter(x, out, call)`` (LoRA adds ``s B A x``, (IA)3 scales, bottleneck and
  LLaMA-Adapter add their terms);
* the replacing forward (``modules_to_save`` copies, ``side == "replace"``): the last acting copy
  runs instead of the host.

An adapter acting on some rows of a mixed batch runs on those rows only (its inputs, the host's
output and the call's batch-first arguments cut to them, :meth:`HostCall.on_rows`), and its
result is scattered back; a copy runs on its rows and the host on the others. An adapter that acts
on every row runs exactly as without rows.

Model-level methods (prompt tuning) ask :func:`acting_names` and :func:`acting_rows` through their
own top-model wiring.
"""

from __future__ import annotations

import contextlib
import copy
import types
import weakref
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .adapters import (BASE_ROW, STATE_ATTR, AdapterState, HostCall, RowPlan, Rows, get_state, require_state,
                       row_index, take_rows)
from .geometry import GEOMETRY
from .targets import ADAPTERS, is_adapter_path, nearest_names

SIDES = ("input", "output", "replace")


def acting_names(st: Optional[AdapterState]) -> list:
    """The adapters that act on a call, in application order: none while disabled; in a mixed batch
    the adapters its rows name; else the active ones."""
    if st is None or st.disabled:
        return []
    if st.rows is not None:
        return st.rows.adapters()
    return st.active


def acting_rows(st: Optional[AdapterState], name: str, x: Optional[torch.Tensor]) -> Optional[Rows]:
    """The rows of a call with batch-first input ``x`` that the acting adapter ``name`` acts on:
    None for all of them (always outside a mixed batch), else a slice of consecutive rows or int64
    indices (maybe empty; see :meth:`RowPlan.rows`).

    Raises:
        ValueError: in a mixed batch, a call without a tensor input or whose batch does not fit.
    """
    if st is None or st.rows is None:
        return None
    if x is None or x.dim() == 0:
        raise ValueError("a mixed batch (adapter_names) needs every adapted layer to get a batch-first tensor input")
    return st.rows.rows(name, x.shape[0], x.device)


def acting(host: nn.Module, side: str, x: Optional[torch.Tensor] = None) -> list:
    """THE routing decision for one host and side: ``[(name, adapter, rows)]`` in application order.

    An adapter acts when :func:`acting_names` lists it (not disabled; the rows' adapters in a
    mixed batch, else the active ones in active order), the host carries it on ``side`` and it is
    not merged into the host's weight. ``rows`` (:func:`acting_rows` of the call's first input
    ``x``) is None when it acts on every row; an adapter acting on no row of the call is left out.
    """
    ads = host._modules.get(ADAPTERS)
    if ads is None:
        return []
    st = host.__dict__.get(STATE_ATTR)
    out = []
    for name in acting_names(st):
        a = ads._modules.get(name)
        if a is not None and a.side == side and not a.merged:
            rows = acting_rows(st, name, x)
            if rows is None or isinstance(rows, slice) or rows.numel():
                out.append((name, a, rows))
    return out


# ----------------------------------------------------------------------------- mixed batches


def row_plan(model: nn.Module, names: Sequence[str], *, expand: bool = False) -> RowPlan:
    """A :class:`~deltatune.adapters.RowPlan` for ``names`` after checking that each row can get
    exactly what it gets alone with its adapter.

    Raises:
        TypeError: ``names`` is not a list of strings.
        ValueError: an unknown name (never a silent fall-back to the base model); an adapter merged
            into the base weights (every row would get it); an adapter that changes base tensors
            in place (trained biases, PiSSA/OLoRA residual weights), or base tensors that hold an
            adapter's own values, which no row-wise routing can give to some rows only.
    """
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {names!r}")
    if not names:
        raise ValueError("adapter_names is empty: give one adapter name (or '__base__') per row")
    st = require_state(model)
    for i, n in enumerate(names):
        if n != BASE_ROW and n not in st.records:
            raise ValueError(f"adapter_names[{i}] = {n!r} is not an adapter of this model; it has {list(st.records)} "
                             f"(or {BASE_ROW!r} for the base model)")
    for n, rec in st.records.items():
        for path in rec.hosts:
            a = (model.get_submodule(path) if path else model)._modules[ADAPTERS]._modules.get(n)
            if a is not None and a.merged:
                raise ValueError(f"adapter {n!r} is merged into the base weights, so every row of a mixed batch would "
                                 "get it: unmerge() before passing adapter_names")
    for n in dict.fromkeys(names):
        rec = st.records.get(n)
        if rec is not None and rec.base_tensors:
            raise ValueError(f"adapter {n!r} cannot be used in a mixed batch: it changes the base tensor "
                             f"{rec.base_tensors[0]!r} in place (trained biases or PiSSA/OLoRA residual weights), "
                             "which every row would see; run its rows alone with set_adapter")
    held = {t: s.owner for t, s in st.base_tensors.items() if s.owner is not None}
    if held:
        t, owner = next(iter(held.items()))
        raise ValueError(f"the base tensor {t!r} holds adapter {owner!r}'s own values (it is active), so the rows of a "
                         f"mixed batch would not see the base model: set_adapter to adapters without trained biases "
                         f"or rewritten base weights first")
    return RowPlan(tuple(names), expand=expand)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str], *, expand: bool = False):
    """Context manager: run mixed batches, row ``i`` with the adapter ``names[i]`` alone.

    ``names`` has one entry per row of the batch (``"__base__"``: the base model). Inside the block
    every forward (and backward) routes each row to its own adapter: each row gets what it gets
    with ``set_adapter(names[i])`` (the active set does not matter), so a mixed batch of training
    rows updates each adapter from its own rows only. Keep the backward inside the block when
    gradient checkpointing recomputes the forward then. ``expand=True``: a call of ``k * len(names)``
    rows gives each name to ``k`` consecutive rows (what ``generate`` does for beams).
    ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` do the same
    for one call. The previous routing comes back on exit, also when the block raises.

    Raises:
        TypeError / ValueError: as :func:`row_plan`.
    """
    st = require_state(model)
    plan = row_plan(model, names, expand=expand)
    prev, st.rows = st.rows, plan
    try:
        yield model
    finally:
        st.rows = prev


_NO_KEYWORD = object()


class AdapterNamesKeyword:
    """The ``adapter_names=`` keyword of the top model: a forward pre-hook (with kwargs) that takes
    it out of the call and routes the call's rows with it (:func:`adapter_rows`), the always-called
    forward hook that restores the routing, and, on a model with ``generate``, an instance
    ``generate`` that takes the keyword (one name per input row; each is repeated for the row's
    beams and returned sequences). Installed with a model's first adapter (``state.model_hooks``);
    ``remove()`` takes it all off."""

    def __init__(self, model: nn.Module):
        self.frames: list = []
        self.model = model  # (a copy.deepcopy of the model copies this object with it, pointing at the copy)
        self.handles = (model.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True),
                        model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
        self.generate = None
        if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
            self.generate = model.__dict__["generate"] = types.MethodType(_generate_with_rows, model)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.frames.clear()
        if self.generate is not None and self.model.__dict__.get("generate") is self.generate:
            del self.model.__dict__["generate"]

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        if "adapter_names" not in kwargs:
            self.frames.append(_NO_KEYWORD)
            return None
        st = get_state(model)
        self.frames.append(st.rows)  # restored by the post-hook (always called), even if this raises
        kwargs = dict(kwargs)
        names = kwargs.pop("adapter_names")
        if names is not None:
            if model.training and torch.is_grad_enabled() and GEOMETRY.checkpointing_on(model):
                raise ValueError("adapter_names= does not reach the forward that gradient checkpointing recomputes "
                                 "during backward: wrap forward and backward in `with deltatune.adapter_rows(model, "
                                 "names):` instead")
            st.rows = row_plan(model, names)
        return args, kwargs

    def _post_hook(self, model: nn.Module, args: tuple, kwargs: dict, output):
        if self.frames:
            prev = self.frames.pop()
            if prev is not _NO_KEYWORD:
                get_state(model).rows = prev
        return None


def _generate_with_rows(model: nn.Module, *args, adapter_names=None, **kwargs):
    """``model.generate`` taking ``adapter_names`` (one name per input row)."""
    generate = type(model).generate
    if adapter_names is None:
        return generate(model, *args, **kwargs)
    with adapter_rows(model, adapter_names, expand=True):
        return generate(model, *args, **kwargs)


# ----------------------------------------------------------------------------- entry points


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
    """Forward pre-hook of a host: ``x = adapter(x, None, call)`` for each acting input-side adapter
    (on its rows only in a mixed batch)."""
    x, where = _first_input(args, kwargs)
    run = acting(host, "input", x)
    if not run or x is None:
        return None
    call = HostCall(host, args, kwargs, x)
    for name, a, rows in run:
        if rows is None:
            x = a(x, None, call)
        else:
            xs = x[rows]
            with _routed(host, name):
                new = a(xs, None, call.on_rows(rows))
            if new is not xs:  # a tap returns its input unchanged: nothing to scatter
                x = x.index_copy(0, row_index(rows, x.device), new.to(x.dtype))
    if where == 0:
        return (x,) + tuple(args[1:]), kwargs
    return args, {**kwargs, where: x}


def _output_hook(host: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of a host: ``out = adapter(x, out, call)`` for each acting output-side adapter
    (on its rows only in a mixed batch: see :func:`_on_rows`).

    Under autocast the output is widened to float32 first (:func:`_widened`); when the first
    acting adapter ``widens()`` itself (LoRA: the cast and its update in one function, whose
    backward casts the gradient back once for both), it gets the bf16/fp16 output with
    ``call.widen`` and returns the float32 sum.

    When no one else can hold the output and no acting adapter reads the base output, adapters
    with ``supports_inplace`` are told they may add into ``out`` in place: this saves a full copy
    of the output per layer. No one else holds it when it is the float32 copy made for this call
    (with autograd on too: the copy's backward keeps nothing), or, without autograd (inference),
    when ours is the host's first forward hook and there are no global ones.
    """
    x, _ = _first_input(args, kwargs)
    run = acting(host, "output", x)
    if not run:
        return output
    reads_base = any(a.uses_base_output for _, a, _ in run)
    widen = _needs_widening(output)
    first = run[0][1]
    fuse = (widen and isinstance(output, torch.Tensor) and run[0][2] is None and not reads_base
            and callable(getattr(first, "widens", None)) and first.widens())
    if widen and not fuse:
        output = _widened(output)
    # our own float32 copy (made here or by the first adapter) is held by no one else
    no_one_else_holds = not reads_base and isinstance(output, torch.Tensor) and (
        widen or (not torch.is_grad_enabled() and not _global_forward_hooks
                  and next(iter(host._forward_hooks.values())) is _output_hook))
    call = HostCall(host, args, kwargs, x, base_output=output)
    for i, (name, a, rows) in enumerate(run):
        if rows is None:
            call.widen = fuse and i == 0
            call.inplace = no_one_else_holds and a.supports_inplace and not call.widen
            before = output
            output = a(x, output, call)
            # a new tensor from another adapter is not assumed ours; a float32 one made from the bf16 output is
            no_one_else_holds = call.inplace or (call.widen and isinstance(output, torch.Tensor) and output is not before
                                                 and output.dtype == torch.float32)
        else:
            # rows are written back into the output in place only without autograd, as before widening
            output = _on_rows(name, a, call, output, rows, no_one_else_holds and not torch.is_grad_enabled())
    return output


def _needs_widening(out) -> bool:
    """Whether :func:`_widened` widens ``out``: its batch-first tensor is bf16/fp16 under autocast."""
    head = _head(out)
    return (isinstance(head, torch.Tensor) and head.dtype in (torch.bfloat16, torch.float16)
            and torch.is_autocast_enabled(head.device.type))


def _widened(out):
    """``out`` with its batch-first tensor in float32 when autocast computes it in bf16/fp16.

    An adapter's contribution to a host output is small next to the output itself: a step's LoRA
    update moves the output by ~1e-4 where bf16 keeps 8 bits of mantissa (a spacing of 2^-7 at
    1.0), so ``out + delta`` in bf16 rounds back to ``out`` and the adapter's early updates were lost
    (on SmolLM2, one LoRA step at lr 1e-4 raised the next batch's loss to 5.26 under bf16 autocast
    and to 4.67 in fp32). In float32 the sum keeps the contribution; autocast casts it back to the
    compute dtype at the next matmul, and the residual stream it flows into stays float32."""
    if _needs_widening(out):
        return _with_head(out, _head(out).float())
    return out


_NARROWS_UNDER_AUTOCAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # autocast runs these in bf16/fp16
_narrowed: tuple = (None, None, None, None)  # (weakref to the last float32 input, (its version, data address,
# layout, requires_grad, grad mode, dtype), its cast, its storage: held so that the address is not reused meanwhile)


def _forget_cast(ref) -> None:
    """The cached input died: drop its cast (autograd keeps its own reference where it needs one)."""
    global _narrowed
    if _narrowed[0] is ref:
        _narrowed = (None, None, None, None)


def _narrow_hook(host: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a host with output-side adapters: under autocast, its float32 input (a
    widened output upstream, see :func:`_widened`) cast once to the autocast dtype and shared by
    every host that reads the same tensor next (q, k and v read one normed input) and by their
    adapters. Autocast would cast it anyway, once per consumer, each cast kept for the backward
    pass; the values are the same."""
    global _narrowed
    if not args or type(host) not in _NARROWS_UNDER_AUTOCAST:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dtype is not torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return None
    if x.is_inference() or torch.compiler.is_compiling():  # inference-mode tensors keep no version counter;
        # traced, the compiler merges the casts itself (and a guard on the cache would recompile): cast, uncached
        return (x.to(torch.get_autocast_dtype(x.device.type)),) + tuple(args[1:]), kwargs
    ref, key, cast, _ = _narrowed
    # in-place writes bump the version; `x.data = ...` swaps the storage or layout and requires_grad_() the graph:
    # neither bumps it
    now = (x._version, x.data_ptr(), x.shape, x.stride(), x.requires_grad, torch.is_grad_enabled(),
           torch.get_autocast_dtype(x.device.type))
    if ref is None or ref() is not x or key != now:
        cast = x.to(now[-1])
        _narrowed = (weakref.ref(x, _forget_cast), now, cast, x.untyped_storage())
    return (cast,) + tuple(args[1:]), kwargs


def _head(out):
    """The batch-first tensor of a host output: the output, or the first element of a tuple/list."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _with_head(out, head):
    if isinstance(out, torch.Tensor):
        return head
    return type(out)((head, *out[1:]))


def _on_rows(name: str, adapter: nn.Module, call: HostCall, out, rows: Rows, write_in_place: bool):
    """``out`` with ``adapter`` applied to the batch rows ``rows`` only: the adapter gets those rows
    of the input and of the output and its result is scattered back (into ``out`` itself when no one
    else holds it). Consecutive rows are a view of ``out``, which an in-place adapter (LoRA, in
    inference) then adds into directly; other rows are a copy it may add into."""
    sub = call.on_rows(rows)
    head = _head(out)
    view = isinstance(rows, slice)
    sub.inplace = adapter.supports_inplace and not torch.is_grad_enabled() and (write_in_place or not view)
    part = head[rows]
    with _routed(call.host, name):
        new = _head(adapter(sub.x, _with_head(out, part), sub))
    if write_in_place:
        if not view:  # a copy of the rows: scatter it back
            head.index_copy_(0, rows, new.to(head.dtype))
        elif new is not part:  # a view the adapter did not write into
            part.copy_(new)
        return out
    return _with_head(out, head.index_copy(0, row_index(rows, head.device), new.to(head.dtype)))


def _replacing_forward(host: nn.Module, *args, **kwargs):
    """Forward of a host with ``modules_to_save`` copies: the last acting copy runs instead of the
    host; in a mixed batch each copy runs on its rows and the host on the others."""
    x, _ = _first_input(args, kwargs)
    run = acting(host, "replace", x)
    if not run:
        return type(host).forward(host, *args, **kwargs)
    if run[-1][2] is None:
        return run[-1][1](*args, **kwargs)
    B = x.shape[0]
    parts, covered = [], torch.zeros(B, dtype=torch.bool, device=x.device)
    for name, module, rows in run:
        with _routed(host, name):
            out = module(*take_rows(args, rows, B, x), **take_rows(kwargs, rows, B, x))
        parts.append((row_index(rows, x.device), out))
        covered[rows] = True
    rest = (~covered).nonzero().squeeze(1)
    if rest.numel():
        with _routed(host, rows=rest, batch=B):
            out = type(host).forward(host, *take_rows(args, rest, B, x), **take_rows(kwargs, rest, B, x))
        parts.append((rest, out))
    return _gather_rows(parts)


@contextlib.contextmanager
def _routed(host: nn.Module, name: Optional[str] = None, rows: Optional[torch.Tensor] = None, batch: int = 0):
    """While some rows of a mixed batch run by themselves, the layers they call route by those rows'
    names: an adapter on its rows (which may call other adapted layers, e.g. LLaMA-Adapter projecting
    its prompt) as ``name`` alone, the host on the ``rows`` no copy took by their own names."""
    st = host.__dict__[STATE_ATTR]
    prev = st.rows
    st.rows = prev.alone(name) if name is not None else prev.restrict(rows, batch)
    try:
        yield
    finally:
        st.rows = prev


def _gather_rows(parts: list):
    """One output of the whole batch from ``[(rows, output of those rows)]`` (rows partition it):
    tensors, or tuples/lists of tensors and None, put back in row order."""
    order = torch.cat([r for r, _ in parts])
    inverse = torch.argsort(order)
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        return torch.cat([o for _, o in parts])[inverse]
    if isinstance(first, (tuple, list)):
        return type(first)(None if first[i] is None else _gather_rows([(r, o[i]) for r, o in parts])
                           for i in range(len(first)))
    raise TypeError(f"a modules_to_save copy returned a {type(first).__name__}; a mixed batch needs a tensor "
                    "(or a tuple of tensors) to put its rows back together")


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
        if not _is_ours(host.__dict__.get("forward")):
            if "forward" in host.__dict__:  # another instance forward (a fast-path block): back on detach
                host.__dict__[_PREV_FORWARD] = host.__dict__["forward"]
            host.forward = types.MethodType(_replacing_forward, host)
    elif adapter.side == "input":
        if not _has_hook(host._forward_pre_hooks, _input_hook):
            host.register_forward_pre_hook(_input_hook, with_kwargs=True)
    elif not _has_hook(host._forward_hooks, _output_hook):
        host.register_forward_hook(_output_hook, with_kwargs=True)
        host.register_forward_pre_hook(_narrow_hook, with_kwargs=True)


_PREV_FORWARD = "_deltatune_prev_forward"


def _is_ours(forward) -> bool:
    return getattr(forward, "__func__", None) is _replacing_forward


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
        _remove_hook(host, _narrow_hook)
    if "replace" not in sides and _is_ours(host.__dict__.get("forward")):
        del host.__dict__["forward"]
        if _PREV_FORWARD in host.__dict__:
            host.forward = host.__dict__.pop(_PREV_FORWARD)
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

