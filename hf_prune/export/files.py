"""The names of the files in an export folder, shared by the code that writes them (`persistence.py`) and the code
that reads or publishes them (`card.py`, `report_format.py`, `deploy.py`), so that neither imports the other for a file
name."""

from __future__ import annotations

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
