"""Deployment on CPU: every deployed form of an export measured side by side, and the `hf-prune onnx` command.

The forms are dense PyTorch fp32 (the model pruning started from), pruned PyTorch fp32, pruned ONNX fp32 and pruned
ONNX int8 (ONNX Runtime's dynamic quantization; see `hf_prune.export.onnx` for the files and the choices behind
them). One helper per job, shared by the recipe's `onnx` stage and `hf-prune onnx`:

- `deployment_rows` times the forms interleaved in one process (ONNX Runtime with as many threads as PyTorch), with
  their file sizes, their metric on evaluation data (`hf_prune.pipeline.evaluation.split_evaluator` measures the
  task metric) and the CPU they ran on (`hf_prune.export.runtime.cpu_info`); it logs which form is fastest on this
  machine, and a warning where int8 is not faster than fp32 here.
- `write_deployment` adds them to the export's `pruning_report.json` and regenerates its model card, both written
  together (`hf_prune.utils.write_files_together`).
- `cli_onnx` exports, measures and writes.
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

from ..utils import file_lock, recover_files_together, recover_interrupted, write_files_together
from . import card as cards
from .files import (
    CARD_NAME,
    FIGURE_NAME,
    ONNX_DIR,
    ONNX_INT8_NAME,
    ONNX_NAME,
    REPORT_NAME,
    WEIGHTS_NAME,
    portable_paths,
    resolved_paths,
)
from .onnx import INFO_VERSION, check_export, check_onnx_source, export_onnx, read_export_info
from .persistence import load_pruned, load_teacher
from .quantize import quantize_onnx
from .report import REPORT_VERSION, on_cpu, time_forms, weights_bytes
from .report_format import cpu_text, format_deployment, load_report
from .runtime import OnnxRuntimeModel, cpu_info, require_onnx

logger = logging.get_logger(__name__)

__all__ = ["deployment_rows", "write_deployment", "speedups", "fastest_forms", "int8_gains", "cli_onnx"]

INT8_FORM, FP32_FORMS = "pruned ONNX int8", ("pruned PyTorch fp32", "pruned ONNX fp32")
DEFAULT_SEQ_LEN = 128  # tokens per sequence `hf-prune onnx` times, as the onnx stage does


# ----------------------------------------------------------------------------------------------------- measuring
def _onnx_bytes(path: Path) -> int:
    """Bytes of an ONNX file and of the external data files stored beside it (models over 2 GB)."""
    onnx, _ = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _latency_ms(deployment: Mapping) -> dict[str, dict[str, float]]:
    """`{batch size: {form: ms}}` of a deployment section."""
    table: dict[str, dict[str, float]] = {}
    for form in deployment.get("forms") or []:
        for b in form.get("latency") or []:
            table.setdefault(str(b["batch_size"]), {})[form["name"]] = b["ms"]
    return table


def fastest_forms(deployment: Mapping) -> dict[str, str]:
    """`{batch size: the name of the fastest form}` of a deployment section (the forms of the pruned model and the
    dense one alike)."""
    return {b: min(times, key=times.get) for b, times in _latency_ms(deployment).items() if times}


def int8_gains(deployment: Mapping) -> dict[str, float]:
    """`{batch size: ms of the fastest pruned fp32 form / ms of pruned ONNX int8}` (above 1: int8 is faster here),
    for the batch sizes at which both were timed."""
    gains = {}
    for b, times in _latency_ms(deployment).items():
        fp32 = [times[name] for name in FP32_FORMS if name in times]
        if INT8_FORM in times and fp32 and times[INT8_FORM] > 0:
            gains[b] = min(fp32) / times[INT8_FORM]
    return gains


def _advise(deployment: Mapping) -> None:
    """Logs which form is fastest on this machine, and a warning at each batch size where int8 is not faster than
    the fastest pruned fp32 form."""
    cpu = cpu_text(deployment.get("cpu") or {})
    times = _latency_ms(deployment)
    fastest = fastest_forms(deployment)
    logger.info(
        "Fastest form on this machine (%s): %s.",
        cpu,
        "; ".join(f"batch {b}: {name} ({times[b][name]:.2f} ms)" for b, name in fastest.items()),
    )
    for b, gain in int8_gains(deployment).items():
        if gain <= 1.0:
            fp32 = min((name for name in FP32_FORMS if name in times[b]), key=times[b].get)
            logger.warning(
                "On this machine (%s) %s is not faster than %s at batch %s (%.2f ms against %.2f ms): deploy %s here, "
                "or time int8 on the serving CPU (ONNX Runtime's int8 kernels need AVX-512 VNNI, AVX-VNNI or AMX "
                "to run fast).",
                cpu, INT8_FORM, fp32, b, times[b][INT8_FORM], times[b][fp32], fp32,
            )  # fmt: skip


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
    first form. File sizes are those of the files a deployment ships. Logs which form is fastest on this machine,
    and a warning where int8 is not faster than fp32 here.

    Args:
        dense_model: the dense model the export was pruned from (e.g. the teacher), or None.
        export_dir: the export folder, with `onnx/` written by [`export_onnx`] from the weights it holds now.
        eval_fn: called with each form (a PyTorch model or an [`OnnxRuntimeModel`]), returns `{split: metric}`
            (e.g. `hf_prune.pipeline.evaluation.split_evaluator`); None leaves the metrics out.
        batch_sizes / seq_len / repeats / warmup: what to time (median of `repeats` runs after `warmup`).
        dense_path: the dense model's folder: its file size is then that of its safetensors.
        metric_name: what `eval_fn` measures.

    Returns:
        The `deployment` section of `pruning_report.json` (see [`write_deployment`]): the forms (each with its file,
        size, latency, metrics and `cpu`), `cpu` (see [`hf_prune.export.runtime.cpu_info`]), `fastest` (see
        [`fastest_forms`]) and `int8_gain` (see [`int8_gains`]).
    """
    folder = check_export(export_dir)
    onnx_dir = folder / ONNX_DIR
    if not (onnx_dir / ONNX_NAME).is_file():
        raise FileNotFoundError(
            f"{onnx_dir / ONNX_NAME} is missing: export the folder first with hf_prune.export_onnx({str(folder)!r}) "
            "or `hf-prune onnx DIR --int8`."
        )
    info = read_export_info(onnx_dir)
    if not check_onnx_source(folder, info):  # raises when the ONNX files were exported from other weights
        logger.info("%s records no digest of its weights, so it is measured unchecked.", onnx_dir / ONNX_NAME)
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
    cpu = cpu_info()
    deployment = {
        "format_version": INFO_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu": cpu,
        "seq_len": seq_len,
        "batch_sizes": [int(b) for b in batch_sizes],
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median",
        "order": "interleaved",
        "num_threads": torch.get_num_threads(),
        "reference": forms[0][0],
        "metric_name": metric_name,
        "onnx": {k: info.get(k) for k in ("exporter", "opset", "int8", "versions", "source")},
        "forms": [
            {
                "name": name,
                "runtime": runtime,
                "precision": precision,
                "file": file,
                "file_bytes": size if size is not None else _onnx_bytes(onnx_dir / Path(file).name),
                "latency": timed[name],
                "metrics": metrics.get(name, {}),
                "cpu": copy.deepcopy(cpu),
            }
            for name, runtime, precision, _, file, size in forms
        ],
    }
    deployment["fastest"] = fastest_forms(deployment)
    deployment["int8_gain"] = int8_gains(deployment)
    _advise(deployment)
    return deployment


