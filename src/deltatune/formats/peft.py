"""The Hugging Face PEFT adapter format, both directions: the only module that knows key names.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. One rule maps
in-memory names to file keys::

    <module path>.adapters.<adapter name>.<leaf>   <->   base_model.model.<module path>.<leaf>

e.g. ``model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight`` <->
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. The adapter name never
appears in a file, so no adapter name can corrupt keys (PEFT issues #2252, #2699). Trained base
biases (``bias="all"/"lora_only"``) are saved under ``base_model.model.<param name>``.
Model-level methods (prompt tuning, prefix tuning) register their own tensors with
:func:`register_format`.

Writes are atomic: each file is written to a temporary name in the same folder, flushed and
renamed over the target; the config is written last.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..config import CONFIG_NAME, AdapterConfig, load_config

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# config class -> (to_disk(model, name, config) -> dict, from_disk(model, name, config, dict) -> dict of leftovers)
_FORMATS: dict[type, tuple[Callable, Callable]] = {}


def register_format(config_cls: type, to_disk: Callable, from_disk: Callable) -> None:
    """Let a model-level method save/load tensors outside the per-layer rule.

    ``to_disk(model, adapter_name, config) -> {file key: tensor}``;
    ``from_disk(model, adapter_name, config, tensors) -> tensors it did not consume``.
    """
    _FORMATS[config_cls] = (to_disk, from_disk)


def _format_for(config):
    for cls in type(config).__mro__:
        if cls in _FORMATS:
            return _FORMATS[cls]
    return None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new, never half."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _layer_keys(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """In-memory name -> file key for every tensor of ``adapter_name`` (per-layer rule)."""
    from ..inject import ADAPTERS

    out = {}
    marker = f".{ADAPTERS}.{adapter_name}."
    for name, t in model.state_dict(keep_vars=True).items():
        i = name.find(marker)
        if i < 0 and name.startswith(f"{ADAPTERS}.{adapter_name}."):
            out[name] = PREFIX + name[len(f"{ADAPTERS}.{adapter_name}.") :]
        elif i >= 0:
            out[name] = PREFIX + name[:i] + "." + name[i + len(marker) :]
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *,
                       save_embedding_layers: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under PEFT's file keys (detached, not copied).

    ``save_embedding_layers=True`` adds the full weights of the adapted embedding layers and of
    the output head (``<path>.base_layer.weight``, PEFT's convention) so that an adapter trained
    after a vocabulary resize carries the new rows.
    """
    from ..inject import get_config, get_state
    from ..methods.lora import bias_parameter_names

    cfg = get_config(model, adapter_name)
    sd = model.state_dict(keep_vars=True)
    out = {disk: sd[mem].detach() for mem, disk in _layer_keys(model, adapter_name).items()}
    hosts = get_state(model).__dict__.get("_hosts", {}).get(adapter_name, [])
    for pname in bias_parameter_names(model, cfg, hosts):
        out[PREFIX + pname] = sd[pname].detach()
    fmt = _format_for(cfg)
    if fmt is not None:
        out.update(fmt[0](model, adapter_name, cfg))
    if save_embedding_layers:
        for pname in _embedding_weight_names(model):
            out[PREFIX + pname[: -len(".weight")] + ".base_layer.weight"] = sd[pname].detach()
    return out


def _embedding_weight_names(model: nn.Module) -> list[str]:
    names = []
    mods = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        m = fn() if callable(fn) else None
        if m is not None:
            mods.append(m)
    for name, mod in model.named_modules():
        if any(mod is m for m in mods) and hasattr(mod, "weight"):
            names.append(name + ".weight")
    return names


def _config_for_save(model: nn.Module, cfg: AdapterConfig) -> AdapterConfig:
    cfg = cfg.copy()
    mc = getattr(model, "config", None)
    if cfg.base_model_name_or_path is None and mc is not None:
        cfg.base_model_name_or_path = getattr(mc, "_name_or_path", None) or getattr(model, "name_or_path", None)
    cfg.inference_mode = True
    return cfg


def save_adapter(model: nn.Module, directory: str, adapter_name: Optional[str] = None, *,
                 save_embedding_layers: Union[bool, str] = "auto") -> list[str]:
    """Save adapter(s) in the PEFT format; return the folders written.

    ``adapter_name=None`` saves every adapter: the first (or the one named "default") into
    ``directory`` and each other into ``directory/<name>/``, as PEFT does. Files in the folder are
    replaced atomically; nothing else in it is touched.

    ``save_embedding_layers``: True saves the full input/output embedding weights too; "auto"
    (default) does so when the model's vocabulary differs from the size recorded when the adapter
    was injected or from ``model.config.vocab_size`` as first seen (a resized vocabulary).

    Raises:
        KeyError: no adapter of that name. ValueError: the model has no adapters.
    """
    from safetensors.torch import save as st_save

    from ..inject import _require_state, get_config

    st = _require_state(model)
    if adapter_name is None:
        names = list(st.configs)
        root = "default" if "default" in names else names[0]
        jobs = [(n, directory if n == root else os.path.join(directory, n)) for n in names]
    else:
        get_config(model, adapter_name)
        jobs = [(adapter_name, directory)]
    written = []
    for name, d in jobs:
        os.makedirs(d, exist_ok=True)
        emb = save_embedding_layers
        if emb == "auto":
            emb = _vocab_resized(model, st)
        tensors = {k: v.contiguous().clone()
                   for k, v in adapter_state_dict(model, name, save_embedding_layers=bool(emb)).items()}
        atomic_write_bytes(os.path.join(d, WEIGHTS_NAME), st_save(tensors, metadata={"format": "pt"}))
        _config_for_save(model, st.configs[name]).save(d)
        written.append(d)
    return written


