"""The top-model wiring of prompt tuning, P-tuning and prefix tuning for transformers models.

Two hooks on the top model (a forward pre-hook with kwargs and an always-called forward hook),
installed once per model by :class:`PromptWiring` when the first prompt adapter is injected
(``GEOMETRY.prompt_wiring``) and removed with the last one. They ask
:func:`deltatune.methods.prompt.acting_prompts` which prompts act on the call, on which rows (the
routing rule of :mod:`deltatune.routing`), and speak transformers' calling convention: keyword names,
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

Mixed batches (:func:`deltatune.adapter_rows`, ``adapter_names=``): rows of different prompt
adapters, and rows without a prompt (the base model, or an adapter of another method), go in one
batch. The virtual columns are as wide as the longest prompt of each kind (prefix: ``Pk`` cache
columns; prompt/P-tuning: ``Pe`` input columns); a row's own P virtual tokens sit at the right end of
its kind's columns and every other virtual column of the row is masked out (attention mask 0), so
no row sees another's prompt. Each row's real positions are shifted by its own P (so the model is
always given ``position_ids``, and an attention mask), its virtual input tokens take positions
0..P-1, and the cache remembers the rows' virtual-column mask (B, Pk + Pe) for later steps. Each row
thus computes what it computes alone with its adapter; the masked columns add exact zeros to the
attention.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..methods.prefix import PrefixEncoder, PrefixTuningConfig
from ..methods.prompt import acting_prompts

_CACHE_MARK = "_deltatune_virtual_tokens"  # set on a Cache object that holds the virtual tokens
_MASK_2D = "prompt methods take a 2D attention_mask (batch, tokens); a prepared 4D mask cannot be extended"


@dataclass
class _Frame:
    """What the pre-hook tells the post-hook about one call."""

    T: int  # real tokens passed in
    mark: object  # virtual tokens the returned cache holds: their number, or the rows' (B, V) mask (mixed)
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
        x0 = next((v for v in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), args[0] if args else None)
                   if isinstance(v, torch.Tensor)), None)
        acts = acting_prompts(model, x0)
        if not acts:
            return None
        positional, ck, params = _forward_params(model)
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
        frame = _Frame(T=T, mark=None)
        if kw.get("return_dict") is False:
            kw["return_dict"] = True
            frame.as_tuple = True
        mixed = len(acts) > 1 or acts[0][3] is not None
        if mixed and "position_ids" not in params:
            raise ValueError(f"rows with different prompt adapters ({', '.join(a[0] for a in acts)}) need a model whose "
                             "forward takes position_ids (each row's positions are shifted by its own prompt)")

        if past == 0:  # a sequence starts: inject the prompt(s)
            if mixed:
                _start_mixed(model, kw, acts, ck, frame, B, T)
            else:
                _start(model, kw, acts[0][1], acts[0][2], ck, frame, B, T)
        else:
            mark = getattr(cache, _CACHE_MARK, None)
            if mark is None:  # a cache started without the prompt: nothing to add mid-sequence
                return None
            frame.mark = mark
            if isinstance(mark, torch.Tensor):  # a mixed batch's rows
                _continue_mixed(kw, mark, past, B, T)
            else:
                kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), mark, T, past - mark)
                kw["position_ids"] = _shift_positions(kw.get("position_ids"), mark, prepend=False)
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
            if frame.drop_cache:  # out of the output altogether: generate would take a None cache for one (beams)
                OrderedDict.__delitem__(output, cache_field)
                object.__setattr__(output, cache_field, None)
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


def _check_prefix_allowed(model: nn.Module) -> None:
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("prefix tuning does not work with gradient checkpointing (the model drops the "
                         "key/value cache under it): disable gradient checkpointing or use prompt tuning")


def _cache_only_for_prefix(model: nn.Module, kw: dict, cache) -> bool:
    """A cache made here only to carry the prefix is not returned unless caching was asked for."""
    use_cache = kw.get("use_cache")
    if use_cache is None:
        use_cache = getattr(getattr(model, "config", None), "use_cache", True)
    return cache is None and not use_cache


def _prepend_embeddings(model: nn.Module, kw: dict, prompts: torch.Tensor) -> None:
    """``inputs_embeds`` = ``prompts`` (B, P, D) then the real tokens' embeddings; labels and token
    types get P leading columns (labels: -100, and the first real label is dropped too)."""
    emb = kw.get("inputs_embeds")
    if emb is None:
        emb = model.get_input_embeddings()(kw.get("input_ids"))
    P = prompts.shape[1]
    kw["inputs_embeds"] = torch.cat([prompts.to(emb.dtype), emb], dim=1)
    kw["input_ids"] = None
    labels = kw.get("labels")
    if labels is not None:
        pad = torch.full((labels.shape[0], P + 1), -100, dtype=labels.dtype, device=labels.device)
        kw["labels"] = torch.cat([pad, labels[:, 1:]], dim=1)
    tt = kw.get("token_type_ids")
    if tt is not None:
        kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], P), tt], dim=1)


def _start(model, kw: dict, mod: nn.Module, config, ck: str, frame: _Frame, B: int, T: int) -> None:
    """First step, one prompt in front of every row."""
    P = mod.num_virtual_tokens
    frame.mark = P
    if mod.kind == "kv":
        _check_prefix_allowed(model)
        cache = kw.get(ck)
        frame.drop_cache = _cache_only_for_prefix(model, kw, cache)
        kw[ck] = _prefix_cache(model, cache, [(mod, config, None)], B, P)
        kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, 0)
        kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=False)
    else:
        prompts = _prompt_output(mod)  # (P, D)
        _prepend_embeddings(model, kw, prompts.unsqueeze(0).expand(B, -1, -1))
        kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, 0)
        kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=True)
        frame.strip = P


def _start_mixed(model, kw: dict, acts: list, ck: str, frame: _Frame, B: int, T: int) -> None:
    """First step of a mixed batch (module docstring): each row its own prompt (or none), the other
    virtual columns masked out, positions shifted per row."""
    ref = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
    dev = ref.device
    kv = [(m, c, r) for _, m, c, r in acts if m.kind == "kv"]
    em = [(m, c, r) for _, m, c, r in acts if m.kind != "kv"]
    Pk = max((m.num_virtual_tokens for m, _, _ in kv), default=0)
    Pe = max((m.num_virtual_tokens for m, _, _ in em), default=0)
    vmask = torch.zeros(B, Pk + Pe, dtype=torch.long, device=dev)  # the rows' virtual columns they attend to
    shift = torch.zeros(B, dtype=torch.long, device=dev)  # each row's own number of virtual tokens
    every = torch.arange(B, device=dev)
    if kv:
        _check_prefix_allowed(model)
        cache = kw.get(ck)
        frame.drop_cache = _cache_only_for_prefix(model, kw, cache)
        kw[ck] = _prefix_cache(model, cache, kv, B, Pk)
        for m, _, r in kv:
            r = every if r is None else r
            vmask[r, Pk - m.num_virtual_tokens:Pk] = 1
            shift[r] = m.num_virtual_tokens
    vpos = None
    if em:
        D = em[0][1].token_dim
        prompts = torch.zeros(B, Pe, D, dtype=torch.float32, device=dev)
        vpos = torch.zeros(B, Pe, dtype=torch.long, device=dev)
        for m, _, r in em:
            r, P = (every if r is None else r), m.num_virtual_tokens
            prompts = prompts.index_put((r[:, None], torch.arange(Pe - P, Pe, device=dev)[None, :]),
                                        _prompt_output(m).to(prompts.dtype).unsqueeze(0).expand(len(r), P, D))
            vmask[r, Pk + Pe - P:] = 1
            vpos[r, Pe - P:] = torch.arange(P, device=dev)
            shift[r] = P
        _prepend_embeddings(model, kw, prompts)
        frame.strip = Pe
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=dev)
    elif mask.dim() != 2:
        raise ValueError(_MASK_2D)
    kw["attention_mask"] = torch.cat([vmask.to(mask.dtype), mask], dim=1)
    pos = kw.get("position_ids")
    pos = torch.arange(T, device=dev).expand(B, T) if pos is None else pos.expand(B, -1)
    pos = pos + shift[:, None]
    kw["position_ids"] = pos if vpos is None else torch.cat([vpos, pos], dim=1)
    frame.mark = vmask


def _continue_mixed(kw: dict, vmask: torch.Tensor, past: int, B: int, T: int) -> None:
    """A later step of a mixed batch: the rows' virtual-column mask in front of the caller's mask
    (which covers the real tokens), positions shifted by each row's own prompt length."""
    if vmask.shape[0] != B:
        raise ValueError(f"the cache was started by a mixed batch of {vmask.shape[0]} rows, this step has {B}")
    V = vmask.shape[1]
    past_real = past - V
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(B, past_real + T, dtype=torch.long, device=vmask.device)
    if mask.dim() != 2:
        raise ValueError(_MASK_2D)
    if mask.shape[1] != past + T:  # the caller's mask covers only the real tokens
        mask = torch.cat([vmask.to(mask.dtype), mask], dim=1)
    kw["attention_mask"] = mask
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(past_real, past_real + T, device=vmask.device).expand(B, T)
    kw["position_ids"] = pos + vmask.sum(1)[:, None]


