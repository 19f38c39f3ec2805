"""The training loss: the sum of the target tokens' cross-entropy, without full-vocabulary logits.

:func:`token_loss_sum` returns ``(sum over target tokens of -log p(y_t | y_<t), number of targets)``
for a collated batch. Two paths compute the same number:

* the **head path** (used wherever it applies): the model runs with its output head standing
  aside for the call (its forward returns its input), so the model hands back the final hidden
  states of the positions that predict targets; only those rows ``h`` (N, D) meet the head's
  weight ``W`` (V, D), in chunks of rows (:class:`HeadCrossEntropy`): per chunk the logits
  (rows, V) and their softmax in the compute dtype (the softmax's sums in float32), the loss in
  float32 and the gradient with respect to ``h``, all in the forward pass. Peak memory is one
  chunk (two (rows, V) tensors, :data:`CHUNK_BYTES` each) whatever the batch, and
  no (B, T, V) tensor ever exists. The head is frozen in every adapter method; when it trains
  (full fine-tuning) its gradient is accumulated chunk by chunk too.
* the **logits path**: the model's own logits of the last K positions (transformers'
  ``logits_to_keep``), then ``F.cross_entropy`` on the target positions. Used when the head
  carries adapters (LoRA on ``lm_head``, a ``modules_to_save`` copy), is not a plain
  ``nn.Linear``, the model does not route its hidden states through it, or it soft-caps its
  logits after the head (Gemma 2's ``final_logit_softcapping``).

Labels follow :func:`deltatune.train.data.collate`: unshifted, -100 off target; the logits at
position t-1 predict the label at t. A packed batch (several examples in one row, see
:mod:`deltatune.train.packing`) is read the same way: each example's first position is never a
target, so no prediction crosses an example boundary.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import GEOMETRY
from ..targets import ADAPTERS
from .data import IGNORE_INDEX

CHUNK_BYTES = 32 << 20  # logits per chunk: 32 MiB in the compute dtype (bf16: 16 M elements, 341 rows of a
# 49,152-word vocabulary; fp32: 170 rows). Measured (4 x 256 SmolLM2 rows, bf16, 2 threads): the head's two matmuls
# took ~230 ms a step in 85-row chunks and ~160 ms in 340-row ones (each chunk reads the head weight again); with the
# softmax written in the compute dtype a chunk holds two (rows, V) tensors, 64 MiB at this size.

_SUM_ROWS = 32  # rows per float32 sum of a chunk's probabilities: a sum with dtype= converts its whole input first,
# and a (rows, V) float32 copy at the end of the forward pass, when the most memory is live, raised the peak by 64 MiB
_KEEP_CACHE: dict = {}


def _forward_params(model: nn.Module) -> frozenset:
    key = type(model)
    if key not in _KEEP_CACHE:
        try:
            _KEEP_CACHE[key] = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            _KEEP_CACHE[key] = frozenset()
    return _KEEP_CACHE[key]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _forward_params(model)


def _cache_kw(model: nn.Module) -> str:
    """The forward keyword of the key/value cache (transformers >= 5.x: ``cache``)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _log_tiny(dtype) -> float:
    """log of ``dtype``'s smallest normal number: below it a probability has lost precision (or is 0)."""
    return math.log(torch.finfo(dtype).tiny)


class HeadCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i @ W.T + b, y_i)`` for h (N, D), W (V, D), b (V,) or None, y (N,) int64, in
    chunks of ``chunk`` rows; returns a float32 scalar (and, with ``count_correct``, the number of
    rows whose argmax is the label, an int64 scalar, not differentiable). The matmuls run in
    ``dtype`` (bf16 on the fast path; ``h`` and ``W`` are cast to it). Per chunk one softmax (float32
    inside, written in ``dtype``) gives both the loss and the gradient with respect to the logits
    (``p - onehot(y)``). The target's entry is not taken from the rounded ``p_y``: ``1 - p_y`` is
    the float32 sum of the other entries, summed on their own (no cancellation against ``p_y``),
    so a confident row keeps its small gradient and its loss ``-log1p(-(1 - p_y))`` to float32
    precision; when ``p_y < 1/2`` the loss is ``-log p_y``, and for a ``p_y`` below the dtype's
    smallest normal number ``-(logit_y - max logit) - log p_max`` (``p_max >= 1/V``), so a very
    unlikely target still gets its whole loss (the max is taken for those rows only). The gradients with respect to ``h`` (and ``W``, ``b`` when they require grad) are computed
    in the forward pass, chunk by chunk, and scaled by the incoming gradient in the backward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk, count_correct, dtype):
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight if weight.dtype == dtype else weight.to(dtype)
        hx = h if h.dtype == dtype else h.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        grad_h = torch.empty_like(hx) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, yc = hx[s:s + chunk], y[s:s + chunk]
                logits = hc @ w.T  # (rows, V) in the compute dtype
                if bias is not None:
                    logits = logits + bias.to(logits.dtype)
                if count_correct:
                    correct += (logits.argmax(-1) == yc).sum()
                rows = torch.arange(logits.shape[0], device=logits.device)
                p = torch.softmax(logits, dim=-1)  # (rows, V): float32 inside, one pass
                log_py = p[rows, yc].float().log()
                low = (log_py < _log_tiny(p.dtype)).nonzero().squeeze(1)  # p_y below the dtype's normal numbers
                if len(low):  # log p_y = logit_y - max logit + log p_max (p_max >= 1/V never underflows)
                    top, top_i = logits[low].max(-1)
                    log_py[low] = (logits[low, yc[low]].float() - top.float()) + p[low, top_i].float().log()
                del logits
                p[rows, yc] = 0.0
                rest = torch.cat([p[r:r + _SUM_ROWS].sum(-1, dtype=torch.float32)  # 1 - p_y: the others' sum,
                                  for r in range(0, p.shape[0], _SUM_ROWS)]).clamp(0.0, 1.0)  # no cancellation
                log_p = torch.where(rest < 0.5, torch.log1p(-rest), log_py)
                total -= log_p.sum()
                if need_h or need_w or need_b:
                    p[rows, yc] = (-rest).to(p.dtype)  # d CE / d logits = softmax - one-hot
                    if need_h:
                        torch.mm(p, w, out=grad_h[s:s + chunk])
                    if need_w:
                        grad_w += p.T.float() @ hc.float()
                    if need_b:
                        grad_b += p.sum(0, dtype=torch.float32)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.need = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        saved = iter(ctx.saved_tensors)
        grads = []
        for need, dtype in zip(ctx.need, ctx.dtypes):
            grads.append((next(saved) * grad_total.to(torch.float32)).to(dtype) if need else None)
        return grads[0], grads[1], grads[2], None, None, None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
                       chunk: Optional[int] = None, count_correct: bool = False) -> tuple[torch.Tensor, int]:
    """(float32 scalar sum of CE, number of argmax hits or 0) of rows ``h`` (N, D) against the head
    ``weight`` (V, D) / ``bias``; see :class:`HeadCrossEntropy`. The matmuls run in the autocast
    dtype when autocast is on for ``h``'s device (as the head's own ``nn.Linear`` would), else in
    ``h``'s dtype. ``chunk``: rows per chunk (default: :data:`CHUNK_BYTES` of logits);
    ``count_correct``: count the argmax hits."""
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    elem = torch.finfo(dtype).bits // 8
    chunk = chunk or max(1, CHUNK_BYTES // (elem * weight.shape[0]))
    total, correct = HeadCrossEntropy.apply(h, weight, bias, y, int(chunk), bool(count_correct), dtype)
    return total, int(correct)


_NONLINEAR_AFTER_HEAD = ("final_logit_softcapping",)  # config fields of a map the model applies to its logits
# (Gemma 2/3: tanh(logits / cap) * cap); a linear one (Granite's logits_scaling, Cohere's logit_scale) acts on the
# hidden states the head path gets back just as on the logits


def _configs(model: nn.Module) -> list:
    """The model's config and, for a composite model, its text model's (transformers' get_text_config)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else None
    return [cfg] if text is None or text is cfg else [cfg, text]


def soft_caps_logits(model: nn.Module) -> bool:
    """Whether the model maps its logits through a nonlinear function after the head (Gemma 2's
    soft-capping), which the head path, computing ``h @ W.T``, would leave out."""
    return any(getattr(c, f, None) for c in _configs(model) for f in _NONLINEAR_AFTER_HEAD)


def _head_of(model: nn.Module) -> Optional[nn.Module]:
    """The output head when the head path applies to it: a plain ``nn.Linear`` without adapters,
    whose logits the model does not pass through a nonlinear map (Gemma 2's soft-capping)."""
    head = GEOMETRY.output_embedding(model)
    if type(head) is not nn.Linear or ADAPTERS in head._modules or "forward" in head.__dict__:
        return None
    if soft_caps_logits(model):
        return None
    return head


def _identity(self, x):
    return x


@contextlib.contextmanager
def head_stands_aside(head: nn.Module):
    """For the duration of the block, ``head(x)`` returns ``x`` (its hooks still run)."""
    head.forward = types.MethodType(_identity, head)
    try:
        yield
    finally:
        del head.__dict__["forward"]


def _run_shared_prefix(model: nn.Module, prefix: torch.Tensor, kwargs: dict, head: Optional[nn.Module]) -> None:
    """Run the rows' shared prefix (1, P) once and turn ``kwargs`` (the rows' suffixes, (B, S)) into a
    call that attends to it: its key/value cache repeated for every row (the repeat's backward sums
    the rows' gradients), an attention mask over prefix + suffix, positions P.. for the suffixes."""
    ids = kwargs["input_ids"]
    B, S, P = ids.shape[0], ids.shape[1], prefix.shape[1]
    call = {"input_ids": prefix, "use_cache": True}
    if _accepts_logits_to_keep(model):
        call["logits_to_keep"] = 1  # the prefix predicts no target
    with head_stands_aside(head) if head is not None else contextlib.nullcontext():
        out = model(**call)
    key = _cache_kw(model)
    cache = out[key] if key in out else out["past_key_values"]
    cache.batch_repeat_interleave(B)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones((B, S), dtype=torch.long, device=ids.device)
    kwargs["attention_mask"] = torch.cat([mask.new_ones((B, P)), mask], dim=1)
    kwargs["position_ids"] = torch.arange(P, P + S, device=ids.device).expand(B, S)
    kwargs[key] = cache


def token_loss_sum(model: nn.Module, batch: dict, *, with_accuracy: bool = False, head_path: bool = True):
    """Sum of the target tokens' cross-entropy over a collated batch (module docstring).

    Args:
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T) or None with ``position_ids`` (B, T)
            for a packed batch, ``labels`` (B, T) unshifted (-100 off target); with ``prefix_ids``
            (1, P) the rows are suffixes of that shared prefix, which runs once
            (:func:`deltatune.train.packing.share_prefix`).
        head_path: allow the head path (the logits path is used where it does not apply).

    Returns:
        ``(loss_sum, n_targets)``: a float32 scalar (with grad when grad mode is on) and an int;
        with ``with_accuracy`` also the number of targets whose argmax logit is the label.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    T = ids.shape[1]
    tgt = labels[:, 1:]  # (B, T-1): the label predicted from position j is at j+1
    valid_cols = (tgt != IGNORE_INDEX).any(0).nonzero()
    if len(valid_cols) == 0:
        z = torch.zeros((), dtype=torch.float32, device=ids.device)
        return (z, 0, 0) if with_accuracy else (z, 0)
    first = int(valid_cols[0])  # first logits position that predicts a target
    keep = T - first  # positions first .. T-1
    kwargs = {"input_ids": ids, "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    if _accepts_logits_to_keep(model) and keep < T:
        kwargs["logits_to_keep"] = keep
    y = labels[:, first + 1:]  # (B, keep-1)
    sel = y != IGNORE_INDEX
    head = _head_of(model) if head_path else None
    if batch.get("prefix_ids") is not None:
        _run_shared_prefix(model, batch["prefix_ids"], kwargs, head)
    if head is not None:
        with head_stands_aside(head):
            out = model(**kwargs)
        hidden = out.logits if hasattr(out, "logits") else out[0]
        if hidden.shape[-1] == head.in_features and hidden.shape[-1] != head.out_features:
            h = hidden[:, -keep:][:, :-1][sel]  # (N, D): the rows that predict targets
            w = head.weight.full_tensor() if hasattr(head.weight, "full_tensor") else head.weight  # FSDP: whole
            loss, correct = head_cross_entropy(h, w, head.bias, y[sel], count_correct=with_accuracy)
            n = int(sel.sum())
            return (loss, n, correct) if with_accuracy else (loss, n)
        # the model did not route its hidden states through the head: take the logits path
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    lg = logits[:, -keep:][:, :-1][sel].float()  # (N, V)
    yy = y[sel]
    loss = F.cross_entropy(lg, yy, reduction="sum")
    n = int(sel.sum())
    if with_accuracy:
        return loss, n, int((lg.argmax(-1) == yy).sum())
    return loss, n
