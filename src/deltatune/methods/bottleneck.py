"""Bottleneck adapters: Houlsby, Pfeiffer and parallel.

A bottleneck adapter is a small two-layer network inside the frozen model::

    A(a) = W_up · f(W_down · a + b_down) + b_up          W_down: (d, in), W_up: (out, d), d = in // reduction_factor

* Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751: one adapter
  after the attention block and one after the feed-forward block of every layer (``style="houlsby"``).
* Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
  arXiv:2005.00247: one adapter after the feed-forward block (``style="pfeiffer"``).
* He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366:
  a *parallel* adapter reads the sublayer's input and adds ``s · A(x)`` to its output
  (``style="parallel"``, by default beside the feed-forward block, scaling 4).

Option names and defaults follow AdapterHub ``adapters`` (``SeqBnConfig``, ``DoubleSeqBnConfig``,
``ParBnConfig``). With ``h`` the sublayer's output (before the block adds its residual) and ``r``
the block's residual stream entering the sublayer, the hosted sublayer's output becomes::

    sequential:  a   = h + r   if original_ln_before else h
                 res = h       if residual_before_ln else a
                 h'  = s · A(a) + res  - (0 if original_ln_after else r)
    parallel:    h'  = h + s · A(x)    - (0 if original_ln_after else r)      (x: the sublayer's input)

and the model then adds ``r`` as usual. So Houlsby (``original_ln_before=False``) gives
``h + s·A(h)``; Pfeiffer (``original_ln_before=True``) gives ``h + s·A(h + r)``. This is what
AdapterHub computes on pre-norm decoders (Llama, GPT-2), where no layer norm sits between a
sublayer and its residual add, so the ``original_ln_*`` options only decide where the block's
residual connection is taken (there is no norm to apply). ``original_ln_after=False`` drops the
block's residual connection after the adapter. Where AdapterHub's parallel adapter reads the residual
stream, deltatune's reads the sublayer's own input (the normalised hidden states on pre-norm models),
which is the literal "parallel to the sublayer" of He et al. and also works on plain modules.

Placement (the model's geometry, ``GEOMETRY.decoder_sites`` of :mod:`deltatune.geometry`, supplied
by :mod:`deltatune.integrations.transformers`): the transformer blocks are the
elements of an ``nn.ModuleList`` whose elements are all of one class and each have an attention
child and a feed-forward child, found by name (attention: ``self_attn``, ``attn``, ``attention``,
``self_attention``; feed-forward: ``mlp``, ``feed_forward``, ``ffn``, ``block_sparse_moe``) or else
by class name (``*Attention*`` not ``*Cross*``; ``*MLP*`` / ``*FeedForward*``). The attention
sublayer hosts the "after attention" adapter (``mh_adapter``), the feed-forward sublayer the
"after feed-forward" one (``output_adapter``). The residual stream ``r`` of a sublayer is the input
of its pre-norm, found by name (attention: ``input_layernorm``, ``ln_1``, ``attention_norm``,
``ln_attn``; feed-forward: ``pre_feedforward_layernorm``, ``post_attention_layernorm``, ``ln_2``,
``ffn_norm``, ``ln_mlp``; in a parallel block whose only norm is the attention's, as in GPT-J, Phi
and Falcon, that one); it is needed only when ``original_ln_before=True`` or
``original_ln_after=False``. Blocks without an attention or feed-forward child (OPT keeps ``fc1``/
``fc2`` in the layer itself) are not found: name the modules with ``target_modules`` there. ``leave_out`` lists block indices (0-based) left without adapters.

Plain modules: with ``target_modules`` set, each matching module hosts one adapter placed after
its output (sequential styles) or beside it (parallel), whatever the style; sizes come from the
module's layer kind (``nn.Linear``, ``Conv1D``) or from its first and last linear sub-layers.

Bottleneck adapters cannot be merged into weights (a non-linearity sits between the two
projections): :func:`deltatune.merge` refuses them with that reason. They save in the usual two
files with ``peft_type: "BOTTLENECK"`` (``<path>.adapter_down.weight`` etc.); Hugging Face PEFT
cannot read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype

from ..routing import attach, attach_modules_to_save
from ..config import AdapterConfig, LayerAdapterConfig, register_config
from ..geometry import GEOMETRY, Site, config_value
from ..inject import register_method
from ..layers import layer_kind
from ..targets import find_targets, is_excluded, layer_indexer

STYLES = ("houlsby", "pfeiffer", "parallel")

# AdapterHub's defaults per style: DoubleSeqBnConfig, SeqBnConfig, ParBnConfig
_STYLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "houlsby": dict(reduction_factor=16, non_linearity="swish", original_ln_before=False, scaling=1.0,
                    mh_adapter=True, output_adapter=True, init_weights="mam_adapter"),
    "pfeiffer": dict(reduction_factor=16, non_linearity="relu", original_ln_before=True, scaling=1.0,
                     mh_adapter=False, output_adapter=True, init_weights="mam_adapter"),
    "parallel": dict(reduction_factor=2, non_linearity="relu", original_ln_before=False, scaling=4.0,
                     mh_adapter=False, output_adapter=True, init_weights="mam_adapter"),
}

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "linear": lambda t: t,
    "identity": lambda t: t,
}

INIT_WEIGHTS = ("mam_adapter", "bert", "houlsby")


@register_config
@dataclass
class BottleneckConfig(LayerAdapterConfig):
    """Bottleneck adapter configuration (AdapterHub ``BnConfig`` option names).

    Options left as None take the style's default (AdapterHub's ``DoubleSeqBnConfig`` for
    "houlsby", ``SeqBnConfig`` for "pfeiffer", ``ParBnConfig`` for "parallel"); they are filled in
    when the config is built, so a saved config lists every value.

    Fields:
        style: "houlsby" | "pfeiffer" | "parallel" (module docstring).
        reduction_factor: hidden size / bottleneck size (the bottleneck is ``int(in // rf)``, at
            least 1), or a mapping from layer index (str or int) to factor with a "default" key.
            Default 16 (houlsby, pfeiffer) or 2 (parallel).
        non_linearity: "relu", "swish"/"silu", "gelu", "gelu_new", "tanh", "sigmoid",
            "leakyrelu", "linear". Default "swish" (houlsby) or "relu".
        original_ln_before: take the block's residual connection before the adapter (the adapter
            reads ``h + r``). Default True for pfeiffer, else False. Not for parallel.
        original_ln_after: keep the block's residual connection after the adapter. Default True.
        residual_before_ln: the adapter's own residual is ``h`` (True, default) rather than its input.
        scaling: factor ``s`` on the adapter output: a float (default 1.0; 4.0 for parallel),
            "learned" (one trainable scalar, init 1) or "channel" (a trainable vector, init 1).
        leave_out: block indices (0-based) that get no adapter.
        mh_adapter / output_adapter: put an adapter after (beside) the attention / feed-forward
            sublayer. Default from the style (houlsby: both; pfeiffer, parallel: feed-forward only).
        init_weights: "mam_adapter" (default for every style, He et al.'s and LoRA's scheme):
            Kaiming-uniform down-projection, zero up-projection and biases, so the model starts
            exactly as the base (the down-projection gets gradients from the second step on, as
            LoRA's A does). AdapterHub's "bert" (both ~ N(0, 0.02)) and "houlsby" (Houlsby et al.'s
            near-identity init, both truncated N(0, 0.01)) start near the base instead: measured
            on the tiny test models, within 5e-3 ("bert") and 1e-3 ("houlsby") relative.
        dropout: dropout on the adapter output. Default 0.
        target_modules: None (default) places adapters by the model's geometry; a list/regex of
            module names puts one adapter on each of those modules instead (plain modules).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in LoraConfig.

    Raises:
        ValueError: an unknown style, non-linearity, init or scaling; a non-positive reduction
            factor; ``original_ln_before`` with the parallel style; no placement chosen.
    """

    PEFT_TYPE = "BOTTLENECK"
    neutral_fields = AdapterConfig.neutral_fields | {"init_weights", "dropout"}

    style: str = "houlsby"
    reduction_factor: Optional[Union[float, dict]] = None
    non_linearity: Optional[str] = None
    original_ln_before: Optional[bool] = None
    original_ln_after: bool = True
    residual_before_ln: bool = True
    scaling: Optional[Union[float, str]] = None
    leave_out: list = field(default_factory=list)
    mh_adapter: Optional[bool] = None
    output_adapter: Optional[bool] = None
    init_weights: Optional[str] = None
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        for k, v in _STYLE_DEFAULTS[self.style].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.non_linearity.lower() not in _ACTIVATIONS:
            raise ValueError(
                f"non_linearity {self.non_linearity!r} is not supported: use one of {', '.join(_ACTIVATIONS)}"
            )
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {', '.join(INIT_WEIGHTS)}, got {self.init_weights!r}")
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                try:
                    self.scaling = float(self.scaling)
                except ValueError:
                    raise ValueError(
                        f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}"
                    ) from None
        else:
            self.scaling = float(self.scaling)
        rfs = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [self.reduction_factor]
        for rf in rfs:
            if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 0:
                raise ValueError(f"reduction_factor must be a number > 0 (or a mapping of them), got {rf!r}")
        if self.style == "parallel" and self.original_ln_before:
            raise ValueError(
                "original_ln_before=True does not apply to parallel adapters (they read the sublayer's input): "
                "set it to False or use style 'pfeiffer'"
            )
        if self.target_modules is None and not (self.mh_adapter or self.output_adapter):
            raise ValueError("mh_adapter and output_adapter are both False: no adapter would be placed")
        if not 0.0 <= float(self.dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout!r}")
        self.leave_out = sorted(int(i) for i in (self.leave_out or []))

    def reduction_for(self, layer: Optional[int]) -> float:
        """The reduction factor of block ``layer`` (None: the default).

        Raises:
            KeyError: a mapping without an entry for ``layer`` and without "default".
        """
        rf = self.reduction_factor
        if not isinstance(rf, dict):
            return float(rf)
        for key in (layer, str(layer), "default"):
            if key is not None and key in rf:
                return float(rf[key])
        raise KeyError(
            f"reduction_factor {rf!r} has no entry for layer {layer} and no 'default': add {{'default': 16}}"
        )


MERGE_ERROR = (
    "a bottleneck adapter has a non-linearity between its down- and up-projection, so it is not a "
    "linear map and cannot be folded into any weight matrix; keep it as a module (it costs "
    "2*h*d extra multiply-adds per token), or train LoRA/(IA)3 if you need a mergeable adapter"
)


class _Slot:
    """The residual stream a :class:`ResidualTap` saw last, for the ``readers`` adapters that read it
    in the same forward pass (cleared after the last read, so no activation outlives the pass)."""

    __slots__ = ("value", "readers", "left")

    def __init__(self, readers: int = 1):
        self.value, self.readers, self.left = None, readers, 0

    def put(self, v: torch.Tensor) -> None:
        self.value, self.left = v, self.readers

    def take(self) -> Optional[torch.Tensor]:
        v = self.value
        self.left -= 1
        if self.left <= 0:
            self.value = None
        return v


class ResidualTap(nn.Module):
    """An input-side adapter on a block's pre-norm module: it records the norm's input (the
    residual stream entering the sublayer) for the bottleneck adapters of the same name that need
    it, and returns the input unchanged. It has no parameters and acts exactly when they do (the
    same routing rule), so it needs no hook of its own."""

    side = "input"
    merged = False
    merge_error = MERGE_ERROR
    uses_base_output = False
    supports_inplace = False
    composes = "other"
    no_decay = ()

    def __init__(self, slot: _Slot):
        super().__init__()
        self.slot = slot

    def forward(self, x: torch.Tensor, out, call) -> torch.Tensor:
        self.slot.put(x)
        return x

    def merge_into(self, host, w):
        raise ValueError(self.merge_error)

    merge_bias = merge_into


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter on one host (a transformer sublayer or a plain module).

    Submodules/parameters (file keys ``<host path>.<name>``): ``adapter_down`` (Linear in -> d),
    ``adapter_up`` (Linear d -> out), and ``scaling`` (shape (1,) or (out,)) when it is learned.

    Called by the host's output hook as ``adapter(x, out, call) -> new out``; ``out`` is the host's output, a tensor
    (B, ..., out) or a tuple whose first element is one (attention modules), and a tuple comes back
    with its first element replaced. Adapter maths runs in the adapter dtype and is cast back to the
    output's dtype.

    Raises:
        RuntimeError: the residual stream or the sublayer input it needs was not seen in this forward
            pass (the model did not call the pre-norm module found at injection).
    """

    side = "output"
    merge_error = MERGE_ERROR
    uses_base_output = False
    supports_inplace = False
    composes = "other"
    no_decay = ("scaling",)  # a learned scaling starts at 1

    def __init__(self, in_features: int, out_features: int, bottleneck: int, *, mode: str, non_linearity: str,
                 scaling: Union[float, str], original_ln_before: bool, original_ln_after: bool,
                 residual_before_ln: bool, init_weights: str, dropout: float = 0.0,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if mode not in ("sequential", "parallel"):
            raise ValueError(f"mode must be 'sequential' or 'parallel', got {mode!r}")
        if mode == "sequential" and in_features != out_features:
            raise ValueError(
                f"a sequential bottleneck adapter needs equal input and output sizes, got {in_features} -> "
                f"{out_features}: use style 'parallel' on this module"
            )
        dtype = dtype or torch.float32
        self.mode = mode
        self.in_features, self.out_features, self.bottleneck = in_features, out_features, bottleneck
        self.non_linearity = non_linearity.lower()
        self._act = _ACTIVATIONS[self.non_linearity]
        self.original_ln_before = bool(original_ln_before)
        self.original_ln_after = bool(original_ln_after)
        self.residual_before_ln = bool(residual_before_ln)
        self.merged = False  # never becomes True (not mergeable)
        self.adapter_down = nn.Linear(in_features, bottleneck, dtype=dtype, device=device)
        self.adapter_up = nn.Linear(bottleneck, out_features, dtype=dtype, device=device)
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, dtype=dtype, device=device))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))
        else:
            self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init_weights = init_weights
        self._init(init_weights)
        self.residual: Optional[_Slot] = None  # set by the injector when needs_residual

    @property
    def needs_residual(self) -> bool:
        return (self.mode == "sequential" and self.original_ln_before) or not self.original_ln_after

    def _init(self, how: str) -> None:
        with torch.no_grad():
            down, up = self.adapter_down, self.adapter_up
            if how == "bert":
                nn.init.normal_(down.weight, std=0.02)
                nn.init.normal_(up.weight, std=0.02)
            elif how == "houlsby":
                nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
            elif how == "mam_adapter":
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(up.weight)
            else:
                raise ValueError(f"init_weights must be one of {', '.join(INIT_WEIGHTS)}, got {how!r}")
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)

    def bottleneck_forward(self, a: torch.Tensor) -> torch.Tensor:
        """``s · dropout(A(a))`` for a: (B, ..., in) in the adapter dtype -> (B, ..., out)."""
        up = self.adapter_up(self._act(self.adapter_down(a)))  # (B, T, d) -> (B, T, out)
        return self.dropout(up * self.scaling)

    def merge_into(self, host, w):
        raise ValueError(self.merge_error)

    merge_bias = merge_into

    def forward(self, x, out, call):
        """``out`` -> the sublayer output with the adapter applied (class docstring); ``x`` is the
        sublayer's input (parallel adapters read it)."""
        h, rest = (out, None) if isinstance(out, torch.Tensor) else (out[0], out[1:])
        dt = compute_dtype(h, self.adapter_down.weight.dtype)
        hh = h.to(dt)
        r = None
        if self.needs_residual:
            r = self.residual.take() if self.residual is not None else None
            if r is None:
                raise RuntimeError(
                    "this bottleneck adapter needs the block's residual stream, but its pre-norm module did not "
                    "run in this forward pass"
                )
            r = r.to(dt)
        if self.mode == "parallel":
            xin = x
            if xin is None:
                raise RuntimeError("the parallel adapter did not see its sublayer's input in this forward pass")
            new = hh + self.bottleneck_forward(xin.to(dt))
        else:
            a = hh + r if self.original_ln_before else hh
            res = hh if self.residual_before_ln else a
            new = self.bottleneck_forward(a) + res
        if not self.original_ln_after:
            new = new - r
        new = new.to(h.dtype)
        if rest is None:
            return new
        return (new, *rest) if isinstance(out, tuple) else [new, *rest]

    def extra_repr(self) -> str:
        s = self.scaling if isinstance(self.scaling, float) else f"learned{tuple(self.scaling.shape)}"
        extra = ""
        if self.mode == "sequential":
            extra = f", original_ln_before={self.original_ln_before}"
        if not self.original_ln_after:
            extra += ", original_ln_after=False"
        return (f"mode={self.mode}, {self.in_features}->{self.bottleneck}->{self.out_features}, "
                f"non_linearity={self.non_linearity}, scaling={s}{extra}")


