"""Attention for CPU training by length: explicit attention for short sequences, SDPA for long ones.

On the CPU, PyTorch's fused SDPA kernel (``scaled_dot_product_attention``, transformers'
``"sdpa"``) wins on long sequences but its backward pass is slow on short ones: on SmolLM2 in bf16
with the default task's ~43-token chats, the attention backward took a quarter of a training step.
The explicit form (``softmax(q k^T * s + mask) v``, the softmax's sums in float32, as transformers' ``"eager"``)
was faster up to a few hundred keys (4 x 256 tokens: 2.43 s vs 2.87 s a step) and much slower
beyond (4 x 1024: 34 s vs 15 s, one thread). :func:`attention` takes the explicit form while
gradients are on and a call has at most :data:`MATH_MAX_KEYS` keys, and SDPA otherwise (every
inference call, every long sequence). Both compute the same attention; the masks are SDPA's
(boolean, or causal by flag). It is registered with transformers as ``"deltatune"``
(:func:`use_length_aware_attention`).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

NAME = "deltatune"
MATH_MAX_KEYS = 384


_bias_cache: tuple = (None, None, None)  # (weakref to the last boolean mask, (dtype, Q, K), its additive form)
_causal: dict = {}  # (dtype, Q, K, device) -> the causal bias


def _forget_bias(ref) -> None:
    global _bias_cache
    if _bias_cache[0] is ref:
        _bias_cache = (None, None, None)


def _bias_of(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A mask as an additive one of ``dtype``: a boolean one (True: attend) as 0 or half the dtype's
    lowest value; an additive one clamped there (float32's lowest value is -inf in bf16, and a row
    of -inf a NaN softmax)."""
    low = torch.finfo(dtype).min / 2
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, low)
    return mask.clamp_min(low).to(dtype)


