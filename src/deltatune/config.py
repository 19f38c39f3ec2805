"""Adapter configuration dataclasses and the config registry.

Every config keeps Hugging Face PEFT's field names, defaults and meanings, and reads/writes
PEFT's ``adapter_config.json``. Keys this version does not know are kept in ``extra`` and written
back unchanged, so a config from a newer PEFT survives a round trip.

A method registers its config class with :func:`register_config` under PEFT's ``peft_type``
string ("LORA", "IA3", "PROMPT_TUNING", ...); :func:`config_from_dict` picks the class from that
field. The built-in methods register when ``deltatune`` is imported (``deltatune/__init__.py``
imports :mod:`deltatune.methods`), so nothing here imports a method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ._io import atomic_write_bytes

CONFIG_NAME = "adapter_config.json"

_CONFIG_REGISTRY: dict[str, type] = {}


def register_config(cls):
    """Class decorator: register ``cls`` under its ``PEFT_TYPE`` for :func:`config_from_dict`."""
    _CONFIG_REGISTRY[cls.PEFT_TYPE] = cls
    return cls


def registered_peft_types() -> list[str]:
    return sorted(_CONFIG_REGISTRY)


@dataclass
class AdapterConfig:
    """Fields every adapter config has (PEFT's ``PeftConfig``)."""

    PEFT_TYPE: ClassVar[str] = ""
    # why adapters of this method can never be merged (None: merging is up to each layer adapter)
    merge_error: ClassVar[Optional[str]] = None
    # fields that do not change what an adapter computes (init recipes, dropout, bookkeeping): two
    # configs that differ only in these describe the same trained adapter
    neutral_fields: ClassVar[frozenset] = frozenset(
        {"inference_mode", "base_model_name_or_path", "revision", "task_type", "peft_version", "auto_mapping"})

    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    # Keys read from a file that this class does not define; written back as they were.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def peft_type(self) -> str:
        return self.PEFT_TYPE

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict:
        """The ``adapter_config.json`` content: PEFT's keys plus any kept unknown keys."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if isinstance(v, set):
                v = sorted(v)
            out[f.name] = v
        out["peft_type"] = self.PEFT_TYPE
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        """The config of a mapping (``adapter_config.json``'s content).

        Raises:
            ValueError: a field of a plain type (int, float, bool, str, dict, list) holds a value of
                another type, or the class refuses a value (names the field).
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "peft_type"}
        for f in dataclasses.fields(cls):
            want = _PLAIN_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
            v = known.get(f.name)
            if want and v is not None and (not isinstance(v, want) or (isinstance(v, bool) and bool not in want)):
                raise ValueError(f"field {f.name!r} must be {f.type}, got {v!r}")
        try:
            cfg = cls(**known)
        except TypeError as e:
            raise ValueError(str(e)) from None
        cfg.extra = extra
        return cfg

    def save(self, directory: str) -> str:
        """Write ``adapter_config.json`` into ``directory`` atomically; return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path

    def copy(self, **changes) -> "AdapterConfig":
        c = dataclasses.replace(self, **changes)
        c.extra = dict(self.extra)
        return c


_PLAIN_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,)}


def config_from_dict(d: dict) -> AdapterConfig:
    """Build the registered config class named by ``d["peft_type"]``.

    Raises:
        ValueError: the ``peft_type`` is missing or not one deltatune implements.
    """
    if not isinstance(d, dict):
        raise ValueError(f"an adapter config is a JSON object of fields, got {type(d).__name__}")
    pt = d.get("peft_type")
    if not isinstance(pt, str) or pt not in _CONFIG_REGISTRY:
        raise ValueError(
            f"adapter config has peft_type {pt!r}; deltatune reads {', '.join(registered_peft_types())}"
        )
    return _CONFIG_REGISTRY[pt].from_dict(d)


def load_config(directory: str) -> AdapterConfig:
    """Read ``adapter_config.json`` from ``directory``.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` there.
        ValueError: the file is not valid JSON or names an unknown ``peft_type``.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: is this an adapter folder?")
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): save the adapter again") from None
    try:
        return config_from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


TargetSpec = Optional[Union[list, str]]


@dataclass
class LayerAdapterConfig(AdapterConfig):
    """Common fields of the methods that attach to individual layers (LoRA, IA3, bottleneck)."""

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    modules_to_save: Optional[list] = None
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            v = getattr(self, name)
            strings = isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v)
            if v is not None and not strings and not (isinstance(v, str) and name != "modules_to_save"):
                raise ValueError(f"{name} must be " + ("a list of module names" if name == "modules_to_save" else
                                                       "a module name, a list of names or a regex") + f", got {v!r}")
        v = self.layers_to_transform
        ints = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        if v is not None and not ints and not (isinstance(v, int) and not isinstance(v, bool)):
            raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {v!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: say which layer indices to adapt")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used with a regex target_modules string: "
                "put the layer indices in the regex instead"
            )
