"""The report as text: the table `hf-prune report DIR` prints, and the rows the model card is built from.

`report.py` measures and returns the report dict; this module only reads one (from `build_report`, or a
`pruning_report.json` with [`load_report`], old versions included) and lays it out.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path

from ..utils import format_float, format_int
from .files import REPORT_NAME, resolved_paths

__all__ = [
    "load_report",
    "format_report",
    "format_deployment",
    "deployment_table",
    "cpu_text",
    "deployment_machine_note",
    "metric_rows",
    "LOWER_IS_BETTER",
    "lower_is_better",
    "metric_notes",
    "cli_report",
]

# Metrics whose smaller values are the better ones (every other metric: higher is better).
LOWER_IS_BETTER = ("perplexity", "mse")


def lower_is_better(metric: str | None) -> bool:
    """Whether smaller values of `metric` are better (perplexity, mean squared error)."""
    return metric in LOWER_IS_BETTER


def load_report(folder: str | Path) -> dict:
    """Reads `pruning_report.json` from an exported folder.

    Args:
        folder: a folder written by `save_pruned(..., report=...)`.

    Returns:
        The report dict.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Pass the folder written by hf_prune.save_pruned.")
    path = folder / REPORT_NAME
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {REPORT_NAME}, so it is not an hf_prune export with a report. Make one with "
            "`save_pruned(model, folder, tokenizer, report=build_report(dense, pruned))` or run a recipe with "
            "`hf-prune run`, whose export stage writes it."
        )
    try:
        return resolved_paths(json.loads(path.read_text(encoding="utf-8")), folder)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); export the model again with save_pruned.") from err


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_report(report: Mapping) -> str:
    """Renders a report dict (from `build_report` or `pruning_report.json`) as a plain-text table.

    Args:
        report: the report dict.

    Returns:
        The table, lines separated by newlines.
    """
    title = f"Pruning report: {report.get('base_model') or 'unknown base model'}"
    if report.get("task"):
        title += f" on {report['task']}"
    lines = [title, ""]
    params, size, flops = report.get("parameters", {}), report.get("file_size", {}), report.get("flops", {})
    mib = {k: None if size.get(k) is None else size[k] / 2**20 for k in ("before_bytes", "after_bytes")}
    gflops = {k: None if flops.get(k) is None else flops[k] / 1e9 for k in ("dense", "pruned")}
    rows = [
        ("", "dense", "pruned", "dense/pruned"),
        (
            "parameters (total)",
            format_int(params.get("total_before")),
            format_int(params.get("total_after")),
            format_float(params.get("total_ratio"), suffix="x"),
        ),
        (
            "parameters (encoder)",
            format_int(params.get("encoder_before")),
            format_int(params.get("encoder_after")),
            format_float(params.get("encoder_ratio"), suffix="x"),
        ),
        (
            "file size (MiB)",
            format_float(mib["before_bytes"]),
            format_float(mib["after_bytes"]),
            format_float(size.get("ratio"), suffix="x"),
        ),
        (
            f"GFLOPs (1 x {flops.get('seq_len', '?')} tokens)",
            format_float(gflops["dense"], 3),
            format_float(gflops["pruned"], 3),
            format_float(flops.get("ratio"), suffix="x"),
        ),
    ]
    latency = report.get("latency", {})
    for b in latency.get("batches", []):
        rows.append(
            (
                f"CPU latency batch {b['batch_size']} (ms)",
                format_float(b.get("dense_ms")),
                format_float(b.get("pruned_ms")),
                format_float(b.get("speedup"), suffix="x"),
            )
        )
    decode = report.get("decode")
    if decode:
        rows.append(
            (
                f"decode tokens/s (batch 1, after {decode.get('prompt_len')})",
                format_float(decode.get("dense_tokens_per_s")),
                format_float(decode.get("pruned_tokens_per_s")),
                format_float(decode.get("speedup"), suffix="x (pruned/dense)"),
            )
        )
    for name, split, teacher, pruned in metric_rows(report):
        rows.append((f"{name} {split}", format_float(teacher, 4), format_float(pruned, 4), ""))
    lines += _table(rows)
    if latency:
        lines.append(
            f"(latency: median of {latency.get('repeats')} interleaved runs, {latency.get('seq_len')} tokens, "
            f"{report.get('environment', {}).get('num_threads')} threads)"
        )
    lines += [wrapped for note in metric_notes(report) for wrapped in textwrap.wrap(f"({note})", 119)]
    layers = report.get("layers") or []
    if layers:
        lines += [""]
        layer_rows = [("layer", "heads kept", "FFN kept")]
        for layer in layers:
            if layer.get("removed"):
                layer_rows.append((str(layer["layer"]), "layer removed", ""))
                continue
            heads = f"{layer['heads_kept']}/{layer['heads_dense']}"
            layer_rows.append((str(layer["layer"]), heads, f"{layer['ffn_kept']}/{layer['ffn_dense']}"))
        lines += _table(layer_rows)
    hidden = report.get("hidden_size") or {}
    if hidden and hidden.get("kept") != hidden.get("dense"):
        lines.append(f"(residual width: {hidden['kept']} of {hidden['dense']} hidden dimensions kept)")
    sample = report.get("generation_sample")
    if sample:
        lines += ["", f"Greedy answers to {sample['prompt']!r}:"]
        lines += [f"  {who}: {sample[key]!r}" for who, key in (("dense teacher", "teacher"), ("pruned", "pruned"))]
    stages = report.get("stages") or []
    if stages:
        lines += [""]
        stage_rows = [(s["name"], format_float(s["wall_time_s"], 1)) for s in stages]
        lines += _table([("stage", "wall time (s)"), *stage_rows])
    if report.get("deployment"):
        lines += ["", *format_deployment(report["deployment"], report.get("metric_name"))]
    return "\n".join(lines)