def speedups(deployment: Mapping) -> dict[str, dict[str, float]]:
    """`{form: {batch size: speedup against the reference form}}` of a deployment section."""
    return {
        f["name"]: {str(b["batch_size"]): round(b["speedup"], 3) for b in f["latency"]}
        for f in deployment.get("forms", [])
    }


def write_deployment(export_dir: str | os.PathLike, deployment: Mapping) -> dict:
    """Adds a deployment section to an export's `pruning_report.json` and regenerates its model card (`README.md`,
    when the export has one) with the table of deployed forms.

    Both files are written together: each to a temporary file first, then renamed, the card first, so a reader never
    sees the new report beside the old card; a process killed between the renames is completed by the next call
    (see [`hf_prune.utils.write_files_together`]). Concurrent calls on one export take turns (`file_lock`).

    Args:
        export_dir: the export folder.
        deployment: the dict from [`deployment_rows`].

    Returns:
        The report as written.
    """
    folder = check_export(export_dir)
    path, card_path = folder / REPORT_NAME, folder / CARD_NAME
    with file_lock(path):
        recover_files_together(folder)  # an earlier call killed midway: its renames are completed first
        recover_interrupted(path)
        recover_interrupted(card_path)
        report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format_version": REPORT_VERSION}
        report = resolved_paths(report, folder)
        report["deployment"] = copy.deepcopy(dict(deployment))
        text = json.dumps(portable_paths(report, folder), indent=2) + "\n"
        files = {}
        if card_path.is_file():
            figure = FIGURE_NAME if (folder / FIGURE_NAME).is_file() else None
            card = cards.make_model_card(report, AutoConfig.from_pretrained(folder), figure_name=figure)
            files[card_path] = str(card)  # what ModelCard.save writes
        files[path] = text
        write_files_together(files)
    return report


