"""The names of the files in an export folder, shared by the code that writes them (`persistence.py`) and the code
that reads or publishes them (`card.py`, `report.py`), so that neither imports the other for a file name."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "CONFIG_NAME",
    "MODELING_NAME",
    "CARD_NAME",
    "FIGURE_NAME",
    "PICKLE_SUFFIXES",
    "EVAL_CACHE_NAME",
    "ONNX_DIR",
    "ONNX_NAME",
    "ONNX_INT8_NAME",
    "ONNX_INFO_NAME",
    "export_files",
    "write_json_atomic",
]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODELING_NAME = "modeling_hf_prune.py"
CARD_NAME = "README.md"
FIGURE_NAME = "head_map.png"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Written beside a teacher's weights by the metrics cache; local bookkeeping, never uploaded.
EVAL_CACHE_NAME = "hf_prune_eval_cache.json"
# The ONNX forms of an export live in its `onnx/` subfolder, as Optimum and transformers.js lay them out on the Hub.
ONNX_DIR = "onnx"
ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model_int8.onnx"
ONNX_INFO_NAME = "export_info.json"


def export_files(folder: str | Path) -> list[str]:
    """Sorted relative paths of the files in an export folder."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_json_atomic(path: str | Path, obj, sort_keys: bool = False) -> None:
    """Writes `obj` as JSON to a temporary file beside `path`, flushed to disk, then renames it over `path`: a reader
    sees the old file or the new one, never a part.

    Args:
        path: the file to write (its folder is created).
        obj: anything `json.dumps` takes; it is serialised before any file is touched.
        sort_keys: sort the keys of every mapping (stable diffs of a file rewritten often, e.g. `state.json`).
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
