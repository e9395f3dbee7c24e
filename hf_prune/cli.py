"""`hf-prune` command line: `run` a staged recipe, print a `report`, `push` an export to the Hub."""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging

logger = logging.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prune",
        description="Structured pruning of Transformers: staged recipes, reports and Hub uploads of pruned models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="Run a staged recipe (default: the offline demo recipe).")
    run.add_argument("recipe", nargs="?", default=None, help="Recipe YAML file (default: recipes/demo.yaml).")
    run.add_argument("--output-dir", default=None, help="Where stages, state.json and the export go.")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set model=path/to/model or --set stages.movement.target_sparsity=0.6.",
    )

    report = sub.add_parser("report", help="Print the pruning report of an exported folder as a table.")
    report.add_argument("dir", help="An exported folder (holds pruning_report.json).")

    push = sub.add_parser("push", help="Create a Hub repo and upload an exported folder to it.")
    push.add_argument("dir", help="An exported folder.")
    push.add_argument("--repo-id", required=True, help="Hub repo id, e.g. my-org/bert-base-mnli-pruned.")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from .recipe import cli_run

            return cli_run(args)
        if args.command == "report":
            from .report import cli_report

            return cli_report(args)
        if args.command == "push":
            from .card import cli_push

            return cli_push(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hf-prune {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