def host_dims(host: nn.Module) -> tuple[int, int]:
    """(in, out) sizes of a host: its own layer kind, else its first and last linear sub-layers.

    Raises:
        ValueError: neither gives the sizes (e.g. a convolution, or a module without linear layers).
    """
    kind = layer_kind(host)
    if kind is not None and kind.linear_like:
        return kind.in_features(host), kind.out_features(host)
    if kind is not None:
        raise ValueError(f"bottleneck adapters act on the last dimension; a {type(host).__name__} is not supported")
    leaves = [m for m in host.modules() if m is not host and (k := layer_kind(m)) is not None and k.linear_like]
    if not leaves:
        raise ValueError(
            f"cannot tell the sizes of a {type(host).__name__}: target a linear layer or a module containing them"
        )
    k0, k1 = layer_kind(leaves[0]), layer_kind(leaves[-1])
    return k0.in_features(leaves[0]), k1.out_features(leaves[-1])


def _sites_for(model: nn.Module, config: BottleneckConfig) -> list[Site]:
    if config.target_modules is not None:
        names = find_targets(model, config, predicate=lambda m: True)
        for n in names:
            mod = model.get_submodule(n)
            if isinstance(mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                raise ValueError(
                    f"{n} is a {type(mod).__name__}, which would run the adapter as one of its own layers: target "
                    f"its last layer instead (e.g. '{n}.{len(mod) - 1}')"
                )
        index_of = layer_indexer(model, config.layers_pattern)
        return [Site(n, index_of(n), "module") for n in names]
    found = GEOMETRY.decoder_sites(model)
    if not found:
        raise ValueError(
            "found no transformer blocks (a ModuleList of layers with attention and feed-forward children) in "
            f"this {type(model).__name__}: pass target_modules to name the modules that get adapters"
        )
    lt = config.layers_to_transform
    lt = [lt] if isinstance(lt, int) else lt
    out = []
    for s in found:
        if s.kind == "attention" and not config.mh_adapter:
            continue
        if s.kind == "feed_forward" and not config.output_adapter:
            continue
        if s.layer in config.leave_out or (lt and s.layer not in lt) or is_excluded(config, s.host):
            continue
        out.append(s)
    if not out:
        raise ValueError(f"leave_out={config.leave_out} / layers_to_transform={config.layers_to_transform} "
                         "leave no layer for a bottleneck adapter")
    return out


def inject_bottleneck(model: nn.Module, config: BottleneckConfig, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Attach a :class:`BottleneckAdapter` at every site of ``config`` (module docstring), and one
    :class:`ResidualTap` on each pre-norm whose input (the residual stream) an adapter needs."""
    sites = _sites_for(model, config)
    hidden = config_value(model, "hidden_size", "n_embd", "d_model")
    mode = "parallel" if config.style == "parallel" else "sequential"
    adapters = [(s, _make_adapter(model, config, s, hidden, mode, adapter_dtype)) for s in sites]
    slots: dict = {}
    for s, ad in adapters:
        if ad.needs_residual:
            slot = slots.setdefault(s.norm, _Slot(0))
            slot.readers += 1
            ad.residual = slot
    for norm, slot in slots.items():
        attach(model, norm, rec.name, ResidualTap(slot))
    for s, ad in adapters:
        attach(model, s.host, rec.name, ad)
    attach_modules_to_save(model, config, rec.name)


def _make_adapter(model, config, s: Site, hidden, mode, adapter_dtype) -> BottleneckAdapter:
    host = model.get_submodule(s.host)
    if s.kind == "module" or hidden is None:
        fin, fout = host_dims(host)
    else:
        fin = fout = hidden
    d = max(1, int(fin // config.reduction_for(s.layer)))
    weight_ref = next((m for m in host.modules() if layer_kind(m) is not None), host)
    ad = BottleneckAdapter(
        fin, fout, d, mode=mode, non_linearity=config.non_linearity, scaling=config.scaling,
        original_ln_before=config.original_ln_before, original_ln_after=config.original_ln_after,
        residual_before_ln=config.residual_before_ln, init_weights=config.init_weights,
        dropout=float(config.dropout), dtype=resolve_dtype(adapter_dtype, getattr(weight_ref, "weight", None)),
        device=module_device(host),
    )
    if ad.needs_residual and s.norm is None:
        why = "original_ln_before=True" if ad.original_ln_before and mode == "sequential" else "original_ln_after=False"
        raise ValueError(
            f"{why} needs the residual stream entering {s.host}, which deltatune finds only in transformer "
            "blocks with a known pre-norm module (input_layernorm/ln_1, post_attention_layernorm/ln_2, ...): "
            "set original_ln_before=False and original_ln_after=True for plain modules"
        )
    return ad


register_method(BottleneckConfig, inject_bottleneck)
