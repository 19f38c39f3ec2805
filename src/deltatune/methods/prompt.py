"""Prompt tuning, P-tuning and prefix tuning: continuous prompts fed to the model at its top.

* Prompt tuning (Lester et al., arXiv:2104.08691): ``num_virtual_tokens`` learned input embeddings
  (P, token_dim) are put before the input embeddings. Initialised at random (N(0, 1), as PEFT),
  from a text (``prompt_tuning_init="TEXT"``: the word embeddings of the text's tokens, repeated
  or cut to P) or from random vocabulary rows (``"SAMPLE_VOCAB"``).
* P-tuning (Liu et al., arXiv:2103.10385): the P virtual token embeddings are the output of a
  prompt encoder, an MLP (3 linear layers, ReLU) or a bidirectional LSTM followed by an MLP, applied
  to a learned (P, token_dim) table.
* Prefix tuning (Li and Liang, arXiv:2101.00190): every layer gets P learned key and value
  vectors per key/value head, fed through the key/value cache (:mod:`deltatune.methods.prefix`).

No wrapper model: the prompt modules live in ``model.prompt_adapters[<adapter name>]`` and two
hooks on the top model (a forward pre-hook with kwargs and a forward hook) do the work, so
``model(...)``, ``model.generate(...)`` (cache on or off, left-padded batches) and training loops
all see the prompt. The hooks speak the model library's calling convention (keyword names, the
key/value cache object), so they belong to the integration: :mod:`deltatune.integrations.hf_prompt`
(installed through ``GEOMETRY.prompt_wiring``). This module holds the configs, the prompt
modules, the injection, :func:`acting_prompts` (which prompts act on a call, on which rows: the
routing rule of :mod:`deltatune.routing`) and the file format. Prefix tuning's config and encoder are in
:mod:`deltatune.methods.prefix`.

What the hooks do to masks, positions, labels, the cache and the logits is described in
:mod:`deltatune.integrations.hf_prompt`. Callers always speak in real tokens.

Files are Hugging Face PEFT's: ``adapter_config.json`` with PEFT's fields and one tensor
``prompt_embeddings`` in ``adapter_model.safetensors``: the virtual embeddings (P, token_dim) for
prompt/P-tuning and the flattened prefix (P, num_layers * 2 * token_dim) for prefix tuning, i.e.
the *output* of any encoder. Loading such a file gives a prompt table without the encoder (as PEFT's
inference mode does); loading it with ``is_trainable=True`` trains that table directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from ..adapters import AdapterRecord, get_state, module_device, resolve_dtype, row_index

from ..routing import acting_names, acting_rows
from ..config import AdapterConfig, register_config
from ..geometry import GEOMETRY, config_value
from ..inject import register_method

CONTAINER = "prompt_adapters"  # model.prompt_adapters: nn.ModuleDict, adapter name -> prompt module
FILE_KEY = "prompt_embeddings"


def _enum_str(v):
    return None if v is None else str(getattr(v, "value", v))


# ----------------------------------------------------------------------------- configs


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (PEFT's ``PromptLearningConfig``).

    Fields:
        num_virtual_tokens: P, the number of virtual tokens (int > 0). Required.
        token_dim: width of one virtual token. Default: read from the model (hidden size; for
            prefix tuning on grouped-query models ``head_dim * num_key_value_heads``, as PEFT).
        num_transformer_submodules: 1 for decoder-only models (the default; 2 is for
            encoder-decoder models, which deltatune does not support).
        num_attention_heads: heads of the model (key/value heads for prefix tuning). Default: read
            from the model.
        num_layers: transformer layers. Default: read from the model.
        modules_to_save: not supported with prompt methods (must stay None).

    The missing geometry fields are filled in place on the config object at :func:`inject` time,
    and saved so, as PEFT does.
    """

    merge_error: ClassVar[Optional[str]] = (
        "its virtual tokens are extra inputs, not a change of any weight; keep the adapter and load it with "
        "load_adapter (or deltatune generate --adapter)")

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list] = None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def __post_init__(self):
        if self.num_virtual_tokens is not None and (
            not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0
        ):
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.modules_to_save:
            raise ValueError("modules_to_save is not supported with prompt methods in deltatune: leave it None")


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., arXiv:2104.08691), field for field as PEFT's ``PromptTuningConfig``.

    Fields (besides :class:`PromptLearningConfig`'s):
        prompt_tuning_init: "RANDOM" (N(0, 1) entries, PEFT's default), "TEXT" (embeddings of
            ``prompt_tuning_init_text``'s tokens, repeated or cut to P) or "SAMPLE_VOCAB" (the
            embeddings of P random vocabulary ids).
        prompt_tuning_init_text: the text for "TEXT".
        tokenizer_name_or_path: local tokenizer folder for "TEXT" (loaded with
            ``local_files_only=True``). Instead, a tokenizer object may be passed as
            ``inject(model, config, tokenizer=tok)`` or put in this field; its ``name_or_path`` is then
            recorded here (PEFT requires this field for "TEXT").
        tokenizer_kwargs: extra keyword arguments for ``AutoTokenizer.from_pretrained`` (e.g.
            ``{"gguf_file": "model.gguf"}``); ``trust_remote_code`` is always dropped.
    """

    PEFT_TYPE = "PROMPT_TUNING"
    neutral_fields = AdapterConfig.neutral_fields | {
        "tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init", "prompt_tuning_init_text"}

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        self.prompt_tuning_init = _enum_str(self.prompt_tuning_init)
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not supported: use 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB'"
            )
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text to start from)")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., arXiv:2103.10385), field for field as PEFT's ``PromptEncoderConfig``.

    Fields (besides :class:`PromptLearningConfig`'s):
        encoder_reparameterization_type: "MLP" (Linear-ReLU-Linear-ReLU-Linear) or "LSTM" (a
            bidirectional LSTM, then Linear-ReLU-Linear).
        encoder_hidden_size: hidden width of the encoder. Default: ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP always has 3 linear layers, as in PEFT). Default 2.
        encoder_dropout: dropout between LSTM layers. Default 0.0.
    """

    PEFT_TYPE = "P_TUNING"
    neutral_fields = AdapterConfig.neutral_fields | {"encoder_dropout"}

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_str(self.encoder_reparameterization_type)
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r}: use 'MLP' or 'LSTM'"
            )
        if not 0.0 <= float(self.encoder_dropout) <= 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1], got {self.encoder_dropout!r}")


