"""MNLI on CPU: all-MiniLM-L6-v2 fine-tuned densely, then pruned at three operating points by the staged pipeline.

    python benchmarks/mnli_cpu.py                          # teacher + the three points, resumable
    python benchmarks/mnli_cpu.py --points 2x              # one point
    python benchmarks/mnli_cpu.py --data-dir PATH          # another copy of the MNLI jsonl files

The teacher comes from `recipes/mnli-minilm-cpu.yaml` (its `finetune` stage, on the local train samples). Each
operating point then runs, from that teacher, the pipeline of the same recipe with its own sparsities: movement
pruning of whole heads with distillation, physical head removal, distillation, gradual Taylor pruning of FFN neurons
(with distillation between and after its iterations), evaluation on the full validation_matched split, and an export
whose `pruning_report.json` holds measured numbers (parameters, file size, FLOPs, interleaved CPU latency at batch 1
and 32, the accuracy of teacher and pruned model, the wall time of every stage).

Every run is a `hf-prune` recipe run under `--output-dir` (default `runs/mnli-cpu`): interrupted runs resume from the
first unfinished stage. Results go to `benchmarks/results/mnli_cpu.json` (one summary) and the model cards (with
their head maps) to `model_cards/minilm-mnli-<point>/`. Model weights stay in the run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from hf_prune.recipe import enable_progress_logging, run_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "mnli-minilm-cpu.yaml"

# Sparsities chosen from the FLOPs model of MiniLM-L6 at 128 tokens (per layer and token: Q/K/V/O plus attention
# about 1.4 MFLOPs, FFN about 2.4 MFLOPs): removing a fraction h of heads and f of FFN neurons leaves
# 1 - (1.4 h + 2.4 f) / 3.8 of the encoder's work.
POINTS = {
    "1.5x": {"heads": 0.35, "ffn": 0.35},
    "2x": {"heads": 0.5, "ffn": 0.55},
    "3x": {"heads": 0.7, "ffn": 0.72},
}


def _stages(point: dict, steps: dict) -> list[dict]:
    return [
        {
            "stage": "movement",
            "args": {
                "max_steps": steps["movement"],
                "attention_granularity": "head",
                "sparsity_mode": "global",
                "target_sparsity": point["heads"],
                "pruning_warmup_steps": steps["movement"] // 10,
                "pruning_cooldown_steps": steps["movement"] // 4,
                "pruning_frequency": 10,
            },
        },
        {"stage": "prune_heads"},
        {"stage": "distill", "args": {"max_steps": steps["distill"]}},
        {
            "stage": "taylor_ffn",
            "args": {
                "max_steps": steps["taylor"],
                "target_sparsity": point["ffn"],
                "taylor_iterations": 4,
                "taylor_interval_steps": max(1, (steps["taylor"] * 3 // 5) // 4),
            },
        },
        {"stage": "evaluate"},
        {"stage": "export", "seq_len": 128, "batch_sizes": [1, 32], "repeats": 10},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/mnli-cpu")
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnli"))
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--movement-steps", type=int, default=150)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--taylor-steps", type=int, default=200)
    parser.add_argument("--max-eval-samples", type=int, default=None, help="Default: the full validation_matched.")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "mnli_cpu.json"))
    parser.add_argument("--cards", default=str(ROOT / "model_cards"))
    parser.add_argument("--table", action="store_true", help="Only print the results file as a markdown table.")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.results).read_text())))
        return
    enable_progress_logging()

    data = Path(args.data_dir)
    train, validation = data / "train_subset_8999.jsonl", data / "validation_matched.jsonl"
    for f in (train, validation):
        if not f.is_file():
            raise SystemExit(
                f"{f} is missing: pass --data-dir with the MNLI jsonl files (train_subset_8999.jsonl, "
                "validation_matched.jsonl)."
            )
    out = Path(args.output_dir)
    common = [
        f"data.train_file={train}",
        f"data.validation_file={validation}",
        f"data.max_eval_samples={args.max_eval_samples if args.max_eval_samples else 'null'}",
    ]

    started = time.perf_counter()
    teacher_run = run_recipe(
        RECIPE,
        output_dir=str(out / "teacher"),
        overrides=common
        + [
            "stages="
            + json.dumps(
                [{"stage": "finetune", "args": {"num_train_epochs": args.finetune_epochs}}, {"stage": "evaluate"}]
            ),
        ],
    )
    teacher_dir = out / "teacher" / teacher_run.state["finished"][0]["dir"] / "model"
    teacher_metrics = teacher_run.state["finished"][-1].get("metrics", {})
    results = {
        "teacher": {
            "model_dir": str(teacher_dir),
            "metrics": teacher_metrics,
            "stages": [
                {"name": r["name"], "wall_time_s": r.get("wall_time_s")} for r in teacher_run.state["finished"]
            ],
        },
        "points": {},
    }
    steps = {"movement": args.movement_steps, "distill": args.distill_steps, "taylor": args.taylor_steps}
    for name in args.points:
        stages = json.dumps(_stages(POINTS[name], steps))
        run = run_recipe(
            RECIPE,
            output_dir=str(out / name),
            overrides=common + [f"model={teacher_dir}", f"teacher={teacher_dir}", f"stages={stages}"],
        )
        export = run.export_dir or next((out / name).glob("*/")).parent / "final"
        report = json.loads((Path(export) / "pruning_report.json").read_text())
        results["points"][name] = {
            "sparsity": POINTS[name],
            "steps": steps,
            "export_dir": str(export),
            "report": report,
        }
        card_dir = Path(args.cards) / f"minilm-mnli-{name}"
        card_dir.mkdir(parents=True, exist_ok=True)
        for f in ("README.md", "head_map.png", "pruning_report.json"):
            if (Path(export) / f).is_file():
                shutil.copy2(Path(export) / f, card_dir / f)
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    tmp = args.results + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.results)
    print(summary_table(results))


def _speedup(report: dict, batch_size: int) -> float:
    row = next(b for b in report["latency"]["batches"] if b["batch_size"] == batch_size)
    return row["dense_ms"] / row["pruned_ms"]


def summary_table(results: dict) -> str:
    """Dense teacher and every point: accuracy, parameters, file size, measured speedups and the FLOPs ratio."""
    rows = [("model", "accuracy", "params", "MiB", "speedup b1", "speedup b32", "FLOPs ratio", "0.9 x FLOPs met")]
    for i, (name, point) in enumerate(results["points"].items()):
        r = point["report"]
        teacher_acc = next(iter((r["metrics"].get("teacher") or {}).values()), None)
        pruned_acc = next(iter((r["metrics"].get("pruned") or {}).values()), None)
        if i == 0:
            rows.append(
                (
                    "dense (teacher)",
                    f"{teacher_acc:.4f}",
                    f"{r['parameters']['total_before']:,}",
                    f"{r['file_size']['before_bytes'] / 2**20:.1f}",
                    "1.00x",
                    "1.00x",
                    "1.00x",
                    "-",
                )
            )
        b1, b32, flops = _speedup(r, 1), _speedup(r, 32), r["flops"]["ratio"]
        rows.append(
            (
                f"pruned {name}",
                f"{pruned_acc:.4f}",
                f"{r['parameters']['total_after']:,}",
                f"{r['file_size']['after_bytes'] / 2**20:.1f}",
                f"{b1:.2f}x",
                f"{b32:.2f}x",
                f"{flops:.2f}x",
                "yes" if max(b1, b32) >= 0.9 * flops else "no",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(" | ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows)


def markdown_table(results: dict) -> str:
    """The results as the markdown table of the README: one row for the teacher, one per operating point."""
    rows = [
        "| model | accuracy (validation_matched) | parameters | file (MiB) | CPU speedup b1 | CPU speedup b32 "
        "| FLOPs ratio | heads kept | FFN kept | stage wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    teacher = results["teacher"]
    for i, (name, point) in enumerate(results["points"].items()):
        r = point["report"]
        t_acc = next(iter(r["metrics"]["teacher"].values()))
        p_acc = next(iter(r["metrics"]["pruned"].values()))
        if i == 0:
            t_wall = " + ".join(f"{s['name']} {s['wall_time_s']:.0f}" for s in teacher["stages"])
            rows.append(
                f"| dense, fine-tuned (teacher) | {t_acc:.4f} | {r['parameters']['total_before']:,} | "
                f"{r['file_size']['before_bytes'] / 2**20:.1f} | 1.00x | 1.00x | 1.00x | "
                f"{r['heads']['dense']} | {r['ffn']['dense']} | {t_wall} |"
            )
        wall = " + ".join(f"{s['name']} {s['wall_time_s']:.0f}" for s in r["stages"] if s.get("wall_time_s"))
        rows.append(
            f"| pruned {name} | {p_acc:.4f} ({(p_acc - t_acc) * 100:+.2f} pt) | "
            f"{r['parameters']['total_after']:,} | {r['file_size']['after_bytes'] / 2**20:.1f} | "
            f"{_speedup(r, 1):.2f}x | {_speedup(r, 32):.2f}x | {r['flops']['ratio']:.2f}x | "
            f"{r['heads']['kept']} | {r['ffn']['kept']} | {wall} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
