"""A cache of evaluation results keyed by what determines them: the model's weights, the evaluation split's content
and the metric.

The dense teacher is evaluated by every `evaluate` stage of every run that distils from it (minutes per split on a
CPU); with the cache, a benchmark of several operating points evaluates it once. Keys are content digests, so a
retrained teacher, another split, other tokenization or another sample size never reuse a stale entry, whatever the
folder is called.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from ..export.files import EVAL_CACHE_NAME
from ..utils import write_json_atomic

logger = logging.get_logger(__name__)

__all__ = ["CACHE_NAME", "model_digest", "dataset_digest", "cache_key", "MetricsCache"]

CACHE_NAME = EVAL_CACHE_NAME
CACHE_VERSION = 1


@torch.no_grad()
def model_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the model's `state_dict` (name, dtype, shape and bytes), as 32 hex digits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:32]


def dataset_digest(dataset) -> str:
    """sha256 of a `datasets.Dataset`'s rows (every column by name, values in row order), as 32 hex digits.

    Hashes values, not Arrow buffers, so the same rows give the same digest whether they come from a file, a
    `select()` view or a slice.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format(None).data.table
    if getattr(dataset, "_indices", None) is not None:  # a select()/shuffle() view: hash the rows it shows
        table = dataset.flatten_indices().data.table
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks()
        digest.update(f"{name}|{column.type}|{len(column)}|".encode())
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
            column = pc.list_flatten(column)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            digest.update(column.to_numpy(zero_copy_only=False).tobytes())
        else:
            digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return digest.hexdigest()[:32]


def cache_key(model_key: str, split_key: str, metric: str) -> str:
    return f"{model_key}:{split_key}:{metric}"


class MetricsCache:
    """A JSON file of `{key: {"value", "split", "metric", "created"}}`, rewritten atomically on every store.

    Args:
        path: the cache file (created on the first store).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries = self._read()

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("Ignoring the unreadable metrics cache %s (%s); it will be rewritten.", self.path, err)
            return {}
        if not isinstance(data, dict) or data.get("format_version") != CACHE_VERSION:
            return {}
        return dict(data.get("entries") or {})

    def get(self, key: str) -> float | None:
        entry = self.entries.get(key)
        return None if entry is None else float(entry["value"])

    def put(self, key: str, value: float, split: str, metric: str) -> None:
        self.entries[key] = {
            "value": float(value),
            "split": split,
            "metric": metric,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            write_json_atomic(self.path, {"format_version": CACHE_VERSION, "entries": self.entries}, sort_keys=True)
        except OSError as err:  # a read-only teacher folder: the result is still returned, just not kept
            logger.warning("Could not write the metrics cache %s (%s).", self.path, err)
