#!/usr/bin/env python
"""The staged MNLI pipeline: fine-tune, movement-prune heads, distill, Taylor-prune FFN neurons, evaluate, export.

Runs a recipe (default: recipes/mnli-bert-base.yaml) with the same runner as `hf-prune run`, on one process or many:

    python scripts/prune_mnli.py --output-dir runs/mnli
    accelerate launch --multi_gpu --num_processes 2 scripts/prune_mnli.py --output-dir runs/mnli
    torchrun --nproc_per_node 2 scripts/prune_mnli.py --output-dir runs/mnli

Without CUDA the processes talk over gloo. Only the main process writes files (state.json, stage results, the export);
after each stage every process loads what it wrote, so all of them continue with the same masks and shapes. Rerun the
same command to resume an interrupted run.

Examples:
    python scripts/prune_mnli.py --model bert-base-uncased --set stages.movement.target_sparsity=0.6
    python scripts/prune_mnli.py --recipe recipes/mnli-minilm-cpu.yaml --set defaults.max_steps=50
    python scripts/prune_mnli.py --train-file train.jsonl --validation-file dev_matched.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe",
        default=str(REPO / "recipes" / "mnli-bert-base.yaml"),
        help="Recipe YAML (default: recipes/mnli-bert-base.yaml of this repository).",
    )
    parser.add_argument("--model", default=None, help="Model folder or Hub id; replaces the recipe's `model`.")
    parser.add_argument("--output-dir", default=None, help="Run folder (stages, state.json, export).")
    parser.add_argument(
        "--train-file", default=None, help="Local training file (jsonl, csv or tsv: premise, hypothesis, label)."
    )
    parser.add_argument(
        "--validation-file",
        action="append",
        default=None,
        help="Local validation file; repeat for several splits (each is named after its file name).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set stages.movement.target_sparsity=0.6 --set defaults.bf16=true.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hf_prune.recipe import enable_progress_logging, format_summary, run_recipe

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={Path(args.model).absolute() if Path(args.model).exists() else args.model}")
    if args.train_file:
        overrides.append(f"data.train_file={Path(args.train_file).absolute()}")
    if args.validation_file:
        files = [str(Path(p).absolute()) for p in args.validation_file]
        overrides.append(f"data.validation_file={json.dumps(files[0] if len(files) == 1 else files)}")
    enable_progress_logging()
    try:
        result = run_recipe(args.recipe, overrides=overrides, output_dir=args.output_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"prune_mnli: error: {err}", file=sys.stderr)
        return 2
    if result.is_main:
        print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
