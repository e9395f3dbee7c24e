"""The stages that measure and write: `evaluate` (the task's metrics of teacher and model, a causal LM's perplexity
included, the teacher's read from its metrics cache when these weights met these splits before), `export` (the pruned
model with its report and card) and `onnx` (the ONNX forms of an export, measured beside the PyTorch ones), and the
checks of an onnx stage's options and place in a recipe.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path

from transformers.utils import logging

from ..export.deploy import deployment_rows, speedups, write_deployment
from ..export.files import ONNX_DIR
from ..export.onnx import MAX_OPSET, MIN_OPSET, export_onnx, read_export_info
from ..export.persistence import save_pruned
from ..export.report import build_report
from ..models.auto import get_adapter
from .causal_lm import block_size_of, perplexity_note
from .context import StageContext
from .evaluation import split_evaluator
from .generation import generation_sample
from .metrics_cache import CACHE_NAME, MetricsCache, cache_key, dataset_digest, model_digest
from .sources import base_model_name, load_start_model

logger = logging.get_logger(__name__)

__all__ = [
    "evaluate_splits",
    "teacher_cache_path",
    "teacher_metrics",
    "evaluate_all",
    "evaluate_models",
    "main_metric_values",
    "stage_evaluate",
    "stage_export",
    "stage_onnx",
    "measured_length",
    "check_onnx_options",
    "check_onnx_order",
]


def evaluate_splits(ctx: StageContext, model, args, splits: dict) -> dict[str, dict[str, float]]:
    """`{split: {metric: value}}` of `model` on `splits`, every metric of the task, by the stage's Trainer."""
    trainer = ctx.trainer(model, args, train=False)
    names = ctx.task_spec().metric_names
    results = {}
    for split, ds in splits.items():
        out = trainer.evaluate(eval_dataset=ds, metric_key_prefix=split)
        results[split] = {name: float(out[f"{split}_{name}"]) for name in names}
    del trainer
    return results


def teacher_cache_path(ctx: StageContext) -> Path:
    """Where the teacher's metrics are cached: in the teacher's own folder (so every run distilling from it shares
    them), or in the run folder when the teacher comes from the Hub."""
    source = ctx.teacher_source()
    folder = Path(source) if source is not None and Path(source).is_dir() else ctx.output_dir
    return folder / CACHE_NAME


def teacher_metrics(ctx: StageContext, teacher, args, splits: dict) -> dict[str, dict[str, float]]:
    """The teacher's metrics on every split, evaluated only for the splits the cache does not hold for these weights,
    this split content and every metric of the task (one cache entry per metric)."""
    cache = MetricsCache(teacher_cache_path(ctx))
    spec = ctx.task_spec()
    model_key, names = model_digest(teacher), spec.metric_names
    # a metric read for one class (f1 of the positive label) is another number for another class
    positive = getattr(spec, "positive_label", None)

    def metric_key(m: str) -> str:
        return m if positive is None else f"{m}[{positive}]"

    keys = {}
    for split, ds in splits.items():
        keys[split] = {m: cache_key(model_key, dataset_digest(ds), metric_key(m)) for m in names}
    results = {split: {m: cache.get(key) for m, key in split_keys.items()} for split, split_keys in keys.items()}
    missing = {split: splits[split] for split, values in results.items() if None in values.values()}
    if missing:
        results.update(evaluate_splits(ctx, teacher, args, missing))
        if ctx.is_main:
            for split in missing:
                for m in names:
                    cache.put(keys[split][m], results[split][m], split, m)
    if len(missing) < len(splits):
        logger.info(
            "Teacher %s on %s read from %s.", ", ".join(names), sorted(set(splits) - set(missing)),
            teacher_cache_path(ctx),
        )  # fmt: skip
    return {split: results[split] for split in splits}


