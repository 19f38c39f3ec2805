"""VeRA: Vector-based Random Matrix Adaptation.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454. One pair of
frozen random matrices ``A`` (r x in_max) and ``B`` (out_max x r) is shared by every adapted layer
of the model; each layer trains only two vectors, ``d`` (r,) and ``b`` (out,)::

    y = W x + b0 + diag(b) B_s diag(d) A_s dropout(x)          A_s = A[:, :in], B_s = B[:out, :]

(``in_max``/``out_max``: the largest input/output sizes among the adapted layers; each layer uses
the top-left slice it needs). At init ``b = 0`` and ``d = d_initial``, so the model starts as the
base model exactly. Merging adds ``diag(b) B_s diag(d) A_s`` to the weight.

The shared projections. They are drawn from PEFT's PRNG recipe: a CPU ``torch.Generator`` seeded
with ``projection_prng_key`` draws ``A`` then ``B``, each Kaiming-uniform with bound
``sqrt(6 / fan_in)`` (``fan_in``: the tensor's second dimension), so a file saved without them
(``save_projection=False``) reloads to the same matrices. They live once per adapter, outside the
layers, in ``model.vera_projections[<adapter name>]`` (non-persistent buffers ``vera_A``,
``vera_B``: not part of the model's state_dict, never trained), listed in the adapter's record
(``AdapterRecord.modules``) and removed with the adapter by its cleanup. On disk they are PEFT's
model-level keys ``base_model.vera_A`` / ``base_model.vera_B`` (written only with
``save_projection=True``, and then required on load); the per-layer vectors follow the key rule
(``base_model.model.<path>.vera_lambda_b`` / ``vera_lambda_d``).

Linear layers only (nn.Linear, transformers Conv1D, 4-bit linears), as in PEFT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype
from ..config import AdapterConfig, LayerAdapterConfig, register_config
from ..inject import register_method
from ..routing import attach
from .common import check_kind, finish_inject, resolve_targets

CONTAINER = "vera_projections"  # model.vera_projections: nn.ModuleDict, adapter name -> VeraProjections
FILE_A, FILE_B = "base_model.vera_A", "base_model.vera_B"


@register_config
@dataclass
class VeraConfig(LayerAdapterConfig):
    """VeRA configuration, field for field as Hugging Face PEFT's ``VeraConfig``.

    Fields:
        r: rows of the shared ``A`` / columns of ``B`` (int > 0). Default 256 (VeRA wants larger
            ranks than LoRA: only ``r + out`` numbers per layer train).
        projection_prng_key: seed of the shared projections (module docstring). Default 0.
        save_projection: write ``vera_A`` / ``vera_B`` into the adapter file (default True); False
            relies on the seed to rebuild them.
        vera_dropout: dropout on the adapter's input. Default 0.0.
        d_initial: initial value of every ``vera_lambda_d`` entry. Default 0.1.
        fan_in_fan_out: kept for PEFT; set to True when a transformers Conv1D is targeted (deltatune
            reads each layer's layout from its kind).
        bias: "none", "all" or "vera_only" (the biases of adapted layers), trained and saved as LoRA's.
        init_weights: True: ``b = 0``, ``d = d_initial`` (identity at start); False: ``b = 1``,
            ``d ~ N(0, 1)``.
        target_modules, modules_to_save, layers_to_transform, layers_pattern: as LoraConfig.
    """

    PEFT_TYPE = "VERA"
    neutral_fields = AdapterConfig.neutral_fields | {"init_weights", "vera_dropout", "d_initial"}

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.vera_dropout) <= 1.0:
            raise ValueError(f"vera_dropout must be in [0, 1], got {self.vera_dropout!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        if d.get("exclude_modules") is None:  # PEFT's VeraConfig has no such field
            d.pop("exclude_modules", None)
        return d


def kaiming_projection(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor of ``shape`` drawn U(-bound, bound), ``bound = sqrt(6 / shape[1])`` (Kaiming
    uniform, gain sqrt(2), fan_in = ``shape[1]``), from ``generator``: PEFT's recipe."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections_for(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in_max), B (out_max, r))`` for ``projection_prng_key=key``: A is drawn first."""
    g = torch.Generator(device="cpu").manual_seed(int(key))
    a = kaiming_projection((r, in_max), g)
    return a, kaiming_projection((out_max, r), g)


class VeraProjections(nn.Module):
    """The shared frozen ``vera_A`` (r, in_max) and ``vera_B`` (out_max, r) of one VeRA adapter
    (non-persistent buffers: the adapter file, not the model's state_dict, carries them)."""

    no_decay = ()  # no parameters

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


class VeraAdapter(nn.Module):
    """One layer's VeRA vectors (module docstring).

    Parameters (adapter dtype): ``vera_lambda_b`` (out,), ``vera_lambda_d`` (r,). The shared
    :class:`VeraProjections` is referenced, not owned (it is no child of this module, so the key
    rule never sees it). Called as ``adapter(x, out, call) -> out + diag(b) B_s diag(d) A_s x``;
    ``x`` (..., in) of any float dtype, the term computed in the adapter dtype and cast to ``out``'s.

    Raises:
        TypeError: the host is not a linear layer.
    """

    side = "output"
    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "add"
    # vera_lambda_d is a scaling vector started at d_initial (not 0): weight decay would pull it
    # away from where the method puts it; vera_lambda_b starts at 0 (the adapter's neutral) and decays
    no_decay = ("vera_lambda_d",)

    def __init__(self, host: nn.Module, name: str, projections: VeraProjections, config: VeraConfig,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        kind = check_kind(host, name, "VeRA", ("linear-like",))
        self.kind = kind.name
        self.in_features, self.out_features = kind.in_features(host), kind.out_features(host)
        self.r = config.r
        self.merged = False
        self.__dict__["projections"] = projections  # shared: a reference, not a child module
        self.vera_dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        kw = dict(dtype=dtype or torch.float32, device=module_device(host, recurse=False))
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **kw))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r, **kw))

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.projections
        return p.vera_A[:, : self.in_features], p.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor, out: torch.Tensor, call) -> torch.Tensor:
        a, b = self._slices()
        dt = compute_dtype(x, self.vera_lambda_d.dtype)
        h = F.linear(self.vera_dropout(x.to(dt)), a.to(dt)) * self.vera_lambda_d.to(dt)  # (..., r)
        y = F.linear(h, b.to(dt)) * self.vera_lambda_b.to(dt)  # (..., out)
        return out + y.to(out.dtype)

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """``w + diag(b) B_s diag(d) A_s`` (float32, canonical (out, in))."""
        a, b = (t.to(torch.float32) for t in self._slices())
        lb, ld = self.vera_lambda_b.to(torch.float32), self.vera_lambda_d.to(torch.float32)
        return w + (lb[:, None] * b) @ (ld[:, None] * a)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, in={self.in_features}, out={self.out_features}"


