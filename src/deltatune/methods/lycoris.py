"""LoHa and LoKr: weight updates built from Hadamard and Kronecker products (the LyCORIS family).

* LoHa (Hyeon-Woo et al., "FedPara", arXiv:2108.06098): the update of a weight ``W`` (out x in) is
  the Hadamard (element-wise) product of two rank-``r`` products, so its rank can reach ``r^2``::

      delta W = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)      w*_a: (out, r), w*_b: (r, in)

* LoKr (Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
  Evaluation", arXiv:2309.14859): the update is a Kronecker product of a small factor and a larger
  one, each full or of rank ``r``, with ``out = a * b`` and ``in = c * d`` split by
  :func:`factorization`::

      delta W = (alpha / r) * kron(w1, w2)      w1: (a, c) (or w1_a @ w1_b),  w2: (b, d) (or w2_a @ w2_b)

Both adapt linear layers (nn.Linear, transformers Conv1D, 4-bit linears: in the canonical ``(out,
in)`` layout) and ``nn.Conv1d``/``nn.Conv2d`` (the update has the kernel's shape ``(out, in/groups,
*k)``; with ``use_effective_conv2d`` and a kernel larger than 1 the kernel dimensions come from a
CP core ``t`` (r, r, *k), "Proposition 3" of FedPara). The adapter computes ``delta W`` and adds
``F.linear(x, delta W)`` (or the host's convolution with ``delta W``) to the host's output, as PEFT
does; merging adds ``delta W`` to the weight, so merged and unmerged agree to rounding. At init one
factor is zero (LoHa's ``w2_b``, LoKr's ``w1``): the model starts as the base model exactly.

Tensor names are PEFT's (``hada_w1_a`` ... ``hada_t2``; ``lokr_w1``, ``lokr_w1_a``, ``lokr_w1_b``,
``lokr_w2``, ``lokr_w2_a``, ``lokr_w2_b``, ``lokr_t2``), so files move between deltatune and
``peft`` both ways (PEFT 0.21 adapts only nn.Linear, nn.Conv1d and nn.Conv2d with these methods:
a transformers Conv1D adapter saved by deltatune does not load there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype
from ..config import AdapterConfig, LayerAdapterConfig, register_config
from ..inject import register_method
from ..routing import attach
from .common import check_kind, check_zero_padding, conv_apply, finish_inject, lycoris_shape, resolve_targets
from .lora import pattern_value

KINDS = ("linear-like", "conv1d", "conv2d")


@dataclass
class _LycorisFields(LayerAdapterConfig):
    """Fields LoHa and LoKr share (PEFT's ``LycorisConfig`` and the common ones of both configs).

    Fields:
        r: rank of each low-rank factor (int > 0). Default 8.
        alpha: the update is multiplied by ``alpha / r``. Default 8.
        rank_dropout: while training, each output row of the update is dropped with this
            probability (LoHa rescales the kept rows by 1/mean; LoKr only with ``rank_dropout_scale``).
        module_dropout: while training, the whole adapter is skipped for a forward with this probability.
        use_effective_conv2d: CP-decompose the kernel dimensions of Conv1d/Conv2d updates (kernel > 1).
        rank_pattern / alpha_pattern: per-module ``r`` / ``alpha`` (keys: regexes matched against the
            end of the module name, PEFT's rule).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as
            :class:`~deltatune.LoraConfig`; ``target_modules=None`` takes PEFT's per-architecture default.
    """

    neutral_fields = AdapterConfig.neutral_fields | {"init_weights", "rank_dropout", "module_dropout"}

    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@register_config
@dataclass
class LoHaConfig(_LycorisFields):
    """LoHa configuration, field for field as Hugging Face PEFT's ``LoHaConfig`` (see the module
    docstring for the maths and :class:`_LycorisFields` for the shared fields).

    Fields:
        init_weights: True (default): ``w1_a, w1_b, w2_a`` (and the CP cores) Kaiming-uniform,
            ``w2_b`` zero, so the adapter starts as the identity; False: all Kaiming-uniform.
    """

    PEFT_TYPE = "LOHA"
    init_weights: bool = True


@register_config
@dataclass
class LoKrConfig(_LycorisFields):
    """LoKr configuration, field for field as Hugging Face PEFT's ``LoKrConfig``.

    Fields:
        decompose_both: also write the small factor ``w1`` as ``w1_a @ w1_b`` when ``r`` is below half
            of its larger side (``w2`` is low-rank whenever ``r`` is below half of its larger side).
        decompose_factor: the factor :func:`factorization` aims at (-1: near the square root).
        rank_dropout_scale: rescale kept rows by 1/mean under ``rank_dropout``.
        init_weights: True (default): ``w1`` (or ``w1_a``) zero, the rest Kaiming-uniform (identity
            at start); "lycoris": ``w2`` (or ``w2_b``) zero instead; False: all Kaiming-uniform.
    """

    PEFT_TYPE = "LOKR"
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Union[bool, str] = True

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` (LyCORIS' rule, as PEFT has it).

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)`` as given. Otherwise walk
    the divisors ``m`` up from 1 (stopping at one above ``factor``; -1: no bound) until ``m >= n``,
    then order the pair: e.g. 32 -> (4, 8), 128 -> (8, 16), 127 -> (1, 127), 128 with factor 4 -> (4, 32).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    start_sum = m + n  # LyCORIS compares with the first pair's sum only
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        if cand + dimension // cand > start_sum or cand > bound:
            break
        m, n = cand, dimension // cand
    return (n, m) if m > n else (m, n)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.kron(a, b)`` (the tensor with fewer dimensions gets leading 1s), computed as one
    broadcast product: ``torch.kron`` fails on some einsum results (PEFT's LoKr on a Conv1d with
    ``use_effective_conv2d`` raises there)."""
    n = max(a.dim(), b.dim())
    sa = (1,) * (n - a.dim()) + tuple(a.shape)
    sb = (1,) * (n - b.dim()) + tuple(b.shape)
    a2 = a.reshape([d for s in sa for d in (s, 1)])
    b2 = b.reshape([d for s in sb for d in (1, s)])
    return (a2 * b2).reshape([x * y for x, y in zip(sa, sb)])


def _kaiming(*tensors) -> None:
    for t in tensors:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """The kernel-shaped factor of a CP decomposition: ``(p, q, k1, k2)`` from core ``t`` (r, r, k1, k2),
    ``wa`` (r, p) and ``wb`` (r, q)."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


def _setup(ad: nn.Module, host: nn.Module, name: str, method: str, r: int, alpha: float, config) -> tuple:
    kind = check_kind(host, name, method, KINDS)
    if not kind.linear_like:
        check_zero_padding(host, name, method)
    ad.kind, ad.linear_like = kind.name, kind.linear_like
    ad.r, ad.alpha, ad.scaling = r, alpha, alpha / r
    ad.rank_dropout, ad.module_dropout = float(config.rank_dropout), float(config.module_dropout)
    ad.merged = False
    out_f, in_f, k = lycoris_shape(host, kind)
    ad.weight_shape = (out_f, in_f, *k)
    return out_f, in_f, k


def _delta(ad, apply_rank_dropout: bool) -> torch.Tensor:
    w = ad.raw_delta().reshape(ad.weight_shape)
    if apply_rank_dropout:
        keep = (torch.rand(w.shape[0], device=w.device) > ad.rank_dropout).to(w.dtype)
        if ad.rescale_rank_dropout:
            keep = keep / keep.mean().clamp_min(torch.finfo(w.dtype).tiny)
        w = w * keep.view(-1, *([1] * (w.dim() - 1)))
    return w


def _forward(ad, x: torch.Tensor, out: torch.Tensor, call) -> torch.Tensor:
    """``out + F.linear(x, delta W)`` (or the host's convolution with ``delta W``), in the adapter dtype."""
    if ad.training and ad.module_dropout and not bool(torch.rand(1) > ad.module_dropout):
        return out  # module dropout: this forward skips the adapter
    w = _delta(ad, ad.training and ad.rank_dropout > 0)
    dt = compute_dtype(x, w.dtype)
    xa = x.to(dt)
    y = F.linear(xa, w.to(dt)) if ad.linear_like else conv_apply(call.host, ad.kind, xa, w.to(dt))
    return out + y.to(out.dtype)


def _merge_into(ad, w: torch.Tensor) -> torch.Tensor:
    return w + _delta(ad, False).to(w.dtype).reshape(w.shape)


class LoHaAdapter(nn.Module):
    """One LoHa update on one host (module docstring).

    Parameters (adapter dtype, PEFT's names): linear kinds and flattened convolutions: ``hada_w1_a``,
    ``hada_w2_a`` (out, r), ``hada_w1_b``, ``hada_w2_b`` (r, in * prod(k)); effective convolutions
    (``use_effective_conv2d``, kernel > 1): ``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in),
    ``hada_t1``, ``hada_t2`` (r, r, *k) (Conv1d: (r, r, k, 1)).

    Raises:
        TypeError: the host is not a linear layer, nn.Conv1d or nn.Conv2d.
    """


    side = "output"
    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "add"  # adds F.linear(x, delta W): commutes with LoRA-like terms
    no_decay = ()  # every factor is neutral at 0 (a zero factor zeroes the update), so all may decay
    rescale_rank_dropout = True

    def __init__(self, host: nn.Module, name: str, r: int, alpha: float, config: LoHaConfig,
                 dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)
        out_f, in_f, k = _setup(self, host, name, "LoHa", r, alpha, config)
        kw = dict(dtype=dtype or torch.float32, device=module_device(host, recurse=False))
        effective = bool(config.use_effective_conv2d) and len(k) > 0 and math.prod(k) > 1
        self.effective = effective
        if effective:
            core = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
            self.hada_t1 = nn.Parameter(torch.empty(core, **kw))
            self.hada_w1_a = nn.Parameter(torch.empty(r, out_f, **kw))
            self.hada_w1_b = nn.Parameter(torch.empty(r, in_f, **kw))
            self.hada_t2 = nn.Parameter(torch.empty(core, **kw))
            self.hada_w2_a = nn.Parameter(torch.empty(r, out_f, **kw))
            self.hada_w2_b = nn.Parameter(torch.empty(r, in_f, **kw))
        else:
            flat = in_f * math.prod(k)
            self.hada_w1_a = nn.Parameter(torch.empty(out_f, r, **kw))
            self.hada_w1_b = nn.Parameter(torch.empty(r, flat, **kw))
            self.hada_w2_a = nn.Parameter(torch.empty(out_f, r, **kw))
            self.hada_w2_b = nn.Parameter(torch.empty(r, flat, **kw))
        with torch.no_grad():
            _kaiming(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a)
            if effective:
                _kaiming(self.hada_t1, self.hada_t2)
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b)
            else:
                _kaiming(self.hada_w2_b)

    def raw_delta(self) -> torch.Tensor:
        """``(alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (CP form: the cores contracted first)."""
        if self.effective:
            w1 = _cp(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = _cp(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            w1, w2 = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b
        return w1 * w2 * self.scaling

    def forward(self, x, out, call):
        return _forward(self, x, out, call)

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """``w + delta W`` (float32, canonical layout)."""
        return _merge_into(self, w)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, cp={self.effective}"


class LoKrAdapter(nn.Module):
    """One LoKr update on one host (module docstring). With ``out = a * b`` and ``in = c * d``
    (:func:`factorization` of each, ``decompose_factor``):

    Parameters (adapter dtype, PEFT's names): ``lokr_w1`` (a, c), or ``lokr_w1_a`` (a, r) and
    ``lokr_w1_b`` (r, c) with ``decompose_both`` and ``r < max(a, c) / 2``; ``lokr_w2`` (b, d[, *k])
    when ``r >= max(b, d) / 2``, else ``lokr_w2_a`` (b, r) and ``lokr_w2_b`` (r, d * prod(k)), or with
    ``use_effective_conv2d`` on a kernel > 1 ``lokr_t2`` (r, r, *k), ``lokr_w2_a`` (r, b),
    ``lokr_w2_b`` (r, d). ``delta W = (alpha / r) * kron(w1, w2)`` reshaped to the weight's shape
    (:func:`kron` follows ``torch.kron``, as PEFT computes it, including on Conv1d kernels).

    Raises:
        TypeError: the host is not a linear layer, nn.Conv1d or nn.Conv2d.
    """

    side = "output"
    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "add"  # adds F.linear(x, delta W): commutes with LoRA-like terms
    no_decay = ()  # every factor is neutral at 0 (a zero factor zeroes the update), so all may decay

    def __init__(self, host: nn.Module, name: str, r: int, alpha: float, config: LoKrConfig,
                 dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)
        out_f, in_f, k = _setup(self, host, name, "LoKr", r, alpha, config)
        self.rescale_rank_dropout = bool(config.rank_dropout_scale)
        kw = dict(dtype=dtype or torch.float32, device=module_device(host, recurse=False))
        (a, b), (c, d) = factorization(out_f, config.decompose_factor), factorization(in_f, config.decompose_factor)
        use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        use_w2 = r >= max(b, d) / 2
        self.effective = bool(config.use_effective_conv2d) and len(k) > 0 and math.prod(k) > 1 and not use_w2
        if use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, **kw))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r, **kw))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c, **kw))
        if use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *k, **kw))
        elif self.effective:
            self.lokr_t2 = nn.Parameter(torch.empty((r, r, *k) if len(k) == 2 else (r, r, k[0], 1), **kw))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b, **kw))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d, **kw))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r, **kw))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(k), **kw))
        self._init(config.init_weights)

    def _init(self, init) -> None:
        w1 = [self.lokr_w1] if hasattr(self, "lokr_w1") else [self.lokr_w1_a, self.lokr_w1_b]
        w2 = [self.lokr_w2] if hasattr(self, "lokr_w2") else [self.lokr_w2_a, self.lokr_w2_b]
        with torch.no_grad():
            _kaiming(*w1, *w2, *([self.lokr_t2] if self.effective else []))
            if init is True:
                nn.init.zeros_(w1[0])  # lokr_w1, or lokr_w1_a
            elif init == "lycoris":
                nn.init.zeros_(w2[-1])  # lokr_w2, or lokr_w2_b

    def raw_delta(self) -> torch.Tensor:
        """``(alpha / r) * kron(w1, w2)``; a 4-d ``w2`` (convolution kernels) takes ``w1`` as (a, c, 1, 1)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif self.effective:
            w2 = _cp(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return kron(w1, w2) * self.scaling

    def forward(self, x, out, call):
        return _forward(self, x, out, call)

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """``w + delta W`` (float32, canonical layout)."""
        return _merge_into(self, w)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, shape={self.weight_shape}"


def _injector(adapter_cls, method: str):
    def inject(model: nn.Module, config, rec: AdapterRecord, *, adapter_dtype=None) -> None:
        # one adapter per targeted module (rank_pattern/alpha_pattern per module), then the
        # modules_to_save copies
        hosts = resolve_targets(model, config, method.lower())
        for name in hosts:
            host = model.get_submodule(name)
            r = pattern_value(config.rank_pattern, name, config.r)
            alpha = pattern_value(config.alpha_pattern, name, config.alpha)
            dtype = resolve_dtype(adapter_dtype, getattr(host, "weight", None))
            attach(model, name, rec.name, adapter_cls(host, name, r, alpha, config, dtype=dtype))
        finish_inject(model, config, rec, hosts)

    return inject


register_method(LoHaConfig, _injector(LoHaAdapter, "LoHa"))
register_method(LoKrConfig, _injector(LoKrAdapter, "LoKr"))
