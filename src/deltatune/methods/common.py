"""Small pieces the weight-reparameterising methods share (LoHa, LoKr, VeRA, AdaLoRA, OFT, BOFT).

* :func:`resolve_targets`: ``target_modules=None`` becomes PEFT's default for the model type (the
  method's table, supplied by :mod:`deltatune.integrations.transformers`), written into the config;
* :func:`check_kind`: the host is of a layer kind the method adapts (error names the others);
* :func:`conv_apply`: run a convolution host's geometry (stride, padding, dilation, groups) with
  another weight;
* :func:`finish_inject`: ``modules_to_save`` copies and trained base biases (``bias="all"`` or
  ``"<method>_only"``, PEFT's rule), as LoRA does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord
from ..geometry import default_targets
from ..inject import claim_base_tensor
from ..layers import LayerKind, layer_kind
from ..routing import attach_modules_to_save
from ..targets import find_targets
from .lora import bias_parameter_names

_CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def resolve_targets(model: nn.Module, config, method: str) -> list[str]:
    """Paths of the modules ``config`` targets; ``target_modules=None`` takes PEFT's default for the
    model type of ``method`` (written into the config, as PEFT records it).

    Raises:
        ValueError: no default is known for this model type (name the layers), or nothing matches.
    """
    if config.target_modules is None:
        default = default_targets(method, model)
        if default is None:
            raise ValueError(f"{type(config).__name__}.target_modules is None and deltatune knows no default target "
                             "modules for this model's architecture: name the layers (a list, a regex, or 'all-linear')")
        config.target_modules = default if isinstance(default, str) else list(default)
    return find_targets(model, config)


def check_kind(host: nn.Module, name: str, method: str, allowed: tuple) -> LayerKind:
    """The host's layer kind when ``method`` adapts it (``allowed``: kind names, ``"linear-like"`` for
    every kind that computes ``x @ W.T``: nn.Linear, transformers Conv1D, 4-bit linears).

    Raises:
        TypeError: another kind (the message names the module and what the method adapts).
    """
    kind = layer_kind(host)
    ok = kind is not None and (kind.name in allowed or ("linear-like" in allowed and kind.linear_like))
    if not ok:
        names = {"linear-like": "linear layers (nn.Linear, transformers Conv1D)", "conv1d": "nn.Conv1d",
                 "conv2d": "nn.Conv2d", "conv3d": "nn.Conv3d", "embedding": "nn.Embedding"}
        what = ", ".join(names.get(a, a) for a in allowed)
        raise TypeError(f"{method} cannot adapt {name} ({type(host).__name__}); it adapts {what}")
    return kind


def check_zero_padding(host: nn.Module, name: str, method: str) -> None:
    """Raise ``ValueError`` for a convolution whose ``padding_mode`` is not "zeros" (the adapter's own
    convolution would pad differently from the host's)."""
    mode = getattr(host, "padding_mode", "zeros")
    if mode != "zeros":
        raise ValueError(f"{method} on a convolution with padding_mode={mode!r} ({name}) is not supported")


def conv_apply(host: nn.Module, kind_name: str, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv(x, weight, bias)`` with the host's stride, padding, dilation and groups."""
    return _CONV[kind_name](x, weight, bias, host.stride, host.padding, host.dilation, host.groups)


def finish_inject(model: nn.Module, config, rec: AdapterRecord, hosts: list[str]) -> None:
    """Attach ``config.modules_to_save`` copies and claim the base biases ``config.bias`` trains
    (each such bias becomes this adapter's own, see :mod:`deltatune.inject`)."""
    attach_modules_to_save(model, config, rec.name)
    if getattr(config, "bias", "none") not in ("none", "all") and not str(config.bias).endswith("_only"):
        raise ValueError(f"bias must be 'none', 'all' or '<method>_only', got {config.bias!r}")
    rec.bias_params = bias_parameter_names(model, config, hosts)
    for pname in rec.bias_params:
        claim_base_tensor(model, rec, pname)


def lycoris_shape(host: nn.Module, kind: LayerKind) -> tuple[int, int, tuple]:
    """(out, in per group, kernel) of a host: kernel ``()`` for linear kinds."""
    if kind.linear_like:
        return kind.out_features(host), kind.in_features(host), ()
    return host.out_channels, host.in_channels // host.groups, tuple(host.kernel_size)
