#!/usr/bin/env python
"""The staged MNLI pipeline: fine-tune the teacher, prune it to a speed without training, distill, evaluate, export.

Runs a recipe (default: recipes/mnli-bert-base.yaml) with the same runner as `hf-prune run`, on one process or many:

    python scripts/prune_mnli.py --output-dir runs/mnli
    accelerate launch --multi_gpu --num_processes 2 scripts/prune_mnli.py --output-dir runs/mnli
    torchrun --nproc_per_node 2 scripts/prune_mnli.py --output-dir runs/mnli

Without CUDA the processes talk over gloo. Only the main process writes files (state.json, stage results, the export);
after each stage every process loads what it wrote, so all of them continue with the same masks and shapes. Rerun the
same command to resume an interrupted run. Other GLUE tasks: scripts/prune_glue.py --task NAME.

Examples:
    python scripts/prune_mnli.py --model bert-base-uncased --set stages.prune_to_speedup.target_speedup=3
    python scripts/prune_mnli.py --recipe recipes/mnli-minilm-cpu.yaml --set defaults.max_steps=50
    python scripts/prune_mnli.py --train-file train.jsonl --validation-file dev_matched.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared driver beside this file, however it is launched

from _driver import REPO, build_parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, REPO / "recipes" / "mnli-bert-base.yaml", "premise, hypothesis, label")
    return run(parser.parse_args(argv), "prune_mnli")


if __name__ == "__main__":
    sys.exit(main())