def evaluate_all(ctx: StageContext, model) -> dict:
    """`{"teacher": {split: {metric: value}}, "pruned": {...}}`: every metric of the task on every validation split
    (the teacher's from the metrics cache when these weights were evaluated on these splits before)."""
    args = ctx.arguments()
    splits = ctx.eval_splits()
    if not splits:
        raise ValueError("There is no validation split to evaluate on: set data.validation_file in the recipe.")
    results = {}
    teacher = ctx.load_teacher()
    if teacher is not None:
        results["teacher"] = teacher_metrics(ctx, teacher, args, splits)
    del teacher
    results["pruned"] = evaluate_splits(ctx, model, args, splits)
    gc.collect()
    logger.info("Stage %s: %s.", ctx.spec["name"], results)
    return results


def main_metric_values(all_metrics: dict, metric: str) -> dict:
    """`{"teacher": {split: value}, "pruned": {...}}` of one metric, from [`evaluate_all`]'s result."""
    return {who: {split: values[metric] for split, values in splits.items()} for who, splits in all_metrics.items()}


def evaluate_models(ctx: StageContext, model) -> dict:
    """`{"teacher": {split: value}, "pruned": {split: value}}` of the task's main metric on every validation split."""
    return main_metric_values(evaluate_all(ctx, model), ctx.task_spec().main_metric)


def _evaluation_record(ctx: StageContext, model) -> dict:
    """An evaluation as stages record it: the main metric's values as `metrics`, every metric in the summary."""
    all_metrics, metric = evaluate_all(ctx, model), ctx.task_spec().main_metric
    summary = {"metric": metric, "all_metrics": all_metrics}
    return {"metrics": main_metric_values(all_metrics, metric), "summary": summary}


def measured_length(model, seq_len: int) -> int:
    """The tokens per sequence a model is measured at: `seq_len`, or the positions its config fixes (an image model's
    patches and class token), which its measurements then name."""
    fixed = get_adapter(model).sequence_length(model.config)
    return seq_len if fixed is None else int(fixed)


def stage_evaluate(ctx: StageContext) -> dict:
    """The task's metrics of the teacher and of the current model on every validation split."""
    model = ctx.load_current_model()
    return {"model_dir": None, **_evaluation_record(ctx, model), "_model": model}


def stage_export(ctx: StageContext) -> dict:
    """Measures the current model against the dense teacher and exports it with its report and model card."""
    opts = ctx.spec
    model = ctx.load_current_model()
    last_model = max([i for i, r in enumerate(ctx.finished) if r.get("model_dir")], default=-1)
    evaluated = [r for r in ctx.finished[last_model + 1 :] if r["stage"] == "evaluate"]
    record = evaluated[-1] if evaluated else _evaluation_record(ctx, model)
    task, metrics, summary = ctx.task_spec(), record["metrics"], record.get("summary") or {}
    target = ctx.output_dir / opts["path"]
    if ctx.is_main:
        teacher_source = ctx.teacher_source()
        dense = ctx.load_teacher() or load_start_model(ctx.recipe, ctx.tokenizer, task)
        stages = [{"name": r["name"], "stage": r["stage"], "wall_time_s": r["wall_time_s"]} for r in ctx.finished]
        note = sample = None  # a causal LM's: how its validation text was cut into blocks, one answer of each model
        if task.is_causal_lm:
            note = perplexity_note(ctx.eval_splits(), block_size_of(ctx.recipe.data, task))
            sample = generation_sample(dense, model, ctx.tokenizer, opts["sample_prompt"])
        report = build_report(
            dense,
            model,
            seq_len=measured_length(model, int(opts["seq_len"])),
            batch_sizes=tuple(int(b) for b in opts["batch_sizes"]),
            repeats=int(opts["repeats"]),
            base_model=base_model_name(ctx.recipe),
            task=task.name,
            dataset=task.hub_dataset,
            metrics=metrics,
            metric_name=summary.get("metric", task.main_metric),
            all_metrics=summary.get("all_metrics"),
            metric_note=note,
            stages=stages,
            dense_path=teacher_source if teacher_source and Path(teacher_source).is_dir() else None,
            pruned_path=ctx.current_model_dir(),
            generation_sample=sample,
        )
        save_pruned(
            model, target, ctx.tokenizer, report=report, overwrite=True, card=opts["card"], figure=opts["figure"]
        )
        logger.info("Stage %s: exported to %s.", ctx.spec["name"], target)
    summary = {"export_dir": str(target.relative_to(ctx.output_dir))}
    return {"model_dir": None, "metrics": metrics, "summary": summary, "_model": model}