_SIG_CACHE: dict = {}


def _forward_params(model) -> tuple[list, str, frozenset]:
    """(positional parameter names, the cache keyword, every parameter name) of the model's forward."""
    cls = type(model)
    hit = _SIG_CACHE.get(cls)
    if hit is None:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = frozenset(p.name for p in params)
        cache_key = "cache" if "cache" in names else "past_key_values"
        hit = _SIG_CACHE[cls] = (positional, cache_key, names)
    return hit


def _extend_mask(mask: Optional[torch.Tensor], P: int, T: int, past_real: int) -> Optional[torch.Tensor]:
    """Prepend P attended columns to a 2D padding mask that covers only real tokens."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(_MASK_2D)
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


def _prefix_cache(model, cache, entries: list, B: int, Pk: int):
    """Fill ``cache`` (or a new DynamicCache) with the prefix of every layer, (B, kv_heads, Pk,
    head_dim) keys and values: ``entries`` are ``(module, config, rows)`` (rows None: every row),
    each row's prefix right-aligned in the Pk columns, zeros where a row has none (those columns
    are masked out for it)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    config = entries[0][1]
    L, H = config.num_layers, config.num_attention_heads
    hd = config.token_dim // H
    for _, c, _ in entries[1:]:
        if (c.num_layers, c.num_attention_heads, c.token_dim) != (L, H, config.token_dim):
            raise ValueError("prefix adapters of different layer counts or key/value sizes cannot share a batch")
    dtype = model.get_input_embeddings().weight.dtype
    if len(entries) == 1 and entries[0][2] is None and config.num_virtual_tokens == Pk:  # one prefix, every row
        kv = _prompt_output(entries[0][0]).to(dtype).view(Pk, 2 * L, H, hd).permute(1, 2, 0, 3)  # (2L, H, P, hd)
        kv = kv.unsqueeze(1).expand(2 * L, B, H, Pk, hd)
    else:
        dev = model.get_input_embeddings().weight.device
        kv = torch.zeros(2 * L, B, H, Pk, hd, dtype=dtype, device=dev)
        for mod, c, rows in entries:
            P = c.num_virtual_tokens
            rows = torch.arange(B, device=dev) if rows is None else rows
            own = _prompt_output(mod).to(dtype).view(P, 2 * L, H, hd).permute(1, 2, 0, 3)  # (2L, H, P, hd)
            kv = kv.index_put((torch.arange(2 * L, device=dev)[:, None, None], rows[None, :, None],
                               torch.arange(H, device=dev)[None, None, :], ),
                              torch.cat([torch.zeros(2 * L, H, Pk - P, hd, dtype=dtype, device=dev), own], dim=2)
                              .unsqueeze(1).expand(2 * L, len(rows), H, Pk, hd))
    for layer in range(L):
        cache.update(kv[2 * layer].contiguous(), kv[2 * layer + 1].contiguous(), layer)
    return cache
