"""Tiny recipe assets built in code (a small BERT, a word-level tokenizer, jsonl data), and a runner for torchrun.

Run by test_pipeline.py as `torchrun --nproc_per_node 2 recipe_run.py RECIPE OUT_JSON`: every rank runs the recipe
and writes the shapes and head masks of its in-memory model to `OUT_JSON.rank<N>`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))

from utils import tiny_config  # noqa: E402

from hf_prune.pipeline.demo import build_wordlevel_tokenizer, make_demo_data  # noqa: E402


def make_tiny_assets(root: Path) -> dict[str, Path]:
    """Writes a tiny BERT with its tokenizer and demo-task jsonl files under `root`; returns their paths."""
    import torch
    from transformers import AutoModelForSequenceClassification

    root = Path(root)
    tokenizer = build_wordlevel_tokenizer(model_max_length=64)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    model_dir = root / "tiny-bert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = make_demo_data(96, 32, seed=0)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    names = ("entailment", "neutral", "contradiction")
    with open(data_dir / "train.jsonl", "w") as f:
        for row in data["train"]:  # names in the training file, ints in the validation file
            f.write(json.dumps({**row, "label": names[row["label"]]}) + "\n")
    with open(data_dir / "validation_matched.jsonl", "w") as f:
        for row in data["validation"]:
            f.write(json.dumps(row) + "\n")
    return {"model": model_dir, "train": data_dir / "train.jsonl", "validation": data_dir / "validation_matched.jsonl"}


def tiny_recipe(assets: dict, output_dir, movement_steps: int = 6, **defaults) -> dict:
    """A recipe with every stage, a few optimizer steps each, checkpoints every 2 steps."""
    return {
        "model": str(assets["model"]),
        "task": "mnli",
        "data": {
            "train_file": str(assets["train"]),
            "validation_file": str(assets["validation"]),
            "max_seq_length": 32,
        },
        "seed": 0,
        "output_dir": str(output_dir),
        "defaults": {
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "learning_rate": 5e-3,
            "max_steps": 6,
            "save_steps": 2,
            "logging_steps": 2,
            "disable_tqdm": True,
            "distill_alpha": 0.5,
            "use_cpu": True,
            **defaults,
        },
        "stages": [
            {"stage": "finetune"},
            {
                "stage": "movement",
                "args": {"max_steps": movement_steps, "target_sparsity": 0.9, "pruning_frequency": 1},
            },
            {"stage": "prune_heads"},
            {"stage": "distill", "args": {"max_steps": 2}},
            {
                "stage": "taylor_ffn",
                "args": {"target_sparsity": 0.5, "taylor_iterations": 2, "taylor_interval_steps": 2},
            },
            {"stage": "evaluate"},
            {"stage": "export", "seq_len": 16, "batch_sizes": [1, 2], "repeats": 1, "figure": False},
        ],
    }


def run_on_two_processes(recipe: dict, folder: Path, port: int, fail_search: bool = False):
    """Runs `recipe` under `torchrun --nproc_per_node 2` on the CPU, as a user would launch it (no use_cpu, no
    inherited launcher variables), and returns what each rank recorded (see `main`); with `fail_search`, the main
    process's `prune_to_speedup` raises and the finished process is returned."""
    import subprocess

    import yaml

    recipe_path = Path(folder) / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    if fail_search:
        env["FAIL_SEARCH_ON_MAIN"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    out_json = Path(folder) / "shapes.json"
    proc = subprocess.run(
        [*cmd, os.path.abspath(__file__), str(recipe_path), str(out_json)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    if fail_search:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(Path(f"{out_json}.rank{r}").read_text()) for r in (0, 1)]


def model_shapes(model) -> dict:
    from hf_prune.models import structure

    return {"heads": structure.num_heads(model), "ffn": structure.ffn_size(model)}


def zeroed_units(model) -> dict:
    """Per layer, the heads whose query rows are all zero and the FFN neurons whose up-projection rows are all zero:
    the masks as the weights carry them, read without the pruner."""
    import torch

    from hf_prune.models import structure

    size, units = structure.head_size(model), {}
    for i in range(len(structure.get_layers(model))):
        query = structure.projections(model, i, "attention")["query"].weight.detach()
        up = structure.projections(model, i, "mlp")["ffn_in"].weight.detach()
        heads = (query.reshape(-1, size * query.shape[1]) == 0).all(dim=1)
        units[str(i)] = {
            "heads": heads.nonzero().flatten().tolist(),
            "neurons": (up == 0).all(dim=1).nonzero().flatten().tolist(),
        }
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return {"units": units, "sum": flat.sum().item(), "abs": flat.abs().sum().item()}


class StepRecorder(TrainerCallback):
    """Records `zeroed_units` of the model at every step of every training stage, keyed by the stage folder: at each
    step's start (the masks of the update made at the end of the step before) and at the end of training."""

    def __init__(self):
        self.stages = {}

    def _record(self, args, state, model):
        stage = Path(args.output_dir).parent.name
        self.stages.setdefault(stage, []).append({"step": state.global_step, **zeroed_units(model)})

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._record(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(args, state, model)


def main(recipe_path: str, out_json: str) -> None:
    from hf_prune.pipeline import stages
    from hf_prune.pipeline.recipe import run_recipe

    calls = []
    prune_to_speedup = stages.prune_to_speedup

    def counted(*args, **kwargs):  # which processes ran the retraining-free search
        calls.append(1)
        if os.environ.get("FAIL_SEARCH_ON_MAIN") and int(os.environ.get("RANK", 0)) == 0:
            raise ValueError("the search failed on purpose")
        return prune_to_speedup(*args, **kwargs)

    stages.prune_to_speedup = counted
    recorder = StepRecorder()
    result = run_recipe(recipe_path, callbacks=[recorder])
    rank = int(os.environ.get("RANK", 0))
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "shapes": model_shapes(result.model),
        "finished": [r["name"] for r in result.state["finished"]],
        "head_masks": next(
            (r["summary"]["head_masks"] for r in result.state["finished"] if r["stage"] == "movement"), None
        ),
        "steps": recorder.stages,
        "prune_to_speedup_calls": len(calls),
    }
    with open(f"{out_json}.rank{rank}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