def stage_onnx(ctx: StageContext) -> dict:
    """ONNX export (and int8 quantization) of an export stage's folder; every deployed form is then measured against
    the dense teacher and added to that folder's report and model card (see `hf_prune.export.deploy`)."""
    opts, task = ctx.spec, ctx.task_spec()
    exported = [r["summary"]["export_dir"] for r in ctx.finished if r["stage"] == "export"]
    target = ctx.output_dir / (opts["path"] or exported[-1])
    summary = {"export_dir": str(target.relative_to(ctx.output_dir)), "onnx_dir": f"{target.name}/{ONNX_DIR}"}
    if ctx.is_main:
        # the run owns its export folder: an interrupted attempt's onnx/ is replaced
        export_onnx(target, int8=bool(opts["int8"]), opset=int(opts["opset"]), overwrite=True)
        teacher_source = ctx.teacher_source()
        batch_size = ctx.arguments().per_device_eval_batch_size
        evaluate = split_evaluator(ctx.eval_splits(), ctx.collator(), batch_size, task)
        dense = ctx.load_teacher() or load_start_model(ctx.recipe, ctx.tokenizer, task)
        deployment = deployment_rows(
            dense,
            target,
            evaluate if opts["evaluate"] else None,
            batch_sizes=tuple(int(b) for b in opts["batch_sizes"]),
            seq_len=measured_length(dense, int(opts["seq_len"])),
            repeats=int(opts["repeats"]),
            dense_path=teacher_source if teacher_source and Path(teacher_source).is_dir() else None,
            metric_name=task.main_metric,
        )
        write_deployment(target, deployment)
        files = read_export_info(target / ONNX_DIR)["files"]
        summary.update(files=sorted(files.values()), speedups=speedups(deployment))
    return {"model_dir": None, "metrics": {}, "summary": summary, "_model": ctx.load_current_model()}


# ----------------------------------------------------------------------------------------------------- checks
def check_onnx_options(entry: Mapping, options: dict, where: str) -> None:
    """The options of a recipe's onnx stage (`entry`, defaults `options`) are valid, else a `ValueError` at `where`."""
    value = lambda key: entry.get(key, options[key])  # noqa: E731
    for key in ("int8", "evaluate"):
        if not isinstance(value(key), bool):
            raise ValueError(f"{where}: {key}={value(key)!r} must be true or false.")
    opset = value("opset")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"{where}: opset={opset!r} must be an integer from {MIN_OPSET} to {MAX_OPSET}.")
    sizes = value("batch_sizes")
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise ValueError(f"{where}: batch_sizes={sizes!r} must be a non-empty list of positive integers.")
    for key, v in (("seq_len", value("seq_len")), ("repeats", value("repeats")), *(("batch_sizes", b) for b in sizes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {key}={v!r} must be a positive integer (batch_sizes: a list of them).")
    if value("path") is not None and not isinstance(value("path"), str):
        raise ValueError(f"{where}: path={value('path')!r} must be the `path` of an earlier export stage.")


def check_onnx_order(stages: list[dict], i: int) -> None:
    """An onnx stage converts the folder of an export stage that runs before it."""
    spec = stages[i]
    paths = [s["path"] for s in stages[:i] if s["stage"] == "export"]
    if not paths:
        raise ValueError(
            f"Stage {spec['name']!r} (onnx) converts an exported folder to ONNX: put an export stage before it, e.g. "
            "stages: [..., {stage: export}, {stage: onnx, int8: true}]."
        )
    if spec["path"] is not None and spec["path"] not in paths:
        raise ValueError(
            f"Stage {spec['name']!r} (onnx) has path={spec['path']!r}, but the export stages before it write "
            f"{paths}; set path to one of them, or leave it out for the last one."
        )
