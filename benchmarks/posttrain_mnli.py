"""Retraining-free pruning on MNLI: all-MiniLM-L6-v2 fine-tuned densely, then pruned to 1.5x, 2x and 3x FLOPs without
training, against one-shot magnitude pruning to the same shapes.

    python benchmarks/posttrain_mnli.py                       # teacher (trained once) + every row, resumable
    python benchmarks/posttrain_mnli.py --targets 2           # one target
    python benchmarks/posttrain_mnli.py --table               # print the results as a markdown table

The teacher is all-MiniLM-L6-v2 fine-tuned for 2 epochs on the 9,999 shared MNLI training pairs
(`train_subset_8999.jsonl` + `train_subset_extra_1000.jsonl`) by an `hf-prune` recipe under `--output-dir`. For each
target speedup, rows are:

- `fisher`: `hf_prune.prune_to_speedup` (mask Fisher on 2,048 training pairs, search, rearrangement, least-squares
  tuning on 512 of them, physical removal);
- `fisher-no-tune`: the same without the least-squares tuning (what the tuning is worth);
- `magnitude`: one-shot magnitude pruning of heads (L1 of their Q/K/V rows and attention-output columns) and FFN
  neurons (L1 of their up row and down column) to exactly the shapes `fisher` chose, no training (the naive baseline).

Each row is evaluated on the full validation_matched split (9,815 pairs) and timed against the dense teacher on CPU
(batch 1 and 32, 128 tokens, interleaved in one process, median), with its FLOPs ratio and the wall time of the
pruning. Results go to `benchmarks/results/posttrain_mnli.json`, written after each row; a rerun skips finished rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding

from hf_prune import prune_ffn_neurons, prune_heads, prune_hidden_dims, prune_layers, prune_to_speedup
from hf_prune.export.persistence import load_pruned
from hf_prune.export.report import build_report
from hf_prune.models import structure
from hf_prune.models.hidden import hidden_module_objects, hidden_width
from hf_prune.pipeline.data import read_local_file, read_train_files, tokenize_splits
from hf_prune.pipeline.demo import load_tokenizer_by_name
from hf_prune.pipeline.evaluation import dataset_metric
from hf_prune.pipeline.recipe import enable_progress_logging, run_recipe
from hf_prune.pruning.hidden_pruner import hidden_magnitude
from hf_prune.pruning.scores import unit_magnitude
from hf_prune.pruning.units import layer_units
from hf_prune.utils import update_json_atomic

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "mnli"
# run folders (teachers, rows, checkpoints) outside the repository, so a clean checkout keeps them
RUNS = Path(os.environ.get("HF_PRUNE_RUNS", Path.home() / ".cache" / "hf_prune" / "runs"))


def teacher_folder_name(teacher_dir: Path) -> str:
    """The teacher's folder as results files record it: relative to the runs folder when inside it (no path of the
    machine that made it), absolute otherwise."""
    teacher_dir = Path(teacher_dir).absolute()
    return str(teacher_dir.relative_to(RUNS)) if teacher_dir.is_relative_to(RUNS) else str(teacher_dir)


def teacher_recipe(data: Path, epochs: float) -> dict:
    return {
        "description": "all-MiniLM-L6-v2 fine-tuned densely on the 9,999 shared MNLI training pairs.",
        "model": "builtin:demo",
        "task": "mnli",
        "data": {
            "train_file": [str(data / "train_subset_8999.jsonl"), str(data / "train_subset_extra_1000.jsonl")],
            "validation_file": str(data / "validation_matched.jsonl"),
            "max_seq_length": 128,
        },
        "seed": 42,
        "defaults": {
            "per_device_train_batch_size": 32,
            "per_device_eval_batch_size": 128,
            "learning_rate": 5e-5,
            "warmup_steps": 0.06,
            "logging_steps": 20,
            "save_steps": 100,
        },
        # a whole number of epochs as an int, so the recipe (and its hash) reads as a hand-written one would
        "stages": [{"stage": "finetune", "args": {"num_train_epochs": int(epochs) if epochs % 1 == 0 else epochs}}],
    }


@torch.no_grad()
def magnitude_prune(model, heads_after: list[int], ffn_after: list[int], hidden_after=None, dropped=()):
    """One-shot magnitude pruning to the given shapes (a pruned copy is made by the caller): the layers `dropped`
    removed first (the per-layer shapes are those of the layers kept), each unit scored by the L1 norm of the weights
    it owns, and the residual stream narrowed to `hidden_after` dimensions of largest L1 norm."""
    if dropped:
        prune_layers(model, list(dropped))
    removed = {}
    for kind, after in (("attention", heads_after), ("mlp", ffn_after)):
        removed[kind] = {}
        for lu in layer_units(model, kind):
            order = torch.argsort(unit_magnitude(lu))
            removed[kind][lu.layer] = order[: lu.count - after[lu.layer]].tolist()
    prune_heads(model, {k: v for k, v in removed["attention"].items() if v})
    prune_ffn_neurons(model, {k: v for k, v in removed["mlp"].items() if v})
    if hidden_after is not None and hidden_after < hidden_width(model):
        order = torch.argsort(hidden_magnitude(hidden_module_objects(model)))
        prune_hidden_dims(model, order[: hidden_width(model) - hidden_after].tolist())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(RUNS / "posttrain-mnli"))
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--teacher-epochs", type=float, default=2.0)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--tune-samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="Timed runs per model and batch size.")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "posttrain_mnli.json"))
    parser.add_argument("--table", action="store_true", help="Only print the results file as a markdown table.")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.results).read_text())))
        return
    enable_progress_logging()
    torch.manual_seed(0)
    data = Path(args.data_dir)
    out = Path(args.output_dir)
    teacher_run = run_recipe(teacher_recipe(data, args.teacher_epochs), output_dir=str(out / "teacher"))
    teacher_dir = out / "teacher" / teacher_run.state["finished"][0]["dir"] / "model"
    teacher = load_pruned(teacher_dir).eval()
    tokenizer = load_tokenizer_by_name(str(teacher_dir))
    raw = {
        "train": read_train_files([data / "train_subset_8999.jsonl", data / "train_subset_extra_1000.jsonl"]),
        "validation_matched": read_local_file(data / "validation_matched.jsonl"),
    }
    splits = tokenize_splits(raw, tokenizer, 128)
    collator = DataCollatorWithPadding(tokenizer)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(
        model="sentence-transformers/all-MiniLM-L6-v2",
        teacher={"epochs": args.teacher_epochs, "train_pairs": len(splits["train"]), "dir": str(teacher_dir)},
        eval_split="validation_matched",
        eval_pairs=len(splits["validation_matched"]),
        machine={
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        num_samples=args.num_samples,
        tune_samples=args.tune_samples,
    )
    rows = results.setdefault("rows", {})

    def merge(on_disk: dict) -> None:
        """This run's values over the file's, read right before writing: rows another run added meanwhile stay (and
        join this run's)."""
        rows.update({k: v for k, v in (on_disk.get("rows") or {}).items() if k not in rows})
        on_disk.update(results)

    def save():
        update_json_atomic(results_path, merge)

    if "dense_accuracy" not in results:
        results["dense_accuracy"] = dataset_metric(teacher, splits["validation_matched"], collator, batch_size=128)
        save()
    for target in args.targets:
        shapes = None
        for method in ("fisher", "fisher-no-tune", "magnitude"):
            key = f"{target:g}x/{method}"
            if key in rows:
                shapes = shapes or rows[key].get("shapes")
                continue
            start = time.perf_counter()
            if method == "magnitude":
                pruned = magnitude_prune(copy.deepcopy(teacher), shapes["heads"], shapes["ffn"])
                summary = {}
            else:
                pruned, summary = prune_to_speedup(
                    teacher, splits["train"], target, args.num_samples, tune=method == "fisher",
                    tune_samples=args.tune_samples, data_collator=collator,
                )  # fmt: skip
            wall = time.perf_counter() - start
            shapes = shapes or {"heads": structure.num_heads(pruned), "ffn": structure.ffn_size(pruned)}
            acc = dataset_metric(pruned, splits["validation_matched"], collator, batch_size=128)
            report = build_report(teacher, pruned, seq_len=128, batch_sizes=(1, 32), repeats=args.repeats)
            rows[key] = {
                "target_speedup": target,
                "method": method,
                "accuracy": acc,
                "delta_pt": 100 * (acc - results["dense_accuracy"]),
                "flops_ratio": report["flops"]["ratio"],
                "speedup_b1": report["latency"]["batches"][0]["speedup"],
                "speedup_b32": report["latency"]["batches"][1]["speedup"],
                "params": report["parameters"]["total_after"],
                "prune_wall_s": round(wall, 1),
                "phases_s": summary.get("wall_time_s"),
                "shapes": {"heads": structure.num_heads(pruned), "ffn": structure.ffn_size(pruned)},
            }
            print(json.dumps({key: rows[key]}, indent=1), flush=True)
            save()
    print(markdown_table(results))


def markdown_table(results: dict) -> str:
    dense = results["dense_accuracy"]
    lines = [
        "| target | method | validation_matched | FLOPs | CPU b1 / b32 | heads | FFN | pruning wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| - | dense teacher | {100 * dense:.2f} | 1.00x | 1.00x / 1.00x | 72 | 9216 | - |",
    ]
    for r in results["rows"].values():
        lines.append(
            f"| {r['target_speedup']:g}x | {r['method']} | {100 * r['accuracy']:.2f} ({r['delta_pt']:+.2f}) | "
            f"{r['flops_ratio']:.2f}x | {r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x | "
            f"{sum(r['shapes']['heads'])} | {sum(r['shapes']['ffn'])} | {r['prune_wall_s']:.0f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
