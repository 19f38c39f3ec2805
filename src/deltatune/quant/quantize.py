"""Quantize a model's frozen base linear weights to 4 bits (QLoRA), measure them, re-quantize merges.

QLoRA (Dettmers et al., arXiv:2305.14314): the frozen base weights are stored in 4-bit NormalFloat
(NF4, blocks of 64 weights with one absmax scale each; the scales quantized again to 8 bits in
blocks of 256 with double quantization) and dequantized on the fly to the compute dtype; LoRA
trains on top, unchanged. Quantization is a property of the base layer (a bitsandbytes
``Linear4bit`` or a torchao ``NF4Tensor`` weight), registered as a layer kind, so LoRA and DoRA,
merge, save and load work on it through the same code as on a dense base.
"""

from __future__ import annotations

import ctypes
import gc
import re
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..adapters import get_state
from ..layers import layer_kind
from ..targets import _list_match, is_adapter_path, output_head_names
from . import bnb as _bnb
from . import nf4 as _nf4

RECORD = "_deltatune_quant"
BACKENDS = {"bitsandbytes": "bitsandbytes", "bnb": "bitsandbytes", "torchao": "torchao"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(d: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(d, torch.dtype):
        dt = d
    else:
        dt = _DTYPES.get(str(d).replace("torch.", "").lower())
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype={d!r} is not supported: use torch.float32, torch.bfloat16 or torch.float16")
    return dt


def _backend_of(m: nn.Module):
    """The backend module (bnb / nf4) of a 4-bit layer, or None for any other module."""
    k = layer_kind(m)
    if k is _bnb.BNB_KIND:
        return _bnb
    if k is _nf4.NF4_KIND:
        return _nf4
    return None


def is_quantized(m: nn.Module) -> bool:
    """True when ``m`` is a 4-bit base layer of a registered backend."""
    return _backend_of(m) is not None


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so that the freed dense weights leave RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return _list_match(spec, name)


@torch.no_grad()
def quantize_base(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Union[str, torch.dtype] = torch.float32,
    target_modules: Union[None, str, Iterable[str]] = None,
    skip_modules: Iterable[str] = ("lm_head",),
    *,
    backend: str = "bitsandbytes",
    blocksize: int = 64,
) -> nn.Module:
    """Quantize the frozen base ``nn.Linear`` weights of ``model`` to 4 bits, in place; return it.

    Call it before :func:`deltatune.inject`. Each selected ``nn.Linear`` (weight (out, in), any
    float dtype) becomes a 4-bit layer under the same name: with ``backend="bitsandbytes"`` (the
    default) a ``bitsandbytes.nn.Linear4bit`` (the bias Parameter is kept), with
    ``backend="torchao"`` the same ``nn.Linear`` holding a torchao ``NF4Tensor`` weight. The
    dense weights are freed. Layers of a model that transformers already loaded in 4 bits
    (``BitsAndBytesConfig(load_in_4bit=True)``) are accepted as they are (and kept in the layout
    training needs, see :func:`deltatune.quant.bnb.keep_cpu_format`).

    Skipped: modules named in ``skip_modules`` (name or dotted suffix), the model's output head,
    a weight shared with another module (tied embeddings), and anything not exactly ``nn.Linear``
    (embeddings, norms, transformers ``Conv1D``).

    Args:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"`` (bitsandbytes only).
        double_quant: quantize the block scales again (8 bits, blocks of 256): ~0.516 instead
            of ~0.563 bytes per weight. torchao always double-quantizes.
        compute_dtype: dtype the weight is dequantized to for the matmul (bitsandbytes casts the
            input to it and the output back to the input's dtype). torchao computes in the
            input's dtype and ignores it. A merge writes dense weights of the weight's original
            dtype (the model's), so that the merged layer still accepts the model's activations.
        target_modules: only these modules (names / dotted suffixes, or a regex string matched in
            full); default: every ``nn.Linear`` not skipped.
        blocksize: weights per absmax block (bitsandbytes: 32 ... 4096; torchao: 64 only).

    Raises:
        ValueError: the model already has adapters (quantize first, then inject); an unknown
            quant_type/backend/compute_dtype, an option the backend lacks, or nothing to quantize.
        ImportError: the backend's package is not installed (``pip install 'deltatune[quant]'``).
    """
    quant_type, backend, cdt = _check_args(model, quant_type, backend, compute_dtype, double_quant, blocksize)
    done, accepted, skipped, repacked = _quantize_layers(model, target_modules, skip_modules, backend, quant_type,
                                                         double_quant, cdt, blocksize)
    if not done and not accepted:
        raise ValueError("quantize_base found no nn.Linear to quantize"
                         + (f" among target_modules={target_modules!r}" if target_modules is not None else "")
                         + (f"; skipped: {dict(list(skipped.items())[:6])}" if skipped else ""))
    if repacked:
        warnings.warn(f"{repacked} bitsandbytes layers had been repacked for the CPU inference kernel "
                      "(eval() without grad); restored to the standard 4-bit layout with bf16-rounded scales",
                      stacklevel=3)
    model.__dict__[RECORD] = {
        "backend": backend, "quant_type": quant_type, "double_quant": bool(double_quant),
        "blocksize": blocksize, "compute_dtype": str(cdt).replace("torch.", ""),
        "quantized": done, "accepted": accepted, "skipped": skipped,
    }
    gc.collect()
    _malloc_trim()
    return model


def _quantize_layers(model, target_modules, skip_modules, backend, quant_type, double_quant, cdt, blocksize):
    """Quantize the selected ``nn.Linear`` layers in place (see :func:`quantize_base`); return
    (quantized names, names already 4-bit, {skipped name: why}, layers restored from bitsandbytes'
    CPU inference packing)."""
    uses: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    heads = output_head_names(model)
    skip = tuple(skip_modules or ())
    done, accepted, skipped, repacked = [], [], {}, 0
    for name, mod in list(model.named_modules()):
        if not name or is_adapter_path(name):
            continue
        if is_quantized(mod):
            accepted.append(name)
            if _backend_of(mod) is _bnb:
                repacked += _bnb.keep_cpu_format(mod)
                mod.weight.quant_numel = _bnb.quantized_numel(mod)  # for count_parameters
            continue
        if type(mod) is not nn.Linear:
            continue
        if _list_match(skip, name) or (name in heads and not (target_modules and _matches(target_modules, name))):
            continue
        if target_modules is not None and not _matches(target_modules, name):
            continue
        why = _why_not(mod._parameters.get("weight"), uses, backend)
        if why:
            skipped[name] = why
            continue
        if backend == "torchao":
            mod.weight = _nf4.quantize_weight(mod.weight)
        else:
            new = _bnb.to_linear4bit(mod, quant_type=quant_type, double_quant=double_quant,
                                     compute_dtype=cdt, blocksize=blocksize)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        done.append(name)
    return done, accepted, skipped, repacked


def _check_args(model, quant_type, backend, compute_dtype, double_quant, blocksize):
    """(quant_type, backend, compute dtype), checked; the backend's package imported.

    Raises:
        ValueError: an unknown quant_type/backend/compute_dtype, an option the backend lacks, or a
            model that already has adapters. ImportError: the backend's package is missing.
    """
    quant_type = str(quant_type).lower()
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is not supported: use 'nf4' or 'fp4'")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use 'bitsandbytes' (default) or 'torchao'")
    backend = BACKENDS[backend]
    cdt = _as_dtype(compute_dtype)
    if backend == "torchao" and (quant_type != "nf4" or not double_quant or blocksize != 64):
        raise ValueError("backend='torchao' supports only quant_type='nf4', double_quant=True, blocksize=64: "
                         "use backend='bitsandbytes' for FP4, single quantization or other block sizes")
    st = get_state(model)
    if st is not None and st.records:
        raise ValueError(f"quantize_base() must run before inject(): this model already has adapters "
                         f"{list(st.records)}; quantize the base model first, then inject")
    if backend == "bitsandbytes":
        _bnb.import_bnb()
    else:
        _nf4.import_nf4()
    return quant_type, backend, cdt


def _why_not(w, uses: dict, backend: str) -> Optional[str]:
    """Why the weight ``w`` of an ``nn.Linear`` is left dense (None: it can be quantized)."""
    if w is None or not w.is_floating_point() or w.device.type == "meta":
        return "no float weight"
    if uses.get(id(w), 0) > 1:
        return "weight shared with another module (tied)"
    if backend == "torchao" and not _nf4.can_quantize(w):
        return f"numel {w.numel()} is not a multiple of 64 (torchao)"
    return None


def base_quantization(model: nn.Module) -> Optional[dict]:
    """The keyword arguments of :func:`quantize_base` that rebuild this model's 4-bit base from the
    dense one (the layers it quantized or accepted, named in full), or None when it did not run.

    ``quantize_base(dense_model, **base_quantization(model))`` quantizes the same layers the same
    way (quantization is deterministic), so an adapter trained on the 4-bit base meets that base again.
    """
    rec = model.__dict__.get(RECORD)
    if not rec:
        return None
    return {
        "backend": rec["backend"], "quant_type": rec["quant_type"], "double_quant": rec["double_quant"],
        "blocksize": rec["blocksize"], "compute_dtype": rec["compute_dtype"],
        "target_modules": sorted(set(rec.get("quantized", [])) | set(rec.get("accepted", []))), "skip_modules": [],
    }


def _nbytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def quant_stats(model: nn.Module) -> dict:
    """What the frozen base weights hold in memory, measured from the tensors themselves.

    Returns a dict:
        ``base_weight_bytes``: bytes of every base parameter (4-bit codes, their scales and code
        tables, plus the dense parameters left: embeddings, norms, biases); adapter tensors are
        not counted, tied tensors once. ``quantized_weight_bytes``: the 4-bit layers' part of it.
        ``quantized_params``: weights held in 4 bits. ``bytes_per_quantized_param``: their ratio
        (NF4 + double quantization ~0.516; fp32 is 4). ``quantized_layers``, and the backend,
        quant_type and compute_dtype recorded by :func:`quantize_base` (None if it did not run).
    """
    seen: set = set()
    qbytes = qparams = layers = 0
    qweights = set()
    for name, mod in model.named_modules():
        if is_adapter_path(name):
            continue
        be = _backend_of(mod)
        if be is None:
            continue
        layers += 1
        qweights.add(id(mod._parameters["weight"]))
        qbytes += _nbytes(be.held_tensors(mod), seen)
        qparams += be.quantized_numel(mod)
    dense = []
    for name, p in model.named_parameters():
        if is_adapter_path(name) or id(p) in qweights:
            continue
        dense.append(p.detach())
    dbytes = _nbytes(dense, seen)
    rec = model.__dict__.get(RECORD) or {}
    return {
        "base_weight_bytes": qbytes + dbytes,
        "quantized_weight_bytes": qbytes,
        "quantized_params": qparams,
        "quantized_layers": layers,
        "bytes_per_quantized_param": qbytes / qparams if qparams else None,
        "quant_backend": rec.get("backend"),
        "quant_type": rec.get("quant_type"),
        "compute_dtype": rec.get("compute_dtype"),
    }


@torch.no_grad()
def requantize_merged(model: nn.Module) -> dict:
    """Write the layers that a merge turned from 4-bit into dense back into 4 bits, and warn.

    Re-quantizing a merged weight ``dequant(W4) + delta`` rounds it again, so the result no longer
    reproduces the adapter model (huggingface/peft#2321). This only runs when asked
    (``merge_and_unload(..., requantize=True)``) and always warns with the number of layers and
    the largest absolute weight error it caused. Returns ``{"layers", "max_abs_error",
    "max_rel_error"}`` (relative to each layer's max |w|).
    """
    n, max_abs, max_rel = 0, 0.0, 0.0
    for _, mod in model.named_modules():
        spec = mod.__dict__.get(_bnb.MARK)
        if spec is None or is_quantized(mod) or type(mod) is not nn.Linear:
            continue
        be = _bnb if spec["backend"] == "bitsandbytes" else _nf4
        ref = mod.weight.detach().abs().max().item()
        err = be.requantize(mod, spec).abs().max().item()
        n += 1
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / ref if ref else 0.0)
    if n:
        warnings.warn(
            f"re-quantized {n} merged layers to 4 bits: the model no longer equals the adapter model; "
            f"max |weight error| {max_abs:.4g} (max {100 * max_rel:.2f}% of a layer's max |w|). "
            "merge_and_unload(requantize=False) keeps the exact 16/32-bit merge",
            stacklevel=3,
        )
    return {"layers": n, "max_abs_error": max_abs, "max_rel_error": max_rel}
