"""What an adapter folder holds, read from its two PEFT files alone (``deltatune inspect``)."""

from __future__ import annotations

import os
import re

import torch

from ..config import CONFIG_NAME
from ..methods.lora import lora_scaling
from .peft import PREFIX, read_adapter_tensors, read_config_json

_LORA_LEAVES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _natural_key(s: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def _module_tensors(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {leaf: float tensor}; a LoRA matrix's leaf is ``lora_A`` (not ``lora_A.weight``)."""
    groups: dict = {}
    for k, t in tensors.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and mod.rpartition(".")[2] in _LORA_LEAVES:
            mod, _, leaf = mod.rpartition(".")
        groups.setdefault(mod, {})[leaf] = t.float()
    return groups


def _module_row(mod: str, g: dict, cfg: dict) -> dict:
    A = g.get("lora_A", g.get("lora_embedding_A"))
    B = g.get("lora_B", g.get("lora_embedding_B"))
    if A is not None and B is not None:
        rank = A.shape[0]
        alpha = cfg.get("lora_alpha")
        scale = lora_scaling(rank, alpha, bool(cfg.get("use_rslora"))) if alpha else 1.0
        delta = B @ A if "lora_embedding_A" in g else B.reshape(B.shape[0], -1) @ A.reshape(rank, -1)
        norm = float(scale * torch.linalg.matrix_norm(delta))
        kind = "lora"
    else:
        norm = float(torch.sqrt(sum((t ** 2).sum() for t in g.values())))
        kind = ",".join(sorted(g))
    return {"module": mod, "norm": norm, "tensors": kind, "params": int(sum(t.numel() for t in g.values()))}


def describe_adapter(path: str) -> dict:
    """Method, targets, rank, parameter count and per-module update norms of an adapter folder.

    For LoRA modules the norm is ``||scale * B @ A||_F`` (the Frobenius norm of the weight update);
    for other tensors the L2 norm of the module's adapter tensors. Nothing is loaded but the two files.

    Raises:
        FileNotFoundError: ``path`` is not an adapter folder.
    """
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"{path} is not an adapter folder (no {CONFIG_NAME})")
    cfg = read_config_json(path)
    tensors = read_adapter_tensors(path)
    groups = _module_tensors(tensors)
    return {
        "method": cfg.get("peft_type"),
        "targets": cfg.get("target_modules"),
        "rank": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "base_model": cfg.get("base_model_name_or_path"),
        "parameters": sum(t.numel() for t in tensors.values()),
        "modules": [_module_row(mod, groups[mod], cfg) for mod in sorted(groups, key=_natural_key)],
        "config": cfg,
    }
