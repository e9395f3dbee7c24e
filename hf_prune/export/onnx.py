"""ONNX files of an export: the export of a (pruned) model with dynamic batch and sequence axes, and its int8 form.

`export_onnx(folder)` writes `folder/onnx/model.onnx` (and `model_int8.onnx` with `int8=True`) with
`folder/onnx/export_info.json` (exporter, opset, inputs, versions, the digest of the weights it was exported from,
and the check of ONNX Runtime against PyTorch), atomically. `hf_prune.export.quantize` quantizes, `hf_prune.export
.runtime` runs the files (`OnnxRuntimeModel`) and `hf_prune.export.deploy` measures them.

Choices, measured on all-MiniLM-L6-v2 pruned to 2x with torch 2.13, transformers 5 and onnxruntime 1.32 on CPU:

- Exporter: the TorchScript tracer (`torch.onnx.export(..., dynamo=False)`). With dynamic batch and sequence axes
  it gives the same logits as the dynamo exporter, which needs `onnxscript` besides and exports about ten times
  slower. Export runs with eager attention: its graph runs a little faster in ONNX Runtime than the SDPA one.
- int8: dynamic quantization by ONNX Runtime (see `hf_prune.export.quantize`). The default `weight_type="qint8"`
  runs faster than `"quint8"` where the CPU has VNNI. torchao's `quantize_` (int8 dynamic activations and weights)
  ran slower than ONNX Runtime int8 at batch 1 and 32, and `torch.ao.quantization.quantize_dynamic` is deprecated,
  so there is no PyTorch int8 form.
- Staleness: `export_info.json` records a SHA-256 digest of the export's `config.json` and weights. int8 is added
  to an existing `onnx/` folder only when `model.onnx` was exported from the weights the folder holds now, and the
  deployed forms are measured only then.

onnx and onnxruntime come with the `[onnx]` extra: this module imports without them, and what needs them raises an
ImportError naming `pip install "hf-prune[onnx]"`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.utils import logging

from ..models.auto import get_adapter
from ..models.costs import dummy_inputs
from ..utils import recover_interrupted, swap_into_place, temporary_folder, write_json_atomic
from . import quantize as quantization
from .files import (
    CONFIG_NAME,
    ONNX_DIR,
    ONNX_INFO_NAME,
    ONNX_INT8_NAME,
    ONNX_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from .persistence import load_pruned
from .quantize import quantize_onnx, quantized_ops  # noqa: F401  (their 0.2 home; the public API imports them here)
from .runtime import INSTALL_HINT, OnnxRuntimeModel, cpu_has_vnni, require_onnx  # noqa: F401  (as above)

logger = logging.get_logger(__name__)

__all__ = [
    "export_onnx",
    "read_export_info",
    "check_export",
    "export_digest",
    "check_onnx_source",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
]

DEFAULT_OPSET = 17  # the first opset with a LayerNormalization op
MIN_OPSET = 11  # dynamic Slice (the sequence axis) and CumSum (roberta's position ids) need opset 11
MAX_OPSET = 20  # the newest opset the TorchScript exporter writes
EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"
INFO_VERSION = 1
CHECK_TOLERANCE = 1e-3  # export-time check of ONNX Runtime against PyTorch (float reordering stays far below it)


def check_export(path: str | os.PathLike) -> Path:
    """The export folder, or an error naming what makes it one."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder. Pass an export folder written by hf_prune.save_pruned (or by the export "
            "stage of `hf-prune run`)."
        )
    missing = [] if (folder / CONFIG_NAME).is_file() else [CONFIG_NAME]
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()):
        missing.append(WEIGHTS_NAME)
    if missing:
        raise ValueError(
            f"{folder} is not a model export: it has no {' and no '.join(missing)}. Make one with "
            "hf_prune.save_pruned(model, folder, tokenizer) or with the export stage of `hf-prune run`, then export "
            "that folder to ONNX."
        )
    return folder


