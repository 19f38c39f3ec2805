"""The Hugging Face PEFT adapter format, both directions: the only module that knows key names.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. One rule maps
in-memory names to file keys::

    <module path>.adapters.<adapter name>.<leaf>   <->   base_model.model.<module path>.<leaf>

e.g. ``model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight`` <->
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. The adapter name never
appears in a file, so no adapter name can corrupt keys (PEFT issues #2252, #2699). Trained base
biases (``bias="all"/"lora_only"``) are saved under ``base_model.model.<param name>`` (each
adapter's own values of them). Model-level methods (prompt tuning, prefix tuning) give their own
tensors through the ``to_disk`` / ``from_disk`` of their registered method
(:func:`deltatune.inject.register_method`).

Writes are atomic: each file is written to a temporary name in the same folder, flushed and
renamed over the target; the config is written last.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .._io import atomic_write_bytes
from ..adapters import ADAPTERS, get_record, get_state, require_state, unmerged_parameter
from ..targets import is_adapter_path
from ..config import CONFIG_NAME, AdapterConfig, load_config
from ..geometry import GEOMETRY
from ..inject import base_tensor_value, inject, method_for, refresh_trainable
from ..lifecycle import delete_adapter
from ..merge import merge, merged_adapters, unmerge
from ..quant.quantize import base_quantization

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
# safetensors metadata entry of the weights file (peft ignores it): JSON of the quantize_base
# keyword arguments of the 4-bit base the adapter was trained on; absent for a dense base
BASE_QUANTIZATION_KEY = "deltatune.base_quantization"


def _layer_keys(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """In-memory name -> file key for every tensor of ``adapter_name`` (per-layer rule)."""
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
                       save_embedding_layers: Union[bool, Iterable[str]] = False) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under PEFT's file keys (detached, not copied).

    ``save_embedding_layers=True`` adds the full weights of the input embedding and the output
    head (or of the modules whose paths it lists), so that an adapter trained after a vocabulary
    resize carries the new rows. Keys follow
    PEFT: ``base_model.model.<path>.weight``, or ``<path>.base_layer.weight`` when the module hosts
    this adapter (PEFT wraps it then). A module saved as a ``modules_to_save`` copy is not saved
    twice. The unmerged weight is saved even while adapters are merged.
    """
    rec = get_record(model, adapter_name)
    sd = model.state_dict(keep_vars=True)
    out = {disk: sd[mem].detach() for mem, disk in _layer_keys(model, adapter_name).items()}
    for pname in rec.bias_params:
        out[base_param_key(pname, rec.hosts)] = base_tensor_value(model, adapter_name, pname).detach()
    spec = method_for(rec.config)
    if spec.to_disk is not None:
        out.update(spec.to_disk(model, adapter_name, rec.config))
    if save_embedding_layers:
        only = None if save_embedding_layers is True else set(save_embedding_layers)
        for path, mod in _embedding_modules(model):
            if only is not None and path not in only:
                continue
            ad = mod._modules.get(ADAPTERS)
            mine = ad._modules.get(adapter_name) if ad is not None else None
            if mine is not None and mine.side == "replace":
                continue  # saved already, as the modules_to_save copy
            w = unmerged_parameter(model, f"{path}.weight")
            key = f"{PREFIX}{path}.base_layer.weight" if mine is not None else f"{PREFIX}{path}.weight"
            out[key] = w.detach()
    return out


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the input embedding and the output head."""
    mods = [m for m in (GEOMETRY.input_embedding(model), GEOMETRY.output_embedding(model)) if m is not None]
    return [(name, mod) for name, mod in model.named_modules()
            if any(mod is m for m in mods) and isinstance(getattr(mod, "_parameters", {}).get("weight"), torch.Tensor)]


def _embedding_weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, _ in _embedding_modules(model)]


def base_vocab_sizes(model: nn.Module) -> dict[str, int]:
    """Vocabulary sizes this model's base is known to have had, by source (see
    ``deltatune.integrations.hf_geometry.base_vocab_sizes``); the adapters' recorded base model
    folders are among the places looked at."""
    st = get_state(model)
    paths = [r.config.base_model_name_or_path for r in st.records.values()] if st is not None else []
    return GEOMETRY.base_vocab_sizes(model, [p for p in paths if p])


def _config_for_save(model: nn.Module, cfg: AdapterConfig) -> AdapterConfig:
    cfg = cfg.copy()
    if cfg.base_model_name_or_path is None:
        cfg.base_model_name_or_path = GEOMETRY.name_or_path(model)
    cfg.inference_mode = True
    return cfg


def save_adapter(model: nn.Module, directory: str, adapter_name: Optional[str] = None, *,
                 save_embedding_layers: Union[bool, str] = "auto") -> list[str]:
    """Save adapter(s) in the PEFT format; return the folders written.

    ``adapter_name=None`` saves every adapter: the first (or the one named "default") into
    ``directory`` and each other into ``directory/<name>/``, as PEFT does. Files in the folder are
    replaced atomically; nothing else in it is touched.

    ``save_embedding_layers``: True saves the full input/output embedding weights too (see
    :func:`adapter_state_dict`); "auto" (default) does so when the vocabulary was resized: the
    input embedding's rows differ from a base size deltatune knows (:func:`base_vocab_sizes`: the
    size recorded by deltatune's model loader, the size when the first adapter was injected, the
    ``vocab_size`` of the base model folder's ``config.json``), or the adapter was loaded from a
    file that carried them. New rows are random at resize time, so an adapter that depends on them
    is useless without them (regression case C07). False never saves them.

    Raises:
        KeyError: no adapter of that name. ValueError: the model has no adapters.
    """
    from safetensors.torch import save as st_save

    st = require_state(model)
    if adapter_name is None:
        names = list(st.records)
        root = "default" if "default" in names else names[0]
        jobs = [(n, directory if n == root else os.path.join(directory, n)) for n in names]
    else:
        get_record(model, adapter_name)
        jobs = [(adapter_name, directory)]
    metadata = {"format": "pt"}
    quant = base_quantization(model)
    if quant is not None:
        metadata[BASE_QUANTIZATION_KEY] = json.dumps(quant)
    written = []
    for name, d in jobs:
        os.makedirs(d, exist_ok=True)
        emb = save_embedding_layers
        if emb == "auto":
            emb = _vocab_resized(model) or list(st.records[name].carries_embeddings)
        tensors = {k: v.contiguous().clone()
                   for k, v in adapter_state_dict(model, name, save_embedding_layers=emb).items()}
        atomic_write_bytes(os.path.join(d, WEIGHTS_NAME), st_save(tensors, metadata=metadata))
        _config_for_save(model, st.records[name].config).save(d)
        written.append(d)
    return written


def _vocab_resized(model: nn.Module) -> bool:
    """True when the input embedding's rows differ from a known base vocabulary size
    (:func:`base_vocab_sizes`)."""
    emb = GEOMETRY.input_embedding(model)
    w = getattr(emb, "weight", None) if emb is not None else None
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    return any(v != w.shape[0] for v in base_vocab_sizes(model).values())


class AdapterFileError(ValueError):
    """An adapter file that cannot be read (damaged, empty, not tensors); the message names the file and
    the fix, in one line."""


def read_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder: ``adapter_model.safetensors``, else a legacy ``adapter_model.bin``.

    Nothing in a file is ever run: safetensors holds only tensors, and a ``.bin`` (a pickle) is read
    only by ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers, with a warning to convert it.

    Raises:
        FileNotFoundError: neither file is there. AdapterFileError: the file is damaged, empty, or
            not a mapping of names to tensors.
    """
    from safetensors.torch import load_file

    p = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(p):
        try:
            tensors = load_file(p)
        except Exception as e:  # noqa: BLE001 - safetensors' errors have no common base: one message
            what = "empty" if os.path.getsize(p) == 0 else f"damaged ({_first_line(e)})"
            raise AdapterFileError(f"{p} is {what}: save or copy the adapter again") from None
        return tensors
    p = os.path.join(directory, WEIGHTS_NAME_BIN)
    if os.path.isfile(p):
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's business
                warnings.simplefilter("ignore")
                tensors = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unpickling error, a truncated zip, ...
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if ln.startswith(("Unsupported", "Trying to", "Unsupported global"))),
                       _first_line(e))
            raise AdapterFileError(f"{p} was refused: it is not a plain file of tensors (torch.load(weights_only=True): "
                                   f"{why[:200]}); nothing in it was run: use adapter_model.safetensors") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise AdapterFileError(f"{p} holds a {type(tensors).__name__}, not a mapping of names to tensors")
        warnings.warn(f"{p} is a legacy pickle file, read with torch.load(weights_only=True), which runs no code; "
                      "save the adapter again to get adapter_model.safetensors", stacklevel=2)
        return tensors
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def read_adapter_metadata(directory: str) -> dict:
    """The string metadata of an adapter folder's safetensors file (e.g. :data:`BASE_QUANTIZATION_KEY`);
    empty for a legacy ``adapter_model.bin``."""
    from safetensors import safe_open

    p = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(p):
        if os.path.isfile(os.path.join(directory, WEIGHTS_NAME_BIN)):
            return {}
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    try:
        with safe_open(p, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as e:  # noqa: BLE001
        what = "empty" if os.path.getsize(p) == 0 else f"damaged ({_first_line(e)})"
        raise AdapterFileError(f"{p} is {what}: save or copy the adapter again") from None


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
    cfg = load_config(directory)
    cfg.inference_mode = not is_trainable
    tensors = read_adapter_tensors(directory)
    _check_base_shapes(model, tensors, directory)  # before anything is injected or written
    st = get_state(model)
    fresh = st is None or adapter_name not in st.records
    if not fresh:
        _check_same_config(st.records[adapter_name].config, cfg, adapter_name, directory)
    if fresh:
        try:
            inject(model, cfg, adapter_name, adapter_dtype=adapter_dtype)
        except (TypeError, AttributeError) as e:  # a field of the file's config holds a value of the wrong kind
            raise ValueError(f"cannot load adapter {directory!r}: its {CONFIG_NAME} does not fit ({e})") from None
    remerge = [] if fresh else [n for n in merged_adapters(model) if n == adapter_name]
    if remerge:
        unmerge(model, adapter_names=remerge)
    try:
        carried = _load_tensors(model, adapter_name, tensors, directory)
    except Exception:
        if fresh:
            delete_adapter(model, adapter_name)
        elif remerge:
            merge(model, adapter_names=remerge)
        raise
    rec = get_record(model, adapter_name)
    if carried:  # saved again with the adapter ("auto"), as the file had them
        rec.carries_embeddings = carried
    if not fresh:
        rec.config.inference_mode = not is_trainable
    refresh_trainable(model)
    if remerge:
        merge(model, adapter_names=remerge)
    return model


def _check_same_config(have, saved, adapter_name: str, directory: str) -> None:
    """Loading weights into an existing adapter keeps that adapter's config, so the file's config
    must compute the same thing (same method, rank, scaling, targets ...).

    Raises:
        ValueError: the configs differ; the message names the fields and both values.
    """
    a, b = have.to_dict(), saved.to_dict()
    neutral = type(have).neutral_fields | type(saved).neutral_fields
    diff = [k for k in sorted(set(a) | set(b)) if k not in neutral and a.get(k) != b.get(k)
            and not (isinstance(a.get(k), (list, tuple)) and isinstance(b.get(k), (list, tuple))
                     and sorted(map(str, a[k])) == sorted(map(str, b[k])))]
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} here, {b.get(k)!r} in the file" for k in diff[:4])
        raise ValueError(f"the model's adapter {adapter_name!r} was made with another config than {directory} "
                         f"({shown}): load the file under another adapter_name, or delete_adapter() first")


