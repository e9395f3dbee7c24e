"""The shared driver of the staged-pipeline scripts (`prune_mnli.py`, `prune_glue.py`): command-line options that
become recipe overrides, then the runner of `hf-prune run`, on one process or under torchrun / accelerate launch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_parser(doc: str, default_recipe: Path, columns: str) -> argparse.ArgumentParser:
    """The options every pipeline script takes.

    Args:
        doc: the script's docstring (its first paragraph is the description).
        default_recipe: the recipe run when `--recipe` is not given.
        columns: what a local data file holds, for the help text (e.g. "premise, hypothesis, label").
    """
    examples = doc.partition("Examples:")[2]
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=f"Examples:{examples}" if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--recipe",
        default=str(default_recipe),
        help=f"Recipe YAML (default: {default_recipe.relative_to(REPO)} of this repository).",
    )
    parser.add_argument("--model", default=None, help="Model folder or Hub id; replaces the recipe's `model`.")
    parser.add_argument("--output-dir", default=None, help="Run folder (stages, state.json, export).")
    parser.add_argument(
        "--train-file",
        action="append",
        default=None,
        help=f"Local training file (jsonl, csv or tsv: {columns}); repeat to concatenate several.",
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
        help="Override a recipe value, e.g. --set stages.distill.max_steps=100 --set defaults.bf16=true.",
    )
    return parser


def recipe_overrides(args: argparse.Namespace, first: list[str] | None = None) -> list[str]:
    """The `--set` overrides the options stand for: `first` (the script's own), the model, the data files, then the
    user's `--set` values, which win."""
    overrides = list(first or [])
    if args.model:
        overrides.append(f"model={Path(args.model).absolute() if Path(args.model).exists() else args.model}")
    if args.train_file:
        files = [str(Path(p).absolute()) for p in args.train_file]
        overrides.append(f"data.train_file={json.dumps(files[0] if len(files) == 1 else files)}")
    if args.validation_file:
        files = [str(Path(p).absolute()) for p in args.validation_file]
        overrides.append(f"data.validation_file={json.dumps(files[0] if len(files) == 1 else files)}")
    return overrides + list(args.overrides)


def run(args: argparse.Namespace, prog: str, first: list[str] | None = None) -> int:
    """Runs the recipe with the options' overrides and prints the closing summary (main process).

    Returns:
        The exit status: 0, or 2 when the recipe, its data or its models are refused before training.
    """
    from hf_prune.pipeline.recipe import enable_progress_logging, format_summary, run_recipe

    enable_progress_logging()
    try:
        result = run_recipe(args.recipe, overrides=recipe_overrides(args, first), output_dir=args.output_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if result.is_main:
        print(format_summary(result))
    return 0
