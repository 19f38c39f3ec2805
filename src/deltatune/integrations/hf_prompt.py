"""The top-model wiring of prompt tuning, P-tuning and prefix tuning for transformers models.

Two hooks on the top model (a forward pre-hook with kwargs and an always-called forward hook),
installed once per model by :class:`PromptWiring` when the first prompt adapter is injected
(``GEOMETRY.prompt_wiring``) and removed with the last one. They ask
:func:`deltatune.methods.prompt.active_prompt` which prompt acts on the call (the routing rule of
:mod:`deltatune.adapters`), and speak transformers' calling convention: keyword names,
``DynamicCache``, ``ModelOutput``.

What the hooks do (B = batch, T = tokens passed in, P = virtual tokens):

* First step (no cache, or an empty one): prompt/P-tuning turn ``input_ids`` (B, T) into
  ``inputs_embeds`` (B, P+T, D) with the virtual embeddings in front; prefix tuning fills the
  cache with the (B, kv_heads, P, head_dim) prefix of every layer. ``attention_mask`` (B, T) gets P
  columns of ones in front; ``position_ids`` (B, T) are shifted by P (the virtual tokens take
  positions 0..P-1; without ``position_ids`` the model counts them itself); ``labels`` (B, T) get
  P columns of -100 in front and their first column set to -100, so that the loss is exactly the
  base model's loss over the real tokens (the last virtual position never predicts ``labels[:,
  0]``; PEFT does count that one term, so losses agree with PEFT when ``labels[:, 0] == -100``).
* Later steps (a cache that holds the prompt; the hooks mark such caches): ``attention_mask`` is
  extended by P ones when it covers only the real tokens, ``position_ids`` are shifted by P.
* The output: for prompt and P-tuning the ``logits`` (and ``hidden_states``) of the P virtual
  positions are dropped, so ``logits`` (B, T, V) line up with ``input_ids`` exactly as for the
  base model (unlike PEFT, whose logits have P+T positions). Attention maps keep all positions.

Callers always speak in real tokens: masks, positions and labels never include the virtual tokens.
The prompt is only injected when a sequence starts; a non-empty cache made without the prompt (e.g.
inside :func:`deltatune.disable_adapter`) is passed through unchanged.

Callers always speak in real tokens: masks, positions and labels never include the virtual tokens.
The prompt is only injected when a sequence starts; a non-empty cache made without the prompt (e.g.
inside :func:`deltatune.disable_adapter`) is passed through unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..methods.prefix import PrefixEncoder, PrefixTuningConfig
from ..methods.prompt import active_prompt

_CACHE_MARK = "_deltatune_virtual_tokens"  # set on a Cache object that holds the virtual tokens


@dataclass
class _Frame:
    """What the pre-hook tells the post-hook about one call."""

    T: int  # real tokens passed in
    mark: int  # virtual tokens the returned cache holds
    strip: int = 0  # virtual positions to drop from logits / hidden states
    as_tuple: bool = False  # the caller asked for return_dict=False
    drop_cache: bool = False  # a cache made only to carry the prefix, not asked for


class PromptWiring:
    """The two hooks of one model and the stack of frames between them (one per nested call).
    ``remove()`` takes both hooks off."""

    def __init__(self, model: nn.Module):
        self.frames: list = []
        self.handles = (model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                        model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.frames.clear()

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        self.frames.append(None)  # replaced below; the post-hook (always called) pops it even if this raises
        act = active_prompt(model)
        if act is None:
            return None
        _, mod, config = act
        positional, ck = _forward_params(model)
        kw = dict(kwargs)
        for n, a in zip(positional, args):
            if n in kw:
                raise TypeError(f"forward() got multiple values for argument {n!r}")
            kw[n] = a
        if ck == "cache" and "past_key_values" in kw:
            kw["cache"] = kw.pop("past_key_values")
        ids, emb = kw.get("input_ids"), kw.get("inputs_embeds")
        x = emb if emb is not None else ids
        if x is None:
            raise ValueError("prompt methods need input_ids or inputs_embeds")
        B, T = x.shape[0], x.shape[1]
        cache = kw.get(ck)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise TypeError("prompt methods need a transformers Cache object as the key/value cache, not a tuple")
        past = 0 if cache is None else int(cache.get_seq_length())
        P = mod.num_virtual_tokens
        frame = _Frame(T=T, mark=P)
        if kw.get("return_dict") is False:
            kw["return_dict"] = True
            frame.as_tuple = True

        if past == 0:  # a sequence starts: inject the prompt
            if mod.kind == "kv":
                if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                    raise ValueError("prefix tuning does not work with gradient checkpointing (the model drops the "
                                     "key/value cache under it): disable gradient checkpointing or use prompt tuning")
                use_cache = kw.get("use_cache")
                if use_cache is None:
                    use_cache = getattr(getattr(model, "config", None), "use_cache", True)
                # a cache made here only to carry the prefix is not returned unless caching was asked for
                frame.drop_cache = cache is None and not use_cache
                kw[ck] = _prefix_cache(model, mod, config, cache, B)
                kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, 0)
                kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=False)
            else:
                if emb is None:
                    emb = model.get_input_embeddings()(ids)
                prompts = _prompt_output(mod).to(emb.dtype)  # (P, D)
                kw["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(B, -1, -1), emb], dim=1)
                kw["input_ids"] = None
                kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, 0)
                kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=True)
                labels = kw.get("labels")
                if labels is not None:
                    pad = torch.full((labels.shape[0], P + 1), -100, dtype=labels.dtype, device=labels.device)
                    kw["labels"] = torch.cat([pad, labels[:, 1:]], dim=1)
                tt = kw.get("token_type_ids")
                if tt is not None:
                    kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], P), tt], dim=1)
                frame.strip = P
        else:
            P = getattr(cache, _CACHE_MARK, None)
            if P is None:  # a cache started without the prompt: nothing to add mid-sequence
                return None
            frame.mark = P
            kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, past - P)
            kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=False)
        self.frames[-1] = frame
        return (), kw

    def _post_hook(self, model: nn.Module, args: tuple, kwargs: dict, output):
        if not self.frames:
            return None
        frame = self.frames.pop()
        if frame is None:
            return None
        cache_field = None
        if isinstance(output, dict):  # transformers ModelOutput (an OrderedDict of the set fields)
            keys = list(output.keys())  # plain keys: no deprecation warning for the old cache name
            cache_field = next((f for f in ("cache", "past_key_values") if f in keys and output[f] is not None), None)
        if cache_field is not None:
            if frame.drop_cache:
                output[cache_field] = None
            elif hasattr(output[cache_field], "get_seq_length"):
                setattr(output[cache_field], _CACHE_MARK, frame.mark)
        P = frame.strip
        if P and isinstance(output, dict):
            T = frame.T
            logits = output.get("logits")
            if logits is not None and logits.shape[1] > T:
                output["logits"] = logits[:, logits.shape[1] - T:]
            hs = output.get("hidden_states")
            if hs is not None:
                output["hidden_states"] = tuple(h[:, h.shape[1] - T:] if h.shape[1] > T else h for h in hs)
        if frame.as_tuple:
            return tuple(v for v in output.values() if v is not None)
        return output


def _prompt_output(mod: nn.Module) -> torch.Tensor:
    """The prompt module's output, computed in its own (float32) dtype even under autocast: it is a
    few rows, and this keeps what training sees equal to what the adapter file stores."""
    dev = next(mod.parameters()).device.type
    with torch.autocast(dev, enabled=False):
        return mod()


_SIG_CACHE: dict = {}


def _forward_params(model) -> tuple[list, str]:
    cls = type(model)
    hit = _SIG_CACHE.get(cls)
    if hit is None:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = {p.name for p in params}
        cache_key = "cache" if "cache" in names else "past_key_values"
        hit = _SIG_CACHE[cls] = (positional, cache_key)
    return hit


def _extend_mask(mask: Optional[torch.Tensor], P: int, T: int, past_real: int) -> Optional[torch.Tensor]:
    """Prepend P attended columns to a 2D padding mask that covers only real tokens."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError("prompt methods take a 2D attention_mask (batch, tokens); a prepared 4D mask cannot be extended")
    if mask.shape[1] == past_real + P + T:  # the caller already included the virtual tokens
        return mask
    ones = torch.ones(mask.shape[0], P, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def _shift_positions(pos: Optional[torch.Tensor], P: int, prepend: bool) -> Optional[torch.Tensor]:
    if pos is None:
        return None
    pos = pos + P
    if prepend:
        virt = torch.arange(P, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], P)
        pos = torch.cat([virt, pos], dim=-1)
    return pos


def _prefix_cache(model, mod: PrefixEncoder, config: PrefixTuningConfig, cache, B: int):
    """Fill ``cache`` (or a new DynamicCache) with the prefix: per layer (B, kv_heads, P, head_dim)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    P, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    hd = config.token_dim // H
    dtype = model.get_input_embeddings().weight.dtype
    kv = _prompt_output(mod).to(dtype)  # (P, L*2*D)
    kv = kv.view(P, 2 * L, H, hd).permute(1, 2, 0, 3)  # (2L, H, P, hd)
    for layer in range(L):
        k = kv[2 * layer].unsqueeze(0).expand(B, H, P, hd).contiguous()
        v = kv[2 * layer + 1].unsqueeze(0).expand(B, H, P, hd).contiguous()
        cache.update(k, v, layer)
    return cache