# ----------------------------------------------------------------------------- prompt modules


class PromptEmbedding(nn.Module):
    """Prompt tuning's table: ``embedding.weight`` (P_total, token_dim). ``forward() -> (P_total, D)``."""

    kind = "embeds"
    no_decay = ()

    def __init__(self, total: int, token_dim: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.num_virtual_tokens = total
        self.embedding = nn.Embedding(total, token_dim, dtype=dtype, device=device)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def load_flat(self, t: torch.Tensor) -> None:
        _copy_checked(self.embedding.weight, t)


class PromptEncoder(nn.Module):
    """P-tuning's encoder. ``forward() -> (P_total, token_dim)``: ``head(embedding.weight)``.

    Parameters (PEFT's names): ``embedding`` (P_total, D); MLP: ``mlp_head`` = Linear(D, H), ReLU,
    Linear(H, H), ReLU, Linear(H, D); LSTM: ``lstm_head`` (bidirectional, hidden H, ``num_layers``)
    then ``mlp_head`` = Linear(2H, 2H), ReLU, Linear(2H, D). Built with ``flat=True`` (inference,
    or after loading a file) there is no head and ``embedding`` holds the virtual embeddings.
    """

    kind = "embeds"
    no_decay = ()

    def __init__(self, total: int, token_dim: int, hidden: int, encoder_type: str, num_layers: int,
                 dropout: float, *, flat: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.num_virtual_tokens = total
        self.encoder_type = encoder_type
        kw = dict(dtype=dtype, device=device)
        self.embedding = nn.Embedding(total, token_dim, **kw)
        self.flat = flat
        if flat:
            return
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, token_dim, **kw))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        if self.flat:
            return e
        if self.encoder_type == "LSTM":
            e = self.lstm_head(e.unsqueeze(0))[0][0]  # (P, 2H)
        return self.mlp_head(e)

    def load_flat(self, t: torch.Tensor) -> None:
        _make_flat(self, ("lstm_head", "mlp_head"))
        _copy_checked(self.embedding.weight, t)


def _make_flat(mod: nn.Module, heads) -> None:
    """Drop the encoder heads: from now on ``embedding`` holds the encoder's output directly."""
    for h in heads:
        if h in mod._modules:
            del mod._modules[h]
    mod.flat = True


