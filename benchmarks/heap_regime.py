"""Whether a timing depends on what the process did before it: the dense MNLI teacher against the 2x and 3x shapes of
the README's rows, timed in a fresh process and again in the same process after a few training steps, with the C heap
taken as is (`HF_PRUNE_STEADY_HEAP=0`) and held steady while timing (the default, `hf_prune.models.heap`).

    python benchmarks/heap_regime.py            # two fresh processes, one per regime; about 5 minutes on 2 cores
    python benchmarks/heap_regime.py --table

Each regime runs in its own process, since the first timing changes the heap for the rest of the process: there, the
shapes are timed `--rounds` times (each a median of 10 interleaved rounds at batch 32 x 128 tokens, the calibration's
timing), then 12 training steps of a copy of the teacher run (AdamW, batches of 32 of random tokens and lengths, as
the distillation before an export stage does), then the shapes are timed again. Timings are for the shapes only (the
kept units are the first ones of each layer: which units are kept changes values, not time). Results:
`benchmarks/results/heap_regime.json`, with the CPU and threads of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hf_prune.export.persistence import load_teacher
from hf_prune.export.runtime import cpu_info
from hf_prune.posttrain.timing import paired_speedups, shaped_copy
from hf_prune.utils import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from posttrain_mnli import RUNS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REGIMES = {"as is": "0", "steady": "1"}


def card_shapes(card: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep-masks of a published row's per-layer head and FFN shapes (its `pruning_report.json`)."""
    layers = json.loads((card / "pruning_report.json").read_text())["layers"]
    heads, neurons = [], []
    for layer in layers:
        keep = torch.ones(layer["heads_dense"], dtype=torch.bool)
        keep[layer["heads_removed"]] = False
        heads.append(keep)
        neurons.append(torch.arange(layer["ffn_dense"]) < layer["ffn_kept"])
    return heads, neurons


def train_steps(model, steps: int = 12) -> None:
    """A few AdamW steps of `model` on random batches of 32 (lengths 40 to 117 tokens), as a training stage leaves the
    process."""
    generator = torch.Generator().manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    for step in range(steps):
        ids = torch.randint(1000, 20000, (32, 40 + 7 * step), generator=generator)
        labels = torch.randint(0, model.config.num_labels, (32,), generator=generator)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def child(teacher_dir: str, rounds: int, out: Path) -> None:
    dense = load_teacher(teacher_dir).eval()
    shapes = {f"{t}x": shaped_copy(dense, *card_shapes(ROOT / "model_cards" / f"minilm-mnli-{t}x")) for t in (2, 3)}

    def timed() -> dict:
        return {
            name: [statistics.median(paired_speedups(dense, model, 32, 128, repeats=10)) for _ in range(rounds)]
            for name, model in shapes.items()
        }

    fresh = timed()
    train_steps(load_teacher(teacher_dir))
    after = timed()
    record = {"fresh": fresh, "after_training": after, "cpu": cpu_info()}
    write_json_atomic(out, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", default=None, help="Default: the teacher of benchmarks/teacher_curve.py.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "heap_regime.json"))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    results_path = Path(args.results)
    if args.table:
        print(table(json.loads(results_path.read_text())))
        return
    if args.teacher_dir is None:
        curve = json.loads((ROOT / "benchmarks" / "results" / "teacher_curve.json").read_text())
        args.teacher_dir = str(RUNS / curve["teacher_dir"])
    if not (Path(args.teacher_dir) / "config.json").is_file():
        raise SystemExit(f"{args.teacher_dir} holds no model: run benchmarks/teacher_curve.py --rebuild first.")
    if args.child:
        child(args.teacher_dir, args.rounds, Path(args.child))
        return
    results = {"command": "python benchmarks/heap_regime.py", "rounds": args.rounds, "regimes": {}}
    began = time.perf_counter()
    for regime, switch in REGIMES.items():
        out = results_path.with_name(f".{results_path.stem}-{switch}.json")
        command = [sys.executable, __file__, "--teacher-dir", args.teacher_dir, "--rounds", str(args.rounds)]
        subprocess.run([*command, "--child", str(out)], check=True, env={**os.environ, "HF_PRUNE_STEADY_HEAP": switch})
        results["regimes"][regime] = json.loads(out.read_text())
        out.unlink()
    results["wall_s"] = round(time.perf_counter() - began, 1)
    write_json_atomic(results_path, results)
    print(table(results))


def table(results: dict) -> str:
    """Per regime and shapes, the medians of the fresh and after-training timings and their ratio."""
    lines = ["| heap | shapes | fresh process | after training | after / fresh |", "|---|---|---|---|---|"]
    for regime, record in results["regimes"].items():
        for name, fresh in record["fresh"].items():
            after = record["after_training"][name]
            f, a = statistics.median(fresh), statistics.median(after)
            lines.append(
                f"| {regime} | {name} | {f:.3f}x ({min(fresh):.3f}-{max(fresh):.3f}) "
                f"| {a:.3f}x ({min(after):.3f}-{max(after):.3f}) | {a / f:.3f} |"
            )
    cpu = next(iter(results["regimes"].values()))["cpu"]
    machine = f"{cpu['model']}, {cpu['threads']} threads of {cpu['logical_cpus']}"
    lines.append(
        f"\n{machine}; {results['rounds']} timings of each (medians of 10 interleaved rounds), range in brackets."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
