"""The dependency direction of the package, checked on every import statement (function-local ones
included), as ../shared/DESIGN.md lays it out:

    _io, config, geometry, layers, targets  <-  adapters, routing  <-  inject  <-  merge, quant
        <-  methods, lifecycle  <-  combine, extract  <-  formats  <-  integrations  <-  train  <-  cli

The package root (the public API of ``deltatune/__init__.py``) sits with train: it gathers the core,
the integrations and the training job (``deltatune.train(...)``); cli is its client. A module imports only modules of its own rank or below, there is no import
cycle, the core
(everything below integrations) never imports train, cli or transformers, and a function-local
import is only for an optional heavy dependency (never for one of deltatune's own modules).
"""

from __future__ import annotations

import ast
import pathlib

import deltatune

ROOT = pathlib.Path(deltatune.__file__).parent
RANKS = [
    {"_io", "config", "geometry", "layers", "targets"},
    {"adapters", "routing"},
    {"inject"},
    {"merge", "quant"},
    {"methods", "lifecycle"},
    {"combine", "extract"},  # new LoRA adapters made from others (combine) or from a weight difference (extract)
    {"formats"},
    {"integrations"},
    {"train"},
    {"cli", "__main__"},
]
CORE_MAX = 6  # ranks 0..6: everything below integrations
HEAVY = {"transformers", "datasets", "yaml", "matplotlib", "tqdm", "bitsandbytes", "torchao", "peft", "psutil",
         "gguf", "accelerate", "tokenizers", "trl", "tensorboard", "safetensors", "lemminflect", "chitchat_dataset"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["deltatune", *parts])


def _imports(path: pathlib.Path):
    """(imported module, line, function-local?) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    local, typing_only = set(), set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        if isinstance(fn, ast.If) and "TYPE_CHECKING" in ast.unparse(fn.test):  # annotations only: never run
            typing_only.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.level and not node.module:  # from . import x: each x is a module of the package
                for a in node.names:
                    yield f"{target}.{a.name}", node.lineno, id(node) in local
            else:
                yield target, node.lineno, id(node) in local


MODULES = {_module_name(p) for p in ROOT.rglob("*.py")}


def _resolve(target: str) -> str:
    """The deltatune module an import reaches (``from deltatune import inject`` names a function)."""
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


def _rank(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:  # the package itself (deltatune/__init__.py): the public API, which gathers the
        return RANKS.index({"train"})  # core, the integrations and the training job; cli is its client
    for i, group in enumerate(RANKS):
        if parts[1] in group:
            return i
    raise AssertionError(f"{mod} has no rank in tests/test_layering.py: add it where it belongs")


def _graph():
    edges, problems = {}, []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        edges.setdefault(mod, set())
        for target, line, is_local in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            top = target.split(".")[0]
            if top == "deltatune":
                target = _resolve(target)
                if is_local:
                    problems.append(f"{where}: function-local import of {target} (only optional heavy dependencies)")
                edges[mod].add(target)
                if _rank(target) > _rank(mod):
                    problems.append(f"{where}: {mod} (rank {_rank(mod)}) imports {target} (rank {_rank(target)})")
            else:
                if is_local and top not in HEAVY:
                    problems.append(f"{where}: function-local import of {target}, which is not an optional heavy "
                                    "dependency")
                if top in ("transformers", "peft", "trl") and _rank(mod) <= CORE_MAX:
                    problems.append(f"{where}: the core module {mod} imports {target}")
    return edges, problems


def test_every_import_follows_the_layering():
    _, problems = _graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    edges, _ = _graph()
    known = set(edges)

    graph = {m: {t for t in ts if t in known} - {m} for m, ts in edges.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t == "deltatune" or t.startswith(m + "."):
                continue  # the package's own __init__ aggregating its submodules
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


def test_the_checker_sees_local_imports_and_ranks():
    """So that the tests above can fail: ranks are ordered, and a lazily imported heavy dependency
    inside a function is seen as function-local."""
    assert _rank("deltatune.train.loop") > _rank("deltatune.inject") > _rank("deltatune.config")
    found = list(_imports(ROOT / "integrations" / "hf_prompt.py"))
    assert ("transformers", True) in {(t, local) for t, _, local in found}  # DynamicCache, imported lazily
