"""Prefix tuning (Li and Liang, arXiv:2101.00190): learned key/value vectors in front of every layer.

Every layer gets P learned key and value vectors per key/value head, fed to the model through its
key/value cache (the integration pre-fills the cache with the (B, kv_heads, P, head_dim) prefix
of every layer, see :mod:`deltatune.integrations.hf_prompt`). ``prefix_projection=True`` produces
them from a (P, token_dim) table through a two-layer tanh MLP (the reparameterization of the
paper). The config, the injection and the file format are shared with prompt tuning
(:mod:`deltatune.methods.prompt`); the file holds the flattened prefix (P, num_layers * 2 *
token_dim) under ``prompt_embeddings``, as PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import AdapterConfig, register_config
from ..geometry import config_value
from .prompt import GEOMETRY_ADJUST, PromptLearningConfig, _copy_checked, _make_flat, register_prompt_method


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li and Liang, arXiv:2101.00190), field for field as PEFT's ``PrefixTuningConfig``.

    Fields (besides :class:`PromptLearningConfig`'s):
        prefix_projection: produce the prefix through a two-layer MLP (token_dim ->
            encoder_hidden_size -> num_layers * 2 * token_dim, tanh) instead of learning it directly.
        encoder_hidden_size: hidden width of that MLP. Default: ``token_dim``.
        init_weights: None (random, N(0, 1) as PEFT) or "zero" (all-zero prefix / last MLP layer).
    """

    PEFT_TYPE = "PREFIX_TUNING"
    neutral_fields = AdapterConfig.neutral_fields | {"init_weights"}

    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


class PrefixEncoder(nn.Module):
    """Prefix tuning's encoder. ``forward() -> (P, num_layers * 2 * token_dim)``.

    Row layout of one virtual token (PEFT's): ``[layer 0 keys, layer 0 values, layer 1 keys, ...]``,
    each block (heads, head_dim) head-major. Parameters: ``embedding`` (P, L*2*D) or, with
    ``prefix_projection``, ``embedding`` (P, D) and ``transform`` = Linear(D, H), Tanh, Linear(H, L*2*D).
    """

    kind = "kv"
    no_decay = ()

    def __init__(self, total: int, token_dim: int, num_layers: int, hidden: int, projection: bool,
                 init_zero: bool, *, flat: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.num_virtual_tokens = total
        kw = dict(dtype=dtype, device=device)
        self.flat = flat or not projection
        out = num_layers * 2 * token_dim
        if self.flat:
            self.embedding = nn.Embedding(total, out, **kw)
            if init_zero:
                nn.init.zeros_(self.embedding.weight)
        else:
            self.embedding = nn.Embedding(total, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, out, **kw))
            if init_zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        return e if self.flat else self.transform(e)

    def load_flat(self, t: torch.Tensor) -> None:
        if not self.flat:
            _make_flat(self, ("transform",))
            w = self.embedding.weight
            self.embedding = nn.Embedding(t.shape[0], t.shape[1], dtype=w.dtype, device=w.device)
            self.embedding.weight.requires_grad_(w.requires_grad)
        _copy_checked(self.embedding.weight, t)


def _kv_geometry(model: nn.Module, config: PrefixTuningConfig) -> None:
    """PEFT's rule (it also overrides explicit values): on grouped-query models the prefix has the
    key/value geometry, ``token_dim = head_dim * num_key_value_heads``."""
    kv = config_value(model, "num_key_value_heads")
    if kv is not None:
        hd = config_value(model, "head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = hd * kv
        config.num_attention_heads = kv
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"token_dim {config.token_dim} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")


def _build(model, config, dtype, device, tokenizer):
    return PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.num_layers, config.encoder_hidden_size,
                         config.prefix_projection, config.init_weights == "zero", flat=config.inference_mode,
                         dtype=dtype, device=device)


GEOMETRY_ADJUST[PrefixTuningConfig] = _kv_geometry
register_prompt_method(PrefixTuningConfig, _build)
