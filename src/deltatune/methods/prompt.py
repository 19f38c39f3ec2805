"""Prompt tuning, P-tuning and prefix tuning: continuous prompts attached to the top model by hooks.

* Prompt tuning (Lester et al., arXiv:2104.08691): ``num_virtual_tokens`` learned input embeddings
  (P, token_dim) are put before the input embeddings. Initialised at random (N(0, 1), as PEFT),
  from a text (``prompt_tuning_init="TEXT"``: the word embeddings of the text's tokens, repeated
  or cut to P) or from random vocabulary rows (``"SAMPLE_VOCAB"``).
* P-tuning (Liu et al., arXiv:2103.10385): the P virtual token embeddings are the output of a
  prompt encoder, an MLP (3 linear layers, ReLU) or a bidirectional LSTM followed by an MLP, applied
  to a learned (P, token_dim) table.
* Prefix tuning (Li and Liang, arXiv:2101.00190): every layer gets P learned key and value
  vectors per key/value head, fed to the model through its key/value cache (a ``DynamicCache``
  pre-filled with the prefix). ``prefix_projection=True`` produces them from a (P, token_dim) table
  through a two-layer tanh MLP (the reparameterization of the paper).

No wrapper model: the prompt modules live in ``model.prompt_adapters[<adapter name>]`` and two
hooks on the top model (a forward pre-hook with kwargs and a forward hook) do the work, so
``model(...)``, ``model.generate(...)`` (cache on or off, left-padded batches) and training loops
all see the prompt.

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

Files are Hugging Face PEFT's: ``adapter_config.json`` with PEFT's fields and one tensor
``prompt_embeddings`` in ``adapter_model.safetensors``: the virtual embeddings (P, token_dim) for
prompt/P-tuning and the flattened prefix (P, num_layers * 2 * token_dim) for prefix tuning, i.e.
the *output* of any encoder. Loading such a file gives a prompt table without the encoder (as PEFT's
inference mode does); loading it with ``is_trainable=True`` trains that table directly.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_config
from ..formats.peft import register_format
from ..inject import (
    AdapterState,
    add_delete_hook,
    add_trainable_hook,
    get_state,
    register_method,
)

CONTAINER = "prompt_adapters"  # model.prompt_adapters: nn.ModuleDict, adapter name -> prompt module
_FRAMES = "_deltatune_prompt_frames"  # per-call bookkeeping between the pre-hook and the hook
_HOOKS = "_prompt_hook_handles"
_CACHE_MARK = "_deltatune_virtual_tokens"  # set on a Cache object that holds the virtual tokens
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

    MERGE_REFUSAL = ("its virtual tokens are extra inputs, not a change of any weight; keep the adapter "
                     "and load it with load_adapter (or deltatune generate --adapter)")

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

    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


# ----------------------------------------------------------------------------- prompt modules


class PromptEmbedding(nn.Module):
    """Prompt tuning's table: ``embedding.weight`` (P_total, token_dim). ``forward() -> (P_total, D)``."""

    kind = "embeds"

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


