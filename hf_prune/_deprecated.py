"""The module paths of hf_prune 0.1 (one flat package), kept importable for one release with a `DeprecationWarning`.

`import hf_prune.persistence` or `from hf_prune.report import build_report` still work: the old path is a module whose
attributes are looked up in the modules that hold those names now. `hf_prune.posttrain` is a subpackage now; its
`__getattr__` serves the names the 0.1 module of that name had.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module (under hf_prune) -> the modules its public names live in now, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "surgery": ("hf_prune.models.surgery",),
    "modeling_pruned": ("hf_prune.models.bert.modeling_hf_prune", "hf_prune.models.surgery"),
    "costs": ("hf_prune.models.costs", "hf_prune.pruning.allocation"),
    "masks": ("hf_prune.pruning.masks",),
    "scores": ("hf_prune.pruning.scores",),
    "selection": ("hf_prune.pruning.selection",),
    "pruner": (
        "hf_prune.pruning.builder",
        "hf_prune.pruning.block_pruner",
        "hf_prune.pruning.neuron_pruner",
        "hf_prune.pruning.head_pruner",
        "hf_prune.pruning.base",
    ),
    "head_pruner": ("hf_prune.pruning.head_pruner",),
    "unit_pruner": ("hf_prune.pruning.unit_pruner",),
    "posttrain": ("hf_prune.posttrain.search", "hf_prune.posttrain.fisher", "hf_prune.pruning.allocation"),
    "mask_tuning": ("hf_prune.posttrain.mask_tuning",),
    "recipe": ("hf_prune.pipeline.recipe", "hf_prune.pipeline.schema"),
    "recipe_schema": ("hf_prune.pipeline.schema",),
    "stages": ("hf_prune.pipeline.stages", "hf_prune.pipeline.context", "hf_prune.pipeline.sources"),
    "stage_outputs": ("hf_prune.pipeline.stage_outputs",),
    "tasks": ("hf_prune.pipeline.tasks",),
    "data": ("hf_prune.pipeline.data", "hf_prune.pipeline.demo", "hf_prune.pipeline.metrics"),
    "metrics": ("hf_prune.pipeline.metrics", "hf_prune.pipeline.tasks"),
    "metrics_cache": ("hf_prune.pipeline.metrics_cache",),
    "sources": ("hf_prune.pipeline.sources",),
    "demo": ("hf_prune.pipeline.demo",),
    "persistence": ("hf_prune.export.persistence", "hf_prune.export.files"),
    "report": ("hf_prune.export.report", "hf_prune.export.report_format", "hf_prune.export.files"),
    "report_format": ("hf_prune.export.report_format",),
    "card": ("hf_prune.export.card",),
    "onnx_export": ("hf_prune.export.onnx",),
    "deploy": (
        "hf_prune.export.deploy",
        "hf_prune.export.onnx",
        "hf_prune.pipeline.evaluation",
        "hf_prune.export.files",
    ),
    "files": ("hf_prune.export.files", "hf_prune.utils"),
}


def _owner(targets: tuple[str, ...], attr: str):
    """The module of `targets` that exports `attr` (lists it in `__all__`), else the first that has it, else None."""
    modules = [importlib.import_module(t) for t in targets]
    for module in modules:
        if attr in getattr(module, "__all__", ()):
            return module
    return next((m for m in modules if hasattr(m, attr)), None)


def moved_attribute(old: str, attr: str):
    """`attr` of the 0.1 module `hf_prune.<old>` whose name a subpackage now holds (`hf_prune.posttrain`), with a
    `DeprecationWarning` naming where it lives now."""
    module = _owner(MOVED[old], attr)
    if module is not None:
        warnings.warn(
            f"hf_prune.{old}.{attr} moved to {module.__name__}: import it from there, the old path goes in the next "
            "release.",
            DeprecationWarning,
            stacklevel=3,
        )
        return getattr(module, attr)
    raise AttributeError(f"module 'hf_prune.{old}' has no attribute {attr!r}")


# names that were renamed as they moved: (old module, old name) -> "new module:new name"
RENAMED = {
    ("data", "load_tokenizer"): "hf_prune.pipeline.demo:load_tokenizer_by_name",
    ("demo", "load_tokenizer"): "hf_prune.pipeline.demo:load_tokenizer_by_name",
    ("sources", "load_tokenizer"): "hf_prune.pipeline.sources:recipe_tokenizer",
    ("stages", "load_tokenizer"): "hf_prune.pipeline.sources:recipe_tokenizer",
}


def _renamed(old: str, attr: str):
    where = RENAMED.get((old, attr))
    if where is None:
        return None
    module, _, name = where.partition(":")
    warnings.warn(
        f"hf_prune.{old}.{attr} is {module}.{name} now: import that, the old name goes in the next release.",
        DeprecationWarning,
        stacklevel=4,
    )
    return getattr(importlib.import_module(module), name)


class _MovedModule(types.ModuleType):
    """An old module path: attribute reads go to the modules that hold the names now."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved to {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        module = _owner(self._targets, attr)
        if module is not None:
            return getattr(module, attr)
        renamed = _renamed(self.__name__.rpartition(".")[2], attr)
        if renamed is not None:
            return renamed
        raise AttributeError(f"{self.__name__} has no attribute {attr!r} (it moved to {', '.join(self._targets)}).")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, leaf = fullname.rpartition(".")
        if package != "hf_prune" or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        targets = MOVED[spec.name.rpartition(".")[2]]
        warnings.warn(
            f"{spec.name} moved to {' / '.join(targets)}: import from there, the old path goes in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return _MovedModule(spec.name, targets)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Makes the old module paths importable (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
