"""`hf-prune` command line: `run` a staged recipe, `compress` a fine-tuned model to a speed without training, print a
`report`, export to `onnx` (optionally int8), `push` an export to the Hub."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding
from transformers.utils import logging

from .export.card import cli_push
from .export.deploy import cli_onnx
from .export.files import CONFIG_NAME, REPORT_NAME
from .export.report_format import cli_report
from .pipeline.data import read_local_file, tokenize_splits, validation_files
from .pipeline.evaluation import split_evaluator
from .pipeline.recipe import cli_compress, cli_run
from .pipeline.schema import COST_MODELS, IMPORTANCES
from .pipeline.tasks import parse_task

logger = logging.get_logger(__name__)

# What `tokenizer.save_pretrained` writes (one of them at least): without them transformers would build a tokenizer
# from the model type's defaults instead of the export's own.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


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
        "demo, causal_lm (text packed into blocks, scored by perplexity) or image_classification (--train-file and "
        "--validation-file are image folders, one sub-folder per class). Default: causal_lm for a causal LM, "
        "image_classification for an image model (read from its config), else mnli; a dataset with its own columns "
        "is a recipe's task mapping (hf-prune run).",
    )
    compress.add_argument(
        "--train-file", nargs="+", action="extend", default=None, help="Local file(s) or image folder(s) to sample."
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
        "unit (Minitron); hybrid: the Fisher sizes each layer, the mean output norm picks its units.",
    )
    compress.add_argument(
        "--drop-layers", action="store_true", help="Let the search remove whole layers where that loses less."
    )
    compress.add_argument(
        "--layer-counts",
        nargs="+",
        type=int,
        default=None,
        help="The numbers of layers the search may keep (one number fixes the depth); implies --drop-layers.",
    )
    compress.add_argument(
        "--prune-hidden",
        action="store_true",
        help="Let the search narrow the residual stream (hidden dimensions, every family).",
    )
    compress.add_argument(
        "--hidden-widths",
        nargs="+",
        type=int,
        default=None,
        help="The residual widths the search may narrow to (one width fixes it); implies --prune-hidden.",
    )
    compress.add_argument(
        "--tune-bias",
        action="store_true",
        help="The least-squares tuning also fits the output projections' biases (FLAP's bias compensation); adds "
        "zero biases where the family's config has a flag for them (Llama).",
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
    onnx.add_argument(
        "--no-measure",
        action="store_true",
        help="Only write the files. By default every deployed form is then timed (interleaved with the PyTorch "
        "export, on this CPU) and written into DIR/pruning_report.json and the model card.",
    )
    onnx.add_argument(
        "--validation-file",
        nargs="+",
        action="extend",
        default=None,
        help="Local validation file(s) (jsonl, csv or tsv with the task's columns): each form's task metric on them "
        "joins the measurements (the split is the file's stem).",
    )
    onnx.add_argument(
        "--task",
        default=None,
        help="The task of --validation-file: a GLUE name or demo (default: the task in DIR/pruning_report.json).",
    )
    onnx.add_argument("--max-seq-length", type=int, default=128, help="Truncation of --validation-file's texts.")
    onnx.add_argument("--eval-batch-size", type=int, default=64, help="Batch size of the --validation-file scoring.")
    onnx.add_argument(
        "--dense",
        default=None,
        help="The dense model (a folder or a Hub id) timed beside the forms (default: the report's dense_path when "
        "that folder exists).",
    )
    onnx.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="Batch sizes to time (1 32).")
    onnx.add_argument(
        "--seq-len", type=int, default=None, help="Tokens per timed sequence (128, or the model's context if shorter)."
    )
    onnx.add_argument("--repeats", type=int, default=10, help="Timed runs per form and batch size (median; 10).")

    push = sub.add_parser("push", help="Create a Hub repo and upload an exported folder to it.")
    push.add_argument("dir", help="An exported folder.")
    push.add_argument("--repo-id", required=True, help="Hub repo id, e.g. my-org/bert-base-mnli-pruned.")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    return parser


def onnx_evaluator(args):
    """`(eval_fn, metric name)` of `hf-prune onnx DIR --validation-file ...`: each form's task metric on the files,
    tokenized with DIR's tokenizer (`(None, None)` without files). Built before the export, so that a missing
    tokenizer or task fails before any work."""
    if not args.validation_file or getattr(args, "no_measure", False):
        return None, None
    folder = Path(args.dir)
    report_path, config_path = folder / REPORT_NAME, folder / CONFIG_NAME
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    name = args.task or report.get("task")
    if not name:
        raise ValueError("--validation-file needs the task: pass --task (a GLUE name such as mnli, or demo).")
    try:
        task = parse_task(name)
    except ValueError as err:
        raise ValueError(f"{err} Pass the task of --validation-file with --task.") from err
    if task.is_causal_lm:
        raise ValueError(
            "hf-prune onnx --validation-file scores classification and token classification tasks; a causal LM's "
            "perplexity is measured by the evaluate stage of `hf-prune run`."
        )
    if task.label_names is None and config_path.is_file():  # the export's labels, in its label-id order
        labels = json.loads(config_path.read_text(encoding="utf-8")).get("id2label") or {}
        if labels:
            task = task.with_label_names([labels[str(i)] for i in range(len(labels))])
    fix = "Export the model with its tokenizer (hf_prune.save_pruned(model, folder, tokenizer)) or leave out "
    fix += "--validation-file."
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder} holds no tokenizer to read --validation-file with. {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"The tokenizer in {folder} does not load ({err}). {fix}") from err
    raw = {split: read_local_file(path, task) for split, path in validation_files(args.validation_file).items()}
    splits = tokenize_splits(raw, tokenizer, args.max_seq_length, task)
    collator = (DataCollatorForTokenClassification if task.is_token_classification else DataCollatorWithPadding)(
        tokenizer
    )
    return split_evaluator(splits, collator, args.eval_batch_size, task), task.main_metric


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
            return cli_onnx(args, *onnx_evaluator(args))
        if args.command == "push":
            return cli_push(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"hf-prune {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
