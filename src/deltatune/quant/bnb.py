"""bitsandbytes backend: 4-bit NF4/FP4 base layers as ``bitsandbytes.nn.Linear4bit`` (the default).

QLoRA (Dettmers et al., arXiv:2305.14314) stores a frozen weight ``W`` (out, in) as 4-bit codes
in blocks of ``blocksize`` (64) consecutive weights of the row-major flattened ``W``, each block
with one absmax scale; with double quantization the float32 scales are themselves quantized to
8 bits (bitsandbytes' dynamic 8-bit code, blocks of 256, minus their mean ``offset``)::

    W[i] ~= code4[q[i]] * (code8[q8[b]] * absmax2[b // 256] + offset),   b = i // 64

Memory per weight: 0.5 byte of code + 1/64 byte of 8-bit scale + 4/(64*256) byte of second-level
scale ~= 0.516 byte (4.13 bits). Everything numeric here is bitsandbytes' own
(``quantize_4bit`` / ``dequantize_4bit``): this module only moves layers in and out of that
format, so its arithmetic *is* the library's (tested bit for bit). On CPU bitsandbytes uses its
AVX-512 kernels, on CUDA its GPU kernels; the code is the same.

The layer kind registered here serves both layers deltatune quantized
(:func:`deltatune.quantize_base`) and models that transformers loaded with
``BitsAndBytesConfig(load_in_4bit=True)``: both are ``Linear4bit``. Reading the weight
dequantizes to float32 (canonical (out, in) layout); writing a weight (merge) turns the layer
into a dense ``nn.Linear`` of the compute dtype (``LayerKind.replaces_weight``), and
:mod:`deltatune.merge` keeps the packed original so that unmerge restores it bit for bit.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Optional

import torch
from torch import nn

from ..layers import LayerKind, register_layer_kind

MARK = "_deltatune_4bit"  # on a 4-bit layer turned dense by a merge: how to quantize it again


def import_bnb():
    """Import bitsandbytes quietly (its CPU backend logs a warning about an optional kernel hub).

    Raises:
        ImportError: bitsandbytes is not installed (``pip install 'deltatune[quant]'``).
    """
    if "bitsandbytes" not in sys.modules:
        log = logging.getLogger("bitsandbytes")
        prev = log.level
        log.setLevel(logging.ERROR)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "the bitsandbytes 4-bit backend needs bitsandbytes: pip install 'deltatune[quant]' "
                "(or pip install bitsandbytes)"
            ) from e
        finally:
            log.setLevel(prev)
    return sys.modules["bitsandbytes"]


def is_linear4bit(m: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    cls = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return cls is not None and isinstance(m, cls)


def quant_state(m: nn.Module):
    qs = getattr(m.weight, "quant_state", None)
    return qs if qs is not None else getattr(m, "quant_state", None)


def _unpack_cpu_codes(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(n, k) 4-bit codes from bitsandbytes' AVX-512 inference layout (``packing_format_for_cpu``)."""
    packed = data.reshape(-1, 32)
    qw = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # (n*k/64, 64)
    return qw.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)


def dequantize(m: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of a ``Linear4bit`` as a dense (out, in) tensor of ``dtype`` (new memory).

    Uses ``bitsandbytes.functional.dequantize_4bit``. A layer that bitsandbytes repacked for its CPU
    inference kernel (``eval()`` + no grad on an AVX-512-BF16 CPU; bf16 scales) is read without
    changing it.
    """
    bnb = import_bnb()
    qs = quant_state(m)
    if qs is None:
        raise ValueError(f"{type(m).__name__} holds no quantization state: quantize it first (.to(device))")
    if getattr(qs, "packing_format_for_cpu", False):
        n, k = qs.shape
        codes = _unpack_cpu_codes(m.weight.data.view(torch.uint8), n, k).long()
        scale = qs.absmax.T.to(torch.float32).repeat_interleave(qs.blocksize, dim=1)[:, :k]
        return (qs.code.to(torch.float32)[codes] * scale).to(dtype)
    q = copy.copy(qs)
    q.dtype = dtype
    return bnb.functional.dequantize_4bit(m.weight.data, q)


def quantize_weight(w: torch.Tensor, *, quant_type: str, double_quant: bool, blocksize: int = 64,
                    module: Optional[nn.Module] = None):
    """``Params4bit`` holding ``w`` (out, in) in 4 bits (bitsandbytes' ``quantize_4bit``)."""
    bnb = import_bnb()
    data, qs = bnb.functional.quantize_4bit(w.detach().contiguous(), blocksize=blocksize,
                                            compress_statistics=double_quant, quant_type=quant_type)
    p = bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, blocksize=blocksize,
                          compress_statistics=double_quant, quant_type=quant_type,
                          bnb_quantized=True, module=module)
    p.quant_numel = w.numel()  # packed storage: count the weights it represents
    return p


def to_linear4bit(lin: nn.Linear, *, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                  blocksize: int = 64) -> nn.Module:
    """A new ``Linear4bit`` computing ``lin`` with a 4-bit weight; the bias Parameter is shared."""
    bnb = import_bnb()
    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            compute_dtype=compute_dtype, compress_statistics=double_quant,
                            quant_type=quant_type, device="meta")
    new.weight = quantize_weight(lin.weight, quant_type=quant_type, double_quant=double_quant,
                                 blocksize=blocksize, module=new)
    new.quant_state = new.weight.quant_state
    if lin.bias is not None:
        new.bias = lin.bias
    keep_cpu_format(new)
    new.train(lin.training)
    return new