def _container(model: nn.Module, create: bool = False) -> Optional[nn.ModuleDict]:
    cont = model._modules.get(CONTAINER)
    if cont is None and create:
        cont = nn.ModuleDict()
        model.add_module(CONTAINER, cont)
    return cont


def _remover(adapter_name: str):
    def fn(model: nn.Module) -> None:
        cont = _container(model)
        if cont is not None and adapter_name in cont:
            del cont[adapter_name]
            if len(cont) == 0:
                del model._modules[CONTAINER]

    return fn


def inject_vera(model: nn.Module, config: VeraConfig, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Draw the shared projections (sized to the largest adapted layer), then attach a
    :class:`VeraAdapter` to every target of ``config`` (and its modules_to_save copies).

    Raises:
        ValueError: nothing matches; TypeError: a target is not a linear layer.
    """
    hosts = resolve_targets(model, config, "vera")
    kinds = [check_kind(model.get_submodule(n), n, "VeRA", ("linear-like",)) for n in hosts]
    mods = [model.get_submodule(n) for n in hosts]
    in_max = max(k.in_features(m) for k, m in zip(kinds, mods))
    out_max = max(k.out_features(m) for k, m in zip(kinds, mods))
    dtype = resolve_dtype(adapter_dtype, getattr(mods[0], "weight", None))
    a, b = projections_for(config.r, in_max, out_max, config.projection_prng_key)
    dev = module_device(mods[0], recurse=False)
    proj = VeraProjections(a.to(dtype=dtype, device=dev), b.to(dtype=dtype, device=dev))
    _container(model, create=True)[rec.name] = proj
    rec.modules.append(f"{CONTAINER}.{rec.name}")
    rec.cleanup.append(_remover(rec.name))
    conv1d_hf = any(k.name == "conv1d_hf" for k in kinds)
    if config.fan_in_fan_out != conv1d_hf:
        config.fan_in_fan_out = conv1d_hf  # what PEFT records (True exactly for GPT-2's Conv1D)
    for name, host in zip(hosts, mods):
        attach(model, name, rec.name, VeraAdapter(host, name, proj, config, dtype=dtype))
    finish_inject(model, config, rec, hosts)


def _to_disk(model: nn.Module, adapter_name: str, config: VeraConfig) -> dict:
    if not config.save_projection:
        return {}
    p = _container(model)[adapter_name]
    return {FILE_A: p.vera_A.detach(), FILE_B: p.vera_B.detach()}


def _from_disk(model: nn.Module, adapter_name: str, config: VeraConfig, tensors: dict) -> dict:
    rest = dict(tensors)
    a, b = rest.pop(FILE_A, None), rest.pop(FILE_B, None)
    if not config.save_projection:
        if a is not None or b is not None:
            warnings.warn("this VeRA file carries vera_A/vera_B but its config says save_projection=False: they "
                          "are ignored and the projections are rebuilt from projection_prng_key (as peft does)",
                          stacklevel=4)
        return rest
    if a is None or b is None:
        raise ValueError(f"the adapter file has no {FILE_A!r}/{FILE_B!r} tensors, which a VeRA adapter saved with "
                         f"save_projection=True needs (keys in the file: {sorted(tensors)[:6]})")
    p = _container(model)[adapter_name]
    for key, src, dst in ((FILE_A, a, p.vera_A), (FILE_B, b, p.vera_B)):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"shape mismatch: {key}: file {tuple(src.shape)} vs model {tuple(dst.shape)} (the "
                             "largest adapted layer sets the projections' size: was the adapter made for this model?)")
    with torch.no_grad():
        p.vera_A.copy_(a.to(dtype=p.vera_A.dtype, device=p.vera_A.device))
        p.vera_B.copy_(b.to(dtype=p.vera_B.dtype, device=p.vera_B.device))
    return rest


register_method(VeraConfig, inject_vera, to_disk=_to_disk, from_disk=_from_disk)
