"""Full fine-tuning (``deltatune train --method full``): every weight of the model trains through the
same loop as the adapter methods, and the run's output is a plain transformers model folder.

* No adapter is injected. The base is scored first, as loaded and frozen (there is no adapter to
  disable); then every parameter is made trainable (:func:`make_trainable`) and the one loop of
  :mod:`deltatune.train.loop` trains them.
* Weights are float32 whatever ``--precision`` (:func:`weights_dtype`): AdamW then updates float32
  master weights with float32 gradients and moments, and ``--precision bf16`` (or ``fp16`` on a
  GPU) only sets the compute dtype of the forward and backward passes under ``torch.autocast``
  (the fast path's loss, packed rows and shared prefix stay on). Weights held in bf16 would lose
  every update smaller than half a bf16 step of the weight (8 significant bits): at the preset's
  learning rate that is most of them (README, "Full fine-tuning"). So ``--dtype bfloat16`` /
  ``float16`` is refused for this method.
* The output (:func:`save_model_folder`): ``model.safetensors`` + ``config.json`` +
  ``generation_config.json`` + the tokenizer's files via ``save_pretrained``, beside
  ``report.json``, ``metrics.jsonl`` and ``curves.png``; the folder follows the ownership rules of
  :mod:`deltatune.train.outputs`. ``deltatune eval --model OUT`` and ``generate --model OUT`` load it
  like any model folder.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Optional

from torch import nn

from .config import TrainConfig, UsageError

WEIGHTS_DTYPE = "float32"


def weights_dtype(cfg: TrainConfig) -> str:
    """The dtype the weights of a full fine-tuning run are loaded and trained in: float32.

    Raises:
        UsageError: ``--dtype`` bfloat16 or float16 (no float32 master weights: the updates would be lost).
    """
    if cfg.dtype not in (None, WEIGHTS_DTYPE):
        raise UsageError(f"--dtype {cfg.dtype} with --method full would train {cfg.dtype} weights with no float32 "
                         "master copy (most updates are below their resolution and lost): leave --dtype out "
                         "(float32 weights; --precision bf16 computes in bf16 under autocast)")
    return WEIGHTS_DTYPE


def check_out_is_not_model(out: str, model: Optional[str]) -> None:
    """Refuse an ``--out`` that is (or holds) the ``--model`` folder: the run would replace its own base.

    Raises:
        UsageError: ``out`` and ``model`` name the same folder, or ``model`` lies inside ``out``.
    """
    if not model:
        return
    o = os.path.realpath(os.path.expanduser(out))
    m = os.path.realpath(os.path.expanduser(model))
    m = m if os.path.isdir(m) else os.path.dirname(m)  # a .gguf file: its folder
    if m == o or m.startswith(o + os.sep):
        raise UsageError(f"--out {out} would replace the model folder --model {model}: choose another folder")


def make_trainable(model: nn.Module) -> int:
    """Make every parameter trainable; return their number (tied weights once)."""
    seen, n = set(), 0
    for p in model.parameters():
        p.requires_grad_(True)
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def drop_gguf_marks(model: nn.Module) -> None:
    """A GGUF base is de-quantised on load, but transformers keeps its GGUF "quantizer", which refuses to
    save; the weights are plain float tensors, so drop the marks and save them as safetensors."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        if hasattr(model, "quantization_method"):
            try:
                del model.quantization_method
            except AttributeError:
                pass


def save_model_folder(model: nn.Module, tokenizer, path: str) -> str:
    """Write ``model`` (safetensors + config) and ``tokenizer`` into ``path`` with ``save_pretrained``."""
    drop_gguf_marks(model)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
        model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
