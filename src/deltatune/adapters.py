"""The adapter contract and the declared bookkeeping of an adapted model.

Declared state. Everything deltatune knows about a model's adapters lives in one
:class:`AdapterState` (``model._deltatune_state``): one :class:`AdapterRecord` per adapter (its
config, the modules that carry it, the base tensors it holds its own values of, its cleanup), the
active order, the disabled flag, the per-tensor :class:`BaseTensor` slots and the model-level hooks.
Nothing else is attached to the state.

Hosts. A targeted module (the *host*) keeps its own class, parameters and names; it gains a child
``adapters`` (``nn.ModuleDict`` keyed by adapter name) holding one :class:`LayerAdapter` per
adapter, so ``q_proj.weight`` stays ``q_proj.weight`` and the adapter's tensors sit at
``q_proj.adapters.<name>.<leaf>``. How hosts run their adapters (the one routing point) is
:mod:`deltatune.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from .config import AdapterConfig
from .targets import ADAPTERS

STATE_ATTR = "_deltatune_state"
MERGE_ATTR = "_deltatune_merge"  # on a host with merged adapters: its MergeBackup


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
        supports_inplace: the adapter may add into ``out`` in place when ``call.inplace`` is True
            (in inference, or with autograd on when ``out`` is the routing hook's own float32
            copy: the in-place op must then be one autograd can differentiate).
        composes: how it changes ``out`` (input side: ``x``): ``"add"`` (adds a term that does not
            depend on ``out``: LoRA, DoRA, LoHa, LoKr, VeRA, AdaLoRA), ``"scale"`` (multiplies per
            channel: (IA)3) or ``"other"`` (OFT's and BOFT's rotations). Two adapters of the same
            ``"add"``/``"scale"`` kind commute; this decides which partial merges a host can
            represent (:mod:`deltatune.merge`).
        no_decay: names of its parameters whose neutral value is not 0 (DoRA magnitudes, (IA)3
            vectors, learned scalings, VeRA's ``d``, BOFT's output scale) or that a method holds at
            a fixed scale (AdaLoRA's singular vectors): weight decay never applies to them (biases
            never decay).

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
    the adapter may write into ``out`` (no one else holds it); ``widen``: ``out`` is the host's
    bf16/fp16 output under autocast and the adapter returns ``out`` in float32 with its
    contribution added (asked only of an adapter whose ``widens()`` says it can, see
    :func:`deltatune.routing._output_hook`).

    In a mixed batch (:class:`RowPlan`) an adapter that acts on some rows only gets the view
    :meth:`on_rows`: ``x`` and ``base_output`` are those rows, and ``args`` / ``kwargs`` are cut to
    them when first read (:func:`take_rows`).
    """

    __slots__ = ("host", "_args", "_kwargs", "x", "base_output", "inplace", "widen", "_cut")

    def __init__(self, host, args, kwargs, x, base_output=None, inplace=False):
        self.host, self._args, self._kwargs, self.x = host, args, kwargs, x
        self.base_output, self.inplace = base_output, inplace
        self.widen = False
        self._cut = None  # (row indices, batch, the full call's x) while args/kwargs are not cut yet

    @property
    def args(self) -> tuple:
        self._cut_now()
        return self._args

    @property
    def kwargs(self) -> dict:
        self._cut_now()
        return self._kwargs

    def _cut_now(self) -> None:
        if self._cut is not None:
            rows, batch, x = self._cut
            self._cut = None
            self._args = take_rows(self._args, rows, batch, x)
            self._kwargs = take_rows(self._kwargs, rows, batch, x)

    def on_rows(self, rows: "Rows") -> "HostCall":
        """The same call restricted to the batch rows ``rows`` (:data:`Rows`)."""
        x = self.x
        bo = self.base_output
        bo = None if bo is None else take_rows(bo, rows, x.shape[0], bo if isinstance(bo, torch.Tensor) else None)
        sub = HostCall(self.host, self._args, self._kwargs, x[rows], bo)
        sub._cut = (rows, x.shape[0], x)
        return sub


# The rows of a batch one adapter acts on: a ``slice`` of consecutive rows (cutting gives a view),
# or int64 indices (cutting gives a copy). ``tensor[rows]`` cuts dim 0 either way.
Rows = Union[slice, torch.Tensor]


def row_index(rows: Rows, device) -> torch.Tensor:
    """``rows`` as int64 indices on ``device``."""
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows


def take_rows(obj, rows: Rows, batch: int, x: Optional[torch.Tensor]):
    """``obj`` with every batch-first tensor in it cut to the rows ``rows``: tensors of at least 2
    dimensions whose first is ``batch``, and ``x`` itself (the host's first input), inside tuples,
    lists and dicts too; anything else is kept as it is (a cache object, 1-D positions, flags)."""
    if isinstance(obj, torch.Tensor):
        if obj is x or (obj.dim() >= 2 and obj.shape[0] == batch):
            return obj[rows]
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(take_rows(o, rows, batch, x) for o in obj)
    if isinstance(obj, dict):
        return {k: take_rows(v, rows, batch, x) for k, v in obj.items()}
    return obj


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


