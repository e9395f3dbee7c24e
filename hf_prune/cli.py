"""`hf-prune` command line: `run` a staged recipe, `compress` a fine-tuned model to a speed without training, print a
`report`, export to `onnx` (optionally int8), `push` an export to the Hub."""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging

from .export.card import cli_push
from .export.deploy import cli_onnx
from .export.report_format import cli_report
from .pipeline.recipe import cli_compress, cli_run

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

    compress = sub.add_parser(
        "compress",
        help="Prune a fine-tuned model to a speedup without training (Fisher mask search and least-squares tuning), "
        "evaluate it against the dense model and export it with its report and card.",
    )
    compress.add_argument("model", help="The fine-tuned model: a folder or a Hub id.")
    compress.add_argument("--speedup", type=float, required=True, help="Target FLOPs ratio, dense / pruned (e.g. 2).")
    compress.add_argument(
        "--task",
        default="mnli",
        help="The task of the model and its data: glue/<name> (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or "
        "demo (default: mnli); a dataset with its own columns is a recipe's task mapping (hf-prune run).",
    )
    compress.add_argument("--train-file", action="append", default=None, help="Local file(s) to sample from.")
    compress.add_argument("--validation-file", action="append", default=None, help="Local validation file(s).")
    compress.add_argument("--output-dir", default=None, help="Run folder (default: runs/compress-<model name>).")
    compress.add_argument("--num-samples", type=int, default=2048, help="Examples for the Fisher information.")
    compress.add_argument("--tune-samples", type=int, default=512, help="Examples for the least-squares tuning.")
    compress.add_argument("--no-tune", action="store_true", help="Skip the least-squares mask tuning.")
    compress.add_argument("--seq-len", type=int, default=128, help="Sequence length of the FLOPs cost model.")
    compress.add_argument(
        "--cost-model",
        choices=("flops", "latency"),
        default="flops",
        help="flops: --speedup is a FLOPs ratio; latency: --speedup is the speedup of this machine at batch 32 (unit "
        "costs measured, the chosen shapes timed and searched again).",
    )
    compress.add_argument("--max-seq-length", type=int, default=128, help="Truncation of the tokenized examples.")
    compress.add_argument("--max-eval-samples", type=int, default=None, help="Evaluate on a random subset.")
    compress.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a value of the generated recipe, e.g. --set defaults.per_device_eval_batch_size=64.",
    )

    report = sub.add_parser("report", help="Print the pruning report of an exported folder as a table.")
    report.add_argument("dir", help="An exported folder (holds pruning_report.json).")

    onnx = sub.add_parser(
        "onnx",
        help="Export an exported folder to ONNX (DIR/onnx/model.onnx), with --int8 also quantized to int8 by ONNX "
        'Runtime (DIR/onnx/model_int8.onnx). Needs pip install "hf-prune[onnx]".',
    )
    onnx.add_argument("dir", help="An exported folder (config.json, model.safetensors), or an .onnx file to quantize.")
    onnx.add_argument(
        "--int8",
        action="store_true",
        help="Also write the int8 model (dynamic quantization); with an onnx/ folder holding only model.onnx, "
        "quantize that one.",
    )
    onnx.add_argument(
        "--overwrite", action="store_true", help="Replace an existing onnx/ folder (once the new one is complete)."
    )
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset, 11 to 20 (default: 17).")

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
            return cli_run(args)
        if args.command == "compress":
            return cli_compress(args)
        if args.command == "report":
            return cli_report(args)
        if args.command == "onnx":
            return cli_onnx(args)
        if args.command == "push":
            return cli_push(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"hf-prune {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
