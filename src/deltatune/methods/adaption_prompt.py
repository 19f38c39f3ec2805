"""LLaMA-Adapter (Zhang et al., arXiv:2303.16199): gated adaption prompts in the top attention layers.

Each of the top ``adapter_layers`` attention modules gets a learned prompt ``adaption_prompt``
(1, adapter_len, hidden) and a scalar gate ``adaption_gate`` (1,), initialised to zero. The
attention's own key/value projections turn the prompt into keys and values; the layer's queries
attend to them in a separate softmax, scaled by the gate, and the result is added to the attention
output (through the output projection)::

    q      = rope(q_proj(h))                                  (B, heads, T, head_dim)
    k, v   = k_proj(prompt), v_proj(prompt)                   (1, kv_heads, L, head_dim), repeated to heads
    extra  = o_proj(gate * softmax(q k^T * scaling) v)        (B, T, hidden); o_proj's bias not added
    attn_out = attn_out + extra

With the gate at zero the model computes exactly the base model's output, so training starts from
it. The prompt keys carry no rotary position, and the extra term needs no attention mask and no
key/value cache (it depends only on each query), so cached and uncached decoding agree.

GPT-2 attention (``c_attn``) is supported as PEFT does it: keys/values from ``c_attn(prompt)``, the
gated result added after ``c_proj`` without projecting it (PEFT's formula, kept for file
compatibility).

Storage: the adapter is a child ``<attention>.adapters.<name>`` (so its file keys are PEFT's
``base_model.model.<attention path>.adaption_prompt`` / ``.adaption_gate`` by the one key rule);
it is an output-side adapter of the attention module, so the host's routing hook adds the term
(reading the call's hidden states and position embeddings). LLaMA-Adapter cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, module_device, resolve_dtype

from ..routing import attach
from ..config import AdapterConfig, register_config
from ..geometry import config_value, default_targets
from ..inject import register_method


@register_config
@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter, field for field as PEFT's ``AdaptionPromptConfig``.

    Fields:
        target_modules: name (last component) of the attention submodules, e.g. "self_attn"
            (Llama-like models) or "attn" (GPT-2). Default: PEFT's for the architecture, else "self_attn".
        adapter_len: L, the number of prompt tokens per adapted layer (int > 0). Required.
        adapter_layers: how many attention layers, counted from the top, get a prompt. Required.
    """

    PEFT_TYPE = "ADAPTION_PROMPT"

    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    def __post_init__(self):
        for f in ("adapter_len", "adapter_layers"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError("AdaptionPromptConfig.target_modules is one module name (a string), e.g. 'self_attn'")


def _attention_kind(attn: nn.Module) -> Optional[str]:
    if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "llama"
    if hasattr(attn, "c_attn") and hasattr(attn, "split_size"):
        return "gpt2"
    return None


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class AdaptionPromptAdapter(nn.Module):
    """The prompt and gate of one attention layer.

    Parameters (PEFT's names): ``adaption_prompt`` (1, adapter_len, hidden), N(0, 1) init;
    ``adaption_gate`` (1,), zero init. :meth:`extra` returns the term added to the attention
    output (B, T, hidden) in the output's dtype.
    """

    side = "output"
    merged = False
    merge_error = ("LLaMA-Adapter adds attention over learned prompt tokens; it has no weight delta to merge "
                   "(use it unmerged, or delete_adapter it)")
    uses_base_output = False
    supports_inplace = False
    composes = "add"
    no_decay = ()  # the gate's neutral value is 0; the prompt does nothing while the gate is 0

    def __init__(self, attn: nn.Module, adapter_len: int, hidden: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.kind = _attention_kind(attn)
        self.adapter_len = adapter_len
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden, dtype=dtype, device=device).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def merge_into(self, host, w):
        raise ValueError(self.merge_error)

    merge_bias = merge_into

    def forward(self, x, out, call):
        """The attention output ``out`` (a tensor, or a tuple whose first element is it) plus the
        gated prompt term; ``x`` is the attention's hidden states (B, T, hidden)."""
        pe = call.kwargs.get("position_embeddings")
        if pe is None and len(call.args) > 1 and isinstance(call.args[1], tuple):
            pe = call.args[1]
        is_tuple = isinstance(out, tuple)
        o = out[0] if is_tuple else out
        o = o + self.extra(call.host, x, pe).to(o.dtype)
        return (o,) + tuple(out[1:]) if is_tuple else o

    def extra(self, attn: nn.Module, hidden_states: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        if self.kind == "gpt2":
            return self._extra_gpt2(attn, hidden_states)
        wdt = attn.q_proj.weight.dtype if attn.q_proj.weight.is_floating_point() else hidden_states.dtype
        hd = attn.head_dim
        prompt = self.adaption_prompt.to(wdt)
        q = attn.q_proj(hidden_states).view(B, T, -1, hd)  # (B, T, heads, hd)
        k = attn.k_proj(prompt).view(1, self.adapter_len, -1, hd)  # (1, L, kv_heads, hd)
        v = attn.v_proj(prompt).view(1, self.adapter_len, -1, hd)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if position_embeddings is None:
            raise ValueError("LLaMA-Adapter needs the attention's position_embeddings (cos, sin) keyword argument; "
                             "this attention module does not receive it")
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin  # (B, heads, T, hd)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scaling = getattr(attn, "scaling", hd ** -0.5)
        scores = torch.matmul(q, k.transpose(2, 3).to(q.dtype)) * scaling  # (B, heads, T, L)
        w = self.adaption_gate.float() * F.softmax(scores, dim=-1, dtype=torch.float32)
        o = torch.matmul(w.to(q.dtype), v.to(q.dtype))  # (B, heads, T, hd)
        o = o.transpose(1, 2).reshape(B, T, -1)
        o = attn.o_proj(o)  # the module itself (any storage, LoRA on it included), as PEFT does ...
        bias = getattr(attn.o_proj, "bias", None)
        return o - bias if bias is not None else o  # ... but without its bias: zero gate -> exactly 0

    def _extra_gpt2(self, attn, hidden_states):
        B, T, E = hidden_states.shape
        hd = attn.head_dim
        w = attn.c_attn.weight
        prompt = self.adaption_prompt.to(w.dtype if w.is_floating_point() else hidden_states.dtype)
        q = attn.c_attn(hidden_states).split(attn.split_size, dim=2)[0]
        _, k, v = attn.c_attn(prompt).split(attn.split_size, dim=2)
        q = q.view(B, T, -1, hd).transpose(1, 2)
        k = k.view(1, self.adapter_len, -1, hd).transpose(1, 2)
        v = v.view(1, self.adapter_len, -1, hd).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3).to(q.dtype)) / (hd ** 0.5)
        w = self.adaption_gate.float() * F.softmax(scores, dim=-1, dtype=torch.float32)
        o = torch.matmul(w.to(q.dtype), v.to(q.dtype))
        return o.transpose(1, 2).reshape(B, T, -1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapter_len={self.adapter_len}"


def _targets(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    target = config.target_modules or default_targets("adaption_prompt", model) or "self_attn"
    names = [n for n, _ in model.named_modules() if n == target or n.endswith("." + target)]
    if not names:
        raise ValueError(f"no module named {target!r} in the model: set AdaptionPromptConfig.target_modules to the "
                         "attention submodule name (e.g. 'self_attn' or 'attn')")
    if config.adapter_layers > len(names):
        raise ValueError(f"adapter_layers={config.adapter_layers} but the model has only {len(names)} "
                         f"{target!r} modules")
    config.target_modules = target
    return names[-config.adapter_layers:]


def inject_adaption_prompt(model: nn.Module, config: AdaptionPromptConfig, rec: AdapterRecord, *,
                           adapter_dtype=None) -> None:
    """Injector for :class:`AdaptionPromptConfig` (see :func:`deltatune.inject`).

    Raises:
        ValueError: missing ``adapter_len``/``adapter_layers``, no such attention modules, or more
            layers asked than the model has. TypeError: an attention module of an unknown kind.
    """
    if not config.adapter_len or not config.adapter_layers:
        raise ValueError("AdaptionPromptConfig needs adapter_len and adapter_layers (e.g. 10 and 2)")
    names = _targets(model, config)
    hidden = config_value(model, "hidden_size")
    for n in names:
        attn = model.get_submodule(n)
        if _attention_kind(attn) is None:
            raise TypeError(f"{n} ({type(attn).__name__}) is not an attention module LLaMA-Adapter knows: it needs "
                            "q_proj/k_proj/v_proj/o_proj (Llama-like) or c_attn (GPT-2)")
    first = model.get_submodule(names[0])
    ref = first.q_proj.weight if hasattr(first, "q_proj") else first.c_attn.weight
    dtype = resolve_dtype(adapter_dtype, ref)
    for n in names:
        attn = model.get_submodule(n)
        h = hidden or getattr(attn, "embed_dim", None) or attn.config.hidden_size
        attach(model, n, rec.name, AdaptionPromptAdapter(attn, config.adapter_len, h, dtype=dtype,
                                                          device=module_device(attn)))


register_method(AdaptionPromptConfig, inject_adaption_prompt)