def base_param_key(pname: str, hosts) -> str:
    """File key of base parameter ``pname`` saved with an adapter (trained bias, full embedding).

    PEFT moves a wrapped layer's own tensors under ``base_layer``: a parameter of a module that
    hosts the adapter is ``base_model.model.<host>.base_layer.<leaf>``, any other one
    ``base_model.model.<pname>``.
    """
    owner, _, leaf = pname.rpartition(".")
    if owner in hosts:
        return f"{PREFIX}{owner}.base_layer.{leaf}"
    return PREFIX + pname


def _base_param_of_key(key: str) -> Optional[str]:
    """The base parameter a file key names directly (``<path>.base_layer.<leaf>`` -> ``<path>.<leaf>``)."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    head, sep, leaf = rest.rpartition(".base_layer.")
    if sep and "." not in leaf:
        return f"{head}.{leaf}"
    return rest


def _check_base_shapes(model: nn.Module, tensors: dict, directory: str) -> None:
    """Refuse, before touching the model, a file whose full-weight tensors (saved embeddings,
    ``modules_to_save`` copies, trained biases) do not fit the model's base parameters.

    Raises:
        ValueError: a resized vocabulary (names the embedding and the head and both sizes, and the
            fix) or another shape mismatch (names the keys and shapes).
    """
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not is_adapter_path(n)}
    emb_names = set(_embedding_weight_names(model))
    vocab_bad, other_bad = [], []
    for k in sorted(tensors):
        pname = _base_param_of_key(k)
        if pname is None or pname not in params:
            continue
        fs, ms = tuple(tensors[k].shape), tuple(params[pname].shape)
        if fs != ms:
            (vocab_bad if pname in emb_names else other_bad).append((pname, fs, ms))
    if vocab_bad:
        file_rows = sorted({fs[0] for _, fs, _ in vocab_bad})
        model_rows = sorted({ms[0] for _, _, ms in vocab_bad})
        mods = " and ".join(p[: -len(".weight")] for p, _, _ in vocab_bad)
        raise ValueError(
            f"cannot load adapter {directory!r}: vocabulary size mismatch: the file carries "
            f"{'/'.join(map(str, file_rows))}-row weights for {mods}, but the model has "
            f"{'/'.join(map(str, model_rows))} rows ({'/'.join(map(str, model_rows))} vs "
            f"{'/'.join(map(str, file_rows))}). The adapter was trained after resizing the vocabulary: call "
            f"model.resize_token_embeddings({file_rows[-1]}) (and add the same tokens to the tokenizer) before "
            "loading; the saved rows then replace the new ones. Nothing was changed."
        )
    if other_bad:
        raise ValueError(
            f"cannot load adapter {directory!r}: shape mismatch with the base model: "
            + _few(f"{p}: file {fs} vs model {ms}" for p, fs, ms in other_bad)
            + ". Was the adapter trained on another model? Nothing was changed."
        )


def _load_tensors(model, adapter_name, tensors, directory) -> list[str]:
    """Copy the file's tensors into the adapter; return the paths of the embedding modules whose
    full weights the file carried."""
    rec = get_record(model, adapter_name)
    spec = method_for(rec.config)
    sd = model.state_dict(keep_vars=True)
    want = {disk: mem for mem, disk in _layer_keys(model, adapter_name).items()}
    own = {}  # file key -> this adapter's own values of a base tensor (trained biases)
    for pname in rec.bias_params:
        key = base_param_key(pname, rec.hosts)
        want[key] = pname
        own[key] = base_tensor_value(model, adapter_name, pname)
    # the other spelling of a host's base tensor (with/without ".base_layer") is accepted too
    alias = {}
    for k in want:
        if ".base_layer." in k:
            alias[k.replace(".base_layer.", ".")] = k
    rest = {}
    for k, v in tensors.items():
        k2 = alias.get(k, k)
        rest[k if (k2 != k and k2 in tensors) else k2] = v
    if spec.from_disk is not None:
        rest = spec.from_disk(model, adapter_name, rec.config, rest)
    # full embedding weights saved beside the adapter (PEFT's save_embedding_layers): optional
    # keys, as <path>.base_layer.weight (any module) or <path>.weight (input embedding / head)
    emb_names = set(_embedding_weight_names(model))
    optional = {}
    for k in rest:
        if k in want:
            continue
        pname = _base_param_of_key(k)
        if pname is not None and pname in sd and (k.endswith(".base_layer.weight") or pname in emb_names):
            optional[k] = pname
    want_all = {**want, **optional}
    unmatched = sorted(k for k in rest if k not in want_all)
    missing = sorted(k for k in want if k not in rest)
    shape_bad = [
        f"{k}: file {tuple(rest[k].shape)} vs model {tuple(sd[want_all[k]].shape)}"
        for k in sorted(rest) if k in want_all and tuple(rest[k].shape) != tuple(sd[want_all[k]].shape)
    ]
    dtype_bad = [f"{k} is {str(v.dtype).replace('torch.', '')}" for k, v in sorted(rest.items())
                 if k in want_all and not (v.is_floating_point() or v.is_complex())]
    nonfinite = [k for k, v in sorted(rest.items())
                 if k in want_all and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    problems = []
    if dtype_bad:
        problems.append(f"adapter tensors are floating point, but {_few(dtype_bad)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or infinite values: {_few(nonfinite)}")
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
            p = own[k] if k in own else sd[want_all[k]]
            p.copy_(v.to(dtype=p.dtype, device=p.device))
    return sorted(optional[k][: -len(".weight")] for k in optional if optional[k] in emb_names)


def _few(items, n=6):
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_config_json(directory: str) -> dict:
    """The ``adapter_config.json`` of an adapter folder as a dict.

    Raises:
        ValueError: the file is not JSON, or not a JSON object.
    """
    p = os.path.join(directory, CONFIG_NAME)
    try:
        with open(p, encoding="utf-8") as fh:
            d = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON ({e}): save the adapter again") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} holds a JSON {type(d).__name__}, not the object of an adapter config: save the "
                         "adapter again")
    return d
