"""The names of the files in an export folder, shared by the code that writes them (`persistence.py`) and the code
that reads or publishes them (`card.py`, `report_format.py`, `deploy.py`), so that neither imports the other for a file
name."""

from __future__ import annotations

import copy
import os
from pathlib import Path

__all__ = [
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "CONFIG_NAME",
    "MODELING_NAME",
    "CARD_NAME",
    "FIGURE_NAME",
    "REPORT_NAME",
    "PICKLE_SUFFIXES",
    "EVAL_CACHE_NAME",
    "ONNX_DIR",
    "ONNX_NAME",
    "ONNX_INT8_NAME",
    "ONNX_INFO_NAME",
    "BASE_MODEL_CONFIG_KEY",
    "export_files",
    "portable_paths",
    "resolved_paths",
]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODELING_NAME = "modeling_hf_prune.py"
CARD_NAME = "README.md"
FIGURE_NAME = "head_map.png"
REPORT_NAME = "pruning_report.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Written beside a teacher's weights by the metrics cache; local bookkeeping, never uploaded.
EVAL_CACHE_NAME = "hf_prune_eval_cache.json"
# The ONNX forms of an export live in its `onnx/` subfolder, as Optimum and transformers.js lay them out on the Hub.
ONNX_DIR = "onnx"
ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model_int8.onnx"
ONNX_INFO_NAME = "export_info.json"
# The config key in which the stages of `hf-prune run` record the model a saved model was fine-tuned from (the same
# key as `hf_prune.pipeline.sources.BASE_MODEL_KEY`); model cards read it to name the base model.
BASE_MODEL_CONFIG_KEY = "hf_prune_base_model"


def export_files(folder: str | Path) -> list[str]:
    """Sorted relative paths of the files in an export folder."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _path_fields(report: dict, files: bool = True):
    """`(holder, key)` of every local path a report records: the dense and pruned folders, the recipe's model (where
    it is a folder), the teacher as loaded, and (with `files`) each deployed form's file, which names the export's own
    files relative to it."""
    yield report, "base_model"
    yield report, "dense_path"
    yield report, "pruned_path"
    if isinstance(report.get("lineage"), dict):
        yield report["lineage"], "teacher"
    for form in (report.get("deployment") or {}).get("forms") or [] if files else []:
        if isinstance(form, dict):
            yield form, "file"


def portable_paths(report: dict, folder: str | Path) -> dict:
    """A copy of `report` whose absolute local paths are relative to `folder` (the export it is written into), so a
    report published with its export names no folder of the machine that made it, and still finds the teacher while
    the export stays beside its run. Hub ids and relative paths are left as they are (relative ones are taken to be
    relative to `folder` already: [`resolved_paths`] reads them so).

    Args:
        report: a report (`hf_prune.export.report.build_report`).
        folder: the folder the report is written into.

    Returns:
        The new report (`report` is left unchanged).
    """
    out = copy.deepcopy(report)
    base = os.path.abspath(folder)
    for holder, key in _path_fields(out):
        value = holder.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            try:
                holder[key] = Path(os.path.relpath(value, base)).as_posix()
            except ValueError:  # another drive (Windows): no relative path leads there
                holder[key] = Path(value).name
    return out


def resolved_paths(report: dict, folder: str | Path) -> dict:
    """A copy of `report` whose folders relative to `folder` (written by [`portable_paths`]) are absolute again, where
    they exist; the others (Hub ids, folders of another machine) are left as they are, and so are the deployed forms'
    files (relative to `folder`, as the export's own files are named).

    Args:
        report: a report read from `folder`.
        folder: the folder it was read from.

    Returns:
        The new report (`report` is left unchanged).
    """
    out = copy.deepcopy(report)
    for holder, key in _path_fields(out, files=False):
        value = holder.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            path = Path(folder) / value
            if path.exists():
                holder[key] = str(path.resolve())
    return out
