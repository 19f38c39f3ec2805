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

Where the forward runs: output scaling runs in the shared post-forward hook of :mod:`deltatune.inject`
(``adapter(x, out, host=host)``); input scaling needs the input before the layer runs, so a
feed-forward host also gets one forward pre-hook (:func:`_input_scale_hook`) that follows the same
rules (active, not merged, not disabled). It is removed when the adapter is deleted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import LayerAdapterConfig, TargetSpec, register_config
from ..inject import ADAPTERS, STATE_ATTR, AdapterState, add_delete_hook, attach, register_method
from ..layers import layer_kind
from ..targets import find_targets
from .lora import _resolve_dtype, attach_modules_to_save

# (target_modules, feedforward_modules) per transformers ``model_type``: Hugging Face PEFT's
# defaults, used when ``target_modules`` / ``feedforward_modules`` are None.
IA3_DEFAULTS: dict[str, tuple[list, list]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


@register_config
@dataclass
class IA3Config(LayerAdapterConfig):
    """(IA)3 configuration, field for field as Hugging Face PEFT's ``IA3Config``.

    Fields:
        target_modules: list of names (exact or dotted suffix), a regex string (full match), or
            ``"all-linear"``; None: the model type's standard targets (:data:`IA3_DEFAULTS`, e.g.
            Llama ``k_proj, v_proj, down_proj``). Resolved in place when injected.
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

    Called as ``adapter(x, out, host=host) -> out * l`` (output targets; identity for feed-forward
    targets, whose input is scaled by :meth:`scale_input` in a pre-hook). Maths runs in the adapter
    dtype; results are cast back to the dtype of ``out`` / ``x``.

    Raises:
        TypeError: the host is not a linear layer or a convolution (e.g. ``nn.Embedding``).
    """

    fan_in_fan_out = False  # merge reads the canonical (out, in) layout from the layer kind

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
        self.in_features, self.out_features = kind.in_features(host), kind.out_features(host)
        self.merged = False
        dev = next((p.device for p in host.parameters(recurse=False)), torch.device("cpu"))
        if dev.type == "meta":
            dev = torch.device("cpu")
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

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x * l`` for a feed-forward target; x: (B, ..., in) or (B, C_in, *spatial)."""
        return (x.to(self.ia3_l.dtype) * self._vector()).to(x.dtype)

    def forward(self, x, out: torch.Tensor, host: nn.Module) -> torch.Tensor:
        if self.is_feedforward:
            return out
        return (out.to(self.ia3_l.dtype) * self._vector()).to(out.dtype)

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


_PRE_HOOK = "_deltatune_ia3_pre_hook"


def _input_scale_hook(host: nn.Module, args):
    """Forward pre-hook of a feed-forward host: scale its input by every active (IA)3 vector."""
    st: Optional[AdapterState] = host.__dict__.get(STATE_ATTR)
    ads = host._modules.get(ADAPTERS)
    if st is None or st.disabled or ads is None or not args:
        return None
    x = args[0]
    changed = False
    for name in st.active:
        a = ads._modules.get(name)
        if isinstance(a, IA3Adapter) and a.is_feedforward and not a.merged:
            x = a.scale_input(x)
            changed = True
    return (x,) + tuple(args[1:]) if changed else None


def _resolve_targets(model: nn.Module, config: IA3Config) -> None:
    """Fill ``target_modules`` / ``feedforward_modules`` from :data:`IA3_DEFAULTS` (in place)."""
    if config.target_modules is not None and config.feedforward_modules is not None:
        return
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in IA3_DEFAULTS:
        missing = "target_modules" if config.target_modules is None else "feedforward_modules"
        raise ValueError(
            f"IA3Config.{missing} is None and model type {mtype!r} has no standard (IA)3 targets: pass "
            f"{missing} explicitly (feedforward_modules=[] when no target is a feed-forward layer)"
        )
    tm, ff = IA3_DEFAULTS[mtype]
    if config.target_modules is None:
        config.target_modules = list(tm)
    if config.feedforward_modules is None:
        config.feedforward_modules = list(ff)


def inject_ia3(model: nn.Module, config: IA3Config, adapter_name: str, state: AdapterState, *,
               adapter_dtype=None) -> None:
    """Attach an :class:`IA3Adapter` to every target of ``config`` (and its modules_to_save copies)."""
    _resolve_targets(model, config)
    hosts = []
    for name in find_targets(model, config):
        host = model.get_submodule(name)
        ff = is_feedforward(config, name)
        ad = IA3Adapter(host, ff, config.init_ia3_weights, dtype=_resolve_dtype(adapter_dtype, host))
        if ad.kind == "conv1d_hf":
            config.fan_in_fan_out = True  # what PEFT records for GPT-2's Conv1D
        attach(host, adapter_name, ad, state)
        if ff and _PRE_HOOK not in host.__dict__:
            host.__dict__[_PRE_HOOK] = host.register_forward_pre_hook(_input_scale_hook)
        hosts.append(name)
    attach_modules_to_save(model, config, adapter_name, state)
    state.__dict__.setdefault("_hosts", {})[adapter_name] = hosts

    def cleanup(m: nn.Module) -> None:
        # runs before the adapter is detached: drop the pre-hook where no other feed-forward
        # (IA)3 adapter remains on the host
        for hname in hosts:
            host = m.get_submodule(hname)
            ads = host._modules.get(ADAPTERS)
            others = [a for n, a in (ads.items() if ads is not None else [])
                      if n != adapter_name and isinstance(a, IA3Adapter) and a.is_feedforward]
            if not others and _PRE_HOOK in host.__dict__:
                host.__dict__.pop(_PRE_HOOK).remove()

    add_delete_hook(state, adapter_name, cleanup)


register_method(IA3Config, inject_ia3)
