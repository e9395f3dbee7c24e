"""How long to fine-tune the dense MiniLM teacher on the shared MNLI pairs, chosen without touching validation_matched.

    python benchmarks/teacher_curve.py                 # the curve, then the teacher at the chosen epochs (resumable)
    python benchmarks/teacher_curve.py --rebuild        # on a new machine: the recorded teacher again, 3 epochs only
    python benchmarks/teacher_curve.py --table

1. The curve: all-MiniLM-L6-v2 fine-tuned on `train_subset_8999.jsonl` for `--max-epochs` epochs, evaluated after
   every epoch on `train_subset_extra_1000.jsonl`, which this run never trains on (a slice held out of the training
   pairs; validation_matched is never read).
2. The epoch count with the best held-out accuracy (the smaller one on a tie).
3. The teacher: the curve run's checkpoint at that epoch, copied to `--output-dir/teacher` (the very model whose
   held-out accuracy chose it). With `--refit`, a model fine-tuned on all 9,999 pairs for that many epochs instead
   (the recipe of `benchmarks/posttrain_mnli.py`, so a 2-epoch choice reuses that teacher when it exists).

Results (the curve, the choice, the teacher's folder relative to the runs folder, the teacher's digest) go to
`benchmarks/results/teacher_curve.json`.

`--rebuild` makes the recorded teacher again without the rest of the curve (the teacher is lost with the machine's
cache, the curve is not): the curve run trains, on its own schedule, only until the checkpoint of the recorded
epoch, then stops; the held-out accuracies it measured on the way must equal the recorded ones, and the teacher
made from that checkpoint must have the recorded digest (`teacher_digest`), else it stops with both. The curve run
stays resumable: the same command without `--rebuild` finishes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from hf_prune import save_pruned
from hf_prune.export.persistence import load_pruned
from hf_prune.pipeline.context import stage_folder
from hf_prune.pipeline.demo import load_tokenizer_by_name
from hf_prune.pipeline.metrics_cache import model_digest
from hf_prune.pipeline.recipe import enable_progress_logging, run_recipe
from hf_prune.pipeline.schema import load_recipe
from hf_prune.pipeline.sources import BASE_MODEL_KEY, base_model_name
from hf_prune.utils import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from posttrain_mnli import DATA, RUNS, teacher_folder_name, teacher_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def curve_recipe(data: Path, max_epochs: int) -> dict:
    recipe = teacher_recipe(data, float(max_epochs))
    recipe["description"] = "Held-out curve of the MiniLM MNLI teacher: accuracy on 1,000 held-out training pairs."
    recipe["data"].update(
        train_file=str(data / "train_subset_8999.jsonl"),
        validation_file={"heldout": str(data / "train_subset_extra_1000.jsonl")},
    )
    recipe["keep_checkpoints"] = True
    # a checkpoint at every epoch, all kept: the chosen one is the teacher
    recipe["stages"][0]["args"].update(eval_strategy="epoch", save_strategy="epoch", save_total_limit=None)
    return recipe


def read_curve(stage_dir: Path) -> list[dict]:
    checkpoints = sorted(stage_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    return [
        {"epoch": round(h["epoch"], 3), "heldout_accuracy": h["eval_heldout_accuracy"], "step": h["step"]}
        for h in history
        if "eval_heldout_accuracy" in h
    ]


class ReachedStep(Exception):
    """Raised once the checkpoint of a step is on disk: the run stops there and stays resumable."""


class StopAfterCheckpoint(TrainerCallback):
    """Stops training right after the checkpoint of `step` is saved, leaving the learning-rate schedule (and so
    every step before it) exactly as the whole run has it."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise ReachedStep(state.global_step)


def teacher_from_checkpoint(stage_dir: Path, step: int, teacher_dir: Path, base_model: str) -> None:
    """The teacher: the curve run's checkpoint at `step`, saved as a model folder (kept if it is there already), its
    config naming `base_model`, the model the curve run fine-tuned, so that the cards of models pruned from it name
    that model rather than a folder of this machine."""
    config = teacher_dir / "config.json"
    if not config.is_file():
        checkpoint = stage_dir / "checkpoints" / f"checkpoint-{step}"
        teacher = load_pruned(checkpoint)
        setattr(teacher.config, BASE_MODEL_KEY, base_model)
        save_pruned(teacher, teacher_dir, load_tokenizer_by_name("builtin:demo"), card=False)
        return
    values = json.loads(config.read_text())
    if not values.get(BASE_MODEL_KEY):  # a teacher saved before its base was recorded (its weights unchanged)
        write_json_atomic(config, {**values, BASE_MODEL_KEY: base_model}, sort_keys=True)