def keep_cpu_format(m: nn.Module) -> bool:
    """Stop bitsandbytes from repacking ``m`` for its CPU inference kernel; undo a repack.

    bitsandbytes (0.48+) rewrites a ``Linear4bit``'s storage in place the first time it runs in
    ``eval()`` without grad on an AVX-512-BF16 CPU (scales rounded to bf16, compute in bf16), and
    that path has no input gradient. Training and exact merge/unmerge need the standard layout.
    Returns True when a repacked layer was restored (with bitsandbytes' own inverse, scales as
    rounded to bf16).
    """
    m.support_avx512bf16_for_cpu = False
    qs = quant_state(m)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        import_bnb()
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
        m.quant_state = m.weight.quant_state
        return True
    return False


def dense_dtype(m: nn.Module) -> torch.dtype:
    """dtype of the dense weight a merge writes: the weight's dtype before quantization (the
    model's dtype, which ``Linear4bit`` casts its output back to), else the compute dtype."""
    qs = quant_state(m)
    floats = (torch.float32, torch.bfloat16, torch.float16)
    for dt in (getattr(qs, "original_dtype", None), getattr(qs, "dtype", None), getattr(m, "compute_dtype", None)):
        if dt in floats:
            return dt
    return torch.float32


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Replace the 4-bit weight by a dense (out, in) one (dtype: :func:`dense_dtype`; bf16 for a
    bf16 model, fp32 for an fp32 one): ``m`` becomes an ``nn.Linear`` (same object, same bias,
    hooks and children). The previous weight object is not touched (merge keeps it for unmerge)."""
    qs = quant_state(m)
    m.__dict__[MARK] = {
        "backend": "bitsandbytes", "cls": type(m), "quant_type": qs.quant_type, "blocksize": qs.blocksize,
        "double_quant": bool(getattr(qs, "nested", False) or getattr(qs, "original_nested", False)),
    }
    m._parameters["weight"] = nn.Parameter(w.detach().to(dense_dtype(m)).contiguous(), requires_grad=False)
    m.__class__ = nn.Linear


def requantize(m: nn.Module, spec: dict) -> torch.Tensor:
    """Turn a dense layer that was a ``Linear4bit`` (``set_weight``) back into 4 bits; returns
    the float32 weight error ``dequant(new) - W``."""
    w = m.weight.detach().to(torch.float32)
    p = quantize_weight(m.weight, quant_type=spec["quant_type"], double_quant=spec["double_quant"],
                        blocksize=spec["blocksize"], module=m)
    m._parameters["weight"] = p
    m.quant_state = p.quant_state
    m.__class__ = spec["cls"]
    keep_cpu_format(m)
    m.__dict__.pop(MARK, None)
    return dequantize(m) - w


def held_tensors(m: nn.Module) -> list[torch.Tensor]:
    """Every tensor the 4-bit weight of ``m`` holds: packed codes, scales, code tables."""
    qs = quant_state(m)
    out = [m.weight.data]
    if qs is not None:
        out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
        s2 = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
        if s2 is not None:
            out += [t for t in (s2.absmax, s2.code) if isinstance(t, torch.Tensor)]
    return out


def quantized_numel(m: nn.Module) -> int:
    qs = quant_state(m)
    n = 1
    for d in qs.shape:
        n *= int(d)
    return n


BNB_KIND = register_layer_kind(
    LayerKind(
        name="bnb_linear4bit",
        matches=is_linear4bit,
        in_features=lambda m: m.in_features,
        out_features=lambda m: m.out_features,
        get_weight=dequantize,
        set_weight=set_weight,
        priority=10,
        replaces_weight=True,
    )
)
