"""Compiled decoder layers for training: ``torch.compile`` (Inductor) on each transformers decoder layer.

An eager training step of a small model on a CPU spends as long in small elementwise ops (casts
around the bf16 matmuls, the adapters' adds, norms, rotary embeddings, SiLU, softmax) as in its
matmuls: ~10,000 ops a step, each a full pass over memory. Compiled, each layer's forward and
backward become a few fused loops between the matmuls (and the matmuls stay the same library
calls). Measured on SmolLM2-135M (LoRA r16 on q/k/v/o/gate/up/down, 4 x 256 tokens, bf16, 2
threads): 1.51-1.66 s a step eager, 1.08-1.18 s compiled.

:func:`compile_layers` gives every decoder layer a forward that calls the compiled layer while
gradients are on and the layer's own forward otherwise (evaluation and generation stay eager:
their growing key/value caches would recompile at every length). The layers share their code, so
the model compiles once per variant of its input (the first layer's input is the embedding's
dtype, the others' the residual stream's), with dynamic shapes: new batch sizes and lengths reuse
the compiled code. Compiling costs time on a process's first step (30-60 s on two cores;
Inductor keeps what it built in its cache directory, so the next process loads it) and
needs a C++ compiler on the CPU, Triton on CUDA (:func:`compiler_available`). Should Inductor
fail to build the code anyway (no working compiler after all, a kernel it cannot generate; the
backward is built with the forward, on the first call), the layers fall back to their eager forward
until the next :func:`compile_layers`, with one warning, and the step runs eagerly. Other errors
(a wrong shape, a real bug) are raised as they would be eagerly.

The modules, weights, keys and outputs stay the same (the layer's ``forward`` is replaced in its
instance dict, as the other integrations do); hooks on the layer's submodules (the adapters'
routing) are traced into the compiled code, and a change to them (another adapter, a new one)
recompiles (torch's guards).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import types
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

_failed: Optional[str] = None  # why compiling failed since the last compile_layers (the layers then run eagerly)
_calls = 0  # calls that ran compiled code since the last compile_layers
_PREV = "_deltatune_prev_forward"  # a forward the instance had before compile_layers, restored by uncompile_layers


def compiler_available(device_type: str) -> bool:
    """Whether Inductor can build kernels for ``device_type`` here: a C++ compiler (``$CXX``, g++,
    clang++ or c++) for ``"cpu"``, Triton for ``"cuda"``; False for other devices."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "g++", "clang++", "c++"))
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def decoder_layers(model: nn.Module) -> list:
    """The model's transformers decoder layers (``GradientCheckpointingLayer`` subclasses, or
    classes named ``...DecoderLayer``), in module order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as base
    except ImportError:  # older transformers
        base = ()
    return [m for m in model.modules() if (base and isinstance(m, base)) or type(m).__name__.endswith("DecoderLayer")]


def compile_failed() -> Optional[str]:
    """Why compiling failed since the last :func:`compile_layers` (the layers run eagerly since), or None."""
    return _failed


def compiled_calls() -> int:
    """How many layer calls ran compiled code since the last :func:`compile_layers`."""
    return _calls


def _has_cache(kwargs: dict) -> bool:
    return any(type(v).__name__.endswith("Cache") for v in kwargs.values())


def _forward(self, *args, **kwargs):
    global _failed, _calls
    if torch.is_grad_enabled() and _failed is None and not _has_cache(kwargs):
        try:
            # the backward is compiled with the forward (not lazily inside backward(), where a failure could not
            # fall back)
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                out = self._deltatune_compiled(*args, **kwargs)
            _calls += 1
            return out
        except torch._dynamo.exc.BackendCompilerFailed as e:  # Inductor could not build it (InductorError included)
            _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("torch.compile failed (%s); training continues without it (--torch-compile off "
                        "skips the attempt)", _failed)
    return self._deltatune_eager(*args, **kwargs)


def compile_layers(model: nn.Module) -> int:
    """Give each decoder layer of ``model`` (:func:`decoder_layers`) the forward described in the
    module docstring; returns how many layers it switched (0: none found, or already switched).
    Compiling itself happens on the first call with gradients on. Resets :func:`compile_failed`
    and :func:`compiled_calls` (a new run tries again)."""
    global _failed, _calls
    _failed, _calls = None, 0
    n = 0
    for layer in decoder_layers(model):
        if "_deltatune_compiled" in layer.__dict__:
            continue
        if "forward" in layer.__dict__:
            layer.__dict__[_PREV] = layer.__dict__["forward"]
        eager = layer.forward
        layer._deltatune_eager = eager
        layer._deltatune_compiled = torch.compile(eager, dynamic=True)
        layer.forward = types.MethodType(_forward, layer)
        n += 1
    return n


def uncompile_layers(model: nn.Module) -> int:
    """Undo :func:`compile_layers`: each switched layer gets back the forward it had (its class's, or
    one set on the instance before); returns how many. ``deltatune train`` calls it when training
    ends, so the model it returns (and any copy of it) carries no compiled code."""
    n = 0
    for layer in decoder_layers(model):
        if "_deltatune_compiled" in layer.__dict__:
            for k in ("forward", "_deltatune_compiled", "_deltatune_eager"):
                layer.__dict__.pop(k, None)
            if _PREV in layer.__dict__:
                layer.__dict__["forward"] = layer.__dict__.pop(_PREV)
            n += 1
    return n
