"""Target matching with Hugging Face PEFT's rules.

``target_modules``:
  * a list: a module matches when its full name is in the list or ends with ``"." + entry``;
  * a string: a regular expression that must match the full module name (``re.fullmatch``);
  * ``"all-linear"``: every linear layer (``nn.Linear`` and transformers ``Conv1D``) except the
    model's output head.

``exclude_modules`` uses the same list/regex rules and wins over ``target_modules``.
``layers_to_transform`` keeps only modules of these layer indices. A module's layer index is the
index segment right after the outermost layer list on its path: the outermost ``nn.ModuleList``
(else ``nn.Sequential``; with ``layers_pattern``: the outermost one whose name matches the pattern),
found once per model. So ``layers.3.mlp.experts.5.w1`` is in layer 3 (not 5), wherever the layer
list sits. Modules listed in ``modules_to_save`` are never adapter targets.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, Optional

from torch import nn

from .geometry import GEOMETRY
from .layers import layer_kind, supported_kind_names

ALL_LINEAR = "all-linear"
ADAPTERS = "adapters"  # the child that carries a host's adapters (see deltatune.adapters)


def is_adapter_path(name: str) -> bool:
    """True for a module or parameter path inside an ``adapters`` container (``a.adapters.x.w``)."""
    return f".{ADAPTERS}." in f".{name}."


def nearest_names(wanted: Iterable, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Module-name leaves of ``candidates`` closest to each entry of ``wanted`` (for error messages)."""
    leaves = sorted({c.split(".")[-1] for c in candidates if c})
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(str(w).split(".")[-1], leaves, n=n, cutoff=0.4)
    return list(dict.fromkeys(near))


def _list_match(spec: Iterable[str], key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in spec)


def layer_indexer(model: nn.Module, layers_pattern=None) -> Callable[[str], Optional[int]]:
    """A function ``module name -> layer index (or None)`` for ``model`` (see the module docstring).

    The layer lists are found once, here: every ``nn.ModuleList`` / ``nn.Sequential`` of the model
    (outside adapters), restricted to those whose path ends with ``layers_pattern`` (a name or
    regex, or a list of them) when given.
    """
    pats = None
    if layers_pattern:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    lists: dict = {nn.ModuleList: [], nn.Sequential: []}
    for name, mod in model.named_modules():
        kind = nn.ModuleList if isinstance(mod, nn.ModuleList) else nn.Sequential if isinstance(mod, nn.Sequential) else None
        if kind is None or is_adapter_path(name):
            continue
        if pats is not None and not any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in pats):
            continue
        lists[kind].append(name)
    for v in lists.values():
        v.sort(key=lambda n: (n.count(".") if n else -1))  # outermost first

    def index(key: str) -> Optional[int]:
        for kind in (nn.ModuleList, nn.Sequential):  # a ModuleList of blocks before any Sequential
            for lp in lists[kind]:
                prefix = f"{lp}." if lp else ""
                if key.startswith(prefix):
                    seg = key[len(prefix):].split(".")[0]
                    if seg.isdigit() and key != f"{prefix}{seg}":
                        return int(seg)
        return None

    return index


def _layer_allowed(config, key: str, index_of: Optional[Callable]) -> bool:
    lt = getattr(config, "layers_to_transform", None)
    if lt is None or (isinstance(lt, list) and not lt):
        return True
    idx = index_of(key) if index_of is not None else None
    return idx is not None and (idx == lt if isinstance(lt, int) else idx in lt)


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


def matches_target(config, key: str, target_modules=None, index_of: Optional[Callable] = None) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name ``key`` (see module docstring).

    ``index_of``: the model's :func:`layer_indexer` (needed when ``layers_to_transform`` is set).
    """
    if is_excluded(config, key):
        return False
    tm = config.target_modules if target_modules is None else target_modules
    if tm is None:
        return False
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    return _list_match(tm, key) and _layer_allowed(config, key, index_of)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head (excluded by "all-linear"): the module the model's
    geometry names as its output embedding, else modules named ``lm_head``/``score``/``classifier``."""
    head = GEOMETRY.output_embedding(model)
    names = {name for name, mod in model.named_modules() if head is not None and mod is head}
    if not names:
        names = {name for name, _ in model.named_modules() if name.split(".")[-1] in ("lm_head", "score", "classifier")}
    return names


def _is_linear_kind(module: nn.Module) -> bool:
    k = layer_kind(module)
    return k is not None and k.linear_like


def find_targets(model: nn.Module, config, *, predicate=None) -> list[str]:
    """Names of the modules of ``model`` that ``config`` targets, in model order.

    ``predicate(module) -> bool`` filters kinds (default: any registered layer kind).

    Raises:
        ValueError: nothing matched (the message lists the nearest module names), or a name
            matches a module of no adaptable kind.
    """
    strict = predicate is None
    predicate = predicate or (lambda m: layer_kind(m) is not None)
    index_of = layer_indexer(model, getattr(config, "layers_pattern", None))
    tm = config.target_modules
    names = []
    if tm == ALL_LINEAR or (isinstance(tm, list) and tm == [ALL_LINEAR]):
        heads = output_head_names(model)
        for name, mod in model.named_modules():
            if (name and name not in heads and not is_adapter_path(name) and _is_linear_kind(mod)
                    and not is_excluded(config, name) and _layer_allowed(config, name, index_of)):
                names.append(name)
    else:
        unsupported = []
        for name, mod in model.named_modules():
            if not name or is_adapter_path(name) or not matches_target(config, name, index_of=index_of):
                continue
            if predicate(mod):
                names.append(name)
            elif strict:
                unsupported.append(f"{name} ({type(mod).__name__})")
        if unsupported:
            raise ValueError(
                f"target_modules={tm!r} matches modules deltatune cannot adapt: {', '.join(unsupported[:6])}"
                f"{' ...' if len(unsupported) > 6 else ''}; supported layer kinds: {', '.join(supported_kind_names())}. "
                "Name the linear/embedding/conv layers inside them instead"
            )
    if not names:
        raise ValueError(_no_match_message(model, config))
    return names


def unmatched_patterns(patterns: Optional[dict], names: Iterable[str]) -> list[str]:
    """Keys of a ``rank_pattern``/``alpha_pattern`` that match none of ``names`` (PEFT's rule: a
    key is a regex matched against the end of the module name)."""
    names = list(names)
    return [p for p in (patterns or {}) if not any(re.match(rf"(.*\.)?({p})$", n) for n in names)]


def _no_match_message(model: nn.Module, config) -> str:
    tm = config.target_modules
    candidates = [n for n, m in model.named_modules() if n and layer_kind(m) is not None]
    wanted = [tm] if isinstance(tm, str) else list(tm or [])
    near = nearest_names(wanted, candidates) or sorted({n.split(".")[-1] for n in candidates})[:8]
    extra = ""
    if getattr(config, "layers_to_transform", None) is not None:
        extra = f" with layers_to_transform={config.layers_to_transform!r}"
    return (
        f"target_modules={tm!r}{extra} matched no adaptable module; "
        f"nearest module names: {', '.join(near) if near else '(none)'}"
    )
