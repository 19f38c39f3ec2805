"""CLI method name -> adapter config builder.

Each builder takes the parsed training options (a dict of CLI/YAML values; unknown keys ignored)
and returns a config for :func:`deltatune.inject`. Methods register themselves here so that
``deltatune train --method NAME`` and the README's method table stay in one place.
"""

from __future__ import annotations

from typing import Callable

METHOD_BUILDERS: dict[str, Callable[[dict], object]] = {}


def register_cli_method(name: str):
    def deco(fn):
        METHOD_BUILDERS[name] = fn
        return fn

    return deco


@register_cli_method("lora")
def build_lora(opts: dict):
    from ..methods.lora import LoraConfig

    return LoraConfig(
        r=int(opts.get("r", 16)),
        lora_alpha=float(opts.get("lora_alpha", 32)),
        lora_dropout=float(opts.get("lora_dropout", 0.0)),
        target_modules=opts.get("target_modules") or "all-linear",
        use_rslora=bool(opts.get("use_rslora", False)),
        use_dora=bool(opts.get("use_dora", False)),
    )


@register_cli_method("dora")
def build_dora(opts: dict):
    return build_lora({**opts, "use_dora": True})


# CLI method name -> fn(model, opts) -> dict of extra report fields, run on the loaded base model
# BEFORE the adapter is injected (e.g. "qlora" quantizes the base and reports base_weight_bytes,
# quantized_params). Methods without an entry use the model as loaded.
MODEL_PREPARERS: dict[str, Callable] = {}


def register_model_preparer(name: str):
    def deco(fn):
        MODEL_PREPARERS[name] = fn
        return fn

    return deco
