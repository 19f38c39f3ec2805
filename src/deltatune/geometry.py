"""What the methods need to know about a model's architecture, supplied by integrations.

The core never imports transformers. Model knowledge (the input embedding, the config's sizes,
``model_type``, where the transformer blocks are, per-architecture default targets, the
top-model wiring of prompt methods) is asked through the one :data:`GEOMETRY` object, whose
fields :mod:`deltatune.integrations.transformers` fills when deltatune is imported, the way
:mod:`deltatune.quant` registers layer kinds. Without an integration every question has a plain
answer (no embedding, no config, no blocks), so plain ``nn.Module`` models work as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn


@dataclass
class Site:
    """One place for a block-level adapter: the host sublayer, its block index, its kind
    (``"attention"`` | ``"feed_forward"`` | ``"module"``) and the path of its pre-norm (or None)."""

    host: str
    layer: Optional[int]
    kind: str
    norm: Optional[str] = None


def _none(*_a, **_k):
    return None


@dataclass
class ModelGeometry:
    """Answers about a model, each a function of the model (see the module docstring).

    Fields:
        model_type: model -> architecture name (transformers' ``config.model_type``) or None.
        name_or_path: model -> where the base model was loaded from, or None.
        text_config: model -> the (text) config object with sizes, or None.
        input_embedding / output_embedding: model -> the module, or None.
        decoder_sites: model -> list of :class:`Site` (attention and feed-forward sublayers of the
            transformer blocks); empty when the model has none.
        checkpointing_on: model -> whether gradient checkpointing is enabled.
        base_vocab_sizes: (model, paths of base model folders) -> {source: vocabulary size}.
        untie_embeddings: model -> None: record in the model's config that its input and output
            embeddings are no longer tied (after a merge gave one of them its own copy).
        load_tokenizer: (name_or_path, kwargs) -> tokenizer (local files only).
        prompt_wiring: installs the top-model hooks of prompt methods: ``install(model, state)``
            returns an object with ``remove()``; None when no integration provides it.
        default_targets: method name -> {model_type -> default targets} (PEFT's tables).
        on_first_adapter: functions ``(model, state)`` run when a model gets its first adapter
            (recording the vocabulary size, the gradient-checkpointing input hook); a hook they
            install goes into ``state.model_hooks`` and is removed with the last adapter.
    """

    model_type: Callable[[nn.Module], Optional[str]] = _none
    name_or_path: Callable[[nn.Module], Optional[str]] = _none
    text_config: Callable[[nn.Module], Any] = _none
    input_embedding: Callable[[nn.Module], Optional[nn.Module]] = _none
    output_embedding: Callable[[nn.Module], Optional[nn.Module]] = _none
    decoder_sites: Callable[[nn.Module], list] = lambda model: []
    checkpointing_on: Callable[[nn.Module], bool] = lambda model: False
    base_vocab_sizes: Callable[..., dict] = lambda model, paths=(): {}
    untie_embeddings: Callable[[nn.Module], None] = _none
    load_tokenizer: Optional[Callable] = None
    prompt_wiring: Optional[Callable] = None
    default_targets: dict = field(default_factory=dict)
    on_first_adapter: list = field(default_factory=list)


GEOMETRY = ModelGeometry()


def config_value(model: nn.Module, *names: str) -> Any:
    """The first of ``names`` the model's text config sets (e.g. "hidden_size", "n_embd"), or None."""
    cfg = GEOMETRY.text_config(model)
    for n in names:
        v = getattr(cfg, n, None) if cfg is not None else None
        if v is not None:
            return v
    return None


def default_targets(method: str, model: nn.Module) -> Any:
    """PEFT's default targets of ``method`` for the model's architecture, or None when unknown."""
    return GEOMETRY.default_targets.get(method, {}).get(GEOMETRY.model_type(model))