def _copy_checked(p: torch.Tensor, t: torch.Tensor) -> None:
    if tuple(p.shape) != tuple(t.shape):
        raise ValueError(f"prompt_embeddings has shape {tuple(t.shape)}, the adapter expects {tuple(p.shape)}: "
                         "was it saved for another model or another num_virtual_tokens?")
    with torch.no_grad():
        p.copy_(t.to(dtype=p.dtype, device=p.device))


# ----------------------------------------------------------------------------- model geometry


def fill_geometry(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """Fill ``num_layers``, ``token_dim``, ``num_attention_heads`` (and the encoders' hidden size)
    from the model config where they are None, in place, with PEFT's rules (including its
    grouped-query adjustment for prefix tuning). Returns ``config``.

    Raises:
        ValueError: a field is missing and the model config does not say it.
    """
    if config.num_layers is None:
        config.num_layers = config_value(model, "num_hidden_layers", "num_layers", "n_layer")
    if config.token_dim is None:
        config.token_dim = config_value(model, "hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = config_value(model, "num_attention_heads", "n_head", "num_heads")
    for f in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, f) is None:
            raise ValueError(f"cannot read {f} from the model's config: set {f} in the {type(config).__name__}")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_transformer_submodules != 1:
        raise ValueError("num_transformer_submodules must be 1: deltatune's prompt methods support decoder-only models")
    adjust = GEOMETRY_ADJUST.get(type(config))
    if adjust is not None:
        adjust(model, config)
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"  # PEFT builds its causal-LM wrapper only for this task type
    return config


# config class -> fn(model, config): a method's own geometry rule (prefix tuning's key/value sizes)
GEOMETRY_ADJUST: dict = {}


# ----------------------------------------------------------------------------- injection


def _container(model: nn.Module, create: bool = False) -> Optional[nn.ModuleDict]:
    c = model._modules.get(CONTAINER)
    if c is None and create:
        c = nn.ModuleDict()
        model.add_module(CONTAINER, c)
    return c


def _load_tokenizer(config: PromptTuningConfig, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if not config.tokenizer_name_or_path:
        raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass inject(model, config, tokenizer=tok) "
                         "or set tokenizer_name_or_path to a local tokenizer folder")
    if GEOMETRY.load_tokenizer is None:
        raise ValueError("prompt_tuning_init='TEXT' with tokenizer_name_or_path needs a tokenizer loader "
                         "(transformers): pass inject(model, config, tokenizer=tok) instead")
    kw = dict(config.tokenizer_kwargs or {})
    kw.pop("trust_remote_code", None)
    return GEOMETRY.load_tokenizer(config.tokenizer_name_or_path, kw)


def _init_prompt_table(model, config: PromptTuningConfig, weight: torch.Tensor, tokenizer) -> None:
    """Initialise prompt tuning's (P_total, D) table in place as ``config.prompt_tuning_init`` says."""
    total = weight.shape[0]
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return  # nn.Embedding's N(0, 1) (PEFT's RANDOM); inference mode: the file overwrites it
    word = GEOMETRY.input_embedding(model)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, word.num_embeddings, (total,), dtype=torch.long)
    else:
        tok = _load_tokenizer(config, tokenizer)
        ids = list(tok(config.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenizes to no tokens: give a non-empty text")
        ids = (ids * math.ceil(total / len(ids)))[:total]
        ids = torch.tensor(ids, dtype=torch.long)
        if not config.tokenizer_name_or_path:
            config.tokenizer_name_or_path = getattr(tok, "name_or_path", None) or "tokenizer"
    with torch.no_grad():
        rows = word(ids.to(word.weight.device)).detach()
        weight.copy_(rows.to(weight.dtype).to(weight.device))


# config class -> fn(model, config, dtype, device, tokenizer) -> the prompt module
MODULE_BUILDERS: dict = {}


def _build_prompt_tuning(model, config, dtype, device, tokenizer):
    mod = PromptEmbedding(config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim,
                          dtype=dtype, device=device)
    _init_prompt_table(model, config, mod.embedding.weight, tokenizer)
    return mod


def _build_p_tuning(model, config, dtype, device, tokenizer):
    return PromptEncoder(config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim,
                         config.encoder_hidden_size, config.encoder_reparameterization_type,
                         config.encoder_num_layers, config.encoder_dropout, flat=config.inference_mode,
                         dtype=dtype, device=device)


def inject_prompt(model: nn.Module, config: PromptLearningConfig, rec: AdapterRecord, *,
                  adapter_dtype=None, tokenizer=None) -> None:
    """Injector of the three prompt methods (see :func:`deltatune.inject`).

    ``tokenizer``: a tokenizer object for ``prompt_tuning_init="TEXT"`` (else
    ``config.tokenizer_name_or_path`` is loaded).

    Raises:
        ValueError: missing ``num_virtual_tokens``, geometry the model does not tell, a TEXT init
            without a tokenizer, a model without an input embedding, or no integration that wires
            prompts into the model's forward.
    """
    if not config.num_virtual_tokens:
        raise ValueError(f"{type(config).__name__} needs num_virtual_tokens (e.g. 20)")
    emb = GEOMETRY.input_embedding(model)
    if emb is None:
        raise ValueError("prompt methods need a model with an input embedding (a transformers causal LM)")
    if GEOMETRY.prompt_wiring is None:
        raise ValueError("prompt methods need the transformers integration to feed the prompt to the model "
                         "(import deltatune.integrations.transformers)")
    fill_geometry(model, config)
    tok_field = getattr(config, "tokenizer_name_or_path", None)
    if tok_field is not None and not isinstance(tok_field, str):  # a tokenizer object given in the config
        tokenizer = tokenizer if tokenizer is not None else tok_field
        config.tokenizer_name_or_path = getattr(tok_field, "name_or_path", None) or None
    build = next(MODULE_BUILDERS[c] for c in type(config).__mro__ if c in MODULE_BUILDERS)
    mod = build(model, config, resolve_dtype(adapter_dtype, emb.weight), module_device(emb), tokenizer)
    _container(model, create=True)[rec.name] = mod
    rec.modules.append(f"{CONTAINER}.{rec.name}")
    st = get_state(model)
    if "prompt" not in st.model_hooks:
        st.model_hooks["prompt"] = GEOMETRY.prompt_wiring(model)
    rec.cleanup.append(_remover(rec.name))


def _remover(adapter_name: str) -> Callable:
    def fn(model):
        cont = _container(model)
        if cont is not None and adapter_name in cont:
            del cont[adapter_name]
            if len(cont) == 0:
                del model._modules[CONTAINER]
                get_state(model).model_hooks.pop("prompt").remove()

    return fn


def acting_prompts(model: nn.Module, x: torch.Tensor) -> list:
    """``[(name, module, config, rows)]`` of the prompt adapters that act on a call whose input
    (ids or embeddings) is ``x`` (B, T, ...): the routing rule of
    :func:`deltatune.routing.acting_names` (none when adapters are disabled). ``rows`` is None
    when the prompt goes in front of every row, else the int64 indices of its rows in a mixed batch
    (:func:`deltatune.adapter_rows`); rows no entry names run without a prompt.

    Raises:
        ValueError: outside a mixed batch, more than one prompt adapter is active (a model takes one
            prompt method at a time).
    """
    st = get_state(model)
    cont = _container(model)
    if cont is None:
        return []
    names = [n for n in acting_names(st) if n in cont]
    if st.rows is None and len(names) > 1:
        raise ValueError(f"prompt adapters {names} are active together; a model takes one prompt method at a time: "
                         "set_adapter() one of them, or give each row its own with adapter_names")
    out = []
    for n in names:
        rows = acting_rows(st, n, x)
        if rows is not None:
            rows = row_index(rows, x.device)
        if rows is None or rows.numel():
            out.append((n, cont[n], st.records[n].config, rows))
    return out


# ----------------------------------------------------------------------------- file format


def _to_disk(model, adapter_name, config):
    mod = _container(model)[adapter_name]
    with torch.no_grad():
        return {FILE_KEY: mod().detach().clone()}


def _from_disk(model, adapter_name, config, tensors):
    if FILE_KEY not in tensors:
        raise ValueError(f"the adapter file has no {FILE_KEY!r} tensor, which a {config.PEFT_TYPE} adapter needs "
                         f"(keys in the file: {sorted(tensors)[:6]})")
    rest = dict(tensors)
    _container(model)[adapter_name].load_flat(rest.pop(FILE_KEY))
    return rest


def register_prompt_method(config_cls: type, build: Callable) -> None:
    """Register a prompt method: its module builder, the shared injector and the file format."""
    MODULE_BUILDERS[config_cls] = build
    register_method(config_cls, inject_prompt, to_disk=_to_disk, from_disk=_from_disk)


register_prompt_method(PromptTuningConfig, _build_prompt_tuning)
register_prompt_method(PromptEncoderConfig, _build_p_tuning)
