"""The module paths of hf_prune 0.1 (one flat package), kept importable for one release with a `DeprecationWarning`.

`import hf_prune.persistence` or `from hf_prune.report import build_report` still work: the old path is a module whose
attributes are looked up in the modules that hold those names now.
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
    "structure": ("hf_prune.models.structure",),
    "surgery": ("hf_prune.models.surgery",),
    "modeling_pruned": ("hf_prune.models.bert.modeling_hf_prune",),
    "costs": ("hf_prune.models.costs", "hf_prune.pruning.allocation"),
    "masks": ("hf_prune.pruning.masks",),
    "scores": ("hf_prune.pruning.scores",),
    "selection": ("hf_prune.pruning.selection",),
    "pruner": ("hf_prune.pruning.pruners", "hf_prune.pruning.head_pruner", "hf_prune.pruning.builder"),
    "head_pruner": ("hf_prune.pruning.head_pruner",),
    "unit_pruner": ("hf_prune.pruning.unit_pruner",),
    "posttrain": ("hf_prune.posttrain.search", "hf_prune.posttrain.fisher"),
    "mask_tuning": ("hf_prune.posttrain.mask_tuning",),
    "recipe": ("hf_prune.pipeline.recipe", "hf_prune.pipeline.schema"),
    "recipe_schema": ("hf_prune.pipeline.schema",),
    "stages": ("hf_prune.pipeline.stages", "hf_prune.pipeline.sources"),
    "stage_outputs": ("hf_prune.pipeline.stage_outputs",),
    "tasks": ("hf_prune.pipeline.tasks",),
    "data": ("hf_prune.pipeline.data", "hf_prune.pipeline.demo", "hf_prune.pipeline.metrics"),
    "metrics": ("hf_prune.pipeline.metrics",),
    "metrics_cache": ("hf_prune.pipeline.metrics_cache",),
    "sources": ("hf_prune.pipeline.sources",),
    "demo": ("hf_prune.pipeline.demo",),
    "persistence": ("hf_prune.export.persistence", "hf_prune.export.files"),
    "report": ("hf_prune.export.report", "hf_prune.export.report_format"),
    "report_format": ("hf_prune.export.report_format",),
    "card": ("hf_prune.export.card",),
    "onnx_export": ("hf_prune.export.onnx",),
    "deploy": ("hf_prune.export.deploy", "hf_prune.export.onnx"),
    "files": ("hf_prune.export.files", "hf_prune.utils"),
}


class _MovedModule(types.ModuleType):
    """An old module path: attribute reads go to the modules that hold the names now."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved to {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
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
