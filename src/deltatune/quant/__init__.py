"""4-bit frozen base weights for QLoRA (Dettmers et al., arXiv:2305.14314).

``quantize_base(model)`` turns the base ``nn.Linear`` layers into 4-bit NF4 (or FP4) layers of a
well-kept library: bitsandbytes ``Linear4bit`` (default; native CPU and GPU kernels) or torchao's
``NF4Tensor`` (``backend="torchao"``). Both are registered as layer kinds of
:mod:`deltatune.layers`, so LoRA/DoRA inject, merge, save and load through the same code as on a
dense base. Neither package is imported until a 4-bit layer is made or met.
"""

from . import bnb, nf4  # noqa: F401  (registers the 4-bit layer kinds)
from .quantize import base_quantization, is_quantized, quant_stats, quantize_base, requantize_merged

__all__ = ["quantize_base", "quant_stats", "requantize_merged", "is_quantized", "base_quantization"]
