"""Accuracy at a speed on MNLI: every method from the same dense teacher, with the same number of training steps after
it, measured on the full validation_matched split and timed on CPU.

    python benchmarks/accuracy_at_speed.py                     # the whole plan, resumable row by row
    python benchmarks/accuracy_at_speed.py --targets 2 --rows staged --steps 313
    python benchmarks/accuracy_at_speed.py --retime             # time every row's export again, all in one process
    python benchmarks/accuracy_at_speed.py --targets 2 --paired fisher-latency-hidden fisher-latency-distill
    python benchmarks/accuracy_at_speed.py --table

The teacher is the one `benchmarks/teacher_curve.py` chose (all-MiniLM-L6-v2 fine-tuned on the shared MNLI training
pairs for the epochs with the best accuracy on 1,000 held-out training pairs), or `--teacher-dir`. Rows (each an
`hf-prune` recipe run under `--output-dir/teacher-<digest>/<target>x/<row>-<steps>`, so an interrupted row resumes
from its last checkpoint, and rows of different teachers never mix):

- `fisher-latency-distill` (the best pipeline, `recipes/mnli-minilm-cpu.yaml`): `prune_to_speedup` with
  `cost_model="latency"` (the target is a speedup at batch 32 measured on this machine, not a FLOPs ratio: the chosen
  shapes are timed and searched again), then distillation for `--steps` steps;
- `naive-a`: one-shot magnitude pruning of heads and FFN neurons to the shapes of `--naive-shapes-from`'s row (by
  default the one above) at the target, then plain fine-tuning (no teacher) for `--steps` steps;
- `naive-b`: the same one-shot pruning, then distillation from the teacher (alpha 0.9, T 2) for `--steps` steps;
- `staged`: the staged pipeline of earlier releases (movement pruning of whole heads with distillation, head
  removal, distillation, gradual Taylor FFN pruning with distillation), its steps split 48% / 16% / 36%, head and FFN
  sparsities from the FLOPs model at the target;
- `fisher-distill`: `prune_to_speedup` to the target FLOPs ratio, then distillation (the ablation between the two:
  Fisher masks as the start, FLOPs as the cost);
- `fisher-latency-nocal`: the ablation of the calibration: latency unit costs, shapes never timed
  (`calibration_rounds: 0`), then distillation;
- `fisher-latency-hidden`: `fisher-latency-distill`'s pruned model distilled with layer-wise distillation added:
  the MSE between every hidden state of student and teacher (over real tokens, weight 1 beside the logits' KL, as
  TinyBERT and CoFi's layer distillation do; pruning keeps the hidden size, so no projection is needed);
- `joint`: gradual joint pruning of heads and neurons under one FLOPs budget with distillation (`joint_prune`, 60% of
  the steps), then distillation;
- `fisher-latency-width`: `fisher-latency-distill` with the search free to narrow the residual stream
  (`prune_hidden: true`: hidden dimensions by the Fisher of a mask on the stream, CoFi's hidden mask);
- `fisher-latency-narrow`: the width row with the stream's width fixed at three quarters of the teacher's
  (`hidden_widths: [288]` on MiniLM's 384): the test of the width search's estimate, which keeps the full width;
- `fisher-latency-depth`: the same with the search free to drop whole layers (`drop_layers: true`, layers weighed by
  the Fisher of a gate that skips them);
- `fisher-latency-shallow`: the depth row with half the teacher's layers kept (`layer_counts: [3]` on MiniLM's 6,
  the three of least gate Fisher dropped): the test of the depth search's estimate, which keeps every layer at 6x.
  Naive rows at the shapes of a width or depth row drop the same number of layers (the same ones) and narrow the
  stream to the same width by weight magnitude. Rows past 3x end with an `onnx` stage (fp32 and int8, evaluated and
  timed).

Without `--targets` / `--rows`, the plan runs every row but `joint` and the width / depth rows at 2x,
`fisher-latency-distill`, `naive-b` and `fisher-latency-nocal` at 3x, and `fisher-latency-distill`,
`fisher-latency-width`, `fisher-latency-depth` and `naive-b` at 4x and 6x (`--naive-shapes-from
fisher-latency-width` gives naive B the width row's shapes).
Every row trains on the 8,999 training pairs only and is evaluated on the 1,000 extra training pairs (`heldout`: what
defaults and hyperparameters are chosen on, as the teacher's epochs are) and on validation_matched (what is reported,
never chosen on). `--seeds 42 43 44` runs every row once per seed (the table adds the mean and spread of each group:
a difference smaller than the spread decides nothing). `fisher-latency-hidden` is an ablation of one change, the
distillation: it starts from `fisher-latency-distill`'s pruned model of the same seed (`--free-shapes`: its own
search instead).
Every row ends with `evaluate` (validation_matched, 9,815 pairs) and `export` (FLOPs ratio and CPU latency at batch 1
and 32 against the teacher, interleaved in one process). Results: `benchmarks/results/accuracy_at_speed.json`; the
model card of the best row at each target (with its head map and `pruning_report.json`) is copied to
`model_cards/minilm-mnli-<target>x/`.

Each row is timed by its own export stage, at the time it ran; on a shared machine the load of that moment enters
its speedups. `--retime` times the teacher and every row's export of this teacher again, interleaved in one process
(median of `--repeats` runs at batch 1 and 32 x 128 tokens; with `--present-only`, only the rows whose exports are on
this machine, the others keeping their earlier retime), and records those speedups in every row (`retimed`:
when, how, and the speedups of the row's own run kept as `speedup_b1_at_run` / `speedup_b32_at_run`). Rows of
identical shapes (a naive row and the row it took its shapes from) do the same computation, so the spread of their
speedups in that one process is the timing noise; it is recorded as `retime_noise` and printed under the table.
`--rerun` runs rows the results file has already, on a machine without their run folders (the seeded ablations
need the same seed's pruned model): the new record replaces the row's and keeps the earlier ones (`earlier_runs`).
`--paired A B` evaluates two rows' exports again on validation_matched (checking each accuracy against its run) and
records McNemar's exact test on the pairs they disagree on, with a 95% interval of the accuracy difference (`paired`).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding

from hf_prune import save_pruned
from hf_prune.export.persistence import load_pruned
from hf_prune.export.report import time_forms
from hf_prune.export.runtime import cpu_info
from hf_prune.models import structure
from hf_prune.models.costs import unit_costs
from hf_prune.pipeline.data import read_local_file, tokenize_splits
from hf_prune.pipeline.demo import load_tokenizer_by_name
from hf_prune.pipeline.evaluation import dataset_predictions
from hf_prune.pipeline.metrics_cache import model_digest
from hf_prune.pipeline.recipe import enable_progress_logging, run_recipe
from hf_prune.utils import recover_interrupted, swap_into_place, temporary_folder, update_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from posttrain_mnli import DATA, RUNS, magnitude_prune, teacher_folder_name  # noqa: E402
from stats import mcnemar, retimed_speedups, same_shape_spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "fisher-latency-distill", "naive-b", "naive-a", "staged", "fisher-distill", "fisher-latency-nocal",
    "fisher-latency-hidden", "joint", "fisher-latency-width", "fisher-latency-depth", "fisher-latency-narrow",
    "fisher-latency-shallow",
)  # fmt: skip
# The default plan (no --targets / --rows): every row of the comparison at 2x, the naive-B baseline and the best
# pipeline (and the ablation of its calibration) at 3x; past 3x, the search also free to narrow the residual stream
# or to drop layers. The row giving the naive rows their shapes comes first.
BEYOND = ("fisher-latency-distill", "fisher-latency-width", "fisher-latency-depth", "naive-b")
PLAN = {2.0: ROWS[:7], 3.0: ("fisher-latency-distill", "naive-b", "fisher-latency-nocal"), 4.0: BEYOND, 6.0: BEYOND}
HIDDEN_WEIGHT = 1.0  # TinyBERT's weight of the hidden-state MSE beside the logits' KL
DISTILL = {"distill_alpha": 0.9, "distill_temperature": 2.0}


def row_key(tag: str, target: float, row: str, steps: int, seed: int) -> str:
    """The results key of a row: `teacher-<digest>/<target>x/<row>/<steps>`, `/seed<N>` added for seeds but 42."""
    return f"{tag}/{target:g}x/{row}/{steps}" + ("" if seed == 42 else f"/seed{seed}")


def row_folder(out: Path, key: str) -> Path:
    """The run folder of a results key: `out/teacher-<digest>/<target>x/<row>-<steps>[-seed<N>]`."""
    tag, target, row, steps, *seed = key.split("/")
    return out / tag / target / "-".join([f"{row}-{steps}", *seed])


def base_recipe(model: str, teacher: str, data: Path, max_eval: int | None, seed: int = 42) -> dict:
    # trained on the 8,999 pairs only: the 1,000 extra training pairs are the held-out split defaults are chosen on
    # (the teacher's epochs too, benchmarks/teacher_curve.py); validation_matched is only reported
    return {
        "model": model,
        "teacher": teacher,
        "task": "mnli",
        "data": {
            "train_file": str(data / "train_subset_8999.jsonl"),
            "validation_file": {
                "heldout": str(data / "train_subset_extra_1000.jsonl"),
                "validation_matched": str(data / "validation_matched.jsonl"),
            },
            "max_seq_length": 128,
            "max_eval_samples": max_eval,
        },
        "seed": seed,
        "defaults": {
            "per_device_train_batch_size": 32,
            "per_device_eval_batch_size": 128,
            "learning_rate": 5e-5,
            "warmup_steps": 0.06,
            "logging_steps": 20,
            "save_steps": 100,
            **DISTILL,
        },
        "stages": [],
    }


def closing_stages(target: float = 2.0) -> list[dict]:
    stages = [{"stage": "evaluate"}, {"stage": "export", "seq_len": 128, "batch_sizes": [1, 32], "repeats": 10}]
    # past 3x the deployed form is part of the goal: ONNX int8 of the export, evaluated and timed with it
    return stages + ([{"stage": "onnx", "int8": True}] if target > 3.0 else [])


def staged_sparsities(teacher, target: float) -> tuple[float, float]:
    """Head and FFN sparsities giving `target` FLOPs with the same share of the removed FLOPs on heads as the 2x point
    of the README's results (36 of 72 heads, FFN 55%), solved on the cost model."""
    costs = unit_costs(teacher, 128)
    removed = costs.total * (1 - 1 / target)
    head_total, ffn_total = costs.head[0] * sum(costs.heads), costs.neuron[0] * sum(costs.neurons)
    share = 0.5 * head_total / (0.5 * head_total + 0.55 * ffn_total)
    return min(0.95, share * removed / head_total), min(0.95, (1 - share) * removed / ffn_total)


