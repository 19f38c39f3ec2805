"""OFT: orthogonal fine-tuning with block-diagonal Cayley-parametrised rotations.

Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", arXiv:2306.07280. The
input features of a layer are split into ``r`` blocks of ``b`` (``r * b = in``); each block is
multiplied by an orthogonal ``b x b`` matrix ``R_i`` made from a skew-symmetric ``Q_i`` (its
``b(b-1)/2`` upper-triangle entries are the trained ``oft_R.weight`` row ``i``)::

    x' = x @ blockdiag(R_1 .. R_r)      y = W x' + b0        (merged: W' = W blockdiag(R)^T)

``R = cayley(Q)``: with ``use_cayley_neumann`` (default) the truncated series
``I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)`` (``n = num_cayley_neumann_terms``), else the exact
``(I - Q)(I + Q)^-1``, both as Hugging Face PEFT computes them. ``Q = 0`` at init gives ``R = I``:
the model starts as the base model exactly. ``block_share`` uses one ``R`` for every block; ``coft``
(constrained OFT) projects each ``Q`` into a ball of radius ``eps / sqrt(r)`` before use (in place,
as PEFT does). ``module_dropout`` replaces that share of the blocks by ``I`` while training.

Where it acts. PEFT 0.21 rotates the layer's *input*, so on linear layers (nn.Linear, transformers
Conv1D, 4-bit linears) and 1x1 convolutions (the rotation mixes channels) OFT is an input-side
adapter (``x = adapter(x, None, call)``, routed before the host; it composes as ``"other"``, so a
partial merge that would reorder it is refused); on nn.Embedding it rotates the output rows
(``y' = y @ blockdiag(R)``, output side). A k x k convolution with k > 1 is refused: PEFT 0.21 rotates
overlapping unfolded patches and folds them back by summation there, so even a fresh adapter changes
the output and its merge disagrees with its forward (measured: a fresh adapter moves a 3x3 conv's
output by ~8); nothing exact can be computed from such a file.

File keys are PEFT's: ``base_model.model.<path>.oft_R.weight`` (embeddings: ``oft_embedding_R.weight``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype
from ..config import AdapterConfig, LayerAdapterConfig, register_config
from ..inject import register_method
from ..routing import attach
from .common import check_kind, finish_inject, resolve_targets


@register_config
@dataclass
class OFTConfig(LayerAdapterConfig):
    """OFT configuration, field for field as Hugging Face PEFT's ``OFTConfig`` (module docstring).

    Fields:
        r: blocks per layer; give either ``r`` or ``oft_block_size`` (the other is 0). Default 0.
        oft_block_size: block size ``b`` (default 32). A size that does not divide the layer's
            input is moved to the nearest divisor, with a warning (PEFT's rule).
        module_dropout: share of blocks set to the identity while training. Default 0.0.
        use_cayley_neumann, num_cayley_neumann_terms: the series (default, 5 terms) or the exact
            Cayley map. coft, eps: constrained OFT and its radius. block_share: one rotation for all blocks.
        init_weights: True: ``Q = 0`` (identity); False: ``Q ~ N(0, 0.1)``.
        fan_in_fan_out: kept for PEFT (True when a transformers Conv1D is targeted).
        bias: "none", "all" or "oft_only", trained and saved as LoRA's.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as LoraConfig.

    Raises:
        ValueError: ``r`` and ``oft_block_size`` both 0 or both set.
    """

    PEFT_TYPE = "OFT"
    neutral_fields = AdapterConfig.neutral_fields | {"init_weights", "module_dropout"}

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError("OFTConfig: set r or oft_block_size (both are 0)")
        if self.r != 0 and self.oft_block_size != 0:
            raise ValueError(f"OFTConfig: set r ({self.r}) or oft_block_size ({self.oft_block_size}), not both "
                             "(r x oft_block_size = the layer's input size)")


def nearest_divisor(n: int, want: int) -> int:
    """PEFT's adjustment of a block size or count ``want`` that does not divide ``n``: the nearer of
    the divisors just below and just above it (below on a tie); ``n`` when ``want >= n``."""
    if want >= n:
        return n
    higher = want
    while higher <= n and n % higher:
        higher += 1
    lower = want
    while lower > 1 and n % lower:
        lower -= 1
    return lower if want - lower <= higher - want else higher


def blocks_for(n: int, r: int, block_size: int, name: str) -> tuple[int, int]:
    """``(blocks, block size)`` for a layer of input size ``n`` from OFT's ``r`` / ``oft_block_size``."""
    if r == 0:
        if n % block_size or block_size > n:
            new = nearest_divisor(n, block_size)
            warnings.warn(f"OFT: oft_block_size {block_size} does not divide {name}'s {n} inputs; using {new}",
                          stacklevel=4)
            block_size = new
        return n // block_size, block_size
    if n % r or r > n:
        new = nearest_divisor(n, r)
        warnings.warn(f"OFT: r={r} does not divide {name}'s {n} inputs; using r={new}", stacklevel=4)
        r = new
    return r, n // r


def skew(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """(k, b, b) skew-symmetric matrices from their (k, b(b-1)/2) upper-triangle entries."""
    m = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype, device=vec.device)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Orthogonal (k, b, b) matrices from skew-symmetric ``q``: PEFT's truncated series
    ``I + 2q + 2q^2 + ... + q^(terms-1)``, or the exact ``(I - q)(I + q)^-1``."""
    k, b, _ = q.shape
    if not neumann:  # LU has no half-precision kernels: solve in float32
        w = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q
        eye = torch.eye(b, dtype=w.dtype, device=w.device).expand(k, b, b)
        return torch.linalg.solve(eye + w, eye - w, left=False).to(q.dtype)
    eye = torch.eye(b, dtype=q.dtype, device=q.device).expand(k, b, b)
    r = eye.clone()
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = torch.bmm(q, q)
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r = r + 2.0 * power
            r = r + torch.bmm(power, q)
    return r


def drop_blocks(rot: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p * k)`` random blocks of ``rot`` (k, b, b) become ``I``."""
    k, b, _ = rot.shape
    if k == 1 or p <= 0:
        return rot
    n = int(p * k)
    mask = torch.cat([torch.ones(n, device=rot.device), torch.zeros(k - n, device=rot.device)])
    mask = mask[torch.randperm(k, device=rot.device)].view(k, 1, 1).to(rot.dtype)
    return (1 - mask) * rot + mask * torch.eye(b, dtype=rot.dtype, device=rot.device)


class OFTRotation(nn.Module):
    """The trained part of one OFT layer: ``weight`` (blocks or 1, b(b-1)/2), adapter dtype (PEFT's
    ``oft_R.weight``), and how it becomes the rotation (module docstring)."""

    def __init__(self, blocks: int, b: int, config: OFTConfig, dtype, device):
        super().__init__()
        self.blocks, self.b = blocks, b
        self.share, self.coft, self.eps = bool(config.block_share), bool(config.coft), float(config.eps)
        self.neumann, self.terms = bool(config.use_cayley_neumann), int(config.num_cayley_neumann_terms)
        self.dropout = float(config.module_dropout)
        self.weight = nn.Parameter(torch.zeros(1 if self.share else blocks, b * (b - 1) // 2, dtype=dtype,
                                               device=device))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.weight, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(b, b, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _project(self) -> None:
        """COFT: each ``Q`` outside the ball of radius ``eps / sqrt(k)`` is scaled back onto it (in place)."""
        with torch.no_grad():
            q = skew(self.weight, self.rows, self.cols, self.b)
            eps = self.eps / math.sqrt(q.shape[0])
            norm = torch.linalg.matrix_norm(q, keepdim=True)
            q = torch.where(norm <= eps, q, eps * (q / norm))
            self.weight.copy_(q[:, self.rows, self.cols])

    def rotations(self, dtype: torch.dtype) -> torch.Tensor:
        """(blocks, b, b) orthogonal blocks in ``dtype`` (training: with multiplicative dropout)."""
        if self.coft:
            self._project()
        rot = cayley(skew(self.weight.to(dtype), self.rows, self.cols, self.b), self.neumann, self.terms)
        if self.share:
            rot = rot.expand(self.blocks, self.b, self.b)
        return drop_blocks(rot, self.dropout) if self.training else rot

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ blockdiag(R)`` over the last dimension of ``x`` (..., blocks * b), in the adapter dtype."""
        dt = compute_dtype(x, self.weight.dtype)
        rot = self.rotations(self.weight.dtype).to(dt)  # made in the adapter dtype, applied in x's under autocast
        xr = x.to(dt).reshape(*x.shape[:-1], self.blocks, self.b)
        return torch.einsum("...rk,rkc->...rc", xr, rot).reshape(x.shape).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """``blockdiag(R)`` (in, in), float32."""
        return torch.block_diag(*self.rotations(torch.float32).unbind(0))


class OFTAdapter(nn.Module):
    """OFT on one linear layer or 1x1 convolution: rotates the host's input (module docstring).

    Parameters: ``oft_R.weight`` (blocks or 1, b(b-1)/2), adapter dtype. Called by the input
    pre-hook as ``adapter(x, None, call) -> x @ blockdiag(R)`` (convolutions: over the channels,
    ``x`` (B, C, *spatial)); the result has ``x``'s dtype.

    Raises:
        TypeError: another layer kind. ValueError: a convolution with a kernel larger than 1 or
            groups > 1 (module docstring).
    """

    side = "input"
    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "other"  # a rotation: commutes with no other adapter
    no_decay = ()  # Q = 0 is the identity rotation: decay pulls towards the base model

    def __init__(self, host: nn.Module, name: str, config: OFTConfig, dtype=None):
        super().__init__()
        kind = check_kind(host, name, "OFT", ("linear-like", "conv1d", "conv2d", "conv3d"))
        self.kind, self.conv = kind.name, not kind.linear_like
        if self.conv and (math.prod(host.kernel_size) != 1 or host.groups != 1):
            raise ValueError(f"OFT on {name}: only 1x1 convolutions with groups=1 can be adapted exactly (PEFT 0.21's "
                             f"OFT on a {tuple(host.kernel_size)} kernel changes even a fresh model's output and cannot "
                             "be merged: see deltatune.methods.oft)")
        n = kind.in_features(host)
        blocks, b = blocks_for(n, config.r, config.oft_block_size, name)
        self.merged = False
        self.oft_R = OFTRotation(blocks, b, config, dtype or torch.float32, module_device(host, recurse=False))

    def forward(self, x: torch.Tensor, out, call) -> torch.Tensor:
        if not self.conv:
            return self.oft_R.rotate(x)
        return self.oft_R.rotate(x.movedim(1, -1)).movedim(-1, 1).contiguous()  # channels last, rotated, back

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """``W blockdiag(R)^T`` (float32, canonical (out, in[, 1...]))."""
        return (w.reshape(w.shape[0], -1) @ self.oft_R.matrix().T).reshape(w.shape)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return f"kind={self.kind}, blocks={self.oft_R.blocks}, block_size={self.oft_R.b}, side=input"


class OFTEmbeddingAdapter(nn.Module):
    """OFT on an nn.Embedding: rotates the looked-up rows, ``y' = y @ blockdiag(R)`` (output side).

    Parameters: ``oft_embedding_R.weight`` (blocks or 1, b(b-1)/2), adapter dtype.
    """

    side = "output"
    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "other"
    no_decay = ()

    def __init__(self, host: nn.Module, name: str, config: OFTConfig, dtype=None):
        super().__init__()
        self.kind = "embedding"
        blocks, b = blocks_for(host.embedding_dim, config.r, config.oft_block_size, name)
        self.merged = False
        self.oft_embedding_R = OFTRotation(blocks, b, config, dtype or torch.float32, module_device(host, recurse=False))

    def forward(self, x: torch.Tensor, out: torch.Tensor, call) -> torch.Tensor:
        return self.oft_embedding_R.rotate(out)

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """Canonical (dim, num): ``blockdiag(R)^T W``."""
        return self.oft_embedding_R.matrix().T @ w

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return f"kind=embedding, blocks={self.oft_embedding_R.blocks}, block_size={self.oft_embedding_R.b}"


def inject_oft(model: nn.Module, config: OFTConfig, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Attach OFT to every target of ``config`` (input rotation on linear layers and 1x1 convolutions,
    output rotation on embeddings), and the modules_to_save copies and trained biases.

    Raises:
        ValueError: nothing matches, a convolution OFT cannot adapt exactly. TypeError: another layer kind.
    """
    hosts = resolve_targets(model, config, "oft")
    for name in hosts:
        host = model.get_submodule(name)
        dtype = resolve_dtype(adapter_dtype, getattr(host, "weight", None))
        cls = OFTEmbeddingAdapter if isinstance(host, nn.Embedding) else OFTAdapter
        ad = cls(host, name, config, dtype)
        if ad.kind == "conv1d_hf":
            config.fan_in_fan_out = True  # what peft records for GPT-2's Conv1D
        attach(model, name, rec.name, ad)
    finish_inject(model, config, rec, hosts)


register_method(OFTConfig, inject_oft)
