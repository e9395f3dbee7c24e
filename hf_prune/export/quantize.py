"""Dynamic int8 quantization of ONNX files with ONNX Runtime: `quantize_onnx` (one file, written atomically),
`quantize_file` (the quantization itself, used by `hf_prune.export.onnx.export_onnx` inside its temporary folder) and
`quantized_ops`, which tells a quantized file from a float one.

The choice, measured on all-MiniLM-L6-v2 pruned to 2x with onnxruntime 1.32 on CPU: `quantize_dynamic` with int8
weights and one scale per output channel (closer to fp32 accuracy than one per tensor at the same speed) and uint8
activations quantized per batch; 7-bit weights where the CPU has no int8 dot products (see
`hf_prune.export.runtime.cpu_has_vnni`).
"""

from __future__ import annotations

import logging as pylogging
import os
from pathlib import Path

from transformers.utils import logging

from ..utils import recover_interrupted, temporary_path
from .files import ONNX_INT8_NAME, ONNX_NAME
from .runtime import cpu_has_vnni, require_onnx

logger = logging.get_logger(__name__)

__all__ = ["quantize_onnx", "quantize_file", "quantize_info", "quantized_ops", "QUANTIZED_OPS", "WEIGHT_TYPES"]

WEIGHT_TYPES = ("qint8", "quint8")
# Operators that only a quantized model holds (dynamic, static QDQ and QOperator formats alike).
QUANTIZED_OPS = frozenset(
    {
        "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
        "QLinearConv", "ConvInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
        "QEmbedLayerNormalization", "DynamicQuantizeLSTM", "MatMulNBits",
    }
)  # fmt: skip


def quantized_ops(path: str | os.PathLike) -> list[str]:
    """The quantized operators an ONNX file holds (empty for a float model)."""
    onnx, _ = require_onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises its own DecodeError types
        raise ValueError(f"{path} is not a readable ONNX file ({err}).") from err
    return sorted({node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS})


class _DropRecords(pylogging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _empty_weight_nodes(path: Path) -> list[str]:
    """Nodes reading an empty weight: the projections of a layer that kept no head or no FFN neuron.

    Dynamic quantization of an empty activation (the input of such a layer's output projection) gives a scale that
    corrupts everything after it, and per-channel quantization of an empty weight fails; these nodes do no work, so
    they stay in fp32.
    """
    onnx, _ = require_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph
    empty = {t.name for t in graph.initializer if 0 in t.dims}
    return [node.name for node in graph.node if empty.intersection(node.input)]


def quantize_file(source: Path, output: Path, weight_type: str = "qint8") -> dict:
    """Quantizes the fp32 ONNX file `source` into `output` (no checks of `output`, not atomic: see
    [`quantize_onnx`]) and returns the `int8` entry of `export_info.json` that describes it."""
    require_onnx()
    reduce_range = not cpu_has_vnni()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type={weight_type!r} must be one of {', '.join(WEIGHT_TYPES)}.")
    found = quantized_ops(source)
    if found:
        raise ValueError(
            f"{source} is already quantized (it holds {', '.join(found)}); quantizing it again would lose accuracy "
            f"for nothing. Quantize the fp32 model ({ONNX_NAME}) instead."
        )
    # on failure the quantizer leaves its shape-inferred copy beside the source
    inferred = source.with_name(f"{source.stem}-inferred{source.suffix}")
    existed = inferred.exists()
    # The quantizer advises its pre-processing on every call; that pre-processing (symbolic shape inference) fails on
    # the graphs of transformers encoders, so the advice is dropped rather than repeated to the user. It logs through
    # the root logger, whose first use would also install a handler for the whole process: a NullHandler prevents it.
    root, advice = pylogging.getLogger(), _DropRecords("Please consider to run pre-processing")
    guard = None if root.handlers else pylogging.NullHandler()
    root.addFilter(advice)
    if guard is not None:
        root.addHandler(guard)
    try:
        qtype = QuantType.QInt8 if weight_type == "qint8" else QuantType.QUInt8
        # one scale per output channel: closer to fp32 accuracy than one per tensor, at the same speed (measured)
        quantize_dynamic(
            str(source),
            str(output),
            weight_type=qtype,
            per_channel=True,
            reduce_range=reduce_range,
            nodes_to_exclude=_empty_weight_nodes(source),
        )
    finally:
        root.removeFilter(advice)
        if guard is not None:
            root.removeHandler(guard)
        if not existed:
            inferred.unlink(missing_ok=True)
    return quantize_info(weight_type, reduce_range)


def quantize_onnx(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    weight_type: str = "qint8",
    overwrite: bool = False,
) -> Path:
    """Dynamic int8 quantization of an fp32 ONNX file with ONNX Runtime, written atomically.

    Args:
        model_path: the fp32 `.onnx` file (e.g. `export/onnx/model.onnx`).
        output_path: where to write (default: `<name>_int8.onnx` beside `model_path`, e.g. `model_int8.onnx`).
        weight_type: `"qint8"` (default; fastest where the CPU has VNNI) or `"quint8"`.
        overwrite: replace an existing output file.

    Returns:
        The quantized file.
    """
    require_onnx()
    source = Path(model_path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a file. Pass an ONNX file, e.g. the {ONNX_NAME} of export_onnx.")
    found = quantized_ops(source)
    if found:
        raise ValueError(
            f"{source} is already quantized (it holds {', '.join(found)}); quantizing it again would lose accuracy "
            f"for nothing. Quantize the fp32 model ({ONNX_NAME}) instead."
        )
    output = Path(output_path) if output_path is not None else source.with_name(f"{source.stem}_int8{source.suffix}")
    if output.absolute() == source.absolute():
        raise ValueError(f"output_path is the model itself ({source}); write the int8 model to another file.")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists. Pass overwrite=True (--overwrite) to quantize again.")
    recover_interrupted(output)  # a quantization killed midway leaves its temporary file: removed here
    tmp = temporary_path(output, output.suffix)  # the suffix kept last: the ONNX writer reads the format from it
    try:
        quantize_file(source, tmp, weight_type)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Quantized %s to int8: %s.", source, output)
    return output


def quantize_info(weight_type: str, reduce_range: bool) -> dict:
    """How `model_int8.onnx` was made: the `int8` entry of `export_info.json`."""
    return {
        "file": ONNX_INT8_NAME,
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": weight_type,
        "activations": "uint8, quantized per tensor at run time",
        "per_channel": True,
        "reduce_range": reduce_range,
        "source": ONNX_NAME,
    }