SHAPE_KEYS = ("heads_after", "ffn_after", "hidden_after", "dropped_layers")


def pruned_shapes(state: dict) -> dict | None:
    """The per-layer shapes the first stage of a run chose (`prune_to_speedup`'s summary), None when it chose none
    (a naive row's first stage trains shapes it was given)."""
    summary = first_summary(state)
    return {key: summary.get(key) for key in SHAPE_KEYS} if "heads_after" in summary else None


def first_summary(state: dict) -> dict:
    """The summary of a run's first stage (the pruning, in every row)."""
    return (state.get("finished") or [{}])[0].get("summary") or {}


def run_state(run_dir: Path) -> dict | None:
    """The `state.json` of a row's run folder, None where the row has not run on this machine."""
    state = run_dir / "state.json"
    return json.loads(state.read_text()) if state.is_file() else None


def row_shapes(run_dir: Path, row: dict | None) -> dict | None:
    """The shapes of a row: from its run folder's `state.json` where it is on this machine, else as its results row
    recorded them; None when neither has them."""
    state = run_state(run_dir)
    return pruned_shapes(state) if state is not None else (row or {}).get("shapes")


def finished_run(run_dir: Path, stages: int) -> bool:
    """Whether the run folder holds a run that finished all its `stages` (on this machine)."""
    state = run_state(run_dir)
    return state is not None and len(state.get("finished") or []) >= stages


