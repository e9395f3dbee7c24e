"""Deploy on CPU, measured on MNLI: pruning and int8 quantization together, against the dense teacher in PyTorch.

    python benchmarks/deploy_mnli.py                          # the 2x export of accuracy_at_speed.py's best row
    python benchmarks/deploy_mnli.py --row fisher-latency-nocal --max-eval-samples 2000
    python benchmarks/deploy_mnli.py --export runs/x/final --teacher-dir runs/teacher-curve/teacher
    python benchmarks/deploy_mnli.py --table

The export (by default the `final` export of the `--row` row at `--target`x of `benchmarks/accuracy_at_speed.py`,
found from the teacher's digest as that script lays out its runs) is exported to ONNX fp32 and int8 in its `onnx/`
folder (kept when it is there already, unless `--reexport`). Then every deployed form (dense PyTorch fp32 = the
teacher, pruned PyTorch fp32, pruned ONNX fp32, pruned ONNX int8) is evaluated on validation_matched and timed at
batch 1 and 32 x 128 tokens, all forms interleaved in one process (median of `--repeats` runs, ONNX Runtime with as
many threads as PyTorch). The rows are added to the export's `pruning_report.json` and model card (unless
`--no-write-export`), and written whole, atomically, to `benchmarks/results/deploy_mnli.json`.

Goal: at least 3.5x at batch 32 and 2.5x at batch 1 against dense PyTorch fp32, for at most 1.5 points lost.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_prune import export_onnx, load_pruned
from hf_prune.export.deploy import deployment_rows, write_deployment
from hf_prune.export.onnx import read_export_info
from hf_prune.pipeline.data import read_local_file, tokenize_splits
from hf_prune.pipeline.evaluation import split_evaluator
from hf_prune.pipeline.metrics_cache import model_digest
from hf_prune.pipeline.recipe import enable_progress_logging
from hf_prune.utils import format_float, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "mnli"
SPLIT = "validation_matched"
GOAL = {"speedup_b32": 3.5, "speedup_b1": 2.5, "max_points_lost": 1.5}
REFERENCE = "dense PyTorch fp32"
INT8 = "pruned ONNX int8"


def teacher_folder(arg: str | None) -> Path:
    if arg is None:
        curve = ROOT / "benchmarks" / "results" / "teacher_curve.json"
        arg = json.loads(curve.read_text())["teacher_dir"] if curve.is_file() else None
        if arg is None:
            raise SystemExit("No --teacher-dir and no teacher in benchmarks/results/teacher_curve.json.")
    folder = Path(arg) if Path(arg).is_absolute() else ROOT / arg
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} holds no model: run benchmarks/teacher_curve.py or pass --teacher-dir.")
    return folder


def export_folder(args, teacher) -> Path:
    """`--export`, else the export of the row's run folder under `--runs-dir` (as accuracy_at_speed.py names it)."""
    if args.export:
        return Path(args.export).absolute()
    tag = f"teacher-{model_digest(teacher)[:8]}"
    target = Path(args.runs_dir).absolute() / tag / f"{args.target:g}x"
    run = target / f"{args.row}-{args.steps}"
    state = run / "state.json"
    if not state.is_file():
        there = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
        raise SystemExit(
            f"{run} holds no finished run. Run `python benchmarks/accuracy_at_speed.py --targets {args.target:g} "
            f"--rows {args.row}` first, pick another --row (runs there: {there or 'none'}), or pass --export."
        )
    exports = [r for r in json.loads(state.read_text())["finished"] if r["stage"] == "export"]
    if not exports:
        raise SystemExit(f"The run in {run} has no finished export stage yet.")
    return run / exports[-1]["summary"]["export_dir"]


def onnx_files(export: Path, opset: int, reexport: bool) -> dict:
    onnx_dir = export / "onnx"
    files = read_export_info(onnx_dir).get("files", {})
    if reexport or not files:
        export_onnx(export, int8=True, opset=opset, overwrite=reexport)
    elif "int8" not in files:
        export_onnx(export, int8=True)  # quantizes the model.onnx that is there
    else:
        print(f"Using the ONNX files already in {onnx_dir} (--reexport to export them again).", file=sys.stderr)
    return read_export_info(onnx_dir)


def summary_rows(deployment: dict) -> list[dict]:
    forms = deployment["forms"]
    reference = next((f for f in forms if f["name"] == REFERENCE), forms[0])["metrics"].get(SPLIT)
    rows = []
    for form in forms:
        latency = {b["batch_size"]: b for b in form["latency"]}
        accuracy = form["metrics"].get(SPLIT)
        rows.append(
            {
                "form": form["name"],
                "file_mib": form["file_bytes"] / 2**20,
                **{f"ms_b{b}": v["ms"] for b, v in latency.items()},
                **{f"speedup_b{b}": v["speedup"] for b, v in latency.items()},
                "accuracy": accuracy,
                "points_vs_dense": None if accuracy is None or reference is None else 100 * (accuracy - reference),
            }
        )
    return rows


