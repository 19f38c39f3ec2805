"""transformers model knowledge for the core (registered into :data:`deltatune.geometry.GEOMETRY`).

Everything here reads transformers' conventions without importing transformers: ``config``
(``model_type``, ``get_text_config()``, sizes), ``get_input_embeddings()`` /
``get_output_embeddings()``, the gradient-checkpointing flags, ``tie_word_embeddings``, the
block layout of decoder models, and PEFT's per-architecture default targets. One file to change
when transformers changes one of them.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any, Optional

import torch
from torch import nn

from ..adapters import AdapterState, get_state
from ..geometry import ModelGeometry, Site
from ..targets import is_adapter_path

CONFIG_NAME_MODEL = "config.json"  # a transformers model folder's config
BASE_VOCAB_ATTR = "_deltatune_base_vocab_size"  # set by load_model: the vocabulary as loaded

# PEFT's default target_modules per model_type (``target_modules=None``)
LORA_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm",
                     "opt", "gptj", "gpt_neo", "bart"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["query", "value"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
}

# AdaLoRA's own table (PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING); LoHa, LoKr,
# VeRA, OFT and BOFT use LoRA's (VeRA: phi's attention only)
ADALORA_TARGETS = {
    **dict.fromkeys(["llama", "llama4", "gptj", "gpt_neo", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"],
                    ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bart", "opt"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    **dict.fromkeys(["bloom", "gpt_neox"], ["query_key_value"]),
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
VERA_TARGETS = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"]}

# (target_modules, feedforward_modules) per model_type: PEFT's (IA)3 defaults
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}

# LLaMA-Adapter: the attention submodule name per model_type (PEFT's table)
ADAPTION_PROMPT_TARGETS = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTN_NORMS = ("input_layernorm", "ln_1", "attention_norm", "ln_attn")
FFN_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm", "ln_mlp")


def model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def name_or_path(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _embedding(model: nn.Module, getter: str) -> Optional[nn.Module]:
    fn = getattr(model, getter, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except NotImplementedError:
        return None


def input_embedding(model: nn.Module) -> Optional[nn.Module]:
    return _embedding(model, "get_input_embeddings")


def output_embedding(model: nn.Module) -> Optional[nn.Module]:
    return _embedding(model, "get_output_embeddings")


def _named_child(block: nn.Module, names, class_test) -> Optional[str]:
    for n in names:
        if isinstance(block._modules.get(n), nn.Module):
            return n
    for n, c in block.named_children():
        if class_test(type(c).__name__):
            return n
    return None


def _is_attention_class(cls: str) -> bool:
    return "Attention" in cls and "Cross" not in cls


def _is_ffn_class(cls: str) -> bool:
    return "MLP" in cls or "FeedForward" in cls


def decoder_sites(model: nn.Module) -> list[Site]:
    """Every attention and feed-forward sublayer of the model's transformer blocks (see
    :mod:`deltatune.methods.bottleneck` for the rule).

    Returns an empty list when the model has no such blocks.
    """
    sites = []
    for lname, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or is_adapter_path(lname):
            continue
        blocks = list(mod)
        if len({type(b) for b in blocks}) != 1:
            continue
        first = blocks[0]
        attn = _named_child(first, ATTN_NAMES, _is_attention_class)
        ffn = _named_child(first, FFN_NAMES, _is_ffn_class)
        if attn is None or ffn is None:
            continue
        anorm = next((n for n in ATTN_NORMS if n in first._modules), None)
        fnorm = next((n for n in FFN_NORMS if n in first._modules), None)
        norms = [n for n, c in first.named_children() if "Norm" in type(c).__name__]
        if fnorm is None and anorm is not None and norms == [anorm]:
            fnorm = anorm  # parallel block (GPT-J, Phi, Falcon): both sublayers read one norm of r
        prefix = f"{lname}." if lname else ""
        for i in range(len(blocks)):
            sites.append(Site(f"{prefix}{i}.{attn}", i, "attention", f"{prefix}{i}.{anorm}" if anorm else None))
            sites.append(Site(f"{prefix}{i}.{ffn}", i, "feed_forward", f"{prefix}{i}.{fnorm}" if fnorm else None))
    return sites


def checkpointing_on(model: nn.Module) -> bool:
    """transformers >= 5 names the flag ``is_activation_checkpointing`` (the old name warns); plain
    modules: any submodule with ``gradient_checkpointing = True`` (transformers' own convention)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if getattr(type(model), attr, None) is not None:
            flag = getattr(model, attr)
            if isinstance(flag, bool):
                return flag
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def install_checkpointing_input_hook(model: nn.Module, st: AdapterState) -> None:
    """Make the input-embedding output require grad while gradient checkpointing is on (case C10).

    Reentrant checkpointing rebuilds a block's graph only when one of the block's inputs requires
    grad. With the whole base frozen none does, the loss gets no ``grad_fn`` and the adapters inside
    the checkpointed blocks get no gradient. transformers >= 5 hooks the embeddings itself when
    checkpointing is enabled, earlier releases and other models do not, so deltatune does it for
    every adapted model, in either order (checkpointing enabled before or after :func:`inject`).
    The hook costs nothing without checkpointing and never makes a parameter trainable; it is
    removed with the last adapter (``state.model_hooks["checkpointing"]``).
    """
    emb = input_embedding(model)
    if emb is None or "checkpointing" in st.model_hooks:
        return
    ref = weakref.ref(model)

    def hook(module, args, output):
        m = ref()
        if (m is not None and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.is_floating_point() and not output.requires_grad and checkpointing_on(m)):
            output.requires_grad_(True)
        return output

    st.model_hooks["checkpointing"] = emb.register_forward_hook(hook)


def _contiguous_input(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(),) + tuple(args[1:])
    return None


def install_contiguous_head_input(model: nn.Module, st: AdapterState) -> None:
    """Hand the output head a contiguous input (``state.model_hooks["contiguous_head"]``).

    transformers slices the last position for generation (``hidden_states[:, -1:]``, a strided
    view). On the CPU, ``F.linear`` of such a view with a frozen weight (every adapted model's
    head) takes a slow path: measured with torch 2.13 on SmolLM2's head (49,152 x 576) for 64
    rows, bf16: 13.3 s and a 3.4 GiB peak, against 0.04 s and nothing for a contiguous copy of
    the 64 rows (fp32: 1.2 s against 0.13 s). The copy is one row per sequence.
    """
    head = output_embedding(model)
    if head is None or "contiguous_head" in st.model_hooks:
        return
    st.model_hooks["contiguous_head"] = head.register_forward_pre_hook(_contiguous_input)


def record_vocab(model: nn.Module, st: AdapterState) -> None:
    """Remember the input embedding's rows when the first adapter is added (C07's "auto" rule)."""
    emb = input_embedding(model)
    if emb is not None and hasattr(emb, "num_embeddings"):
        st.vocab_at_inject = emb.num_embeddings


def base_vocab_sizes(model: nn.Module, paths=()) -> dict:
    """Vocabulary sizes this model's base is known to have had, by where deltatune learnt them.

    Sources: ``loaded`` (recorded by :func:`deltatune.integrations.transformers.load_model`),
    ``inject`` (the input embedding's rows when the first adapter was injected), ``base_config``
    (``vocab_size`` in ``config.json`` of the base model's local folder: ``model.config._name_or_path``
    or one of ``paths``, e.g. the adapters' ``base_model_name_or_path``; never fetched from a hub).
    """
    out = {}
    v = model.__dict__.get(BASE_VOCAB_ATTR)
    if isinstance(v, int):
        out["loaded"] = v
    st = get_state(model)
    if st is not None and isinstance(st.vocab_at_inject, int):
        out["inject"] = st.vocab_at_inject
    for path in [getattr(getattr(model, "config", None), "_name_or_path", None), *paths]:
        cfg_path = os.path.join(path, CONFIG_NAME_MODEL) if isinstance(path, str) and path else None
        if cfg_path and os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as fh:
                    d = json.load(fh)
            except (OSError, ValueError):
                continue
            v = d.get("vocab_size") or (d.get("text_config") or {}).get("vocab_size")
            if isinstance(v, int):
                out["base_config"] = v
                break
    return out


def untie_embeddings(model: nn.Module) -> None:
    """Set ``tie_word_embeddings=False`` in the model's config (and its text config)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if text_cfg is not None and getattr(text_cfg, "tie_word_embeddings", False):
            text_cfg.tie_word_embeddings = False


def load_tokenizer(name_or_path: str, kwargs: dict):
    """A tokenizer from local files only (prompt tuning's TEXT init)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, **{"local_files_only": True, **kwargs})


def register(geometry: ModelGeometry) -> None:
    """Fill ``geometry`` with the answers above (the prompt wiring is set by the caller)."""
    geometry.model_type = model_type
    geometry.name_or_path = name_or_path
    geometry.text_config = text_config
    geometry.input_embedding = input_embedding
    geometry.output_embedding = output_embedding
    geometry.decoder_sites = decoder_sites
    geometry.checkpointing_on = checkpointing_on
    geometry.base_vocab_sizes = base_vocab_sizes
    geometry.untie_embeddings = untie_embeddings
    geometry.load_tokenizer = load_tokenizer
    geometry.default_targets.update({"lora": LORA_TARGETS, "ia3": IA3_TARGETS,
                                     "adaption_prompt": ADAPTION_PROMPT_TARGETS, "loha": LORA_TARGETS,
                                     "lokr": LORA_TARGETS, "oft": LORA_TARGETS, "boft": LORA_TARGETS,
                                     "vera": VERA_TARGETS, "adalora": ADALORA_TARGETS})
    for fn in (record_vocab, install_checkpointing_input_hook, install_contiguous_head_input):
        if fn not in geometry.on_first_adapter:
            geometry.on_first_adapter.append(fn)
