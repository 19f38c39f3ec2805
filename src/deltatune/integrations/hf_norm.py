"""The root-mean-square norm of Llama-family models (RMSNorm, arXiv:1910.07467) as one autograd function.

transformers computes ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` as five ops; in a
training step each writes a full (tokens, hidden) float32 tensor, and where adapters widened the
residual stream to float32 (:func:`deltatune.routing._widened`) those are the step's most frequent
temporaries: on SmolLM2 at 4 x 256 tokens, 2.25 MiB each, a dozen per layer. Freed at once, their
holes are refilled by tensors of other sizes, and the heap grows past the memory that is live.
:class:`RMSNorm` gives the same values (float32 maths; float64 for a float64 input) with one
float32 temporary in the forward pass (two for a bf16 input) and two in the backward pass. For
the backward pass it keeps the (tokens, 1) reciprocal RMS and ``x``, in bf16 under bf16
autocast (transformers' ops keep it in float32, twice the memory; fp16 keeps float32: its range).
Under autocast it writes its result in the autocast dtype, the value the projections that read it
would cast it to (each cast kept again for their backward passes).
:func:`use_fused_rmsnorm` switches a model's norms to it while gradients are on.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# the transformers classes whose forward is exactly ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``
KNOWN = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})


class RMSNorm(torch.autograd.Function):
    """``(w * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)).to(dtype)`` for x (..., D), w (D,);
    float32 maths (float64 for float64 ``x``). Saved for backward: the reciprocal RMS (..., 1) in
    that dtype, and ``x``: in bf16 when ``dtype`` is bf16 (autocast) and ``x`` is float32, else as
    it is (fp16's range is too small for the residual stream)."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least
        D = x.shape[-1]
        ms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(D)  # mean(x^2): no (..., D) temporary
        rstd = ms.add_(eps).rsqrt_()
        xn = x32 * rstd
        if x.dtype != torch.float32:
            xn = xn.to(x.dtype)
        out = xn.mul_(weight) if torch.promote_types(xn.dtype, weight.dtype) == xn.dtype else weight * xn
        # under autocast x is kept in the compute dtype: half the memory, and the gradient's own rounding
        # (bf16, 2^-9 relative) is what autocast's ops give their gradients; the reciprocal RMS stays exact
        keep = x.to(dtype) if dtype is torch.bfloat16 and x.dtype == torch.float32 else x  # (fp16's range: no)
        ctx.save_for_backward(keep, rstd, weight)
        ctx.x_dtype = x.dtype
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        c = rstd.dtype
        xn = x.to(c) * rstd  # recomputed: (..., D) float32
        g = grad.to(c) * weight  # d out / d xn (float32)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad.to(c) * xn.to(ctx.x_dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dot = torch.linalg.vecdot(g, xn, dim=-1).unsqueeze(-1).div_(x.shape[-1])  # mean(g * xn)
        dx = g.sub_(xn.mul_(dot)).mul_(rstd)
        return dx.to(ctx.x_dtype), dw, None, None


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` through :class:`RMSNorm`: written in the autocast dtype under autocast, else in
    transformers' dtype (the promotion of the weight's and ``x``'s)."""
    kind = x.device.type
    w = norm.weight
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.promote_types(w.dtype, x.dtype)
    return RMSNorm.apply(x, w, float(norm.variance_epsilon), dtype)


def _forward(self, hidden_states):
    if not torch.is_grad_enabled():  # inference: transformers' own ops (a fresh model computes the same)
        return type(self).forward(self, hidden_states)
    return rms_norm(self, hidden_states)


def _is_known_norm(m: nn.Module) -> bool:
    return (type(m).__name__ in KNOWN and isinstance(getattr(m, "weight", None), torch.Tensor)
            and hasattr(m, "variance_epsilon") and "forward" not in m.__dict__)


def use_fused_rmsnorm(model: nn.Module) -> int:
    """Give every residual-stream norm of ``model`` (weight of the model's hidden size) whose
    transformers class is in :data:`KNOWN` the forward of
    :func:`rms_norm` while gradients are on (inference keeps transformers' ops, so evaluation
    matches a fresh model); returns how many it switched. The norms keep their weights and keys."""
    n = 0
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for m in model.modules():
        # the residual stream's norms only: a per-head query/key norm (Qwen3's q_norm) feeds rotary, not a projection
        if _is_known_norm(m) and (hidden is None or m.weight.numel() == hidden):
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n
