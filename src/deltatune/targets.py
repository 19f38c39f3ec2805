"""Target matching with Hugging Face PEFT's rules.

``target_modules``:
  * a list: a module matches when its full name is in the list or ends with ``"." + entry``;
  * a string: a regular expression that must match the full module name (``re.fullmatch``);
  * ``"all-linear"``: every linear layer (``nn.Linear`` and transformers ``Conv1D``) except the
    model's output head.

``exclude_modules`` uses the same list/regex rules and wins over ``target_modules``.
``layers_to_transform`` keeps only modules whose first numbered path segment (after
``layers_pattern`` when given) is one of the indices. Modules listed in ``modules_to_save`` are
never adapter targets.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional

from torch import nn

from .layers import layer_kind

ALL_LINEAR = "all-linear"

# ``target_modules=None``: the layers PEFT adapts by default, by ``model.config.model_type``
DEFAULT_TARGET_MODULES = {
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


def default_target_modules(model: nn.Module) -> Optional[list]:
    """PEFT's default ``target_modules`` for ``model``'s architecture, or None when unknown."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    v = DEFAULT_TARGET_MODULES.get(mt)
    return list(v) if v is not None else None


def _list_match(spec: Iterable[str], key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in spec)


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def is_excluded(config, key: str) -> bool:
    ex = getattr(config, "exclude_modules", None)
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif _list_match(ex, key):
            return True
    mts = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in mts)


def matches_target(config, key: str, target_modules=None) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name ``key`` (see module docstring)."""
    if is_excluded(config, key):
        return False
    tm = config.target_modules if target_modules is None else target_modules
    if tm is None:
        return False
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    if not _list_match(tm, key):
        return False
    lt = getattr(config, "layers_to_transform", None)
    if lt is None or (isinstance(lt, list) and not lt):
        return True
    idx = _layer_index(key, getattr(config, "layers_pattern", None))
    if idx is None:
        return False
    return idx == lt if isinstance(lt, int) else idx in lt


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head (``get_output_embeddings``), excluded by "all-linear"."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            names.add(name)
    if not names:
        for name, _ in model.named_modules():
            if name.split(".")[-1] in ("lm_head", "score", "classifier"):
                names.add(name)
    return names


def _is_linear_kind(module: nn.Module) -> bool:
    k = layer_kind(module)
    return k is not None and k.linear_like


def find_targets(model: nn.Module, config, *, predicate=None) -> list[str]:
    """Names of the modules of ``model`` that ``config`` targets, in model order.

    ``predicate(module) -> bool`` filters kinds (default: any registered layer kind).

    Raises:
        ValueError: nothing matched; the message lists the nearest module names.
    """
    strict = predicate is None
    predicate = predicate or (lambda m: layer_kind(m) is not None)
    tm = config.target_modules
    names = []
    if tm == ALL_LINEAR or (isinstance(tm, list) and tm == [ALL_LINEAR]):
        heads = output_head_names(model)
        for name, mod in model.named_modules():
            if name and name not in heads and _is_linear_kind(mod) and not is_excluded(config, name):
                if _passes_layers(config, name):
                    names.append(name)
    else:
        unsupported = []
        for name, mod in model.named_modules():
            if not name or ".adapters." in f".{name}." or not matches_target(config, name):
                continue
            if predicate(mod):
                names.append(name)
            elif strict:
                unsupported.append(f"{name} ({type(mod).__name__})")
        if unsupported:
            from .layers import supported_kind_names

            raise ValueError(
                f"target_modules={tm!r} matches modules deltatune cannot adapt: {', '.join(unsupported[:6])}"
                f"{' ...' if len(unsupported) > 6 else ''}; supported layer kinds: {', '.join(supported_kind_names())}. "
                "Name the linear/embedding/conv layers inside them instead"
            )
    names = [n for n in names if ".adapters." not in f".{n}."]
    if not names:
        raise ValueError(_no_match_message(model, config))
    return names


def _passes_layers(config, name: str) -> bool:
    lt = getattr(config, "layers_to_transform", None)
    if lt is None or (isinstance(lt, list) and not lt):
        return True
    idx = _layer_index(name, getattr(config, "layers_pattern", None))
    return idx is not None and (idx == lt if isinstance(lt, int) else idx in lt)


def _no_match_message(model: nn.Module, config) -> str:
    tm = config.target_modules
    candidates = [n for n, m in model.named_modules() if n and layer_kind(m) is not None]
    leaves = sorted({n.split(".")[-1] for n in candidates})
    wanted = [tm] if isinstance(tm, str) else list(tm or [])
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(str(w).split(".")[-1], leaves, n=3, cutoff=0.4)
    near = list(dict.fromkeys(near)) or leaves[:8]
    extra = ""
    if getattr(config, "layers_to_transform", None) is not None:
        extra = f" with layers_to_transform={config.layers_to_transform!r}"
    return (
        f"target_modules={tm!r}{extra} matched no adaptable module; "
        f"nearest module names: {', '.join(near) if near else '(none)'}"
    )
