"""Where and in what precision a run computes: ``--device`` and ``--precision``.

* device: ``"auto"`` (default) is ``cuda`` when a CUDA GPU is visible, else ``cpu``; ``"cpu"``,
  ``"cuda"`` or ``"cuda:N"`` ask for one. The model, every batch, evaluation and generation live
  there (the code never names a device itself).
* precision: ``"auto"`` (default) is ``bf16`` where the hardware computes it fast (a CUDA GPU
  with bf16, or a CPU with AVX512-BF16 or AMX), else ``fp32``; ``"bf16"``, ``"fp16"`` (CUDA
  only) or ``"fp32"`` ask for one. In bf16/fp16 the frozen base weights are held once in that
  dtype (no per-step casts), the adapter weights and the optimizer state stay float32, and the
  forward and backward passes run under ``torch.autocast`` (fp16 with a gradient scaler). The
  loss's softmax is always float32 (:mod:`deltatune.train.loss`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    probes = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if callable(p))


def resolve_device(name: Optional[str] = None) -> torch.device:
    """The device of ``--device`` (see the module docstring).

    Raises:
        ValueError: an unknown device name, or CUDA asked for where none is visible.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asks for a CUDA GPU, but none is visible to torch (this torch build: "
                         f"{torch.__version__}): use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


@dataclass(frozen=True)
class Precision:
    """A run's device and compute dtype (``None``: float32, no autocast)."""

    device: torch.device
    dtype: Optional[torch.dtype] = None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the frozen base weights are held in."""
        return self.dtype or torch.float32

    def autocast(self):
        """The context a forward (and its backward) runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        """A gradient scaler for fp16 (None otherwise)."""
        return torch.amp.GradScaler(self.device.type) if self.dtype is torch.float16 else None


def resolve_precision(name: Optional[str], device: torch.device) -> Precision:
    """The :class:`Precision` of ``--precision`` on ``device`` (see the module docstring).

    Raises:
        ValueError: an unknown name, or fp16 on the CPU.
    """
    name = (name or "auto").strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        name = "bf16" if fast else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 is for CUDA GPUs; on the CPU use bf16 or fp32")
    return Precision(device, _DTYPES[name])


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (other entries as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
