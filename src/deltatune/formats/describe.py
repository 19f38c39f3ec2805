"""What an adapter folder holds, read from its two PEFT files alone (``deltatune inspect``)."""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..config import CONFIG_NAME
from ..methods.lora import lora_scaling, pattern_value
from .peft import PREFIX, read_adapter_tensors, read_config_json

_LORA_LEAVES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_MODULE_LEAVES = _LORA_LEAVES + ("oft_R", "oft_embedding_R")  # adapter sub-modules whose tensor is ``.weight``
MODEL_LEVEL = "(model level)"  # tensors outside the per-layer key rule (VeRA's shared projections)


def _natural_key(s: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def _module_tensors(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {leaf: float tensor}; a LoRA matrix's leaf is ``lora_A`` (not ``lora_A.weight``),
    OFT's ``oft_R``; keys outside ``base_model.model.`` are grouped under :data:`MODEL_LEVEL`."""
    groups: dict = {}
    for k, t in tensors.items():
        if not k.startswith(PREFIX):
            groups.setdefault(MODEL_LEVEL, {})[k.rpartition(".")[2]] = t.float()
            continue
        mod, _, leaf = k[len(PREFIX):].rpartition(".")
        if leaf == "weight" and mod.rpartition(".")[2] in _MODULE_LEAVES:
            mod, _, leaf = mod.rpartition(".")
        groups.setdefault(mod, {})[leaf] = t.float()
    return groups


def _delta_norm(mod: str, g: dict, cfg: dict) -> tuple[Optional[float], Optional[int]]:
    """(||delta W||_F, rank) of one module from its file tensors where the method's update is a
    product of them (LoRA, AdaLoRA, LoHa, LoKr); (None, None) otherwise."""
    method = cfg.get("peft_type")
    if method == "ADALORA" and {"lora_A", "lora_B", "lora_E"} <= set(g):
        a, b, e = g["lora_A"], g["lora_B"], g["lora_E"]
        alpha = cfg.get("lora_alpha") or 0
        s = (alpha if alpha > 0 else a.shape[0]) / (cfg.get("init_r", a.shape[0]) + 1e-5)
        return float(s * torch.linalg.matrix_norm(b @ (a * e))), a.shape[0]
    A = g.get("lora_A", g.get("lora_embedding_A"))
    B = g.get("lora_B", g.get("lora_embedding_B"))
    if A is not None and B is not None:
        rank = A.shape[0]
        alpha = cfg.get("lora_alpha")
        scale = lora_scaling(rank, alpha, bool(cfg.get("use_rslora"))) if alpha else 1.0
        delta = B @ A if "lora_embedding_A" in g else B.reshape(B.shape[0], -1) @ A.reshape(rank, -1)
        return float(scale * torch.linalg.matrix_norm(delta)), rank
    if method in ("LOHA", "LOKR"):
        r = pattern_value(cfg.get("rank_pattern"), mod, cfg.get("r"))
        s = pattern_value(cfg.get("alpha_pattern"), mod, cfg.get("alpha") or 0) / r
        if "hada_w1_a" in g and "hada_t1" not in g:
            w = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
            return float(s * torch.linalg.norm(w)), r
        if method == "LOKR" and "lokr_t2" not in g:
            w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
            w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"]
            return float(s * torch.linalg.norm(w1) * torch.linalg.norm(w2)), r  # ||kron(a, b)|| = ||a|| ||b||
    return None, None


def _module_row(mod: str, g: dict, cfg: dict) -> dict:
    norm, rank = _delta_norm(mod, g, cfg)
    if norm is not None:
        kind = "lora" if cfg.get("peft_type") in ("LORA", None) else str(cfg.get("peft_type")).lower()
    else:
        norm = float(torch.sqrt(sum((t ** 2).sum() for t in g.values())))
        kind = ",".join(sorted(g))
    row = {"module": mod, "norm": norm, "tensors": kind, "params": int(sum(t.numel() for t in g.values()))}
    if rank is not None:
        row["rank"] = rank
    return row


def _settings(cfg: dict) -> str:
    """One line of the method's size settings."""
    m = cfg.get("peft_type")
    if m == "ADALORA":
        return f"init_r={cfg.get('init_r')} -> target_r={cfg.get('target_r')}, lora_alpha={cfg.get('lora_alpha')}"
    if m in ("LOHA", "LOKR"):
        return f"r={cfg.get('r')}, alpha={cfg.get('alpha')}"
    if m == "VERA":
        return (f"r={cfg.get('r')}, projection_prng_key={cfg.get('projection_prng_key')}, "
                f"save_projection={cfg.get('save_projection')}")
    if m == "OFT":
        return f"r={cfg.get('r')}, oft_block_size={cfg.get('oft_block_size')}"
    if m == "BOFT":
        return (f"boft_block_size={cfg.get('boft_block_size')}, boft_block_num={cfg.get('boft_block_num')}, "
                f"boft_n_butterfly_factor={cfg.get('boft_n_butterfly_factor')}")
    return f"r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}"


def describe_adapter(path: str) -> dict:
    """Method, targets, rank, parameter count and per-module update norms of an adapter folder.

    The norm is ``||delta W||_F`` (the Frobenius norm of the weight update) where the file alone
    gives it: LoRA ``scale * B @ A``, AdaLoRA ``B diag(E) A * alpha / init_r`` (with each module's
    kept rank), LoHa and LoKr (not their CP-decomposed convolutions); for other tensors (VeRA's
    vectors, OFT/BOFT rotations, prompt tensors) the L2 norm of the module's adapter tensors. VeRA's
    shared projections are listed as the module ``(model level)``. Nothing is loaded but the two files.

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
        "rank": cfg.get("init_r") if cfg.get("peft_type") == "ADALORA" else cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha", cfg.get("alpha")),
        "settings": _settings(cfg),
        "base_model": cfg.get("base_model_name_or_path"),
        "parameters": sum(t.numel() for t in tensors.values()),
        "modules": [_module_row(mod, groups[mod], cfg) for mod in sorted(groups, key=_natural_key)],
        "config": cfg,
    }