def recorded_here(record: dict, state: dict) -> bool:
    """Whether `record` is the record of the finished run in the row's folder (`state`): a process killed after the
    run finished but before its record was written leaves the row's earlier record. Records written before rows named
    their run (`run_created`) are taken as this run's."""
    created = record.get("run_created")
    return created is None or created == state.get("created")


def with_earlier(record: dict, earlier: dict | None) -> dict:
    """`record` of a row run again (`--rerun`), its earlier records kept in order under `earlier_runs`."""
    if earlier is None:
        return record
    previous = {k: v for k, v in earlier.items() if k != "earlier_runs"}
    return {**record, "earlier_runs": [*earlier.get("earlier_runs", []), previous]}


def row_stages(row: str, target: float, steps: int, teacher, fixed_shapes: bool = False) -> list[dict]:
    if row == "fisher-latency-hidden" and fixed_shapes:  # one change: the distillation, on the best row's shapes
        return [{"stage": "distill", "args": {"max_steps": steps, "distill_hidden_weight": HIDDEN_WEIGHT}}]
    if row in ("naive-a", "naive-b"):
        args = {"max_steps": steps} if row == "naive-b" else {"max_steps": steps, "distill_alpha": 0.0}
        return [{"stage": "distill" if row == "naive-b" else "finetune", "args": args}]
    if row.startswith("fisher-"):
        prune = {"stage": "prune_to_speedup", "args": {"target_speedup": target}}
        prune["cost_model"] = "flops" if row == "fisher-distill" else "latency"
        if row == "fisher-latency-nocal":
            prune["calibration_rounds"] = 0
        if row in ("fisher-latency-width", "fisher-latency-narrow"):
            prune["prune_hidden"] = True
        if row == "fisher-latency-narrow":
            prune["hidden_widths"] = [teacher.config.hidden_size * 3 // 4]
        if row in ("fisher-latency-depth", "fisher-latency-shallow"):
            prune["drop_layers"] = True
        if row == "fisher-latency-shallow":
            prune["layer_counts"] = [teacher.config.num_hidden_layers // 2]
        distill = {"max_steps": steps}
        if row == "fisher-latency-hidden":
            distill["distill_hidden_weight"] = HIDDEN_WEIGHT
        return [prune, {"stage": "distill", "args": distill}]
    if row == "joint":
        prune = int(steps * 0.6)
        return [
            {
                "stage": "joint_prune",
                "args": {
                    "target_speedup": target, "max_steps": prune, "taylor_iterations": 8,
                    "taylor_interval_steps": max(1, prune * 3 // 4 // 8),
                },
            },
            {"stage": "distill", "args": {"max_steps": steps - prune}},
        ]  # fmt: skip
    heads, ffn = staged_sparsities(teacher, target)
    movement, distill = int(steps * 0.48), int(steps * 0.16)
    taylor = steps - movement - distill
    return [
        {
            "stage": "movement",
            "args": {
                "attention_granularity": "head", "sparsity_mode": "global", "target_sparsity": round(heads, 4),
                "max_steps": movement, "pruning_warmup_steps": movement // 10, "pruning_cooldown_steps": movement // 4,
                "pruning_frequency": 10,
            },
        },
        {"stage": "prune_heads"},
        {"stage": "distill", "args": {"max_steps": distill}},
        {
            "stage": "taylor_ffn",
            "args": {
                "target_sparsity": round(ffn, 4), "max_steps": taylor, "taylor_iterations": 4,
                "taylor_interval_steps": max(1, taylor * 3 // 5 // 4),
            },
        },
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(RUNS / "accuracy-at-speed"))
    parser.add_argument(
        "--teacher-dir",
        default=None,
        help="Default: the teacher chosen by benchmarks/teacher_curve.py (its results file), else the 2-epoch teacher "
        "of benchmarks/posttrain_mnli.py.",
    )
    parser.add_argument(
        "--naive-shapes-from", default="fisher-latency-distill", help="The row whose shapes the naive rows prune to."
    )
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument(
        "--targets",
        nargs="+",
        type=float,
        default=None,
        help="Default: the plan (2x and 3x). With --retime: only these targets' rows are timed (default: all).",
    )
    parser.add_argument("--rows", nargs="+", default=None, choices=ROWS, help="Default: the plan's rows.")
    parser.add_argument("--steps", type=int, default=626, help="Training steps after the teacher, for every row.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="Seeds of every row (training order).")
    parser.add_argument(
        "--free-shapes", action="store_true",
        help="fisher-latency-hidden runs its own latency search instead of starting from fisher-latency-distill's "
        "pruned model (by default an ablation changes one thing: the distillation).",
    )  # fmt: skip
    parser.add_argument(
        "--rerun", action="store_true",
        help="Run the plan's rows again where the results file has them (a machine without their run folders): the "
        "new record replaces the row's, the earlier ones kept under its `earlier_runs`; rows rerun on this machine "
        "already are kept.",
    )  # fmt: skip
    parser.add_argument("--max-eval-samples", type=int, default=None, help="Default: all of validation_matched.")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "accuracy_at_speed.json"))
    parser.add_argument("--cards", default=str(ROOT / "model_cards"), help="Where the best rows' model cards go.")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--retime", action="store_true", help="Time every row's export again in one process.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed runs per model and batch size (--retime).")
    parser.add_argument(
        "--present-only", action="store_true",
        help="--retime only the rows whose exports are under --output-dir (on a machine that has not run them all).",
    )  # fmt: skip
    parser.add_argument(
        "--paired", nargs=2, metavar=("ROW_A", "ROW_B"), default=None,
        help="Compare two rows' exports at the first --targets on the same pairs: McNemar's exact test.",
    )  # fmt: skip
    args = parser.parse_args()
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}}
    if args.table:
        print(markdown_table(results))
        return
    enable_progress_logging()
    curve = ROOT / "benchmarks" / "results" / "teacher_curve.json"
    if args.teacher_dir is None:  # the chosen teacher, its folder recorded relative to the runs folder
        chosen = json.loads(curve.read_text())["teacher_dir"] if curve.is_file() else None
        fallback = RUNS / "posttrain-mnli" / "teacher" / "01-finetune" / "model"
        args.teacher_dir = str(RUNS / chosen if chosen else fallback)
    teacher_dir = Path(args.teacher_dir).absolute()
    if not (teacher_dir / "config.json").is_file():
        raise SystemExit(
            f"{teacher_dir} holds no model: run benchmarks/teacher_curve.py (--rebuild on a new machine) or pass "
            "--teacher-dir."
        )
    teacher = load_pruned(teacher_dir).eval()
    tag = f"teacher-{model_digest(teacher)[:8]}"  # rows of different teachers never share a run folder or a key
    data, out = Path(args.data_dir), Path(args.output_dir).absolute()
    if args.paired:
        target = (args.targets or [2.0])[0]
        paired(results, results_path, out, tag, data, args.paired, target, args.steps, args.seeds[0])
        print(markdown_table(results))
        return
    if args.retime:
        retime(results, results_path, teacher, out, tag, args.repeats, args.present_only, args.targets)
        print(markdown_table(results))
        return
    if args.targets is None and args.rows is None:
        plan = PLAN
    else:
        plan = {target: args.rows or ROWS[:5] for target in args.targets or [2.0]}
    for target, rows in plan.items():
        for row, seed in [(row, seed) for seed in args.seeds for row in rows]:
            shaped = f"{row}-as-{args.naive_shapes_from}" if row.startswith("naive") else row
            fixed = row == "fisher-latency-hidden" and not args.free_shapes
            shaped += "-fixed-shapes" if fixed else ""
            key = row_key(tag, target, shaped, args.steps, seed)
            run_dir = row_folder(out, key)
            if key in results["rows"] and not args.rerun:
                continue
            start_model = str(teacher_dir)
            if fixed:
                best = row_folder(out, row_key(tag, target, ROWS[0], args.steps, seed))
                pruned = [p.parent for p in best.glob("*-prune_to_speedup/model/config.json")]
                if not pruned:
                    raise SystemExit(f"Run the {ROWS[0]} row at {target:g}x (seed {seed}) first: the ablation "
                                     "starts from its pruned model.")  # fmt: skip
                start_model = str(pruned[0])
            if row.startswith("naive"):
                # the shapes of the retraining-free pruner at this target, reached by weight magnitude in one shot
                source = row_key(tag, target, args.naive_shapes_from, args.steps, seed)
                shapes = row_shapes(row_folder(out, source), results["rows"].get(source))
                if shapes is None:
                    raise SystemExit(
                        f"Run the {args.naive_shapes_from} row at {target:g}x (seed {seed}) first: naive rows take "
                        "its shapes (from its run folder, or from its results row where that recorded them)."
                    )
                magnitude = f"magnitude-as-{args.naive_shapes_from}"
                start = row_folder(out, row_key(tag, target, magnitude, args.steps, seed))
                if not (start / "config.json").is_file():
                    hidden, dropped = shapes.get("hidden_after"), shapes.get("dropped_layers") or ()
                    pruned = magnitude_prune(
                        copy.deepcopy(teacher), shapes["heads_after"], shapes["ffn_after"], hidden, dropped
                    )
                    save_pruned(pruned, start, load_tokenizer_by_name(str(teacher_dir)), overwrite=True, card=False)
                start_model = str(start)
            recipe = base_recipe(start_model, str(teacher_dir), data, args.max_eval_samples, seed)
            recipe["stages"] = row_stages(row, target, args.steps, teacher, fixed) + closing_stages(target)
            if (
                key in results["rows"]
                and finished_run(run_dir, len(recipe["stages"]))
                and recorded_here(results["rows"][key], run_state(run_dir))
            ):
                continue  # rerun on this machine already: its record is the one in the results
            # (a run that finished here but whose record was never written resumes with nothing to do: recorded now)
            began = time.perf_counter()
            run = run_recipe(recipe, output_dir=str(run_dir))
            report = run.report
            metrics = report["metrics"]
            earlier = results["rows"].get(key)
            results["rows"][key] = {
                "target_speedup": target,
                "row": row,
                "shapes_from": args.naive_shapes_from if row.startswith("naive") else None,
                "steps": args.steps,
                "seed": seed,
                "fixed_shapes_from": ROWS[0] if fixed else None,
                "accuracy": metrics["pruned"]["validation_matched"],
                "teacher_accuracy": metrics["teacher"]["validation_matched"],
                "heldout_accuracy": metrics["pruned"].get("heldout"),
                "teacher_heldout_accuracy": metrics["teacher"].get("heldout"),
                "teacher": {"dir": teacher_folder_name(teacher_dir), "digest": tag},
                "flops_ratio": report["flops"]["ratio"],
                "speedup_b1": report["latency"]["batches"][0]["speedup"],
                "speedup_b32": report["latency"]["batches"][1]["speedup"],
                "heads": sum(layer["heads_kept"] for layer in report["layers"]),
                "ffn": sum(layer["ffn_kept"] for layer in report["layers"]),
                "layers": sum(not layer.get("removed") for layer in report["layers"]),
                "hidden": (report.get("hidden_size") or {}).get("kept"),
                # the per-layer shapes the pruning chose: naive rows at these shapes need no run folder
                "shapes": pruned_shapes(run.state),
                # the width / depth candidates the search weighed, with their estimated losses
                "structure_search": first_summary(run.state).get("structure_search"),
                "deployment": report.get("deployment"),
                "cpu": cpu_info(),  # the machine every timing of the row was taken on
                "stages": [(s["name"], s["wall_time_s"]) for s in report["stages"]],
                "run_created": run.state.get("created"),  # which run of the row's folder this record is
                "wall_s_this_call": round(time.perf_counter() - began, 1),
            }
            # read again right before writing: another invocation may have added rows meanwhile
            new = {key: with_earlier(results["rows"][key], earlier)}
            results = update_json_atomic(
                results_path, lambda on_disk, new=new: on_disk.setdefault("rows", {}).update(new), {"rows": {}}
            )
            if row == ROWS[0] and seed == args.seeds[0]:
                publish_card(run_dir / "final", Path(args.cards) / f"minilm-mnli-{target:g}x")
    print(markdown_table(results))


def retime(
    results: dict,
    results_path: Path,
    teacher,
    out: Path,
    tag: str,
    repeats: int,
    present_only: bool = False,
    targets: list[float] | None = None,
) -> None:
    """Times the teacher and the export of every row of `tag` (with `present_only`, of those whose exports are
    under `out`; with `targets`, of those targets only) interleaved in one process; records the speedups."""
    prefixes = [f"{tag}/"] if targets is None else [f"{tag}/{target:g}x/" for target in targets]
    rows = {key: row for key, row in results["rows"].items() if key.startswith(tuple(prefixes))}
    forms, missing = {"teacher": teacher}, []
    for key in rows:
        export = row_folder(out, key) / "final"
        if (export / "config.json").is_file():
            forms[key] = load_pruned(export).eval()
        else:
            missing.append(key)
    if missing and not present_only:
        raise SystemExit(
            f"No export for {', '.join(missing)} under {out / tag}: rerun those rows, pass --output-dir, or "
            "--present-only to retime the others."
        )
    rows = {key: row for key, row in rows.items() if key in forms}
    if not rows:
        raise SystemExit(f"No export of any row under {out / tag}: nothing to retime.")
    timed = time_forms(forms, teacher, batch_sizes=(1, 32), seq_len=128, repeats=repeats, warmup=2)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def record(on_disk: dict) -> None:
        for key in rows:
            row = on_disk["rows"][key] = retimed_speedups(on_disk["rows"][key], timed[key])
            row["retimed"] = {
                "at": when, "repeats": repeats, "models_interleaved": len(forms),
                "torch_threads": torch.get_num_threads(), "cpu": cpu_info(),
                "teacher_ms": {str(b["batch_size"]): b["ms"] for b in timed["teacher"]},
            }  # fmt: skip
        shapes = {
            key: (tuple(structure.num_heads(model)), tuple(structure.ffn_size(model)))
            for key, model in forms.items()
            if key != "teacher"
        }
        if on_disk.get("retime_noise"):  # an earlier retime's noise stays with the rows it timed
            on_disk.setdefault("earlier_retime_noise", []).append(on_disk["retime_noise"])
        on_disk["retime_noise"] = same_shape_spread(shapes, timed, when)

    results.update(update_json_atomic(results_path, record))


def paired(results: dict, results_path: Path, out: Path, tag: str, data: Path, rows: list, target: float, steps: int,
           seed: int = 42):  # fmt: skip
    """Evaluates two rows' exports on validation_matched, compares them pair by pair and records the test."""
    keys = [row_key(tag, target, row, steps, seed) for row in rows]
    missing = [key for key in keys if key not in results["rows"]]
    if missing:
        raise SystemExit(f"No result for {', '.join(missing)}: run those rows first (naive rows as naive-b-as-ROW).")
    exports = [row_folder(out, key) / "final" for key in keys]
    tokenizer = load_tokenizer_by_name(str(exports[0]))
    raw = {"validation_matched": read_local_file(data / "validation_matched.jsonl")}
    dataset = tokenize_splits(raw, tokenizer, 128)["validation_matched"]
    collator = DataCollatorWithPadding(tokenizer)
    right = []
    for export in exports:  # both in the same (length-sorted) order: the predictions stay paired
        predictions, references = dataset_predictions(load_pruned(export), dataset, collator, batch_size=128)
        right.append(torch.tensor(predictions) == torch.tensor(references))
    for key, r in zip(keys, right):  # the same accuracy as the row's own evaluate stage, or the pairs differ
        if abs(float(r.float().mean()) - results["rows"][key]["accuracy"]) > 1e-3:
            raise SystemExit(f"{key}: {float(r.float().mean()):.4f} here, {results['rows'][key]['accuracy']:.4f} run.")
    test = {"a": keys[0], "b": keys[1], "split": "validation_matched", "test": "McNemar exact, two-sided"}
    test.update(mcnemar(*right))
    new = {row_key(tag, target, f"{rows[0]}~{rows[1]}", steps, seed): test}
    results.update(update_json_atomic(results_path, lambda on_disk: on_disk.setdefault("paired", {}).update(new)))


def publish_card(export: Path, card_dir: Path) -> None:
    """Copies an export's model card, head map and report (not its weights) to `card_dir`, replacing it whole."""
    recover_interrupted(card_dir)
    tmp = temporary_folder(card_dir)
    try:
        for name in ("README.md", "head_map.png", "pruning_report.json"):
            if (export / name).is_file():
                shutil.copy2(export / name, tmp / name)
        swap_into_place(tmp, card_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once swapped into place


def seed_summary(rows: list[dict]) -> str:
    """The mean and standard deviation over a row's seeds: validation_matched (min and max), held-out accuracy (over
    the seeds that recorded it: rows of earlier runs did not) and the batch-32 speedup."""

    def spread(values: list[float], digits: int = 2) -> str:
        v = torch.tensor(values, dtype=torch.float64)
        return f"{v.mean():.{digits}f} +- {v.std():.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"

    acc = [100 * r["accuracy"] for r in rows]
    text = f"validation_matched {spread(acc)} (min {min(acc):.2f}, max {max(acc):.2f})"
    held = [100 * r["heldout_accuracy"] for r in rows if r.get("heldout_accuracy") is not None]
    if held:
        text += f", heldout {spread(held)} ({len(held)} seed{'s' if len(held) > 1 else ''})"
    return text + f", CPU b32 {spread([r['speedup_b32'] for r in rows])}x"


def deployed_cells(row: dict) -> list[str]:
    """Batch-32 speedup against the teacher and validation_matched accuracy (change against the teacher) of a row's
    ONNX fp32 and int8 forms, as its `onnx` stage measured them ("-" where it has none)."""
    forms = {f["name"]: f for f in (row.get("deployment") or {}).get("forms", [])}
    cells = []
    for name in ("pruned ONNX fp32", "pruned ONNX int8"):
        form = forms.get(name)
        if form is None:
            cells += ["-", "-"]
            continue
        b32 = next((b["speedup"] for b in form["latency"] if b["batch_size"] == 32), None)
        accuracy = form["metrics"].get("validation_matched")
        cells.append("-" if b32 is None else f"{b32:.2f}x")
        delta = None if accuracy is None else 100 * (accuracy - row["teacher_accuracy"])
        cells.append("-" if accuracy is None else f"{100 * accuracy:.2f} ({delta:+.2f})")
    return cells


def deployed_table(results: dict) -> str:
    """The rows past 3x (where layers may be dropped and the residual stream narrowed) and any with deployed forms:
    layers and width kept, and the ONNX forms' speed and accuracy (`onnx` stage, timed at run time)."""
    rows = [r for r in results["rows"].values() if r.get("deployment") or r["target_speedup"] > 3.0]
    if not rows:
        return ""
    lines = [
        "| target | row | seed | layers | hidden | ONNX fp32 b32 | its validation_matched | int8 b32 | its "
        "validation_matched |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        hidden = "-" if r.get("hidden") is None else r["hidden"]
        cells = " | ".join(deployed_cells(r))
        lines.append(f"| {r['target_speedup']:g}x | {r['row']} | {r.get('seed', 42)} | {r.get('layers', '-')} | "
                     f"{hidden} | {cells} |")  # fmt: skip
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    lines = [
        "| target | row | seed | steps | heldout | validation_matched | FLOPs | CPU b1 / b32 | heads | FFN |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = {}
    for key, r in results["rows"].items():
        delta = 100 * (r["accuracy"] - r["teacher_accuracy"])
        held = r.get("heldout_accuracy")
        lines.append(
            f"| {r['target_speedup']:g}x | {r['row']} | {r.get('seed', 42)} | {r['steps']} | "
            f"{'-' if held is None else f'{100 * held:.2f}'} | {100 * r['accuracy']:.2f} ({delta:+.2f}) | "
            f"{r['flops_ratio']:.2f}x | {r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x | {r['heads']} | {r['ffn']} |"
        )
        groups.setdefault(key.rsplit("/seed", 1)[0], []).append(r)
    for name, rows in groups.items():
        if len(rows) > 1:  # several seeds: the mean and the spread a difference has to beat
            lines.append(f"\n{name}: {len(rows)} seeds, " + seed_summary(rows))
    for name, test in (results.get("paired") or {}).items():
        lines.append(
            f"\n{name}: {100 * test['accuracy_difference']:+.2f} points (95% CI {100 * test['ci95'][0]:+.2f} to "
            f"{100 * test['ci95'][1]:+.2f}), {test['a_only_right']} / {test['b_only_right']} pairs right by one "
            f"only, McNemar p = {test['p_value']:.3g}"
        )
    deployed = deployed_table(results)
    if deployed:
        lines.append("\n" + deployed)
    noise = results.get("retime_noise")
    if noise and noise["groups"]:
        spread = noise["largest_relative_spread"]
        lines.append(
            f"\nTiming noise of the last --retime: rows of identical shapes differ by up to {100 * spread['b1']:.1f}% "
            f"(batch 1) and {100 * spread['b32']:.1f}% (batch 32) in speedup ({len(noise['groups'])} groups)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