BASE_ROW = "__base__"  # in a mixed batch, the row that runs the base model (Hugging Face PEFT's name)


@dataclass
class RowPlan:
    """The adapter of each row of a mixed batch (set by :func:`deltatune.adapter_rows`).

    Fields:
        names: one adapter name per input row, or :data:`BASE_ROW` for the base model.
        expand: a call of ``k * n`` rows (``n = len(names)``) gives each name to ``k`` consecutive
            rows, as ``generate`` repeats each input row for its beams / returned sequences;
            without it every call must have exactly ``n`` rows.
    """

    names: tuple
    expand: bool = False
    _index: dict = field(default_factory=dict, repr=False)

    def adapters(self) -> list:
        """The distinct adapter names of the rows (the base row excluded), in first-row order."""
        return [n for n in dict.fromkeys(self.names) if n != BASE_ROW]

    def rows(self, name: str, batch: int, device) -> Optional[Rows]:
        """The rows of a ``batch``-row call that ``name`` acts on: None for all of them, a ``slice``
        when they are consecutive (the usual case: rows grouped by adapter, a view cuts them), else
        int64 indices on ``device`` (an empty tensor when it acts on none).

        Raises:
            ValueError: ``batch`` does not fit the number of names.
        """
        key = (name, batch, str(device))
        if key in self._index:
            return self._index[key]
        n = len(self.names)
        if batch == n:
            k = 1
        elif self.expand and batch > 0 and batch % n == 0:
            k = batch // n
        else:
            raise ValueError(f"adapter_names gives {n} names but a layer got a batch of {batch} rows: give one name "
                             "per row of the batch" + (" (per input row for generate)" if self.expand else ""))
        idx = [r for r in range(batch) if self.names[r // k] == name]
        if len(idx) == batch:
            out = None
        elif idx and idx[-1] - idx[0] == len(idx) - 1:
            out = slice(idx[0], idx[-1] + 1)
        else:
            out = torch.tensor(idx, dtype=torch.long, device=device)
        self._index[key] = out
        return out

    def alone(self, name: str) -> "RowPlan":
        """The plan of the rows of ``name`` while they run alone (its adapter's own calls of other
        adapted layers, e.g. LLaMA-Adapter projecting its prompt): ``name`` for any batch."""
        key = ("alone", name)
        if key not in self._index:
            self._index[key] = RowPlan((name,), expand=True)
        return self._index[key]

    def restrict(self, rows: Rows, batch: int) -> "RowPlan":
        """The plan of the sub-batch ``rows`` of a ``batch``-row call: their names."""
        k = batch // len(self.names)
        idx = range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()
        names = tuple(self.names[r // k] for r in idx)
        return self.alone(names[0]) if len(set(names)) == 1 else RowPlan(names)


@dataclass
class AdapterState:
    """Model-wide adapter bookkeeping (one object per adapted model, ``model._deltatune_state``).

    Fields: ``records`` (name -> :class:`AdapterRecord`, in the order added), ``active`` (names, in
    application order), ``disabled``, ``base_tensors`` (parameter name -> :class:`BaseTensor`),
    ``model_hooks`` (name -> object with ``remove()``: hooks on the top model, e.g. the prompt
    wiring, the ``adapter_names=`` keyword and the gradient-checkpointing input hook),
    ``vocab_at_inject`` (input-embedding rows when the first adapter was added), ``trained_biases``
    (base biases made trainable by the last trainability update), ``rows`` (the :class:`RowPlan`
    of the mixed batch being run, else None).
    """

    records: dict = field(default_factory=dict)
    active: list = field(default_factory=list)
    disabled: bool = False
    base_tensors: dict = field(default_factory=dict)
    model_hooks: dict = field(default_factory=dict)
    vocab_at_inject: Optional[int] = None
    trained_biases: set = field(default_factory=set)
    rows: Optional[RowPlan] = None

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


def compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter computes in for input ``x``: ``x``'s own under autocast (autocast casts
    the adapter's float32 weights for each matmul, so the activations need no copy), else the
    adapter's parameter dtype (inputs are cast to it and results cast back)."""
    return x.dtype if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() else param_dtype


def module_device(module: nn.Module, recurse: bool = True) -> torch.device:
    """Device for new adapter tensors beside ``module``: its first parameter's (CPU for meta or none)."""
    dev = next((p.device for p in module.parameters(recurse=recurse)), torch.device("cpu"))
    return torch.device("cpu") if dev.type == "meta" else dev
