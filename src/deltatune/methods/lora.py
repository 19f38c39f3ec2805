"""LoRA, rsLoRA and DoRA.

* LoRA (Hu et al., arXiv:2106.09685): the frozen weight ``W`` (out x in) gets a trainable low-rank
  update ``delta W = s * B @ A`` with ``A`` (r x in), ``B`` (out x r) and ``s = lora_alpha / r``::

      y = W x + b + s * B(A(dropout(x)))

* rsLoRA (Kalajdzievski, arXiv:2312.03732): ``s = lora_alpha / sqrt(r)`` (``use_rslora=True``).
* DoRA (Liu et al., arXiv:2402.09353): the updated weight is renormalised per output row and
  rescaled by a trainable magnitude ``m`` (out,), initialised to ``||W||_row``::

      W' = m * (W + s B A) / ||W + s B A||_row         (the norm is detached, paper sec. 4.3)

The same adapter module serves every layer kind of :mod:`deltatune.layers` (Linear, transformers
Conv1D, Embedding, Conv1d/2d/3d, and any registered quantized kind); it reads the base weight only
through the layer-kind registry.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype

from ..routing import attach, attach_modules_to_save
from ..config import AdapterConfig, LayerAdapterConfig, register_config
from ..geometry import default_targets
from ..inject import claim_base_tensor, register_method
from ..layers import dense_weight, layer_kind, set_dense_weight
from ..merge import is_merged, unmerged_dense_weight
from ..targets import find_targets, is_adapter_path, nearest_names, unmatched_patterns


@register_config
@dataclass
class LoraConfig(LayerAdapterConfig):
    """LoRA / rsLoRA / DoRA configuration, field for field as Hugging Face PEFT's ``LoraConfig``.

    Fields:
        r: rank of the update (int > 0). Default 8.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r`` (or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``). Default 8.
        lora_dropout: dropout probability on the adapter input. Default 0.0.
        target_modules: list of names (exact or dotted suffix), a regex string (full match), or
            ``"all-linear"``. See :mod:`deltatune.targets`. ``None`` (PEFT's default): the usual
            attention projections of the model's architecture (PEFT's table by ``model_type``,
            supplied by :mod:`deltatune.integrations.transformers`), written into the config at inject.
        exclude_modules: same forms; excluded modules are never adapted.
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha``; keys are
            regexes matched against the end of the module name. A key that matches no adapted
            module is an error (it lists the nearest module names), never silently ignored.
        bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted
            layers). Biases train in place and are saved with the adapter (PEFT's keys). The
            adapter holds its own values of them (see :mod:`deltatune.inject`): the model uses
            them only while the adapter is active, so ``disable_adapter``, another active adapter
            and deleting this one all see the original biases (``merge_and_unload`` keeps the
            trained ones).
        use_rslora: rank-stabilised scaling (arXiv:2312.03732). use_dora: weight-decomposed LoRA
            (DoRA, arXiv:2402.09353), on linear, Conv1D, convolution and embedding layers.
        init_lora_weights: True (Kaiming-uniform A, zero B: the model starts as the base),
            "gaussian" (A ~ N(0, 1/r)), "pissa" / "pissa_niter_K" (PiSSA, arXiv:2404.02948:
            principal singular vectors; the base weight becomes the residual), "olora" (OLoRA,
            arXiv:2406.01775: QR; also rewrites the base weight), or False (A and B both random:
            the model does not start as the base). Embeddings always start as A = 0, B ~ N(0, 1)
            unless False; PiSSA/OLoRA apply to linear kinds only. The residual weight is this
            adapter's own (the model uses it only while the adapter is active), so the base model,
            ``disable_adapter`` and every other adapter see the original weight.
        modules_to_save: modules trained in full (as a copy) and saved with the adapter.
        fan_in_fan_out: PEFT's flag for layers storing (in, out) weights. deltatune knows each
            layer kind's layout (a transformers Conv1D is read transposed), so the flag is not
            needed; on ``nn.Linear`` it is ignored with a warning, as PEFT does.
        lora_bias: a trainable bias on ``lora_B`` (merged into the host's bias).

    Keys of a PEFT config that deltatune does not implement (``layer_replication``,
    ``trainable_token_indices``, ``use_qalora``...) are kept in ``extra`` and refused at inject when
    set, rather than silently ignored.
    """

    PEFT_TYPE = "LORA"
    neutral_fields = AdapterConfig.neutral_fields | {"init_lora_weights", "lora_dropout"}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) <= 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1], got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        ok = self.init_lora_weights in (True, False, "gaussian", "pissa", "olora") or (
            isinstance(self.init_lora_weights, str) and re.fullmatch(r"pissa_niter_\d+", self.init_lora_weights)
        )
        if not ok:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: use True, False, "
                "'gaussian', 'pissa', 'pissa_niter_K' or 'olora'"
            )


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor ``s`` on ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA
    (Kalajdzievski, arXiv:2312.03732)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(patterns: dict, key: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first pattern matching the end of ``key``."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


class LoraAdapter(nn.Module):
    """One LoRA/DoRA adapter on one host layer.

    Parameters (names as in PEFT's state dict):
        linear kinds and convolutions: ``lora_A`` (module, weight (r, in[, *k])),
        ``lora_B`` (module, weight (out, r[, 1...])); embeddings: ``lora_embedding_A`` (r, num) and
        ``lora_embedding_B`` (dim, r); DoRA: ``lora_magnitude_vector`` (out,) ((1, out, 1..) on convs).

    Called by the host's output hook as ``adapter(x, out, call) -> out + contribution``; ``x`` is the host input
    (B, ..., in) of any float dtype (ids for embeddings), ``out`` the host output (B, ..., out).
    Adapter maths runs in the adapter's dtype (``x`` is cast to it); the contribution is cast to
    ``out.dtype``. The contribution is defined against the *unmerged* base weight ``W0``, so
    several adapters on one layer add up to what merging them gives:

        LoRA: ``s * B A x``;  DoRA: ``(m / n - 1) * (W0 x) + (m / n) * s * B A x`` with
        ``n = ||W0 + s B A||_row`` (detached).
    """

    side = "output"
    supports_inplace = True  # may add into ``out`` in place when the hook says no one else holds it
    composes = "add"
    no_decay = ("lora_magnitude_vector",)  # DoRA's magnitude starts at ||W||, not 0

    def __init__(self, host: nn.Module, r: int, lora_alpha: float, lora_dropout: float, *,
                 use_rslora: bool = False, use_dora: bool = False, init_lora_weights=True,
                 fan_in_fan_out: bool = False, lora_bias: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__()
        kind = layer_kind(host)
        if kind is None:
            raise TypeError(f"LoRA cannot adapt a {type(host).__name__}")
        self.kind = kind.name
        self.linear_like = kind.linear_like
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora = use_dora
        self.uses_base_output = use_dora  # DoRA reads call.base_output (the host's own output)
        # The layer kind owns the storage layout (a transformers Conv1D is read transposed by its
        # kind), so the adapter never transposes: PEFT's fan_in_fan_out flag is not needed.
        self.merged = False
        self.merge_error: Optional[str] = None
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        dtype = dtype or torch.float32
        dev = module_device(host, recurse=False)
        fin, fout = kind.in_features(host), kind.out_features(host)
        self.in_features, self.out_features = fin, fout
        if kind.name == "embedding":
            self.lora_embedding_A = nn.Parameter(torch.empty(r, fin, dtype=dtype, device=dev))
            self.lora_embedding_B = nn.Parameter(torch.empty(fout, r, dtype=dtype, device=dev))
        elif kind.linear_like:
            self.lora_A = nn.Linear(fin, r, bias=False, dtype=dtype, device=dev)
            self.lora_B = nn.Linear(r, fout, bias=lora_bias, dtype=dtype, device=dev)
        else:  # convolutions
            conv = type(host)
            if host.groups != 1:
                raise ValueError(f"LoRA on a grouped convolution (groups={host.groups}) is not supported")
            if getattr(host, "padding_mode", "zeros") != "zeros":
                raise ValueError(f"LoRA on a convolution with padding_mode={host.padding_mode!r} is not supported")
            nd = host.weight.dim() - 2
            self.lora_A = conv(fin, r, host.kernel_size, host.stride, host.padding, dilation=host.dilation,
                               bias=False, dtype=dtype, device=dev)
            self.lora_B = conv(r, fout, (1,) * nd, (1,) * nd, bias=lora_bias, dtype=dtype, device=dev)
        if lora_bias:
            if getattr(host, "bias", None) is None:
                self.merge_error = ("lora_bias=True on a layer without a bias: the trained lora_B bias has "
                                    "nowhere to go in the base layer")
            elif use_dora:
                self.merge_error = "merging lora_bias=True together with DoRA is not implemented"
        self._init(host, init_lora_weights)
        if use_dora:
            with torch.no_grad():
                w = self._base_weight(host, torch.float32)
                norm = self._weight_norm(w, self._lora_weight().to(w.dtype))
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))

    # -- init -----------------------------------------------------------------------------
    def _init(self, host, init):
        with torch.no_grad():
            if self.kind == "embedding":
                # PEFT: A = 0, B ~ N(0, 1) for every init except False (both random); the SVD
                # inits do not apply to embeddings
                if init is False:
                    nn.init.normal_(self.lora_embedding_A)
                    nn.init.normal_(self.lora_embedding_B)
                else:
                    nn.init.zeros_(self.lora_embedding_A)
                    nn.init.normal_(self.lora_embedding_B)
                return
            if init is False:
                return  # both keep their default (random) nn init
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            elif isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
                return self._svd_init(host, init)
            nn.init.zeros_(self.lora_B.weight)
            if self.lora_B.bias is not None:
                nn.init.zeros_(self.lora_B.bias)

    def _svd_init(self, host, init):
        kind = layer_kind(host)
        if not kind.linear_like:
            raise ValueError(f"init_lora_weights={init!r} is supported on linear layers only, not on {kind.name}")
        if getattr(kind, "replaces_weight", False):
            raise ValueError(f"init_lora_weights={init!r} rewrites the base weight and cannot be used on a "
                             f"{kind.name} layer: initialise on the dense model, then quantize")
        w = dense_weight(host).detach().float()
        r = self.r
        if init == "olora":
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r].contiguous(), q[:, :r].contiguous()
        else:
            if init == "pissa":
                v, s, uh = torch.linalg.svd(w, full_matrices=False)
                vr, sr, uhr = v[:, :r], s[:r].clone(), uh[:r]
            else:
                niter = int(init.split("_niter_")[-1])
                vr, sr, ur = torch.svd_lowrank(w, r, niter=niter)
                uhr = ur.t()
            sr /= self.scaling
            a = torch.diag(torch.sqrt(sr)) @ uhr
            b = vr @ torch.diag(torch.sqrt(sr))
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        set_dense_weight(host, w - self.scaling * (b @ a))  # the residual: this adapter's own (claimed) weight

    # -- weights --------------------------------------------------------------------------
    def _base_weight(self, host, dtype):
        """The unmerged base weight ``W0`` in canonical layout, even while adapters are merged."""
        return unmerged_dense_weight(host).to(dtype)

    def _lora_weight(self) -> torch.Tensor:
        """``B @ A`` (unscaled) in the host's canonical weight layout, in the adapter dtype (also
        under autocast, which would round it to bf16 before it meets ``W``)."""
        with torch.autocast(self.lora_A.weight.device.type if self.kind != "embedding"
                            else self.lora_embedding_A.device.type, enabled=False):
            return self._lora_product()

    def _lora_product(self) -> torch.Tensor:
        if self.kind == "embedding":
            return self.lora_embedding_B @ self.lora_embedding_A  # (dim, num)
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dim() == 2:
            return b @ a
        # B is a 1x1 convolution: the composed kernel is B (out, r) times A (r, in * k...)
        r = a.shape[0]
        return torch.mm(b.reshape(-1, r), a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])

    def _weight_norm(self, w: torch.Tensor, lora_w: torch.Tensor) -> torch.Tensor:
        """``||W + s BA||`` per output, float32: in bf16 the sum rounds a small ``s BA`` back onto ``W``."""
        v = w.float() + self.scaling * lora_w.float()
        if v.dim() == 2:
            return torch.linalg.norm(v, dim=1)
        dims = tuple(range(1, v.dim()))
        return v.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """The merged weight minus the base weight, float32, canonical layout (out, in[, *k]).

        DoRA's delta is taken against the unmerged base weight ``W0`` (as its forward computes it),
        so merging several adapters into one layer gives what running them unmerged gives.
        """
        lw = self._lora_weight().float()
        if not self.use_dora:
            return self.scaling * lw
        w = self._base_weight(host, torch.float32)
        norm = self._weight_norm(w, lw)
        m = self.lora_magnitude_vector.float()
        scale = (m / norm)
        if w.dim() == 2:
            scale = scale.view(-1, 1)
        else:
            scale = scale.transpose(0, 1)  # (out, 1, ...)
        return scale * (w + self.scaling * lw) - w

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """The merged float32 weight: ``w + delta_weight(host)`` (canonical layout)."""
        if self.merge_error:
            raise ValueError(self.merge_error)
        return w + self.delta_weight(host).to(w.dtype)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        """The merged float32 bias: ``b + s * lora_B.bias`` (``lora_bias=True``), else ``b`` itself."""
        bb = None if self.kind == "embedding" else self.lora_B.bias
        if bb is None:
            return b
        return b + self.scaling * bb.detach().float().reshape(-1)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, out: torch.Tensor, call) -> torch.Tensor:
        """``out + contribution`` (see the class docstring); ``call``: the routing hook's
        :class:`~deltatune.adapters.HostCall` (its ``base_output`` for DoRA, ``inplace``)."""
        host, base_output = call.host, call.base_output
        if self.kind == "embedding":
            h = F.embedding(x, self.lora_embedding_A.T, host.padding_idx, host.max_norm,
                            host.norm_type, host.scale_grad_by_freq, host.sparse)  # (..., r)
            if self.use_dora:
                return out + self._dora_embedding(x, h, out if base_output is None else base_output, host)
            return _add_scaled(out, h, self.lora_embedding_B, None, self.scaling, call.inplace)
        dt = compute_dtype(x, self.lora_A.weight.dtype)
        xa = x if x.dtype == dt else x.to(dt)
        if self.use_dora:
            return out + self._dora(xa, out if base_output is None else base_output, host).to(out.dtype)
        h = self.lora_A(self.lora_dropout(xa))  # (..., r)
        if call.widen:
            return _WidenedAdd.apply(out, h, self.lora_B.weight, self.scaling)
        if self.linear_like:
            return _add_scaled(out, h, self.lora_B.weight, self.lora_B.bias, self.scaling, call.inplace)
        return out + (self.lora_B(h) * self.scaling).to(out.dtype)

    def widens(self) -> bool:
        """Whether :meth:`forward` can take a bf16/fp16 host output and return it in float32 with
        the update added (``call.widen``, see :class:`_WidenedAdd`): linear-like hosts, no DoRA,
        no ``lora_bias``."""
        return self.linear_like and not self.use_dora and self.lora_B.bias is None

    def _dora(self, x, base_out, host):
        dt = x.dtype
        w32 = self._base_weight(host, torch.float32)  # read once: the norm in float32, the matmul in x's dtype
        norm = self._weight_norm(w32, self._lora_weight().detach()).detach()
        mag = self.lora_magnitude_vector / norm
        conv = w32.dim() > 2
        dropout_on = self.training and not isinstance(self.lora_dropout, nn.Identity)
        if not dropout_on and not is_merged(host):
            # reuse the host's output W0 x + b (no second base matmul)
            base = base_out.to(dt)
            bias = getattr(host, "bias", None)
            if bias is not None:
                shape = (1, -1) + (1,) * (base.dim() - 2) if conv else (-1,)
                base = base - bias.to(dt).view(*shape)
        else:
            x = self.lora_dropout(x)
            w = w32.to(dt)
            if conv:
                fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
                base = fn(x, w, None, host.stride, host.padding, host.dilation, host.groups)
            else:
                base = F.linear(x, w)
        if not conv:
            mag = mag.view(1, -1) if base.dim() == 2 else mag
        return (mag - 1) * base + mag * self.lora_B(self.lora_A(x)) * self.scaling

    def _dora_embedding(self, ids, h, base_out, host):
        dt = h.dtype
        w = self._base_weight(host, dt)  # (dim, num)
        norm = self._weight_norm(w, self._lora_weight().detach()).detach()  # (dim,)
        mag = self.lora_magnitude_vector / norm
        if is_merged(host):
            base = F.embedding(ids, w.T, host.padding_idx)
        else:
            base = base_out.to(dt)
        return ((mag - 1) * base + mag * (h @ self.lora_embedding_B.T) * self.scaling).to(base_out.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, dora={self.use_dora}"


class _WidenedAdd(torch.autograd.Function):
    """``out.float() + scaling * h @ w_b.T`` for a host's bf16/fp16 output ``out`` (..., o) under
    autocast, ``h`` (..., r) in the compute dtype, ``w_b`` (o, r) (used in float32); returns float32
    (..., o), contiguous.

    The routing hook's widening (:func:`deltatune.routing._widened`: the update summed in float32
    so that a small one is not rounded away) and the update in one step. The backward pass casts
    the float32 gradient to ``h``'s dtype once: that is the host output's gradient (what the cast's
    own backward gave), and the update's two small matmuls run on it in that dtype, as autocast
    ran them; the weight's gradient is returned in float32."""

    @staticmethod
    def forward(ctx, out, h, w_b, scaling):
        h2 = h.reshape(-1, h.shape[-1])
        ctx.save_for_backward(h2, w_b)
        ctx.scaling, ctx.h_shape, ctx.out_dtype = scaling, h.shape, out.dtype
        y = out.to(torch.float32, memory_format=torch.contiguous_format)
        return _add_scaled(y, h, w_b, None, scaling, inplace=True)  # grad mode is off here: one addmm_ into y

    @staticmethod
    def backward(ctx, grad):
        h2, w_b = ctx.saved_tensors
        g = grad.to(h2.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        dh = dw = None
        if ctx.needs_input_grad[1]:
            dh = torch.mm(g2, w_b.to(g.dtype)).mul_(ctx.scaling).view(ctx.h_shape)
        if ctx.needs_input_grad[2]:
            dw = torch.mm(g2.t(), h2).to(w_b.dtype).mul_(ctx.scaling)
        return (g if g.dtype == ctx.out_dtype else grad.to(ctx.out_dtype)), dh, dw, None


def _add_scaled(out: torch.Tensor, h: torch.Tensor, w_b: torch.Tensor, b_b: Optional[torch.Tensor],
                scaling: float, inplace: bool = False) -> torch.Tensor:
    """``out + scaling * (h @ w_b.T + b_b)`` cast to ``out.dtype``; h (..., r), w_b (o, r), out (..., o).

    Without a bias this is one ``addmm`` in ``out``'s dtype, autocast off for it, when ``h`` has
    that dtype or is bf16/fp16 under a float32 ``out`` (under autocast ``out`` is the routing hook's
    float32 copy, see :func:`deltatune.routing._widened`: ``h`` (N, r) is cast up, ``w_b`` used in
    its own float32, and the update is summed in float32 instead of being rounded to bf16 first and
    added in three more passes). BLAS accumulates into ``out`` itself when the hook says no one
    else holds it (``inplace``: in inference, or ``out`` is the hook's float32 copy), else into a
    copy of it. Either saves full passes over the output compared with ``out + B(h) * s`` (a
    multiply, a cast and an add).
    """
    widened = out.dtype == torch.float32 and h.dtype in (torch.bfloat16, torch.float16)
    if b_b is None and (out.dtype == h.dtype or widened) and out.dim() >= 1:
        o = out.shape[-1]
        h2 = h.reshape(-1, h.shape[-1]).to(out.dtype)
        if w_b.dtype != out.dtype:
            w_b = w_b.to(out.dtype)
        with torch.autocast(out.device.type, enabled=False):
            if inplace and out.is_contiguous():
                if out.dim() == 2:  # on out itself, not a view of it: autograd needs no copy of the slices
                    return out.addmm_(h2, w_b.t(), alpha=scaling)
                if not torch.is_grad_enabled():
                    out.view(-1, o).addmm_(h2, w_b.t(), alpha=scaling)
                    return out
                if out.dim() == 3:
                    return out.baddbmm_(h2.view(*out.shape[:-1], h2.shape[-1]), w_b.t().expand(out.shape[0], -1, -1),
                                        alpha=scaling)
            return torch.addmm(out.reshape(-1, o), h2, w_b.t(), alpha=scaling).view(out.shape)
    y = F.linear(h, w_b, b_b) * scaling
    return out + y.to(out.dtype)


def bias_parameter_names(model: nn.Module, config, hosts: list[str]) -> list[str]:
    """Names of the base biases an adapter with ``config.bias`` trains (and saves)."""
    if getattr(config, "bias", "none") == "none":
        return []
    out = []
    for name, _ in model.named_parameters():
        if is_adapter_path(name) or not (name == "bias" or name.endswith(".bias")):
            continue
        owner = name.rsplit(".", 1)[0]
        if config.bias == "all" or owner in hosts:
            out.append(name)
    return out


# PEFT LoraConfig fields deltatune reads and keeps but does not implement: a non-empty value
# changes what the adapter computes, so such a config is refused rather than silently run wrong.
UNSUPPORTED_PEFT_FIELDS = (
    "layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
    "use_qalora", "megatron_config", "velora_config", "monteclora_config", "use_bdlora", "arrow_config",
    "kasa_config",
)


def _check_supported(config: LoraConfig) -> None:
    bad = {k: v for k, v in config.extra.items() if k in UNSUPPORTED_PEFT_FIELDS and v not in (None, False, [], {}, "")}
    if bad:
        raise ValueError(
            f"this LoRA config sets {', '.join(f'{k}={v!r}' for k, v in bad.items())}, which deltatune does not "
            "implement; remove it (or use peft for this adapter)"
        )


def _check_patterns(model: nn.Module, config: LoraConfig, hosts: list[str]) -> None:
    for field_name in ("rank_pattern", "alpha_pattern"):
        bad = unmatched_patterns(getattr(config, field_name), hosts)
        if bad:
            near = nearest_names(bad, hosts) or sorted({h.split(".")[-1] for h in hosts})[:8]
            raise ValueError(f"{field_name} keys {bad!r} match no adapted module (so they would change nothing); "
                             f"nearest adapted module names: {', '.join(near) or '(none)'}")


def inject_lora(model: nn.Module, config: LoraConfig, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Attach a LoRA/DoRA adapter to every module ``config`` targets (see :class:`LoraConfig`).

    Raises:
        ValueError: nothing matches (nearest names listed), a ``rank_pattern``/``alpha_pattern`` key
            matches no adapted module, an unsupported option or layer.
    """
    _check_supported(config)
    if config.target_modules is None:
        default = default_targets("lora", model)
        if default is None and not config.modules_to_save:
            raise ValueError("LoraConfig.target_modules is None and deltatune knows no default target modules for "
                             "this model's architecture: name the layers (a list, a regex, or 'all-linear')")
        config.target_modules = None if default is None else list(default)  # PEFT writes the resolved targets
    hosts = find_targets(model, config) if config.target_modules is not None else []
    _check_patterns(model, config, hosts)
    svd_init = isinstance(config.init_lora_weights, str) and (
        config.init_lora_weights.startswith("pissa") or config.init_lora_weights == "olora")
    warned_fifo = False
    for name in hosts:
        host = model.get_submodule(name)
        kind = layer_kind(host)
        if config.fan_in_fan_out and kind.name == "linear" and not warned_fifo:
            warnings.warn("fan_in_fan_out=True is ignored for torch.nn.Linear targets (their weight is (out, in)); "
                          "transformers Conv1D layers are recognised without it", stacklevel=3)
            warned_fifo = True
        if svd_init and kind.linear_like:
            claim_base_tensor(model, rec, f"{name}.weight")  # the residual weight is this adapter's own
        ad = LoraAdapter(
            host, pattern_value(config.rank_pattern, name, config.r),
            pattern_value(config.alpha_pattern, name, config.lora_alpha), config.lora_dropout,
            use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=config.init_lora_weights,
            lora_bias=config.lora_bias, dtype=resolve_dtype(adapter_dtype, getattr(host, "weight", None)),
        )
        attach(model, name, rec.name, ad)
    attach_modules_to_save(model, config, rec.name)
    rec.bias_params = bias_parameter_names(model, config, hosts)
    for pname in rec.bias_params:
        claim_base_tensor(model, rec, pname)


register_method(LoraConfig, inject_lora)