def read_export_info(onnx_dir: str | os.PathLike) -> dict:
    """The `export_info.json` of an `onnx/` folder (an empty dict when there is none)."""
    path = Path(onnx_dir) / ONNX_INFO_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------------- staleness
def _source_files(folder: Path) -> list[str]:
    """The files whose content the ONNX graph is made of: the config and every weights file (shards included)."""
    index = folder / WEIGHTS_INDEX_NAME
    if not (folder / WEIGHTS_NAME).is_file() and index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [CONFIG_NAME, WEIGHTS_INDEX_NAME, *shards]
    return [CONFIG_NAME, WEIGHTS_NAME]


def export_digest(export_dir: str | os.PathLike) -> dict:
    """`{"files": [...], "sha256": ...}`: a SHA-256 digest of an export's `config.json` and weights files (names and
    contents), as `export_info.json` records it for the weights `model.onnx` was exported from."""
    folder = check_export(export_dir)
    files = _source_files(folder)
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return {"files": files, "sha256": digest.hexdigest()}


def check_onnx_source(export_dir: str | os.PathLike, info: dict | None = None) -> bool:
    """Raises when the `onnx/` folder of an export was exported from other weights than the folder holds now.

    Args:
        export_dir: the export folder.
        info: its `onnx/export_info.json` (read when not given).

    Returns:
        True when the recorded digest matches; False when the folder records none (written before digests were
        recorded), so it cannot be checked.
    """
    folder = check_export(export_dir)
    info = read_export_info(folder / ONNX_DIR) if info is None else info
    recorded = (info.get("source") or {}).get("sha256")
    if recorded is None:
        return False
    if export_digest(folder)["sha256"] != recorded:
        raise ValueError(
            f"{folder / ONNX_DIR / ONNX_NAME} was exported from other weights than {folder} holds now (its "
            f"{ONNX_INFO_NAME} records another digest of {', '.join(info['source'].get('files', []))}). Export it "
            f"again from the current weights: hf_prune.export_onnx({str(folder)!r}, int8=..., overwrite=True), or "
            "`hf-prune onnx DIR [--int8] --overwrite`."
        )
    return True


# ----------------------------------------------------------------------------------------------------- export
def _input_names(config) -> list[str]:
    return get_adapter(config).model_input_names(config)


def _inputs(model, names: list[str], batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens with padding at the end of the first row, so that the traced graph keeps the mask path; pairs
    of segments (`token_type_ids` 0, then 1) where the model takes token types, so that both segments' embeddings
    are traced and checked."""
    max_len = getattr(model.config, "max_position_embeddings", seq_len + 2) - 2  # roberta offsets its positions
    inputs = dummy_inputs(model, batch_size, min(seq_len, max_len), seed)
    if "attention_mask" in inputs:  # images have none (their adapter's inputs: pixel_values)
        inputs["attention_mask"][0, -2:] = 0
    if "token_type_ids" in names:
        types = torch.zeros_like(inputs["input_ids"])
        if getattr(model.config, "type_vocab_size", 2) > 1:
            types[:, types.shape[1] // 2 :] = 1  # the second segment of every row
        inputs["token_type_ids"] = types
    return {name: inputs[name] for name in names}


class _Traced(nn.Module):
    """The model with positional tensor inputs and one tensor out (the logits, or the last hidden state)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)))
        return out["logits"] if "logits" in out else out[0]


