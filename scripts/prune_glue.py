#!/usr/bin/env python
"""The staged pipeline on any GLUE task: fine-tune the teacher, prune it to a speed without training, distill,
evaluate with the task's own metric, export.

Runs a recipe (default: recipes/glue-minilm-cpu.yaml) on the task given by --task, with the same runner as
`hf-prune run`, on one process or many:

    python scripts/prune_glue.py --task sst2
    accelerate launch --multi_gpu --num_processes 2 scripts/prune_glue.py --task qnli
    torchrun --nproc_per_node 2 scripts/prune_glue.py --task cola

Data comes from datasets.load_dataset("nyu-mll/glue", TASK), or from local files (--train-file, --validation-file)
with the task's GLUE columns. Metrics are GLUE's: Matthews correlation (CoLA), F1 and accuracy (MRPC, QQP), Pearson
and Spearman (STS-B), accuracy for the others. The run folder defaults to runs/<recipe name>-<task>; rerun the same
command to resume an interrupted run.

Examples:
    python scripts/prune_glue.py --task stsb --set stages.prune_to_speedup.target_speedup=3
    python scripts/prune_glue.py --task mrpc --recipe recipes/mnli-bert-base.yaml --output-dir runs/mrpc-bert
    python scripts/prune_glue.py --task sst2 --train-file train.tsv --validation-file validation.tsv
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared driver beside this file, however it is launched

from _driver import REPO, build_parser, run  # noqa: E402

from hf_prune.pipeline.tasks import GLUE_TASKS  # noqa: E402


def glue_task(name: str) -> str:
    """`sst2` or `glue/sst2` -> `sst2`; anything else is refused with the valid names."""
    task = name.strip().lower().removeprefix("glue/")
    if task not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}. Valid: {', '.join(GLUE_TASKS)}.")
    return task


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, REPO / "recipes" / "glue-minilm-cpu.yaml", "the task's GLUE columns and label")
    parser.add_argument("--task", required=True, help=f"The GLUE task: {', '.join(GLUE_TASKS)}.")
    args = parser.parse_args(argv)
    try:
        task = glue_task(args.task)
    except ValueError as err:
        parser.error(str(err))
    if args.output_dir is None:
        args.output_dir = f"runs/{Path(args.recipe).stem}-{task}"
    return run(args, "prune_glue", first=[f"task=glue/{task}"])


if __name__ == "__main__":
    sys.exit(main())
