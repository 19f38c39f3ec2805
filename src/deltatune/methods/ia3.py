"""(IA)3: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638. Each targeted layer gets one learned vector ``l``, initialised to ones
(so the adapted model starts as the base model exactly):

* an ordinary target (keys, values) scales its OUTPUT:       ``y = (W x + b) * l``,  ``l``: (out, 1)
* a *feed-forward* target scales its INPUT (the FFN's
  intermediate activation, e.g. Llama's ``down_proj``):     ``y = W (x * l) + b``,  ``l``: (1, in)

On convolutions ``l`` has shape ``(1, C, 1, ...)`` (C = out or in channels). Merging multiplies the
weight's rows (``W' = diag(l) W``, ``b' = l * b``) or columns (``W' = W diag(l)``); on transformers
``Conv1D`` (GPT-2), which stores ``W`` transposed, the layer-kind registry hands over the canonical
``(out, in)`` layout, so the same rule applies. Unmerging restores the kept original exactly
(Hugging Face PEFT divides by ``l``, which is inexact).

The file format is Hugging Face PEFT's: one tensor ``base_model.model.<path>.ia3_l`` per layer and
``peft_type: "IA3"``, so adapters move between deltatune and ``peft`` both ways.

Where the forward runs: both through the host's routing point (:mod:`deltatune.adapters`): an
output target is an output-side adapter (``out = adapter(x, out, call)``), a feed-forward target
an input-side one (``x = adapter(x, None, call)``, before the host runs), so both follow the same
rule (active, in active order, not merged, not disabled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype

from ..routing import attach, attach_modules_to_save
from ..config import AdapterConfig, LayerAdapterConfig, TargetSpec, register_config
from ..geometry import default_targets
from ..inject import register_method
from ..layers import layer_kind
from ..targets import find_targets


@register_config
@dataclass
class IA3Config(LayerAdapterConfig):
    """(IA)3 configuration, field for field as Hugging Face PEFT's ``IA3Config``.

    Fields:
        target_modules: list of names (exact or dotted suffix), a regex string (full match), or
            ``"all-linear"``; None: the model type's standard targets (PEFT's table, supplied by
            :mod:`deltatune.integrations.transformers`; e.g. Llama ``k_proj, v_proj, down_proj``).
            Resolved in place when injected.
        feedforward_modules: the targets whose INPUT is scaled (list: a target whose name ends with
            an entry; string: regex full match). Must be a subset of a list ``target_modules``.
            None: the model type's standard ones; on a model type deltatune does not know, pass
            ``[]`` (no feed-forward target) or a list.
        init_ia3_weights: True (default) starts every vector at ones (the base model's output);
            False draws them from N(0, 1) (the model does not start as the base).
        fan_in_fan_out: kept for PEFT compatibility. deltatune reads each layer's layout from the
            layer kind (transformers ``Conv1D`` is transposed), so it is set to True when a
            ``Conv1D`` is targeted (as PEFT does) and otherwise ignored.
        modules_to_save: modules trained in full (as a copy) and saved with the adapter.
        exclude_modules, layers_to_transform, layers_pattern: as in :class:`LoraConfig`.

    Raises:
        ValueError: ``feedforward_modules`` is not a subset of ``target_modules`` (both lists).
    """

    PEFT_TYPE = "IA3"
    neutral_fields = AdapterConfig.neutral_fields | {"init_ia3_weights"}

    feedforward_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules: {extra} are not targets; "
                    "add them to target_modules or remove them from feedforward_modules"
                )

    def to_dict(self) -> dict:
        d = super().to_dict()
        # PEFT's IA3Config has no layer selection fields: leave them out unless they are used.
        for k in ("layers_to_transform", "layers_pattern"):
            if d.get(k) is None:
                d.pop(k, None)
        return d


def is_feedforward(config: IA3Config, key: str) -> bool:
    """PEFT's rule: a regex string must fully match ``key``; a list entry must end ``key``."""
    ff = config.feedforward_modules
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


class IA3Adapter(nn.Module):
    """One (IA)3 vector on one host layer (see the module docstring for the maths).

    Parameter (PEFT's name): ``ia3_l``, float (adapter dtype), shape ``(out, 1)`` for an output
    target or ``(1, in)`` for a feed-forward target on linear kinds (``nn.Linear``, transformers
    ``Conv1D``, registered quantized linears); ``(1, C, 1, ...)`` on ``nn.Conv1d/2d/3d``.

    Called by the host's routing hooks: an output target as ``adapter(x, out, call) -> out * l``, a
    feed-forward target (``side == "input"``) as ``adapter(x, None, call) -> x * l``. Maths runs in
    the adapter dtype; results are cast back to the dtype of ``out`` / ``x``.

    Raises:
        TypeError: the host is not a linear layer or a convolution (e.g. ``nn.Embedding``).
    """

    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "scale"  # the output per channel (or, as an input-side adapter, the input)
    no_decay = ("ia3_l",)  # a scaling vector: neutral at 1, not 0

    def __init__(self, host: nn.Module, is_feedforward: bool, init_ia3_weights: bool = True,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        kind = layer_kind(host)
        if kind is None or kind.name == "embedding":
            raise TypeError(
                f"(IA)3 cannot adapt a {type(host).__name__}: target linear layers, transformers Conv1D "
                "or convolutions"
            )
        self.kind = kind.name
        self.conv = not kind.linear_like
        self.is_feedforward = bool(is_feedforward)
        self.side = "input" if self.is_feedforward else "output"
        self.in_features, self.out_features = kind.in_features(host), kind.out_features(host)
        self.merged = False
        dev = module_device(host, recurse=False)
        n = self.in_features if self.is_feedforward else self.out_features
        if self.conv:
            self.groups = getattr(host, "groups", 1)
            shape = (1, n) + (1,) * (host.weight.dim() - 2)
        else:
            self.groups = 1
            shape = (1, n) if self.is_feedforward else (n, 1)
        dtype = dtype or torch.float32
        init = torch.ones if init_ia3_weights else torch.randn
        self.ia3_l = nn.Parameter(init(shape, dtype=dtype, device=dev))

    # -- forward -------------------------------------------------------------------------
    def _vector(self) -> torch.Tensor:
        """``l`` shaped to broadcast over an activation (B, ..., n) or, on convs, (B, C, *spatial)."""
        if self.conv:
            return self.ia3_l
        return self.ia3_l.reshape(-1)

    def forward(self, x: torch.Tensor, out, call) -> torch.Tensor:
        """Input side: ``x * l`` (x: (B, ..., in) or (B, C_in, *spatial)); output side: ``out * l``."""
        v = x if self.is_feedforward else out
        dt = compute_dtype(v, self.ia3_l.dtype)
        return (v.to(dt) * self._vector().to(dt)).to(v.dtype)

    # -- merge ---------------------------------------------------------------------------
    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """The merged weight for a float32 canonical weight ``w`` of shape (out, in/groups, *k)."""
        l = self.ia3_l.detach().to(torch.float32).reshape(-1)
        extra = (1,) * (w.dim() - 2)
        if not self.is_feedforward:
            return w * l.view(-1, 1, *extra)
        if self.groups == 1:
            return w * l.view(1, -1, *extra)
        # grouped conv: output channel o reads input channels of its group g = o // (out/groups)
        out_c, in_per_group = w.shape[0], w.shape[1]
        per_out = l.view(self.groups, 1, in_per_group).expand(self.groups, out_c // self.groups, in_per_group)
        return w * per_out.reshape(out_c, in_per_group, *extra)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        """The merged bias: ``b * l`` for an output target, ``b`` for a feed-forward target."""
        if self.is_feedforward:
            return b
        return b * self.ia3_l.detach().to(torch.float32).reshape(-1)

    def extra_repr(self) -> str:
        where = "input (feed-forward)" if self.is_feedforward else "output"
        return f"kind={self.kind}, scales={where}, size={self.ia3_l.numel()}"


def _resolve_targets(model: nn.Module, config: IA3Config) -> None:
    """Fill ``target_modules`` / ``feedforward_modules`` from PEFT's table for the architecture (in place)."""
    if config.target_modules is not None and config.feedforward_modules is not None:
        return
    defaults = default_targets("ia3", model)
    if defaults is None:
        missing = "target_modules" if config.target_modules is None else "feedforward_modules"
        raise ValueError(
            f"IA3Config.{missing} is None and this model's architecture has no standard (IA)3 targets: pass "
            f"{missing} explicitly (feedforward_modules=[] when no target is a feed-forward layer)"
        )
    tm, ff = defaults
    if config.target_modules is None:
        config.target_modules = list(tm)
    if config.feedforward_modules is None:
        config.feedforward_modules = list(ff)


def inject_ia3(model: nn.Module, config: IA3Config, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Attach an :class:`IA3Adapter` to every target of ``config`` (and its modules_to_save copies)."""
    _resolve_targets(model, config)
    for name in find_targets(model, config):
        host = model.get_submodule(name)
        ad = IA3Adapter(host, is_feedforward(config, name), config.init_ia3_weights,
                        dtype=resolve_dtype(adapter_dtype, getattr(host, "weight", None)))
        if ad.kind == "conv1d_hf":
            config.fan_in_fan_out = True  # what PEFT records for GPT-2's Conv1D
        attach(model, name, rec.name, ad)
    attach_modules_to_save(model, config, rec.name)


register_method(IA3Config, inject_ia3)