# ----------------------------------------------------------------------------------------------------- CLI
def _dense_model(args, folder: Path) -> tuple[nn.Module | None, Path | None]:
    """The dense model to time beside the export: `--dense`, else the report's `dense_path` when it is a folder."""
    name = getattr(args, "dense", None)
    if name is None:
        report = folder / REPORT_NAME
        recorded = load_report(folder).get("dense_path") if report.is_file() else None
        if not recorded or not Path(recorded).is_dir():
            return None, None
        name = recorded
        logger.info("Timing the dense model recorded in %s beside the export: %s.", REPORT_NAME, name)
    path = Path(os.path.expanduser(name))
    return load_teacher(name), (path if path.is_dir() else None)


def cli_onnx(args, eval_fn: Callable | None = None, metric_name: str | None = None) -> int:
    """`hf-prune onnx DIR [--int8] [--overwrite] [--opset N] [...]`; DIR may also be an `.onnx` file to quantize.

    After the export, every deployed form is measured (see [`deployment_rows`]; unless `--no-measure`) and written
    into the export's report and card ([`write_deployment`]).

    Args:
        args: the parsed arguments of `hf-prune onnx`.
        eval_fn: scores each form on the validation files (`--validation-file`), or None.
        metric_name: what `eval_fn` measures.
    """
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
    if getattr(args, "no_measure", False):
        return 0
    seq_len = getattr(args, "seq_len", None)
    if seq_len is None:  # 128 tokens, or as many as the model takes (roberta offsets its positions by 2)
        context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or DEFAULT_SEQ_LEN + 2
        seq_len = min(DEFAULT_SEQ_LEN, context - 2)
    dense, dense_path = _dense_model(args, path)
    deployment = deployment_rows(
        dense, path, eval_fn, batch_sizes=tuple(getattr(args, "batch_sizes", None) or (1, 32)), seq_len=seq_len,
        repeats=getattr(args, "repeats", 10), dense_path=dense_path, metric_name=metric_name or "accuracy",
    )  # fmt: skip
    write_deployment(path, deployment)
    print("\n".join(format_deployment(deployment, metric_name)))
    card = " and its model card" if (path / CARD_NAME).is_file() else ""
    print(f"Wrote the deployed forms into {path / REPORT_NAME}{card}.")
    return 0
