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
from .pipeline.schema import COST_MODELS, IMPORTANCES

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
        help="Prune a fine-tuned model or a causal LM to a speedup without training (Fisher mask search and "
        "least-squares tuning), evaluate it against the dense model and export it with its report and card.",
    )
    compress.add_argument("model", help="The model: a folder, a Hub id or builtin:smollm2.")
    compress.add_argument(
        "--speedup",
        type=float,
        required=True,
        help="Target ratio, dense / pruned, of what --cost-model counts (e.g. 2).",
    )
    compress.add_argument(
        "--task",
        default=None,
        help="The task of the model and its data: glue/<name> (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), "
        "demo, or causal_lm (text packed into blocks, scored by perplexity). Default: causal_lm for a causal LM "
        "(read from its config), else mnli; a dataset with its own columns is a recipe's task mapping (hf-prune run).",
    )
    compress.add_argument(
        "--train-file", nargs="+", action="extend", default=None, help="Local file(s) to sample from."
    )
    compress.add_argument(
        "--validation-file", nargs="+", action="extend", default=None, help="Local validation file(s)."
    )
    compress.add_argument(
        "--text-column",
        nargs="+",
        default=None,
        help="causal_lm: the text column of jsonl files (default: text); several are joined by a newline per row, "
        "e.g. --text-column premise hypothesis.",
    )
    compress.add_argument(
        "--block-size", type=int, default=None, help="causal_lm: tokens per block (default 128), at most the context."
    )
    compress.add_argument("--output-dir", default=None, help="Run folder (default: runs/compress-<model name>).")
    compress.add_argument("--num-samples", type=int, default=2048, help="Examples for the Fisher information.")
    compress.add_argument("--tune-samples", type=int, default=512, help="Examples for the least-squares tuning.")
    compress.add_argument("--no-tune", action="store_true", help="Skip the least-squares mask tuning.")
    compress.add_argument(
        "--seq-len", type=int, default=128, help="Tokens of the cost model's inputs (decode: the prompt)."
    )
    compress.add_argument(
        "--cost-model",
        choices=COST_MODELS,
        default="flops",
        help="What --speedup is a ratio of: flops (FLOPs of one forward pass at --seq-len tokens), params "
        "(non-embedding parameters: 1.25 keeps 80%%), latency (this machine's speed at batch 32, unit costs measured, "
        "the chosen shapes timed and searched again), decode (causal LMs: decode tokens/s at batch 1 after --seq-len "
        "tokens, measured the same way).",
    )
    compress.add_argument(
        "--importance",
        choices=IMPORTANCES,
        default="fisher",
        help="fisher: Fisher information of unit masks on the loss (default); activation: mean output norm of each "
        "unit (Minitron).",
    )
    compress.add_argument(
        "--uniform",
        action="store_true",
        help="The same attention units and MLP width in every layer: a decoder's export is then its family's own "
        "config, which plain from_pretrained and serving engines load.",
    )
    compress.add_argument(
        "--max-seq-length", type=int, default=128, help="Truncation of the tokenized examples (not causal_lm)."
    )
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