def goal(rows: list[dict]) -> dict:
    int8 = next((r for r in rows if r["form"] == INT8), None)
    if int8 is None or int8["points_vs_dense"] is None:
        return {**GOAL, "met": None}
    met = (
        int8.get("speedup_b32", 0) >= GOAL["speedup_b32"]
        and int8.get("speedup_b1", 0) >= GOAL["speedup_b1"]
        and -int8["points_vs_dense"] <= GOAL["max_points_lost"]
    )
    return {**GOAL, "form": INT8, "met": met}


def markdown_table(results: dict) -> str:
    rows = results["summary"]
    lines = [
        f"Export: {results['export']}; {results['eval_samples']} {SPLIT} pairs; {results['num_threads']} threads, "
        f"{results['seq_len']} tokens, median of {results['repeats']} interleaved runs.",
        "",
        "| form | file (MiB) | b1 (ms) | speedup b1 | b32 (ms) | speedup b32 | accuracy | vs dense (points) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['form']} | {format_float(r['file_mib'], 1)} | {format_float(r.get('ms_b1'), 1)} "
            f"| {format_float(r.get('speedup_b1'), 2, 'x')} | {format_float(r.get('ms_b32'), 1)} "
            f"| {format_float(r.get('speedup_b32'), 2, 'x')} | {format_float(r['accuracy'], 4)} "
            f"| {format_float(r['points_vs_dense'], 2)} |"
        )
    g = results["goal"]
    verdict = {True: "met", False: "not met", None: "not evaluated"}[g["met"]]
    lines += [
        "",
        f"Goal ({INT8} against {REFERENCE}): >= {g['speedup_b32']}x at batch 32, >= {g['speedup_b1']}x at batch 1, "
        f"<= {g['max_points_lost']} points lost: {verdict}.",
    ]
    return "\n".join(lines)


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (results files stay the same on every checkout)."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default=None, help="An export folder (default: the row below's export).")
    parser.add_argument("--teacher-dir", default=None, help="Default: teacher_dir of teacher_curve.json.")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "accuracy-at-speed"))
    parser.add_argument("--row", default="fisher-latency-distill", help="The accuracy_at_speed.py row to deploy.")
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=626)
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--max-eval-samples", type=int, default=None, help="Default: all of validation_matched.")
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="Timed runs per form and batch size.")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--reexport", action="store_true", help="Export and quantize again over an existing onnx/.")
    parser.add_argument("--no-write-export", action="store_true", help="Leave the export's report and card as is.")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "deploy_mnli.json"))
    parser.add_argument("--table", action="store_true", help="Only print the results file as a markdown table.")
    args = parser.parse_args()
    results_path = Path(args.results)
    if args.table:
        print(markdown_table(json.loads(results_path.read_text())))
        return
    enable_progress_logging()
    teacher_dir = teacher_folder(args.teacher_dir)
    teacher = load_pruned(teacher_dir).eval()
    export = export_folder(args, teacher)
    info = onnx_files(export, args.opset, args.reexport)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    dataset = read_local_file(Path(args.data_dir) / f"{SPLIT}.jsonl")
    if args.max_eval_samples is not None and args.max_eval_samples < len(dataset):
        dataset = dataset.shuffle(seed=42).select(range(args.max_eval_samples))
    splits = tokenize_splits({SPLIT: dataset}, tokenizer, 128)
    evaluate = split_evaluator(splits, DataCollatorWithPadding(tokenizer), args.eval_batch_size)
    deployment = deployment_rows(
        teacher, export, evaluate, batch_sizes=args.batch_sizes, seq_len=args.seq_len, repeats=args.repeats,
        dense_path=teacher_dir,
    )  # fmt: skip
    if not args.no_write_export:
        write_deployment(export, deployment)
    rows = summary_rows(deployment)
    results = {
        "export": shown(export),
        "teacher_dir": shown(teacher_dir),
        "eval_split": SPLIT,
        "eval_samples": len(dataset),
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "num_threads": torch.get_num_threads(),
        "onnx": {k: info.get(k) for k in ("exporter", "opset", "int8", "check")},
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "summary": rows,
        "goal": goal(rows),
        "deployment": deployment,
    }
    write_json_atomic(results_path, results)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
