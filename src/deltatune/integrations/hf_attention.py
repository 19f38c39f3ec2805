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

import torch
import torch.nn.functional as F
from torch import nn

NAME = "deltatune"
MATH_MAX_KEYS = 384


def _explicit(module, query, key, value, attention_mask, dropout, scaling, is_causal):
    """(B, Q, H, hd) attention output; query (B, H, Q, hd), key/value (B, Hkv, K, hd), mask boolean
    (True: attend) broadcastable to (B, H, Q, K), or None with ``is_causal``."""
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, Q, K)
    Q, K = scores.shape[-2], scores.shape[-1]
    if attention_mask is None and is_causal and Q > 1:
        attention_mask = torch.arange(K, device=query.device)[None, :] <= torch.arange(Q, device=query.device)[:, None] + (K - Q)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    if scores.dtype in (torch.bfloat16, torch.float16):
        # float32 inside, written in the scores' dtype: the same values as a float32 softmax rounded, and
        # the one (B, H, Q, K) tensor the backward pass keeps (a float32 softmax kept a second, twice the size)
        probs = F.softmax(scores, dim=-1)
    else:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


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
