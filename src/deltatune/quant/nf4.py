"""torchao backend (optional): the base weight becomes torchao's ``NF4Tensor`` inside the same
``nn.Linear``.

torchao's NF4 (the QLoRA format of Dettmers et al., arXiv:2305.14314) is a tensor subclass: the
layer keeps its class and ``F.linear`` dequantizes on the fly (to the input's dtype) with an
input gradient, so quantization really is a property of the weight. Its format: 4-bit NF4 codes
in blocks of 64, the per-block absmax scales minus their mean quantized linearly to int8 per
``scaler_block_size`` block (256; smaller when the number of blocks is not a multiple of 256, as
for SmolLM2's attention projections), one float scale per scaler block. NF4 only (no FP4), double
quantization always. It is pure PyTorch, hence ~15x slower to dequantize than bitsandbytes on
this CPU (see the README); select it with ``quantize_base(..., backend="torchao")``.

Reading the weight dequantizes to float32; writing one (merge) swaps in a dense Parameter of the
NF4 tensor's dtype (``LayerKind.replaces_weight``), and merge keeps the NF4 original for an exact
unmerge.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from ..layers import LayerKind, register_layer_kind

MARK = "_deltatune_4bit"
BLOCK = 64


def import_nf4():
    """torchao's ``NF4Tensor`` class (imported quietly: torchao logs its missing CUDA extensions).

    Raises:
        ImportError: torchao is not installed (``pip install torchao``).
    """
    if "torchao" not in sys.modules:
        logs = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
        prev = [lg.level for lg in logs]
        for lg in logs:
            lg.setLevel(logging.CRITICAL)
        try:
            import torchao  # noqa: F401
        except ImportError as e:
            raise ImportError("backend='torchao' needs torchao: pip install torchao") from e
        finally:
            for lg, lv in zip(logs, prev):
                lg.setLevel(lv)
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:  # torchao <= 0.15
        from torchao.dtypes.nf4tensor import NF4Tensor

    return NF4Tensor


def is_nf4_weight(t) -> bool:
    return type(t).__name__ == "NF4Tensor" and type(t).__module__.startswith("torchao")


def is_nf4_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and is_nf4_weight(m._parameters.get("weight"))


def scaler_block_size(n_blocks: int, preferred: int = 256) -> int:
    """The largest power of two <= ``preferred`` that divides ``n_blocks`` (torchao needs one)."""
    s = preferred
    while s > 1 and n_blocks % s:
        s //= 2
    return s


def can_quantize(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.numel() % BLOCK == 0


def quantize_weight(w: torch.Tensor) -> nn.Parameter:
    """``w`` (out, in) as an NF4Tensor Parameter of ``w``'s dtype (blocks of 64, double quantized).

    torchao dequantizes to the input's dtype in ``F.linear``, so the compute dtype is the
    activations' dtype; the NF4 tensor keeps the weight's dtype so that a merge writes a dense
    weight the layer can still multiply with its inputs."""
    NF4Tensor = import_nf4()
    w = w.detach().contiguous()
    sbs = scaler_block_size(w.numel() // BLOCK)
    return nn.Parameter(NF4Tensor.from_tensor(w, BLOCK, sbs), requires_grad=False)


def dequantize(m: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense (out, in) weight of ``dtype`` from torchao's own ``get_original_weight``."""
    return m.weight.get_original_weight().to(dtype)


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    dt = m.weight.dtype
    m.__dict__[MARK] = {"backend": "torchao", "cls": type(m), "dtype": dt}
    m._parameters["weight"] = nn.Parameter(w.detach().to(dt).contiguous(), requires_grad=False)


def requantize(m: nn.Module, spec: dict) -> torch.Tensor:
    w = m.weight.detach().to(torch.float32)
    m._parameters["weight"] = quantize_weight(m.weight)
    m.__dict__.pop(MARK, None)
    return dequantize(m) - w


def held_tensors(m: nn.Module) -> list[torch.Tensor]:
    w = m.weight
    return [getattr(w, a) for a in ("quantized_data", "quantized_scalers", "quantization_factor",
                                    "scaler_mean", "nf4") if isinstance(getattr(w, a, None), torch.Tensor)]


def quantized_numel(m: nn.Module) -> int:
    return m.weight.numel()


NF4_KIND = register_layer_kind(
    LayerKind(
        name="torchao_nf4",
        matches=is_nf4_linear,
        in_features=lambda m: m.in_features,
        out_features=lambda m: m.out_features,
        get_weight=dequantize,
        set_weight=set_weight,
        priority=10,
        replaces_weight=True,
    )
)
