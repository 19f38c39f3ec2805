"""The fast path's settings outside the training loop: the process's allocator, the model's attention and MLP.

``deltatune train`` calls :func:`prepare_for_training` once, after loading the model and before
the adapters go in; ``bench/train_step.py`` calls it for its ``dt`` configurations, so the
benchmark measures what the command runs. Each setting is one lever of the fast path (measured
alone in the benchmark's ablation):

* **allocator** (:func:`keep_freed_memory`, CPU, glibc): a training step frees and re-allocates
  the same few hundred activation buffers every step. glibc hands blocks above its mmap threshold
  (128 KiB to 32 MiB, adaptive) back to the kernel when they are freed, so the next step
  page-faults every page of them again (the kernel zeroes each). Raising the mmap and trim
  thresholds keeps freed blocks in the heap for the next step. Measured on SmolLM2 (4 x 256 rows,
  LoRA, bf16, 2 threads): 1.50-1.66 s a step -> 1.41-1.49 s. Set ``DELTATUNE_MALLOC=system`` to
  leave glibc's defaults alone (``keep`` or unset: the default; any other value is an error).
  Process-wide and kept for the life of the process.
* **attention** (:func:`deltatune.integrations.hf_attention.use_length_aware_attention`, CPU):
  explicit attention for short training sequences, PyTorch's fused kernel for long ones.
* **swiglu** (:func:`deltatune.integrations.hf_mlp.use_fused_swiglu`, any device): the gated
  feed-forward block's ``silu(g) * u`` as one autograd function that keeps two bf16 tensors for
  the backward pass instead of three (float32 ones once adapters widen the projections' outputs).
* **rmsnorm** (:func:`deltatune.integrations.hf_norm.use_fused_rmsnorm`, any device): the
  Llama-family norm as one autograd function, one float32 temporary where transformers' ops
  write five, its result in the autocast dtype the projections reading it use.
* **compile** (:func:`compile_choice`, then :func:`deltatune.integrations.hf_compile.compile_layers`,
  CPU and CUDA): each decoder layer's training forward and backward compiled by ``torch.compile``
  (``--torch-compile``; ``auto``: LoRA/DoRA runs on the CPU with at least :data:`COMPILE_MIN_STEPS`
  steps to go, in one process, without a shared prefix, where a compiler is installed; ``on`` also
  on CUDA). Applied by ``deltatune train`` once the run's length is
  known, not by :func:`prepare_for_training`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from torch import nn

from ..integrations.hf_attention import use_length_aware_attention
from ..integrations.hf_compile import compiler_available
from ..integrations.hf_mlp import use_fused_swiglu
from ..integrations.hf_norm import use_fused_rmsnorm
from .config import UsageError
from .precision import Precision

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit: blocks up to 32 MiB come from the heap
_TRIM_THRESHOLD = 1 << 30  # free heap top kept before it is returned to the kernel
_tuned = None


def malloc_setting() -> str:
    """``DELTATUNE_MALLOC`` as ``"keep"`` (unset or empty: the default) or ``"system"``.

    Raises:
        ValueError: any other value (a typo would otherwise leave the setting on unnoticed).
    """
    raw = os.environ.get("DELTATUNE_MALLOC", "")
    choice = raw.strip().lower() or "keep"
    if choice not in ("keep", "system"):
        raise ValueError(f"DELTATUNE_MALLOC={raw!r} is not a setting: use 'system' (glibc's own defaults) or "
                         "'keep' (the default: freed blocks kept for reuse), or unset it")
    return choice


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB for reuse instead of unmapping them (module
    docstring); idempotent. Returns whether the setting is in force (False: not glibc, or
    ``DELTATUNE_MALLOC=system``).

    Raises:
        ValueError: ``DELTATUNE_MALLOC`` is not a setting (:func:`malloc_setting`).
    """
    global _tuned
    choice = malloc_setting()
    if _tuned is None:
        _tuned = False
        if choice != "system":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
                return False
            _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _tuned


def prepare_for_training(model: nn.Module, precision: Precision) -> list:
    """Apply the fast path's settings for a run on ``precision``'s device; returns the names of those
    applied (``"allocator"``, ``"attention"``, ``"swiglu"``, ``"rmsnorm"``). The model keeps its weights, keys and outputs."""
    done = []
    if precision.device.type == "cpu":
        if keep_freed_memory():
            done.append("allocator")
        if use_length_aware_attention(model):
            done.append("attention")
    if use_fused_swiglu(model):
        done.append("swiglu")
    if use_fused_rmsnorm(model):
        done.append("rmsnorm")
    return done


COMPILE_MIN_STEPS = 200  # auto compiles runs with at least this many steps to go: compiling costs ~30-60 s on 2 cores on a
# process's first step (less once Inductor's cache holds the kernels); at 4 x 256 tokens a compiled SmolLM2 LoRA step is
# ~0.3-0.4 s shorter, so a run pays it back after ~150 steps
COMPILE_METHODS = ("lora", "dora")  # auto compiles these (each checked against its eager form in the tests)
COMPILE_SETTINGS = ("auto", "on", "off")


def compile_choice(setting: str, *, device_type: str, method: str, steps: int, world: int = 1,
                   cached_calls: bool = False) -> tuple[bool, str]:
    """Whether a run compiles its decoder layers (``--torch-compile``), and why (a few words for the log).

    ``on``: always (one process, CPU or CUDA); ``off``: never; ``auto``: a CPU run (where it is
    measured; CUDA takes ``on``) of a method in :data:`COMPILE_METHODS`, with at least
    :data:`COMPILE_MIN_STEPS` optimizer steps to go (``steps``), in one process, whose training
    calls carry no key/value cache (``cached_calls``: a shared prefix, whose calls run eagerly),
    where Inductor has a compiler (:func:`~deltatune.integrations.hf_compile.compiler_available`).

    Raises:
        UsageError: ``on`` without a compiler for the device, or with several processes; a setting
            not in :data:`COMPILE_SETTINGS`.
    """
    if setting not in COMPILE_SETTINGS:
        raise UsageError(f"--torch-compile must be auto, on or off, got {setting!r}")
    if setting == "off":
        return False, "off"
    have = compiler_available(device_type)
    if setting == "on":
        if world > 1:
            raise UsageError("--torch-compile on runs in one process; with several processes use --torch-compile off")
        if not have:
            need = "Triton" if device_type == "cuda" else "a C++ compiler (g++ or clang++)"
            raise UsageError(f"--torch-compile on needs {need} on this {device_type} machine: install it, or use "
                             "--torch-compile off")
        return True, "on"
    why = ("not measured on this device yet" if device_type != "cpu" else "several processes" if world > 1
           else f"method {method}" if method not in COMPILE_METHODS
           else "the shared prefix's calls run eagerly" if cached_calls
           else f"{steps} steps to go (< {COMPILE_MIN_STEPS})" if steps < COMPILE_MIN_STEPS
           else "no compiler for this device" if not have else None)  # last: the log names it (a run it would help)
    return why is None, why or "auto"
