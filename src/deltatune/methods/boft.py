"""BOFT: orthogonal fine-tuning with butterfly-factorised rotations.

Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
arXiv:2311.06243. The rotation of a layer's ``in`` input features is a product of ``m`` sparse
orthogonal factors (``m = boft_n_butterfly_factor``); factor ``i`` is a block-diagonal matrix of
``D`` Cayley rotations of size ``b`` (``D * b = in``) conjugated by a fixed butterfly permutation
``P_i`` (``P_0 = I``), and a trained per-output scale ``s`` (init 1) multiplies the result::

    M = B_{m-1} ... B_0,   B_i = P_i blockdiag(cayley(R_i1) .. cayley(R_iD)) P_i^T,   cayley(R) = (I - S)(I + S)^-1, S = (R - R^T) / 2
    y = s * (W (x M)) + b0                  (merged: W' = diag(s) W M^T, b0 unchanged)

``R = 0`` and ``s = 1`` at init give the base model exactly. On convolutions (nn.Conv2d, square
kernel, groups 1, uniform stride/padding, dilation 1) the rotation acts on the flattened
``in * k * k`` kernel inputs and the layer is computed with ``diag(s) W M^T``, as PEFT does.
``boft_dropout`` replaces that share of one factor's blocks by ``I`` while training.

How it runs: BOFT replaces what the layer computes (a rotated input, a scaled output), so it is an
output-side adapter that computes the layer again with the rotated input (linear layers: as PEFT,
``x M`` then the host's current weight) or the rotated, scaled weight (convolutions), using the
host's current weight and bias (merged neighbours included) and discarding the host's own result;
it composes as ``"other"``. An unmerged output-side adapter acting before it on the same layer
cannot be rotated with it and is refused at the forward. The permutations are applied as index
gathers and the blocks as batched products, never as dense ``in x in`` matrices.

File keys are PEFT's (``base_model.model.<path>.boft_R`` (m, D, b, b), ``boft_s``: (out, 1) on
linear layers, (1, out) on convolutions). Note: PEFT 0.21 builds BOFT with a butterfly factor of 1
whenever its CUDA extension cannot be compiled (every CPU run), whatever the config says; such a
file's ``boft_R`` has m = 1 under a config with a larger factor, and deltatune refuses it with a
shape error. Files with factor 1, and GPU-made files, load both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype
from ..config import AdapterConfig, LayerAdapterConfig, register_config
from ..inject import register_method
from ..layers import dense_weight
from ..routing import attach
from .common import check_kind, finish_inject, resolve_targets


@register_config
@dataclass
class BOFTConfig(LayerAdapterConfig):
    """BOFT configuration, field for field as Hugging Face PEFT's ``BOFTConfig`` (module docstring).

    Fields:
        boft_block_size: block size ``b`` (default 4); or give ``boft_block_num`` (``D``) instead
            (exactly one of the two is non-zero).
        boft_n_butterfly_factor: number of butterfly factors ``m`` (default 1: plain block-diagonal OFT).
        boft_dropout: share of one factor's blocks set to ``I`` while training. Default 0.0.
        init_weights: True: ``R = 0``, ``s = 1`` (identity); False: ``R ~ N(0, 0.1)``, ``s ~ N(1, 0.1)``.
        fan_in_fan_out: kept for PEFT (True when a transformers Conv1D is targeted).
        bias: "none", "all" or "boft_only", trained and saved as LoRA's.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as LoraConfig.

    Raises:
        ValueError: ``boft_block_size`` and ``boft_block_num`` both 0 or both set.
    """

    PEFT_TYPE = "BOFT"
    neutral_fields = AdapterConfig.neutral_fields | {"init_weights", "boft_dropout"}

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError("BOFTConfig: set boft_block_size or boft_block_num (both are 0)")
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ValueError(f"BOFTConfig: set boft_block_size ({self.boft_block_size}) or boft_block_num "
                             f"({self.boft_block_num}), not both (their product is the layer's input size)")
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(f"boft_n_butterfly_factor must be >= 1, got {self.boft_n_butterfly_factor}")


def butterfly_perm(n: int, blocks: int, half: int, factors_left: int) -> torch.Tensor:
    """The butterfly permutation (PEFT's ``block_butterfly_perm``): within each of ``blocks`` groups of
    ``n // blocks`` indices, the sub-blocks of size ``half`` at even positions come first, then the
    odd ones. Identity when ``factors_left == 0``."""
    if factors_left == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError("BOFT: invalid number of blocks for the butterfly permutation")
    size = n // blocks
    step = size / half
    seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = torch.empty(size, dtype=torch.long)
    for i, pos in enumerate(seq):
        order[int(i * half): int(i * half + half)] = torch.arange(size)[int(pos * half): int(pos * half + half)]
    idx = torch.arange(n)
    for start in range(0, n, size):
        idx[start: start + size] = idx[start: start + size][order]
    return idx


def boft_layout(n: int, block_size: int, block_num: int, factor: int, name: str) -> tuple[int, int]:
    """``(D, b)`` for a layer of ``n`` inputs, checked as PEFT checks them.

    Raises:
        ValueError: ``n`` not divisible, or a butterfly factor the sizes do not allow.
    """
    m = factor - 1
    if block_size == 0:
        if n % block_num:
            raise ValueError(f"BOFT on {name}: its {n} inputs are not divisible by boft_block_num={block_num}")
        if m and (m > int(math.log2(block_num)) or block_num % (2 ** m)):
            raise ValueError(f"BOFT on {name}: boft_n_butterfly_factor={factor} does not fit boft_block_num={block_num}")
        block_size = n // block_num
    else:
        if n % block_size:
            raise ValueError(f"BOFT on {name}: its {n} inputs are not divisible by boft_block_size={block_size}")
        if m and (n < block_size * 2 ** m or n % (block_size * 2 ** m)):
            raise ValueError(f"BOFT on {name}: boft_n_butterfly_factor={factor} and boft_block_size={block_size} do "
                             f"not fit {n} inputs")
        block_num = n // block_size
    if m and (block_num % 2 or block_size % 2):
        raise ValueError(f"BOFT on {name}: a butterfly factor > 1 needs an even block size and block count "
                         f"(got {block_size} and {block_num})")
    return block_num, block_size


def cayley_half_skew(r: torch.Tensor) -> torch.Tensor:
    """(k, b, b) orthogonal ``(I - S)(I + S)^-1`` with ``S = (r - r^T) / 2`` (BOFT's Cayley map)."""
    k, b, _ = r.shape
    w = r.float() if r.dtype in (torch.float16, torch.bfloat16) else r  # LU has no half-precision kernels
    s = 0.5 * (w - w.transpose(1, 2))
    eye = torch.eye(b, dtype=w.dtype, device=w.device).expand(k, b, b)
    return torch.linalg.solve(eye + s, eye - s, left=False).to(r.dtype)


class BOFTAdapter(nn.Module):
    """BOFT on one linear layer or nn.Conv2d (module docstring).

    Parameters (adapter dtype, PEFT's names): ``boft_R`` (m, D, b, b), ``boft_s`` (out, 1) on linear
    layers or (1, out) on convolutions. Buffers (not saved): ``perm``, ``inv_perm`` (m, in).
    Called as ``adapter(x, out, call) -> s * (W (x M)) + b0`` (convolutions: the host's convolution
    with ``diag(s) W M^T``), in the adapter dtype, cast to ``out``'s.

    Raises:
        TypeError: another layer kind. ValueError: sizes BOFT cannot split, a convolution with a
            non-square kernel, groups > 1, dilation > 1 or different strides/paddings per dimension;
            at the forward, an unmerged output-side adapter acting before it on the same layer.
    """

    side = "output"
    merge_error = None
    uses_base_output = True  # it checks that no adapter before it changed the output (and no in-place adds)
    supports_inplace = False
    composes = "other"
    no_decay = ("boft_s",)  # the output scale is neutral at 1; boft_R is neutral at 0 and decays

    def __init__(self, host: nn.Module, name: str, config: BOFTConfig, dtype=None):
        super().__init__()
        kind = check_kind(host, name, "BOFT", ("linear-like", "conv2d"))
        self.kind, self.conv = kind.name, not kind.linear_like
        n, out_f = kind.in_features(host), kind.out_features(host)
        if self.conv:
            k = tuple(host.kernel_size)
            if (k[0] != k[1] or host.groups != 1 or tuple(host.dilation) != (1, 1) or len(set(host.stride)) != 1
                    or not isinstance(host.padding, tuple) or len(set(host.padding)) != 1
                    or getattr(host, "padding_mode", "zeros") != "zeros"):
                raise ValueError(f"BOFT on {name}: only square kernels with groups=1, dilation 1, zero padding and "
                                 "the same stride and padding in both dimensions are supported (as PEFT computes them)")
            n = n * k[0] * k[1]
        factor = int(config.boft_n_butterfly_factor)
        d, b = boft_layout(n, config.boft_block_size, config.boft_block_num, factor, name)
        self.blocks, self.block_size, self.in_features = d, b, n
        self.dropout = float(config.boft_dropout)
        self.merged = False
        dev = module_device(host, recurse=False)
        kw = dict(dtype=dtype or torch.float32, device=dev)
        self.boft_R = nn.Parameter(torch.zeros(factor, d, b, b, **kw))
        self.boft_s = nn.Parameter(torch.ones(*((1, out_f) if self.conv else (out_f, 1)), **kw))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
                nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = torch.stack([butterfly_perm(n, d // 2 ** i, b // 2, factor - 1) for i in range(factor)]).to(dev)
        self.register_buffer("perm", perms, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perms, dim=1), persistent=False)

    # -- the rotation ------------------------------------------------------------------------
    def _blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """(m, D, b, b) Cayley blocks (training: one factor's blocks dropped to I with ``boft_dropout``)."""
        m, d, b, _ = self.boft_R.shape
        rot = cayley_half_skew(self.boft_R.to(dtype).reshape(m * d, b, b)).reshape(m, d, b, b)
        if self.training and self.dropout > 0:
            n = int(self.dropout * d)
            mask = torch.cat([torch.ones(n, device=rot.device), torch.zeros(d - n, device=rot.device)])
            mask = mask[torch.randperm(d, device=rot.device)].view(1, d, 1, 1)
            full = torch.zeros(m, d, 1, 1, device=rot.device)
            full[int(torch.randint(0, m, (1,)))] = mask[0]
            full = full.to(rot.dtype)
            rot = (1 - full) * rot + full * torch.eye(b, dtype=rot.dtype, device=rot.device)
        return rot

    def _right(self, x: torch.Tensor, i: int, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``x @ B_i`` (or ``x @ B_i^T``) over the last dimension of ``x``, ``B_i = P_i blockdiag P_i^T``."""
        xp = x.index_select(-1, self.inv_perm[i])  # x @ P_i
        xb = xp.reshape(*x.shape[:-1], self.blocks, self.block_size)
        eq = "...dk,dck->...dc" if transpose else "...dk,dkc->...dc"
        y = torch.einsum(eq, xb, blocks[i]).reshape(x.shape)
        return y.index_select(-1, self.perm[i])  # @ P_i^T

    def rotate_input(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``x @ M`` with ``M = B_{m-1} ... B_0``."""
        for i in reversed(range(blocks.shape[0])):
            x = self._right(x, i, blocks, transpose=False)
        return x

    def rotate_weight(self, w: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``w @ M^T`` for a (out, in) matrix ``w``."""
        for i in range(blocks.shape[0]):
            w = self._right(w, i, blocks, transpose=True)
        return w

    def _scale(self) -> torch.Tensor:
        return self.boft_s.reshape(-1)  # (out,)

    # -- forward and merge -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, out: torch.Tensor, call) -> torch.Tensor:
        if out is not call.base_output:
            raise ValueError("BOFT computes its layer again from the rotated input, so it cannot follow another "
                             "unmerged adapter on the same layer: merge that one, or activate one at a time")
        host = call.host
        dt = compute_dtype(x, self.boft_R.dtype)
        w = dense_weight(host).to(dt)
        bias = getattr(host, "bias", None)
        if dt != self.boft_R.dtype and not self.conv and out.dtype == torch.float32:
            return self._small_change(x, out, w, bias)
        blocks = self._blocks(self.boft_R.dtype).to(dt)  # made in the adapter dtype, applied in x's under autocast
        s = self._scale().to(dt)
        if self.conv:
            w_eff = (s[:, None] * self.rotate_weight(w.reshape(w.shape[0], -1), blocks)).reshape(w.shape)
            y = F.conv2d(x.to(dt), w_eff, None if bias is None else bias.to(dt), host.stride, host.padding)
        else:
            y = F.linear(self.rotate_input(x.to(dt), blocks), w) * s
            if bias is not None:
                y = y + bias.to(dt)
        return y.to(out.dtype)

    def _small_change(self, x, out, w, bias):
        """Under autocast: ``s * (out - b + W (x M - x)) + b`` in float32, ``out`` the host's (widened)
        output ``W x + b``. The rotation's change ``x M - x`` is made in float32 and only it passes
        the bf16 matmul, so a small rotation is not lost in rounding ``x M`` to bf16."""
        b = 0.0 if bias is None else bias.float()
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            moved = self.rotate_input(xf, self._blocks(torch.float32)) - xf
        return (out - b + F.linear(moved, w).float()) * self._scale().float() + b

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """``diag(s) W M^T`` (float32, canonical layout; convolutions over the flattened kernel inputs)."""
        blocks = self._blocks(torch.float32)
        w2 = self.rotate_weight(w.reshape(w.shape[0], -1), blocks)
        return (self._scale().to(w.dtype)[:, None] * w2).reshape(w.shape)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, factors={self.boft_R.shape[0]}, blocks={self.blocks}, "
                f"block_size={self.block_size}")


def inject_boft(model: nn.Module, config: BOFTConfig, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Attach a :class:`BOFTAdapter` to every target of ``config``, and the modules_to_save copies
    and trained biases.

    Raises:
        ValueError: nothing matches, or sizes/convolutions BOFT cannot take. TypeError: another layer kind.
    """
    hosts = resolve_targets(model, config, "boft")
    for name in hosts:
        host = model.get_submodule(name)
        ad = BOFTAdapter(host, name, config, resolve_dtype(adapter_dtype, getattr(host, "weight", None)))
        if ad.kind == "conv1d_hf":
            config.fan_in_fan_out = True  # what peft records for GPT-2's Conv1D
        attach(model, name, rec.name, ad)
    finish_inject(model, config, rec, hosts)


register_method(BOFTConfig, inject_boft)