def _check_against_torch(model, path: Path, names: list[str]) -> dict:
    """Runs the ONNX file on a batch of another size and length than the traced one and compares with PyTorch."""
    inputs = _inputs(model, names, 3, 11, seed=1)
    with torch.inference_mode():
        expected = _Traced(model, names)(*inputs.values())
    got = OnnxRuntimeModel(path)(**inputs)
    got = got.logits if "logits" in got else got[0]
    diff = float((got - expected).abs().max())
    first = next(iter(inputs.values()))
    shape = f"3 x {first.shape[1]} tokens" if first.dim() == 2 else "x".join(str(n) for n in first.shape)
    if not torch.allclose(got, expected, atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE):
        raise RuntimeError(
            f"The ONNX export disagrees with PyTorch (largest difference {diff:.3g}) on a batch of {shape}; nothing "
            "was written. Try another --opset, or report the model type and versions."
        )
    checked = {"batch_size": 3}
    if first.dim() == 2:  # token inputs: a sequence axis (images have a fixed size)
        checked["seq_len"] = int(first.shape[1])
    checked["max_abs_diff"] = diff
    if "token_type_ids" in inputs:
        checked["token_type_ids"] = sorted(int(t) for t in inputs["token_type_ids"].unique())
    return checked


def _export_fp32(folder: Path, path: Path, opset: int, check: bool) -> dict:
    require_onnx()
    source = export_digest(folder)  # before loading: the digest describes the weights the graph is made of
    model = load_pruned(folder, attn_implementation="eager").eval()
    names = _input_names(model.config)
    sample = _inputs(model, names, 2, 8, seed=0)
    traced = _Traced(model, names).eval()  # export restores the wrapper's mode: a training one would enable dropout
    with torch.inference_mode():
        result = model(**sample)
    output = "logits" if "logits" in result else "last_hidden_state"
    out = result[output] if output == "logits" else result[0]
    # token inputs (batch, sequence) are dynamic in both axes; images only in the batch (their size is fixed)
    axes = {name: {0: "batch", 1: "sequence"} if sample[name].dim() == 2 else {0: "batch"} for name in names}
    axes[output] = {0: "batch", 1: "sequence"} if out.dim() >= 3 else {0: "batch"}
    with warnings.catch_warnings():
        # the exporter's deprecation notice, and tracer notes on shape checks that are constant for an encoder
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced, tuple(sample.values()), str(path), input_names=names, output_names=[output],
            dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    onnx, ort = require_onnx()
    info = {
        "format_version": INFO_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": EXPORTER,
        "opset": opset,
        "attn_implementation": "eager",
        "model_type": model.config.model_type,
        "architecture": type(model).__name__.removeprefix("Pruned"),
        "inputs": names,
        "outputs": [output],
        "dynamic_axes": axes,
        "files": {"fp32": ONNX_NAME},
        "source": source,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    if check:
        info["check"] = _check_against_torch(model, path, names)
    return info


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a second name of `source` (no copy of a large model), or a copy where links are not possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _int8_done(target: Path, info: dict) -> bool:
    """Whether `onnx/` holds a complete int8 model: the file, and the info that records it. A file the info does not
    record is what an older, interrupted addition of int8 left; it is quantized again."""
    q8 = target / ONNX_INT8_NAME
    recorded = (info.get("files") or {}).get("int8") == ONNX_INT8_NAME and "int8" in info
    if q8.exists() and not recorded:
        logger.warning("%s is not recorded in %s (an interrupted quantization): quantizing again.", q8, ONNX_INFO_NAME)
    return q8.exists() and recorded


def _add_int8(folder: Path, target: Path, weight_type: str) -> None:
    """Adds `model_int8.onnx` to an existing `onnx/` folder, as a new folder swapped in whole: its other files are
    linked into a temporary folder, the int8 model and the updated info are written there, then the folders are
    exchanged. A process killed at any point leaves the old folder or the new one (and a temporary folder that the
    next call removes)."""
    info = read_export_info(target)
    if not check_onnx_source(folder, info):
        raise ValueError(
            f"{target / ONNX_NAME} records no digest of the weights it was exported from (written by an older "
            f"hf_prune, or not by export_onnx), so it may not match {folder} now. Export it again: "
            f"hf_prune.export_onnx({str(folder)!r}, int8=True, overwrite=True), or `hf-prune onnx DIR --int8 "
            "--overwrite`."
        )
    tmp = temporary_folder(target)
    try:
        for path in sorted(target.iterdir()):
            if path.is_file() and path.name not in (ONNX_INT8_NAME, ONNX_INFO_NAME) and not path.name.startswith("."):
                _link_or_copy(path, tmp / path.name)
        info["int8"] = quantization.quantize_file(tmp / ONNX_NAME, tmp / ONNX_INT8_NAME, weight_type)
        info.setdefault("files", {})["int8"] = ONNX_INT8_NAME
        write_json_atomic(tmp / ONNX_INFO_NAME, info)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Quantized %s to int8: %s.", target / ONNX_NAME, target / ONNX_INT8_NAME)


def export_onnx(
    export_dir: str | os.PathLike,
    int8: bool = False,
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    weight_type: str = "qint8",
    check: bool = True,
) -> Path:
    """Exports a model export (pruned or dense) to ONNX, in its `onnx/` subfolder, atomically.

    The per-layer head counts and FFN widths (also zero) are rebuilt by `load_pruned`; the graph takes `input_ids`,
    `attention_mask` (and `token_type_ids` for bert and electra) with dynamic batch and sequence axes, and returns
    `logits` (or `last_hidden_state` for a base model). The logits of ONNX Runtime are checked against PyTorch on a
    batch of another shape, with both token types where the model takes them, before anything is written.

    Args:
        export_dir: a folder written by `save_pruned` (`config.json` and `model.safetensors`).
        int8: also write `model_int8.onnx` (see [`hf_prune.export.quantize.quantize_onnx`]). When `onnx/` holds
            `model.onnx` only, that file is quantized and nothing else changes; it must have been exported from the
            weights the folder holds now (`export_info.json` records their digest), else this raises, naming
            `overwrite=True`.
        opset: ONNX opset, from `MIN_OPSET` to `MAX_OPSET`.
        overwrite: replace an existing non-empty `onnx/` folder (the old one is removed only once the new one is
            complete).
        weight_type: int8 weight type, `"qint8"` or `"quint8"`.
        check: compare ONNX Runtime with PyTorch after the export (a disagreement raises and writes nothing).

    Returns:
        The `onnx/` folder, holding `model.onnx`, `export_info.json` and (with `int8`) `model_int8.onnx`.
    """
    require_onnx()
    folder = check_export(export_dir)
    target = folder / ONNX_DIR
    recover_interrupted(target)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset={opset!r} must be an integer from {MIN_OPSET} to {MAX_OPSET}.")
    if weight_type not in quantization.WEIGHT_TYPES:
        raise ValueError(f"weight_type={weight_type!r} must be one of {', '.join(quantization.WEIGHT_TYPES)}.")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; move it away to export to ONNX there.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        if int8 and _int8_done(target, read_export_info(target)):
            raise FileExistsError(
                f"{target / ONNX_INT8_NAME} already exists, so {folder} is quantized already. Pass overwrite=True "
                "(--overwrite) to export and quantize it again."
            )
        if int8 and (target / ONNX_NAME).is_file():
            _add_int8(folder, target, weight_type)
            return target
        raise FileExistsError(
            f"{target} already exists and is not empty. Pass overwrite=True (--overwrite) to replace it (the old "
            "folder is removed only once the new export is complete)."
        )
    tmp = temporary_folder(target)
    try:
        info = _export_fp32(folder, tmp / ONNX_NAME, opset, check)
        if int8:
            info["int8"] = quantization.quantize_file(tmp / ONNX_NAME, tmp / ONNX_INT8_NAME, weight_type)
            info["files"]["int8"] = ONNX_INT8_NAME
        write_json_atomic(tmp / ONNX_INFO_NAME, info)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %s to ONNX (opset %d): %s.", folder, opset, ", ".join(sorted(info["files"].values())))
    return target
