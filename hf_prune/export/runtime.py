"""Running the ONNX files of an export on this machine: `OnnxRuntimeModel` (an ONNX file called like a transformers
model), the check that onnx and onnxruntime are installed, and what the CPU offers the deployed forms
(`cpu_info`, `cpu_has_vnni`).

onnx and onnxruntime come with the `[onnx]` extra: this module imports without them, and what needs them raises an
ImportError naming `pip install "hf-prune[onnx]"`.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import logging

from ..models.heap import heap_regime

logger = logging.get_logger(__name__)

__all__ = ["OnnxRuntimeModel", "require_onnx", "INSTALL_HINT", "cpu_info", "cpu_has_vnni", "INT8_CPU_FLAGS"]

INSTALL_HINT = 'pip install "hf-prune[onnx]"'
# x86 flags that decide how fast int8 matmuls run: AVX-512, its VNNI dot products (and the AVX one), AMX tiles.
INT8_CPU_FLAGS = (
    "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx_vnni_int8"})
_AMX_FLAGS = frozenset({"amx_int8", "amx_tile"})
_X86 = ("x86_64", "amd64", "i386", "i686")


def require_onnx():
    """`(onnx, onnxruntime)`, or an ImportError that names the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"ONNX export and int8 quantization need the onnx and onnxruntime packages ({err}). Install them with: "
            f"{INSTALL_HINT}"
        ) from err
    return onnx, onnxruntime


class OnnxRuntimeModel:
    """An ONNX file run by ONNX Runtime on the CPU, called like a transformers model: `model(**batch).logits`.

    Args:
        path: the `.onnx` file.
        num_threads: intra-op threads (default: `torch.get_num_threads()`, so both runtimes get the same cores).
        spin: let idle ONNX Runtime threads spin (its default). Off here: spinning threads keep their cores busy
            while PyTorch runs next in the same process, which would slow the forms timed after them.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, spin: bool = False):
        _, ort = require_onnx()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def eval(self) -> OnnxRuntimeModel:
        return self

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None, **unused):
        """Runs one batch (torch tensors, numpy arrays or lists) of tokens, or of images (`pixel_values`); other
        keyword inputs (e.g. `labels`) are ignored."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        given = {k: torch.as_tensor(v).detach().to("cpu", torch.int64) for k, v in given.items() if v is not None}
        if pixel_values is not None:
            given["pixel_values"] = torch.as_tensor(pixel_values).detach().to("cpu", torch.float32)
        missing = [n for n in self.input_names if n not in given and (n == "pixel_values" or "input_ids" not in given)]
        if missing:
            raise ValueError(f"{self.path} takes {', '.join(self.input_names)}; {', '.join(missing)} not given.")
        types = given.get("token_type_ids")
        if "token_type_ids" not in self.input_names and types is not None and bool(types.any()):
            raise ValueError(f"{self.path} takes no token_type_ids, but non-zero ones were given.")
        defaults = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}
        feeds = {}
        for name in self.input_names:
            value = given[name] if name in given else defaults[name](given["input_ids"])
            feeds[name] = value.numpy()
        out = torch.from_numpy(self.session.run([self.output_name], feeds)[0])
        if self.output_name == "logits":
            return SequenceClassifierOutput(logits=out)
        return BaseModelOutput(last_hidden_state=out)


# ----------------------------------------------------------------------------------------------------- the CPU
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None  # not Linux


def _cpu_flags(text: str | None) -> set[str]:
    lines = (line.partition(":")[2] for line in (text or "").splitlines() if line.split(":")[0].strip() == "flags")
    return set(re.findall(r"[a-z0-9_]+", next(lines, "")))


def cpu_info() -> dict:
    """What this machine's CPU offers the deployed forms, recorded beside every measurement of them.

    Returns:
        `{"model", "machine", "logical_cpus", "threads", "avx512", "vnni", "amx", "flags", "heap"}`: the model name
        from `/proc/cpuinfo` (else `platform.processor()`), the architecture, the logical CPUs of the machine, the
        threads PyTorch (and ONNX Runtime beside it) runs on, whether it has AVX-512 (`avx512f`), int8 dot products
        (AVX-512 VNNI or AVX-VNNI) and AMX, and which of `INT8_CPU_FLAGS` it has. The three booleans are None where the
        flags cannot be read (not Linux, or not x86); `heap` says whether timings hold the C heap steady (`"steady"`,
        see `hf_prune.models.heap`) or take it as is.
    """
    text = _cpuinfo()
    names = [line.partition(":")[2].strip() for line in (text or "").splitlines() if line.startswith("model name")]
    x86 = platform.machine().lower() in _X86
    flags = _cpu_flags(text) if x86 else set()
    known = bool(flags)
    return {
        "model": (names[0] if names else None) or platform.processor() or platform.machine() or None,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "avx512": "avx512f" in flags if known else None,
        "vnni": bool(flags & _VNNI_FLAGS) if known else None,
        "amx": bool(flags & _AMX_FLAGS) if known else None,
        "flags": [f for f in INT8_CPU_FLAGS if f in flags],
        "heap": heap_regime(),
    }


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX), or is not an x86 CPU.

    Without them (x86 with AVX2 only), ONNX Runtime's u8 x s8 kernels add pairs of products in int16 and saturate, so
    8-bit weights with one scale per channel can move the logits of a small model by as much as their size (measured
    on an AVX2-only AMD EPYC: 20% of the largest logit, against 3% with 7-bit weights). Quantization there uses 7-bit
    weights (`reduce_range=True`), as ONNX Runtime advises for such machines.
    """
    if platform.machine().lower() not in _X86:
        return True
    text = _cpuinfo()
    if text is None:
        return True  # not Linux: no flags to read, keep the full 8 bits
    return bool(_cpu_flags(text) & (_VNNI_FLAGS | {"amx_int8"}))