def curve_teacher_train(step: int) -> str:
    """What the results record as the teacher's training when the teacher is the curve's checkpoint at `step`."""
    return f"train_subset_8999.jsonl (8,999 pairs), the curve's checkpoint at step {step}"


def rebuild(args, data: Path, recorded: dict) -> None:
    """The recorded teacher again: the curve run up to the chosen epoch's checkpoint, checked against the record."""
    step = next(p["step"] for p in recorded["curve"] if round(p["epoch"]) == recorded["chosen_epochs"])
    if args.refit or recorded["teacher_train"] != curve_teacher_train(step):
        raise SystemExit(
            f"The recorded teacher was trained as {recorded['teacher_train']!r}, not taken from the curve's "
            "checkpoint: --rebuild makes only a curve checkpoint teacher; run with --refit (without --rebuild)."
        )
    recipe = load_recipe(curve_recipe(data, recorded["max_epochs"]), output_dir=args.output_dir)
    stage_dir = Path(args.output_dir) / stage_folder(1, recipe.stages[0])
    if not (stage_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file():
        try:
            run_recipe(recipe, callbacks=[StopAfterCheckpoint(step)])
        except ReachedStep:
            pass
    measured = [p for p in read_curve(stage_dir) if p["step"] <= step]
    expected = [p for p in recorded["curve"] if p["step"] <= step]
    if measured != expected:
        raise SystemExit(f"The curve differs from the recorded one: measured {measured}, recorded {expected}.")
    teacher_dir = Path(args.output_dir) / "teacher"
    teacher_from_checkpoint(stage_dir, step, teacher_dir, base_model_name(recipe))
    digest = model_digest(load_pruned(teacher_dir))
    if recorded.get("teacher_digest") not in (None, digest):
        raise SystemExit(f"{teacher_dir} has digest {digest}, the recorded teacher {recorded['teacher_digest']}.")
    results = {**recorded, "teacher_dir": teacher_folder_name(teacher_dir), "teacher_digest": digest}
    write_json_atomic(Path(args.results), results)
    print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(RUNS / "teacher-curve"))
    parser.add_argument("--teacher-output-dir", default=str(RUNS / "posttrain-mnli" / "teacher"))
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "teacher_curve.json"))
    parser.add_argument("--refit", action="store_true", help="Train the teacher again on all 9,999 pairs.")
    parser.add_argument("--rebuild", action="store_true", help="The recorded teacher again, checked (see above).")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    results_path = Path(args.results)
    if args.table:
        results = json.loads(results_path.read_text())
        print("| epoch | held-out accuracy (1,000 training pairs) |\n|---:|---:|")
        for point in results["curve"]:
            print(f"| {point['epoch']:g} | {100 * point['heldout_accuracy']:.2f} |")
        print(f"\nchosen: {results['chosen_epochs']} epochs")
        return
    enable_progress_logging()
    data = Path(args.data_dir)
    if args.rebuild:
        if not results_path.is_file():
            raise SystemExit(f"{results_path} records no curve to rebuild the teacher of: run without --rebuild.")
        rebuild(args, data, json.loads(results_path.read_text()))
        return
    recipe = curve_recipe(data, args.max_epochs)
    run = run_recipe(recipe, output_dir=args.output_dir)
    curve = read_curve(Path(args.output_dir) / run.state["finished"][0]["dir"])
    best = max(curve, key=lambda p: (p["heldout_accuracy"], -p["epoch"]))
    epochs = int(round(best["epoch"]))
    if args.refit:
        teacher = run_recipe(teacher_recipe(data, float(epochs)), output_dir=args.teacher_output_dir)
        teacher_dir = Path(args.teacher_output_dir) / teacher.state["finished"][0]["dir"] / "model"
        teacher_train = "train_subset_8999.jsonl + train_subset_extra_1000.jsonl (9,999 pairs)"
    else:
        stage_dir = Path(args.output_dir) / run.state["finished"][0]["dir"]
        teacher_dir = Path(args.output_dir) / "teacher"
        base = base_model_name(load_recipe(recipe, output_dir=args.output_dir))
        teacher_from_checkpoint(stage_dir, best["step"], teacher_dir, base)
        teacher_train = curve_teacher_train(best["step"])
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "curve_train": "train_subset_8999.jsonl (8,999 pairs)",
        "heldout": "train_subset_extra_1000.jsonl (1,000 pairs, not trained on by the curve run)",
        "max_epochs": args.max_epochs,
        "curve": curve,
        "chosen_epochs": epochs,
        "teacher_train": teacher_train,
        "teacher_dir": teacher_folder_name(teacher_dir),
        "teacher_digest": model_digest(load_pruned(teacher_dir)),
    }
    write_json_atomic(results_path, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