class PrefixEncoder(nn.Module):
    """Prefix tuning's encoder. ``forward() -> (P, num_layers * 2 * token_dim)``.

    Row layout of one virtual token (PEFT's): ``[layer 0 keys, layer 0 values, layer 1 keys, ...]``,
    each block (heads, head_dim) head-major. Parameters: ``embedding`` (P, L*2*D) or, with
    ``prefix_projection``, ``embedding`` (P, D) and ``transform`` = Linear(D, H), Tanh, Linear(H, L*2*D).
    """

    kind = "kv"

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


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("prompt methods need a transformers-style model with a .config; "
                         "or give num_layers, token_dim and num_attention_heads in the config")
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _first_attr(cfg, names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def fill_geometry(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """Fill ``num_layers``, ``token_dim``, ``num_attention_heads`` (and the encoders' hidden size)
    from the model config where they are None, in place, with PEFT's rules (including its
    grouped-query adjustment for prefix tuning). Returns ``config``.

    Raises:
        ValueError: a field is missing and the model config does not say it.
    """
    needs = [config.num_layers, config.token_dim, config.num_attention_heads]
    mc = _text_config(model) if any(v is None for v in needs) or config.PEFT_TYPE == "PREFIX_TUNING" else None
    if config.num_layers is None:
        config.num_layers = _first_attr(mc, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.token_dim is None:
        config.token_dim = _first_attr(mc, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_attr(mc, ("num_attention_heads", "n_head", "num_heads"))
    for f in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, f) is None:
            raise ValueError(f"cannot read {f} from the model's config: set {f} in the {type(config).__name__}")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_transformer_submodules != 1:
        raise ValueError("num_transformer_submodules must be 1: deltatune's prompt methods support decoder-only models")
    if config.PEFT_TYPE == "PREFIX_TUNING":
        kv = getattr(mc, "num_key_value_heads", None)
        if kv is not None:  # PEFT's rule (it also overrides explicit values): the prefix has the kv geometry
            hd = getattr(mc, "head_dim", None) or config.token_dim // config.num_attention_heads
            config.token_dim = hd * kv
            config.num_attention_heads = kv
        if config.token_dim % config.num_attention_heads:
            raise ValueError(f"token_dim {config.token_dim} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"  # PEFT builds its causal-LM wrapper only for this task type
    return config


# ----------------------------------------------------------------------------- injection


def _container(model: nn.Module, create: bool = False) -> Optional[nn.ModuleDict]:
    c = model._modules.get(CONTAINER)
    if c is None and create:
        c = nn.ModuleDict()
        model.add_module(CONTAINER, c)
    return c


def _resolve_dtype(adapter_dtype, model) -> torch.dtype:
    if adapter_dtype is None:
        return torch.float32
    if adapter_dtype == "base":
        emb = model.get_input_embeddings()
        return emb.weight.dtype if emb.weight.is_floating_point() else torch.float32
    if isinstance(adapter_dtype, str):
        return getattr(torch, adapter_dtype)
    return adapter_dtype


def _load_tokenizer(config: PromptTuningConfig, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if not config.tokenizer_name_or_path:
        raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass inject(model, config, tokenizer=tok) "
                         "or set tokenizer_name_or_path to a local tokenizer folder")
    from transformers import AutoTokenizer

    kw = dict(config.tokenizer_kwargs or {})
    kw.pop("trust_remote_code", None)
    kw.setdefault("local_files_only", True)
    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kw)


def _init_prompt_table(model, config: PromptTuningConfig, weight: torch.Tensor, tokenizer) -> None:
    """Initialise prompt tuning's (P_total, D) table in place as ``config.prompt_tuning_init`` says."""
    total = weight.shape[0]
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return  # nn.Embedding's N(0, 1) (PEFT's RANDOM); inference mode: the file overwrites it
    word = model.get_input_embeddings()
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


def _build_module(model, config, dtype, tokenizer):
    dev = model.get_input_embeddings().weight.device
    if dev.type == "meta":
        dev = torch.device("cpu")
    P = config.num_virtual_tokens
    total = P * config.num_transformer_submodules
    D = config.token_dim
    kw = dict(dtype=dtype, device=dev)
    if isinstance(config, PromptTuningConfig):
        mod = PromptEmbedding(total, D, **kw)
        _init_prompt_table(model, config, mod.embedding.weight, tokenizer)
        return mod
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(total, D, config.encoder_hidden_size, config.encoder_reparameterization_type,
                             config.encoder_num_layers, config.encoder_dropout, flat=config.inference_mode, **kw)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(P, D, config.num_layers, config.encoder_hidden_size, config.prefix_projection,
                             config.init_weights == "zero", flat=config.inference_mode, **kw)
    raise TypeError(f"not a prompt method config: {type(config).__name__}")


def inject_prompt(model: nn.Module, config: PromptLearningConfig, adapter_name: str, state: AdapterState, *,
                  adapter_dtype=None, tokenizer=None) -> None:
    """Injector of the three prompt methods (see :func:`deltatune.inject`).

    ``tokenizer``: a tokenizer object for ``prompt_tuning_init="TEXT"`` (else
    ``config.tokenizer_name_or_path`` is loaded).

    Raises:
        ValueError: missing ``num_virtual_tokens``, geometry the model does not tell, a TEXT init
            without a tokenizer, or a model without ``get_input_embeddings``.
    """
    if not config.num_virtual_tokens:
        raise ValueError(f"{type(config).__name__} needs num_virtual_tokens (e.g. 20)")
    if not callable(getattr(model, "get_input_embeddings", None)) or model.get_input_embeddings() is None:
        raise ValueError("prompt methods need a model with get_input_embeddings() (a transformers causal LM)")
    fill_geometry(model, config)
    tok_field = getattr(config, "tokenizer_name_or_path", None)
    if tok_field is not None and not isinstance(tok_field, str):  # a tokenizer object given in the config
        tokenizer = tokenizer if tokenizer is not None else tok_field
        config.tokenizer_name_or_path = getattr(tok_field, "name_or_path", None) or None
    mod = _build_module(model, config, _resolve_dtype(adapter_dtype, model), tokenizer)
    cont = _container(model, create=True)
    cont[adapter_name] = mod
    _install_hooks(model, state)
    add_trainable_hook(state, _trainable_hook(adapter_name))
    add_delete_hook(state, adapter_name, _delete_hook(adapter_name))


def _trainable_hook(adapter_name: str):
    def fn(model, st):
        cont = _container(model)
        if cont is None or adapter_name not in cont:
            return
        cfg = st.configs.get(adapter_name)
        train = adapter_name in st.active and not (cfg is not None and cfg.inference_mode)
        for p in cont[adapter_name].parameters():
            p.requires_grad_(train)

    return fn


def _delete_hook(adapter_name: str):
    def fn(model):
        cont = _container(model)
        if cont is not None and adapter_name in cont:
            del cont[adapter_name]
            if len(cont) == 0:
                del model._modules[CONTAINER]
                _remove_hooks(model)

    return fn


# ----------------------------------------------------------------------------- the hooks


def _install_hooks(model: nn.Module, state: AdapterState) -> None:
    if model.__dict__.get(_HOOKS):
        return
    pre = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    post = model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model.__dict__[_HOOKS] = (pre, post)


def _remove_hooks(model: nn.Module) -> None:
    for h in model.__dict__.pop(_HOOKS, ()):
        h.remove()
    model.__dict__.pop(_FRAMES, None)


def active_prompt(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(name, module) of the active prompt adapter, or None (none active, or adapters disabled).

    Raises:
        ValueError: more than one prompt adapter is active (they cannot be combined).
    """
    st = get_state(model)
    cont = _container(model)
    if st is None or cont is None or st.disabled:
        return None
    names = [n for n in st.active if n in cont]
    if len(names) > 1:
        raise ValueError(f"prompt adapters {names} are active together; a model takes one prompt method at a time: "
                         "set_adapter() one of them")
    return (names[0], cont[names[0]]) if names else None


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
    kv = mod().to(dtype)  # (P, L*2*D)
    kv = kv.view(P, 2 * L, H, hd).permute(1, 2, 0, 3)  # (2L, H, P, hd)
    for layer in range(L):
        k = kv[2 * layer].unsqueeze(0).expand(B, H, P, hd).contiguous()
        v = kv[2 * layer + 1].unsqueeze(0).expand(B, H, P, hd).contiguous()
        cache.update(k, v, layer)
    return cache


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    frames = model.__dict__.setdefault(_FRAMES, [])
    frames.append(None)  # replaced below; the post-hook (always called) pops it even if this raises
    act = active_prompt(model)
    if act is None:
        return None
    name, mod = act
    config = get_state(model).configs[name]
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
    frame = {"strip": 0, "T": T, "mark": P, "tuple": False}
    if kw.get("return_dict") is False:
        kw["return_dict"] = True
        frame["tuple"] = True

    if past == 0:  # a sequence starts: inject the prompt
        if mod.kind == "kv":
            if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                raise ValueError("prefix tuning does not work with gradient checkpointing (the model drops the "
                                 "key/value cache under it): disable gradient checkpointing or use prompt tuning")
            use_cache = kw.get("use_cache")
            if use_cache is None:
                use_cache = getattr(getattr(model, "config", None), "use_cache", True)
            # a cache made here only to carry the prefix is not returned unless caching was asked for
            frame["drop_cache"] = cache is None and not use_cache
            kw[ck] = _prefix_cache(model, mod, config, cache, B)
            kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, 0)
            kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=False)
        else:
            if emb is None:
                emb = model.get_input_embeddings()(ids)
            prompts = mod().to(emb.dtype)  # (P, D)
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
            frame["strip"] = P
    else:
        P = getattr(cache, _CACHE_MARK, None)
        if P is None:  # a cache started without the prompt: nothing to add mid-sequence
            return None
        frame["mark"] = P
        kw["attention_mask"] = _extend_mask(kw.get("attention_mask"), P, T, past - P)
        kw["position_ids"] = _shift_positions(kw.get("position_ids"), P, prepend=False)
    frames[-1] = frame
    return (), kw


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    frames = model.__dict__.get(_FRAMES)
    if not frames:
        return None
    frame = frames.pop()
    if frame is None:
        return None
    cache_field = None
    if isinstance(output, dict):  # transformers ModelOutput (an OrderedDict of the set fields)
        keys = list(output.keys())  # plain keys: no deprecation warning for the old cache name
        cache_field = next((f for f in ("cache", "past_key_values") if f in keys and output[f] is not None), None)
    if cache_field is not None:
        if frame.get("drop_cache"):
            output[cache_field] = None
        elif hasattr(output[cache_field], "get_seq_length"):
            setattr(output[cache_field], _CACHE_MARK, frame["mark"])
    P = frame["strip"]
    if P and isinstance(output, dict):
        T = frame["T"]
        logits = output.get("logits")
        if logits is not None and logits.shape[1] > T:
            output["logits"] = logits[:, logits.shape[1] - T:]
        hs = output.get("hidden_states")
        if hs is not None:
            output["hidden_states"] = tuple(h[:, h.shape[1] - T:] if h.shape[1] > T else h for h in hs)
    if frame["tuple"]:
        return tuple(v for v in output.values() if v is not None)
    return output


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
    t = rest.pop(FILE_KEY)
    mod = _container(model)[adapter_name]
    mod.load_flat(t)
    st = get_state(model)
    if st is not None:
        for fn in st.__dict__.get("_trainable_hooks", []):
            fn(model, st)
    return rest


for _cls in (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig):
    register_method(_cls, inject_prompt)
    register_format(_cls, _to_disk, _from_disk)