def _vocab_resized(model: nn.Module, st) -> bool:
    fn = getattr(model, "get_input_embeddings", None)
    emb = fn() if callable(fn) else None
    if emb is None or not hasattr(emb, "num_embeddings"):
        return False
    seen = st.__dict__.get("vocab_at_inject")
    orig = getattr(getattr(model, "config", None), "_deltatune_base_vocab_size", None)
    return any(v is not None and v != emb.num_embeddings for v in (seen, orig))


def read_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (safetensors, or a legacy ``adapter_model.bin``)."""
    from safetensors.torch import load_file

    p = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(p):
        return load_file(p)
    p = os.path.join(directory, WEIGHTS_NAME_BIN)
    if os.path.isfile(p):
        return torch.load(p, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default", *,
                 is_trainable: bool = False, adapter_dtype=None) -> nn.Module:
    """Load a PEFT-format adapter folder into ``model`` and return the model.

    When the model has no adapter named ``adapter_name``, it is first injected as the saved config
    says. Every tensor in the file must match an adapter tensor of the model in name and shape, and
    every adapter tensor must be in the file; otherwise nothing is loaded (a freshly injected
    adapter is removed again) and the error lists the offending keys.

    Args:
        is_trainable: False (PEFT's default) loads for inference: the adapter stays frozen.

    Raises:
        FileNotFoundError: missing files. ValueError: unmatched, missing or mis-shaped keys (named),
            or a config deltatune cannot read.
    """
    from ..inject import delete_adapter, get_state, inject, _refresh_trainable

    cfg = load_config(directory)
    cfg.inference_mode = not is_trainable
    tensors = read_adapter_tensors(directory)
    st = get_state(model)
    fresh = st is None or adapter_name not in st.configs
    if fresh:
        inject(model, cfg, adapter_name, adapter_dtype=adapter_dtype)
    try:
        _load_tensors(model, adapter_name, tensors, directory)
    except Exception:
        if fresh:
            delete_adapter(model, adapter_name)
        raise
    if not fresh:
        get_state(model).configs[adapter_name].inference_mode = not is_trainable
    _refresh_trainable(model)
    return model


def _load_tensors(model, adapter_name, tensors, directory):
    from ..inject import get_config, get_state
    from ..methods.lora import bias_parameter_names

    cfg = get_config(model, adapter_name)
    fmt = _format_for(cfg)
    sd = model.state_dict(keep_vars=True)
    want = {disk: mem for mem, disk in _layer_keys(model, adapter_name).items()}
    hosts = get_state(model).__dict__.get("_hosts", {}).get(adapter_name, [])
    for pname in bias_parameter_names(model, cfg, hosts):
        want[PREFIX + pname] = pname
    rest = dict(tensors)
    if fmt is not None:
        rest = fmt[1](model, adapter_name, cfg, rest)
    # full embedding weights saved beside the adapter (PEFT's save_embedding_layers): optional keys
    optional = {}
    for k in rest:
        if k.endswith(".base_layer.weight") and k.startswith(PREFIX):
            pname = k[len(PREFIX) : -len(".base_layer.weight")] + ".weight"
            if pname in sd:
                optional[k] = pname
    want_all = {**want, **optional}
    unmatched = sorted(k for k in rest if k not in want_all)
    missing = sorted(k for k in want if k not in rest)
    shape_bad = [
        f"{k}: file {tuple(rest[k].shape)} vs model {tuple(sd[want[k]].shape)}"
        for k in sorted(rest) if k in want_all and tuple(rest[k].shape) != tuple(sd[want_all[k]].shape)
    ]
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} key(s) in the file match nothing in the model: {_few(unmatched)}")
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) of the model are not in the file: {_few(missing)}")
    if shape_bad:
        hint = ""
        if any("embed" in s or "lm_head" in s or "wte" in s for s in shape_bad):
            hint = (" (the adapter was saved from a model with a resized vocabulary: call "
                    "model.resize_token_embeddings(N) with the file's size before loading)")
        problems.append(f"shape mismatch: {_few(shape_bad)}{hint}")
    if problems:
        raise ValueError(f"cannot load adapter {directory!r} as {adapter_name!r}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in rest.items():
            p = sd[want_all[k]]
            p.copy_(v.to(dtype=p.dtype, device=p.device))


def _few(items, n=6):
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_config_json(directory: str) -> dict:
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as fh:
        return json.load(fh)
