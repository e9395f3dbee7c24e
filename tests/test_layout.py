"""The shape of the package: dependencies point one way, no import circle (deferred imports included), each public
name exported by one module, no private name imported across modules, and the 0.1 module paths still import."""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import hf_prune

PACKAGE = Path(hf_prune.__file__).parent
# Which subpackage may import which: pipeline -> trainer -> pruning / posttrain -> models; pipeline -> export ->
# models.
# `utils` imports nothing of hf_prune; the remote-code modeling files import nothing of it either.
ALLOWED = {
    "models": {"models", "utils"},
    "pruning": {"pruning", "models", "utils"},
    "posttrain": {"posttrain", "pruning", "models", "utils"},
    "export": {"export", "models", "utils"},
    "config": {"pruning", "utils"},
    "distill": set(),
    "trainer": {"config", "distill", "pruning", "export", "models", "utils", "sharding"},
    "sharding": {"config"},
    "pipeline": {"pipeline", "config", "trainer", "distill", "pruning", "posttrain", "export", "models", "utils"},
    "cli": {"pipeline", "export"},
    "integrations": {"trainer", "config"},
    "utils": set(),
    "_deprecated": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """Every hf_prune import in a file, at any depth (function bodies and TYPE_CHECKING blocks too):
    `(module, imported names, line)`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_prune":
                continue
            names = [a.name for a in node.names]
            # `from . import x` imports the module x
            submodules = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
            if submodules:
                found += [(m, [], node.lineno) for m in submodules]
            else:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "hf_prune"]
    return found


def library_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "modeling_hf_prune" not in p.name)


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in library_files():
        name = module_name(path)
        if name == "hf_prune" or name == "hf_prune._deprecated":
            continue  # the public API re-exports; the deprecation shim resolves names lazily
        edges[name] = {target for target, _, _ in imports_of(path) if target != name}
    return edges


def test_no_import_circle_even_in_function_bodies():
    edges = graph()
    # a module imported as a package (`from ..models import structure`) resolves to the module itself
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hf_prune"


def test_dependencies_point_one_way():
    wrong = []
    for module, targets in graph().items():
        area = _area(module)
        for target in targets:
            if _area(target) not in (area, "_deprecated") and _area(target) not in ALLOWED[area]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_private_name_is_imported_across_modules():
    private = []
    for path in library_files():
        for target, names, line in imports_of(path):
            private += [f"{module_name(path)}:{line} {target}.{n}" for n in names if n.startswith("_")]
    assert private == []


def test_each_public_name_is_exported_by_one_module():
    owners: dict[str, list[str]] = {}
    for path in library_files():
        name = module_name(path)
        if name == "hf_prune":
            continue  # the public API, re-exported from where each name lives
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                for item in ast.literal_eval(node.value):
                    owners.setdefault(item, []).append(name)
    assert {k: v for k, v in owners.items() if len(v) > 1} == {}
    # and the top-level API names exist where they are said to live
    for item in hf_prune.__all__:
        assert hasattr(hf_prune, item)


def test_every_module_stays_small():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in library_files()}
    assert {k: v for k, v in sizes.items() if v > 520} == {}


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("hf_prune.persistence", "save_pruned", "hf_prune.export.persistence"),
        ("hf_prune.report", "build_report", "hf_prune.export.report"),
        ("hf_prune.report", "format_report", "hf_prune.export.report_format"),
        ("hf_prune.pruner", "HeadMaskPruner", "hf_prune.pruning.head_pruner"),
        ("hf_prune.pruner", "build_pruner", "hf_prune.pruning.builder"),
        ("hf_prune.costs", "allocate_units", "hf_prune.pruning.allocation"),
        ("hf_prune.costs", "count_flops", "hf_prune.models.costs"),
        ("hf_prune.posttrain", "mask_fisher", "hf_prune.posttrain.fisher"),
        ("hf_prune.surgery", "prune_heads", "hf_prune.models.surgery"),
        ("hf_prune.onnx_export", "OnnxRuntimeModel", "hf_prune.export.onnx"),
        ("hf_prune.recipe_schema", "load_recipe", "hf_prune.pipeline.schema"),
    ],
)
def test_old_module_paths_import_with_a_deprecation_warning(old, name, new):
    if old != "hf_prune.posttrain":  # now a subpackage: its own names are new, the 0.1 names warn when read
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old}.* moved to .*{new}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_every_old_module_path_resolves():
    from hf_prune._deprecated import MOVED

    for old, targets in MOVED.items():
        for target in targets:
            importlib.import_module(target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(f"hf_prune.{old}")
        # every name the old module offered is still found (the targets' public names)
        for target in targets:
            for name in getattr(importlib.import_module(target), "__all__", []):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    assert getattr(module, name) is getattr(importlib.import_module(target), name) or any(
                        hasattr(importlib.import_module(t), name) for t in targets[: targets.index(target)]
                    )


def test_renamed_names_keep_their_old_path():
    from hf_prune.pipeline.demo import load_tokenizer_by_name
    from hf_prune.pipeline.sources import recipe_tokenizer

    with pytest.warns(DeprecationWarning, match="load_tokenizer_by_name"):
        assert importlib.import_module("hf_prune.data").load_tokenizer is load_tokenizer_by_name
    with pytest.warns(DeprecationWarning, match="recipe_tokenizer"):
        assert importlib.import_module("hf_prune.stages").load_tokenizer is recipe_tokenizer