def _additive(mask: Optional[torch.Tensor], causal: bool, Q: int, K: int, dtype, device) -> Optional[torch.Tensor]:
    """The mask as a (b, 1, 1, Q, K) tensor of ``dtype`` added to grouped scores (0: attend, half of
    ``dtype``'s lowest value: not, so a sum with a score stays finite and a row with no key left
    gets an even softmax, as a fill with the lowest value gave), or None when nothing is masked.
    A boolean mask (True: attend) broadcastable to (b, 1, Q, K) is converted once per forward pass
    (every layer gets the same mask object) and kept while that object lives; with no mask and
    ``causal`` SDPA's ``is_causal`` form, aligned top-left: key j attends to query i when j <= i
    (transformers passes no mask with more keys than queries only when the keys past the queries
    are a static cache's unfilled slots).

    Raises:
        LookupError: a mask that differs between heads, or a 3-D one (the caller takes the
            per-head form).
    """
    global _bias_cache
    if mask is None:
        if not causal or Q == 1:
            return None
        key = (dtype, Q, K, device)
        if torch.compiler.is_compiling() or key not in _causal:  # traced: no cache (as below)
            keep = torch.arange(K, device=device)[None, :] <= torch.arange(Q, device=device)[:, None]
            bias = _bias_of(keep, dtype).view(1, 1, 1, Q, K)
            if torch.compiler.is_compiling():
                return bias
            if len(_causal) > 8:
                _causal.clear()
            _causal[key] = bias
        return _causal[key]
    if mask.dim() not in (2, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise LookupError("a per-head (or 3-D) mask")
    compiling = torch.compiler.is_compiling()  # traced: no cache (its guards would recompile as it changes)
    if not compiling:
        ref, key, bias = _bias_cache
        now = (dtype, Q, K, None if mask.is_inference() else mask._version)
        if ref is not None and ref() is mask and key == now:
            return bias
    lead = mask.shape[0] if mask.dim() == 4 else 1
    bias = _bias_of(mask, dtype)
    bias = bias.expand(*bias.shape[:-2], Q, K).reshape(lead, 1, 1, Q, K)
    if not compiling and not mask.is_inference() and not mask.requires_grad:
        _bias_cache = (weakref.ref(mask, _forget_bias), now, bias)
    return bias


RECOMPUTE = True  # bf16/fp16 without dropout: the backward pass computes the probabilities again


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys, its sums in float32, written in the scores' dtype."""
    if scores.dtype in (torch.bfloat16, torch.float16):
        # float32 inside, written in the scores' dtype: the same values as a float32 softmax rounded, and
        # the one (B, H, Q, K) tensor the backward pass keeps (a float32 softmax kept a second, twice the size)
        return F.softmax(scores, dim=-1)
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def _grouped_probs(q, k, bias, rep):
    """The probabilities (B, Hkv, R, K) of grouped rows q (B, Hkv, R, hd) against k (B, Hkv, K, hd)
    with the additive bias (b, 1, 1, R / rep, K) or None."""
    B, Hkv, R, _ = q.shape
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, Hkv, R, K)
    if bias is not None:
        s.view(B, Hkv, rep, R // rep, s.shape[-1]).add_(bias)  # in place: the matmul's backward keeps its inputs
    return _softmax(s)


class _GroupedAttention(torch.autograd.Function):
    """``softmax(q k^T + bias) v`` for grouped rows q (B, Hkv, rep * Q, hd), k and v (B, Hkv, K, hd),
    bias (b, 1, 1, Q, K) or None, all in the compute dtype; returns (B, Hkv, rep * Q, hd).

    The backward pass keeps q, k and v only and computes the probabilities again (one matmul and
    one softmax, the forward's values on the CPU; under CUDA autocast the forward's softmax is
    float32 and the recomputed one bf16): the (B, H, Q, K) probabilities are the largest
    tensor a short-sequence training step keeps per layer (4.5 MiB of SmolLM2's 22 at 4 x 256)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, rep):
        ctx.save_for_backward(q, k, v)
        ctx.bias, ctx.rep = bias, rep
        return torch.matmul(_grouped_probs(q, k, bias, rep), v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        p = _grouped_probs(q, k, ctx.bias, ctx.rep)
        grad = grad.to(q.dtype)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dv = torch.matmul(p.transpose(-1, -2), grad) if need_v else None
        if not (need_q or need_k):
            return None, None, dv, None, None
        ds = torch._softmax_backward_data(torch.matmul(grad, v.transpose(-1, -2)), p, -1, p.dtype)
        del p
        return (torch.matmul(ds, k) if need_q else None, torch.matmul(ds.transpose(-1, -2), q) if need_k else None,
                dv, None, None)


def _explicit(module, query, key, value, attention_mask, dropout, scaling, is_causal):
    """(B, Q, H, hd) attention output; query (B, H, Q, hd), key/value (B, Hkv, K, hd), mask boolean
    (True: attend) or additive, broadcastable to (B, H, Q, K), or None with ``is_causal``.

    The query heads of a group share its key and value without copies: the ``rep = H / Hkv`` heads
    are stacked as (B, Hkv, rep * Q, hd) rows against the group's (B, Hkv, K, hd) keys. The scale
    goes into the keys (the smaller side), the mask is added once as a cached bias, and under
    autocast q, k and v are cast to the compute dtype once. In bf16/fp16 (no dropout) the
    backward pass keeps q, k and v and computes the probabilities again (:class:`_GroupedAttention`,
    :data:`RECOMPUTE`): 4 x 256 SmolLM2 rows peaked 150 MiB lower for one more matmul and softmax
    per layer."""
    B, H, Q, hd = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    rep = H // Hkv
    scale = scaling if scaling is not None else hd ** -0.5
    kind = query.device.type
    dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else query.dtype
    q = query
    if query.dtype != dt or not query.is_contiguous():  # one pass to the compute dtype, contiguous
        q = torch.empty(query.shape, dtype=dt, device=query.device).copy_(query)
    k, v = (key * scale).to(dt), value.to(dt)
    try:
        bias = _additive(attention_mask, is_causal, Q, K, dt, query.device)
    except LookupError:  # a mask per head: each head its own copy of its group's key and value
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, Q, K)
        probs = _softmax(scores + _bias_of(attention_mask, dt))
    else:
        trained_mask = attention_mask is not None and attention_mask.requires_grad  # its gradient: the plain form
        if RECOMPUTE and not (dropout and module.training) and not trained_mask and dt in (torch.bfloat16, torch.float16):
            out = _GroupedAttention.apply(q.view(B, Hkv, rep * Q, hd), k, v, bias, rep)
            return out.view(B, H, Q, hd).transpose(1, 2).contiguous(), None
        probs = _grouped_probs(q.view(B, Hkv, rep * Q, hd), k, bias, rep)  # (B, Hkv, rep * Q, K)
    if dropout and module.training:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, v)  # (B, Hkv, rep * Q, hd), or (B, H, Q, hd) per head
    return out.view(B, H, Q, hd).transpose(1, 2).contiguous(), None


def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
              is_causal=None, **kwargs):
    """transformers' attention-function interface: :func:`_explicit` for short training calls, SDPA else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if torch.is_grad_enabled() and key.shape[-2] <= MATH_MAX_KEYS and plain:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return _explicit(module, query, key, value, attention_mask, dropout, scaling, causal)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_length_aware_attention(model: nn.Module) -> bool:
    """Switch a transformers model that uses ``"sdpa"`` to :func:`attention` (registered once, with
    SDPA's masks); return whether it did (another implementation, or no support: left as it is)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):
        return False
    return True