def deployment_table(deployment: Mapping, metric_name: str | None = None) -> list[tuple[str, ...]]:
    """The rows (header first) of the deployed forms: file size, latency and speedup per batch size, metrics."""
    forms = deployment.get("forms") or []
    batches = list(dict.fromkeys(b["batch_size"] for f in forms for b in f.get("latency") or []))
    splits = list(dict.fromkeys(s for f in forms for s in f.get("metrics") or {}))
    header = ["form", "file (MiB)"]
    for b in batches:
        header += [f"batch {b} (ms)", f"speedup b{b}"]
    header += [f"{metric_name or deployment.get('metric_name') or 'metric'} {s}" for s in splits]
    rows = [tuple(header)]
    for form in forms:
        latency = {b["batch_size"]: b for b in form.get("latency") or []}
        size = form.get("file_bytes")
        row = [str(form.get("name")), format_float(None if size is None else size / 2**20)]
        for b in batches:
            timing = latency.get(b, {})
            row += [format_float(timing.get("ms")), format_float(timing.get("speedup"), suffix="x")]
        row += [format_float((form.get("metrics") or {}).get(s), 4) for s in splits]
        rows.append(tuple(row))
    return rows


def format_deployment(deployment: Mapping, metric_name: str | None = None) -> list[str]:
    """The deployed forms of a report as text lines: a table, then how they were timed."""
    rows = deployment_table(deployment, metric_name)
    if len(rows) < 2:
        return []
    forms = deployment.get("forms") or []
    note = (
        f"(deployed forms: median of {deployment.get('repeats')} runs, every form interleaved in one process, "
        f"{deployment.get('seq_len')} tokens, {deployment.get('num_threads')} threads; speedup against "
        f"{forms[0].get('name')})"
    )
    machine = deployment_machine_note(deployment)
    return [*_table(rows), note, *textwrap.wrap(f"({machine})", 119)] if machine else [*_table(rows), note]


def cpu_text(cpu: Mapping) -> str:
    """`AMD EPYC 7B13, 2 threads of 4, AVX-512 no, VNNI no, AMX no, heap steady`: the CPU of a deployment section."""
    if not cpu:
        return "CPU not recorded"
    flags = ", ".join(
        f"{label} {'-' if cpu.get(key) is None else ('yes' if cpu.get(key) else 'no')}"
        for label, key in (("AVX-512", "avx512"), ("VNNI", "vnni"), ("AMX", "amx"))
    )
    threads = f"{cpu.get('threads')} threads of {cpu.get('logical_cpus')}"
    heap = f", heap {cpu['heap']}" if cpu.get("heap") else ""  # absent in records made before it was held steady
    return f"{cpu.get('model') or 'unknown CPU'} ({cpu.get('machine')}), {threads}, {flags}{heap}"


def deployment_machine_note(deployment: Mapping) -> str | None:
    """Where the deployed forms were measured and which was fastest there (None for sections written before the
    CPU was recorded)."""
    if not deployment.get("cpu"):
        return None
    note = f"measured on {cpu_text(deployment['cpu'])}"
    fastest = deployment.get("fastest") or {}
    if fastest:
        note += "; fastest here: " + ", ".join(f"{name} at batch {b}" for b, name in fastest.items())
    slower = [b for b, gain in (deployment.get("int8_gain") or {}).items() if gain <= 1.0]
    if slower:
        note += f"; int8 is not faster than fp32 on this CPU at batch {', '.join(slower)}"
    return note


def metric_rows(report: Mapping) -> list[tuple[str, str, float | None, float | None]]:
    """`(metric, split, teacher, pruned)` for every metric of a report: the main metric first, then the task's other
    metrics (reports written before they were recorded have the main one alone)."""
    main = report.get("metric_name") or "metric"
    metrics = report.get("metrics") or {}
    teacher, pruned = metrics.get("teacher", {}), metrics.get("pruned", {})
    rows = [(main, split, teacher.get(split), pruned.get(split)) for split in dict.fromkeys([*teacher, *pruned])]
    every = report.get("all_metrics") or {}
    t_all, p_all = every.get("teacher", {}), every.get("pruned", {})
    names = dict.fromkeys(m for values in [*t_all.values(), *p_all.values()] for m in values if m != main)
    for name in names:
        for split in dict.fromkeys([*t_all, *p_all]):
            rows.append((name, split, t_all.get(split, {}).get(name), p_all.get(split, {}).get(name)))
    return rows


def metric_notes(report: Mapping) -> list[str]:
    """How to read the report's metrics: which are better when lower, and the report's `metric_note` (how they were
    computed, e.g. how a causal LM's validation text was cut into blocks)."""
    lower = [name for name in dict.fromkeys(row[0] for row in metric_rows(report)) if lower_is_better(name)]
    notes = [f"{', '.join(lower)}: lower is better"] if lower else []
    return notes + ([str(report["metric_note"])] if report.get("metric_note") else [])


def cli_report(args) -> int:
    """`hf-prune report DIR`: prints the report of an exported folder as a table."""
    print(format_report(load_report(args.dir)))
    return 0
