"""Measurements of a dense/pruned pair: parameters, file size, FLOPs, CPU latency, task metrics and stage times.

`build_report` returns a JSON-serialisable dict; `save_pruned(..., report=...)` writes it as `pruning_report.json`
next to the weights, and `hf-prune report DIR` prints it as a table (`report_format.py`). Every number is measured
here, on the two models given, in one process:

- `parameters`: encoder (the base model's encoder layers) and total, before (dense) and after (pruned).
- `file_size`: bytes of the weights each model writes (`method` says how they were measured).
- `flops`: `torch.utils.flop_counter.FlopCounterMode` over one forward pass of a batch of `seq_len` tokens, counted
  with the eager attention implementation (the fused CPU SDPA kernel is invisible to the counter).
- `latency`: CPU forward time per batch size, median of `repeats` runs, dense and pruned interleaved (d, p, d, p, ...)
  after `warmup` runs of each; `speedup` is dense / pruned. For a causal LM the forward pass is generation's prefill
  (logits of the last token only).
- `decode` (causal LMs; else None): tokens/s of greedy generation at batch 1 with the KV cache after `seq_len` tokens,
  dense and pruned timed interleaved; `speedup` is pruned / dense tokens/s.
- `lineage`: the dense model's `name_or_path` (`teacher`) and the base model its config records (`base_model`), for
  the model card (see `hf_prune.export.card.lineage`).
- `layers`: heads and FFN width per layer of the dense model, dense and kept (a layer removed whole keeps nothing and
  is marked `removed`); `metrics`, `stages`, `base_model` and `task` as given;
  `metric_note`, how the metrics were computed (e.g. how a causal LM's validation text was cut into blocks), as given.
- `deployment` (added by `hf_prune.export.deploy.write_deployment`): the deployed forms of the export (dense and pruned
  PyTorch fp32, pruned ONNX fp32 and int8), each with its file size, latency from `time_forms` (every form timed
  interleaved in one process) and task metrics.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.utils import logging

from ..models import structure
from ..models.auto import get_adapter, is_causal_lm
from ..models.costs import count_flops, dummy_inputs, prefill_inputs, time_decode, time_interleaved
from ..models.hidden import hidden_width
from ..models.surgery import KEPT_LAYERS_KEY, PRUNED_HEADS_KEY

logger = logging.get_logger(__name__)

__all__ = [
    "REPORT_VERSION",
    "build_report",
    "time_forms",
    "weights_bytes",
    "on_cpu",
]

REPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def _count(params: Iterable[nn.Parameter]) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _parameters(model: nn.Module) -> tuple[int, int]:
    """(encoder, total) parameter counts; shared (tied) parameters count once."""
    return _count(structure.get_layers(model).parameters()), _count(model.parameters())


def weights_bytes(model: nn.Module, path: str | Path | None) -> tuple[int, str]:
    """Bytes of the weights file of `path` if it holds one, else the bytes of the model's unique state-dict tensors."""
    if path is not None:
        files = sorted(Path(path).glob("model*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files), "safetensors_file"
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total, "state_dict_nbytes"


def on_cpu(model: nn.Module) -> nn.Module:
    """The model itself when it lives on the CPU, else a CPU copy (the caller's model stays where it is)."""
    devices = {p.device.type for p in model.parameters()}
    if devices <= {"cpu"}:
        return model
    logger.info("Measuring a CPU copy of a model that lives on %s.", ", ".join(sorted(devices)))
    return copy.deepcopy(model).to("cpu")


def _latency(dense: nn.Module, pruned: nn.Module, batch_size: int, seq_len: int, repeats: int, warmup: int) -> dict:
    """Median forward time (ms) of both models, timed interleaved in this process (see [`time_forms`])."""
    timed = time_forms(
        {"dense": dense, "pruned": pruned}, dense, batch_sizes=(batch_size,), seq_len=seq_len, repeats=repeats,
        warmup=warmup, prefill=True,
    )  # fmt: skip
    d, p = timed["dense"][0], timed["pruned"][0]
    return {
        "batch_size": batch_size,
        "dense_ms": d["ms"],
        "pruned_ms": p["ms"],
        "speedup": p["speedup"],
        "dense_runs_ms": d["runs_ms"],
        "pruned_runs_ms": p["runs_ms"],
    }


def time_forms(
    forms: Mapping[str, Callable],
    example_model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    prefill: bool = False,
) -> dict[str, list[dict]]:
    """Median CPU latency of several forms of one model (e.g. PyTorch and ONNX Runtime, fp32 and int8), all timed
    interleaved in this process on the same inputs; speedups are against the first form.

    Args:
        forms: `{name: callable}`, each called as `form(input_ids=..., attention_mask=...)` like a model.
        example_model: a PyTorch model of the same vocabulary, whose config and device give the inputs.
        batch_sizes: batch sizes to time.
        seq_len: tokens per sequence.
        repeats: timed runs per form and batch size (the median is reported).
        warmup: untimed runs per form and batch size before timing.
        prefill: time a causal LM's forward pass as generation's prefill (logits of the last token only, see
            [`hf_prune.models.costs.prefill_inputs`]); the forms must then be PyTorch models.

    Returns:
        `{name: [{"batch_size", "ms", "speedup", "runs_ms"}, ...]}`, one entry per batch size.
    """
    if not forms:
        raise ValueError("forms is empty; pass {name: model} for at least one form.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = list(forms)
    timed = {name: [] for name in names}
    for b in batch_sizes:
        inputs = (prefill_inputs if prefill else dummy_inputs)(example_model, int(b), seq_len)
        runs = time_interleaved([forms[n] for n in names], inputs, repeats, warmup)
        reference = statistics.median(runs[0])
        for name, times in zip(names, runs):
            ms = statistics.median(times)
            timed[name].append(
                {"batch_size": int(b), "ms": ms, "speedup": reference / ms if ms > 0 else math.inf, "runs_ms": times}
            )
    return timed


DECODE_TOKENS = 32  # generated tokens per decode timing


def _decode(dense: nn.Module, pruned: nn.Module, prompt_len: int, repeats: int) -> dict:
    """Decode tokens/s of both causal LMs at batch 1 with the KV cache, timed interleaved (see
    [`hf_prune.models.costs.time_decode`])."""
    dense_ms, pruned_ms = time_decode([dense, pruned], prompt_len, DECODE_TOKENS, repeats=repeats)
    d, p = statistics.median(dense_ms), statistics.median(pruned_ms)
    return {
        "batch_size": 1,
        "prompt_len": prompt_len,
        "new_tokens": DECODE_TOKENS,
        "dense_tokens_per_s": 1000.0 / d if d > 0 else math.inf,
        "pruned_tokens_per_s": 1000.0 / p if p > 0 else math.inf,
        "speedup": d / p if p > 0 else math.inf,
        "dense_runs_ms": dense_ms,
        "pruned_runs_ms": pruned_ms,
    }


def _layer_rows(dense: nn.Module, pruned: nn.Module) -> list[dict]:
    """One row per layer of the dense model; a layer depth pruning removed keeps nothing (`"removed": True`)."""
    heads_dense, heads_kept = structure.num_heads(dense), structure.num_heads(pruned)
    ffn_dense, ffn_kept = structure.ffn_size(dense), structure.ffn_size(pruned)
    removed = getattr(pruned.config, PRUNED_HEADS_KEY, None) or {}
    kept_layers = getattr(pruned.config, KEPT_LAYERS_KEY, None) or list(range(len(heads_kept)))
    position = {int(original): j for j, original in enumerate(kept_layers)}
    rows = []
    for i in range(len(heads_dense)):
        j = position.get(i)
        rows.append(
            {
                "layer": i,
                "heads_dense": heads_dense[i],
                "heads_kept": 0 if j is None else heads_kept[j],
                "heads_removed": list(range(heads_dense[i]))
                if j is None
                else sorted(int(h) for h in removed.get(str(j), [])),
                "ffn_dense": ffn_dense[i],
                "ffn_kept": 0 if j is None else ffn_kept[j],
                "removed": j is None,
            }
        )
    return rows


def _ratio(before: float, after: float) -> float | None:
    return before / after if after else None


def _check_metrics(metrics: Mapping | None) -> dict:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping) for v in metrics.values()):
        raise ValueError(
            'metrics must look like {"teacher": {split: value}, "pruned": {split: value}}, '
            f"got {type(metrics).__name__}: {metrics!r}."
        )
    unknown = set(metrics) - {"teacher", "pruned"}
    if unknown:
        raise ValueError(f'metrics keys must be "teacher" and/or "pruned", got unexpected {sorted(unknown)}.')
    return {who: {str(split): float(value) for split, value in values.items()} for who, values in metrics.items()}


def _check_all_metrics(all_metrics: Mapping | None) -> dict:
    if all_metrics is None:
        return {}
    _check_metrics({who: {} for who in all_metrics})
    return {
        who: {str(split): {str(m): float(v) for m, v in values.items()} for split, values in splits.items()}
        for who, splits in all_metrics.items()
    }


def _check_stages(stages: Sequence[Mapping] | None) -> list[dict]:
    checked = []
    for stage in stages or []:
        if not isinstance(stage, Mapping) or "name" not in stage or "wall_time_s" not in stage:
            raise ValueError(f'Each stage must be a dict with "name" and "wall_time_s", got {stage!r}.')
        checked.append({**stage, "name": str(stage["name"]), "wall_time_s": float(stage["wall_time_s"])})
    return checked


def _check_sample(sample: Mapping | None) -> dict | None:
    if sample is None:
        return None
    missing = [k for k in ("prompt", "teacher", "pruned") if not isinstance(sample.get(k), str)]
    if missing:
        raise ValueError(f"generation_sample needs the strings 'prompt', 'teacher' and 'pruned'; missing: {missing}.")
    return dict(sample)


def _local_path(path: str | Path | None) -> str | None:
    """A local folder or file as an absolute path (the folder the report is written into then makes it relative to
    itself: `hf_prune.export.files.portable_paths`); anything else (a Hub id) as given."""
    if path is None:
        return None
    local = os.path.expanduser(str(path))
    return os.path.abspath(local) if os.path.exists(local) else str(path)


def build_report(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    *,
    seq_len: int = 128,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 10,
    warmup: int = 2,
    base_model: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    metric_name: str = "accuracy",
    all_metrics: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    metric_note: str | None = None,
    stages: Sequence[Mapping] | None = None,
    dense_path: str | Path | None = None,
    pruned_path: str | Path | None = None,
    generation_sample: Mapping | None = None,
) -> dict:
    """Measures a dense model and its pruned version on CPU.

    Args:
        dense_model: the unpruned model (e.g. the fine-tuned teacher).
        pruned_model: the pruned model, same architecture.
        seq_len: tokens per sequence for FLOPs and latency.
        batch_sizes: batch sizes to time.
        repeats: timed runs per model and batch size (the median is reported).
        warmup: untimed runs per model and batch size before timing.
        base_model: Hub id or path of the model pruning started from (default: the dense model's `name_or_path`).
        task: the task or dataset, e.g. `"mnli"`.
        dataset: the Hub id of the task's dataset (e.g. `"nyu-mll/glue"`), for the model card.
        metrics: `{"teacher": {split: value}, "pruned": {split: value}}` task metrics, stored as given.
        metric_name: what the values of `metrics` are: the task's main metric (e.g. `"accuracy"`,
            `"matthews_correlation"`, `"f1"`, `"perplexity"`).
        all_metrics: every metric of the task, `{"teacher": {split: {metric: value}}, "pruned": {...}}`.
        metric_note: how the metrics were computed, shown under them by `hf-prune report` and the model card.
        stages: `[{"name": ..., "wall_time_s": ...}, ...]` of the run that produced the pruned model.
        dense_path / pruned_path: folders holding the models' saved weights; when given, file sizes are the sizes of
            their `model*.safetensors` files instead of the bytes of the state dicts.
        generation_sample: a causal LM's greedy answers to one prompt, `{"prompt", "teacher", "pruned", ...}` (see
            `hf_prune.pipeline.generation.generation_sample`), stored as given and shown by the model card.

    Returns:
        A JSON-serialisable dict (see the module docstring for its sections).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for name, model in (("dense_model", dense_model), ("pruned_model", pruned_model)):
        get_adapter(model)  # an unsupported model type fails here, naming the supported ones
        if not hasattr(model, "config"):
            raise ValueError(f"{name} must be a transformers model with a config.")
    if dense_model.config.model_type != pruned_model.config.model_type:
        raise ValueError(
            f"dense_model is a {dense_model.config.model_type!r} model but pruned_model a "
            f"{pruned_model.config.model_type!r} one; pass the pruned version of the dense model."
        )
    dense, pruned = on_cpu(dense_model), on_cpu(pruned_model)
    modes = (dense.training, pruned.training)
    dense.eval()
    pruned.eval()
    try:
        enc_before, total_before = _parameters(dense)
        enc_after, total_after = _parameters(pruned)
        size_before, method_before = weights_bytes(dense, dense_path)
        size_after, method_after = weights_bytes(pruned, pruned_path)
        flops_dense, flops_pruned = count_flops(dense, seq_len), count_flops(pruned, seq_len)
        latency = [_latency(dense, pruned, int(b), seq_len, repeats, warmup) for b in batch_sizes]
        causal = is_causal_lm(dense) and is_causal_lm(pruned)
        decode = _decode(dense, pruned, seq_len, max(3, repeats // 2)) if causal else None
    finally:
        dense.train(modes[0])
        pruned.train(modes[1])

    layers = _layer_rows(dense, pruned)
    report = {
        "format_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": _local_path(base_model or getattr(dense.config, "name_or_path", None) or None),
        # the dense model as loaded, and the base it records (`hf_prune_base_model`): the model card's lineage
        "lineage": {
            "teacher": _local_path(getattr(dense.config, "name_or_path", None) or None),
            "base_model": getattr(dense.config, "hf_prune_base_model", None),
        },
        "task": task,
        "dataset": dataset,
        "model_type": pruned.config.model_type,
        "architecture": type(pruned).__name__.removeprefix("Pruned"),
        "layers": layers,
        "heads": {"dense": sum(r["heads_dense"] for r in layers), "kept": sum(r["heads_kept"] for r in layers)},
        "hidden_size": {"dense": hidden_width(dense), "kept": hidden_width(pruned)},
        "ffn": {"dense": sum(r["ffn_dense"] for r in layers), "kept": sum(r["ffn_kept"] for r in layers)},
        "parameters": {
            "encoder_before": enc_before,
            "encoder_after": enc_after,
            "total_before": total_before,
            "total_after": total_after,
            "encoder_ratio": _ratio(enc_before, enc_after),
            "total_ratio": _ratio(total_before, total_after),
        },
        "file_size": {
            "before_bytes": size_before,
            "after_bytes": size_after,
            "ratio": _ratio(size_before, size_after),
            "method": method_before if method_before == method_after else f"{method_before}/{method_after}",
        },
        "flops": {
            "batch_size": 1,
            "seq_len": seq_len,
            "dense": flops_dense,
            "pruned": flops_pruned,
            "ratio": _ratio(flops_dense, flops_pruned),
            "counter": "torch.utils.flop_counter.FlopCounterMode",
            "attn_implementation": "eager",
        },
        "latency": {
            "device": "cpu",
            "seq_len": seq_len,
            "repeats": repeats,
            "warmup": warmup,
            "statistic": "median",
            "order": "interleaved",
            "attn_implementation": getattr(pruned.config, "_attn_implementation", None),
            "forward": "prefill (logits of the last token)" if causal else "full",
            "batches": latency,
        },
        "decode": decode,
        "metrics": _check_metrics(metrics),
        "metric_name": metric_name,
        "all_metrics": _check_all_metrics(all_metrics),
        "metric_note": None if metric_note is None else str(metric_note),
        "stages": _check_stages(stages),
        "generation_sample": _check_sample(generation_sample),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "num_threads": torch.get_num_threads(),
        },
        "dense_path": _local_path(dense_path),
        "pruned_path": _local_path(pruned_path),
    }
    report["total_wall_time_s"] = sum(s["wall_time_s"] for s in report["stages"]) if report["stages"] else None
    json.dumps(report, allow_nan=True)  # fails here, not at export time, if something is not serialisable
    return report
