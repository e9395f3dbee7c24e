"""Deployment on CPU: every deployed form of an export measured side by side, and the `hf-prune onnx` command.

The forms are dense PyTorch fp32 (the model pruning started from), pruned PyTorch fp32, pruned ONNX fp32 and pruned
ONNX int8 (ONNX Runtime's dynamic quantization; see `hf_prune.export.onnx` for the files and the choices behind
them). `deployment_rows` times them interleaved in one process (ONNX Runtime with as many threads as PyTorch), with
their file sizes and their metric on evaluation data (`hf_prune.pipeline.evaluation.split_evaluator` measures the
task metric); `write_deployment` adds them to the export's `pruning_report.json` and model card.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.utils import logging

from ..utils import temporary_path, write_json_atomic
from . import card as cards
from .files import CARD_NAME, FIGURE_NAME, ONNX_DIR, ONNX_INT8_NAME, ONNX_NAME, REPORT_NAME, WEIGHTS_NAME
from .onnx import (
    INFO_VERSION,
    OnnxRuntimeModel,
    check_export,
    export_onnx,
    quantize_onnx,
    read_export_info,
    require_onnx,
)
from .persistence import load_pruned
from .report import REPORT_VERSION, on_cpu, time_forms, weights_bytes

logger = logging.get_logger(__name__)

__all__ = ["deployment_rows", "write_deployment", "speedups", "cli_onnx"]


# ----------------------------------------------------------------------------------------------------- measuring
def _onnx_bytes(path: Path) -> int:
    """Bytes of an ONNX file and of the external data files stored beside it (models over 2 GB)."""
    onnx, _ = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def deployment_rows(
    dense_model: nn.Module | None,
    export_dir: str | os.PathLike,
    eval_fn: Callable[[object], Mapping[str, float] | float] | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    dense_path: str | os.PathLike | None = None,
    metric_name: str = "accuracy",
) -> dict:
    """Measures every deployed form of an export: dense PyTorch fp32 (when given), pruned PyTorch fp32, pruned ONNX
    fp32 and pruned ONNX int8 (when `onnx/model_int8.onnx` exists).

    Every form is timed interleaved with the others in this process on the same inputs (see
    [`hf_prune.export.report.time_forms`]), ONNX Runtime with as many threads as PyTorch; speedups are against the
    first form. File sizes are those of the files a deployment ships.

    Args:
        dense_model: the dense model the export was pruned from (e.g. the teacher), or None.
        export_dir: the export folder, with `onnx/` written by [`export_onnx`].
        eval_fn: called with each form (a PyTorch model or an [`OnnxRuntimeModel`]), returns `{split: metric}`
            (e.g. `hf_prune.pipeline.evaluation.split_evaluator`); None leaves the metrics out.
        batch_sizes / seq_len / repeats / warmup: what to time (median of `repeats` runs after `warmup`).
        dense_path: the dense model's folder: its file size is then that of its safetensors.
        metric_name: what `eval_fn` measures.

    Returns:
        The `deployment` section of `pruning_report.json` (see [`write_deployment`]).
    """
    folder = check_export(export_dir)
    onnx_dir = folder / ONNX_DIR
    if not (onnx_dir / ONNX_NAME).is_file():
        raise FileNotFoundError(
            f"{onnx_dir / ONNX_NAME} is missing: export the folder first with hf_prune.export_onnx({str(folder)!r}) "
            "or `hf-prune onnx DIR --int8`."
        )
    pruned = load_pruned(folder).eval()
    forms = []  # (name, runtime, precision, model, file, bytes)
    if dense_model is not None:
        dense = on_cpu(dense_model)
        was_training = dense.training
        dense.eval()
        size, _ = weights_bytes(dense, dense_path)
        file = str(Path(dense_path) / WEIGHTS_NAME) if dense_path is not None else None
        forms.append(("dense PyTorch fp32", "pytorch", "fp32", dense, file, size))
    forms.append(("pruned PyTorch fp32", "pytorch", "fp32", pruned, WEIGHTS_NAME, weights_bytes(pruned, folder)[0]))
    for precision, name in (("fp32", ONNX_NAME), ("int8", ONNX_INT8_NAME)):
        path = onnx_dir / name
        if path.is_file():
            file = f"{ONNX_DIR}/{name}"
            forms.append((f"pruned ONNX {precision}", "onnxruntime", precision, OnnxRuntimeModel(path), file, None))
    models = {f[0]: f[3] for f in forms}
    try:
        timed = time_forms(models, pruned, batch_sizes=batch_sizes, seq_len=seq_len, repeats=repeats, warmup=warmup)
        metrics = {}
        for name, model in models.items() if eval_fn is not None else ():
            value = eval_fn(model)
            value = value if isinstance(value, Mapping) else {"eval": value}
            metrics[name] = {k: float(v) for k, v in value.items()}
            logger.info("%s: %s %s.", name, metric_name, metrics[name])
    finally:
        if dense_model is not None:
            dense.train(was_training)
    info = read_export_info(onnx_dir)
    return {
        "format_version": INFO_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "seq_len": seq_len,
        "batch_sizes": [int(b) for b in batch_sizes],
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median",
        "order": "interleaved",
        "num_threads": torch.get_num_threads(),
        "reference": forms[0][0],
        "metric_name": metric_name,
        "onnx": {k: info.get(k) for k in ("exporter", "opset", "int8", "versions")},
        "forms": [
            {
                "name": name,
                "runtime": runtime,
                "precision": precision,
                "file": file,
                "file_bytes": size if size is not None else _onnx_bytes(onnx_dir / Path(file).name),
                "latency": timed[name],
                "metrics": metrics.get(name, {}),
            }
            for name, runtime, precision, _, file, size in forms
        ],
    }


def speedups(deployment: Mapping) -> dict[str, dict[str, float]]:
    """`{form: {batch size: speedup against the reference form}}` of a deployment section."""
    return {
        f["name"]: {str(b["batch_size"]): round(b["speedup"], 3) for b in f["latency"]}
        for f in deployment.get("forms", [])
    }


def write_deployment(export_dir: str | os.PathLike, deployment: Mapping) -> dict:
    """Adds a deployment section to an export's `pruning_report.json` (written atomically) and regenerates its model
    card (`README.md`, when the export has one) with the table of deployed forms.

    Args:
        export_dir: the export folder.
        deployment: the dict from [`deployment_rows`].

    Returns:
        The report as written.
    """
    folder = check_export(export_dir)
    path = folder / REPORT_NAME
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format_version": REPORT_VERSION}
    report["deployment"] = copy.deepcopy(dict(deployment))
    write_json_atomic(path, report)
    card_path = folder / CARD_NAME
    if card_path.is_file():
        figure = FIGURE_NAME if (folder / FIGURE_NAME).is_file() else None
        card = cards.make_model_card(report, AutoConfig.from_pretrained(folder), figure_name=figure)
        tmp = temporary_path(card_path)
        try:
            card.save(tmp)
            os.replace(tmp, card_path)
        finally:
            tmp.unlink(missing_ok=True)
    return report


def cli_onnx(args) -> int:
    """`hf-prune onnx DIR [--int8] [--overwrite] [--opset N]`; DIR may also be an `.onnx` file to quantize."""
    path = Path(args.dir)
    if path.is_file() and path.suffix == ".onnx":
        if not args.int8:
            raise ValueError(f"{path} is an ONNX file: the only thing to do with it is to quantize it; add --int8.")
        print(f"Wrote {quantize_onnx(path, overwrite=args.overwrite)}")
        return 0
    target = export_onnx(path, int8=args.int8, opset=args.opset, overwrite=args.overwrite)
    info = read_export_info(target)
    files = ", ".join(sorted(info.get("files", {}).values()))
    print(f"Exported {path} to {target}: {files} (opset {info.get('opset')}, {info.get('exporter')}).")
    return 0
