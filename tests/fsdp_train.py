"""Run by test_fsdp.py, once on one process (without FSDP) and once under `torchrun --nproc_per_node 2` with FSDP2 on
the CPU (gloo): distills a tiny Llama and a tiny BERT without pruning and writes, per rank, the losses, the whole
weights' checksums after every optimizer step and at the end, and the logits of the gathered weights; the model is
saved for the test to reload. On two processes it also records the refusals (pruning under FSDP, FSDP1 on the CPU)
and runs a recipe whose distill stage trains under FSDP.

As in ddp_train.py, nothing here sets `use_cpu` or a backend.
"""

import json
import os
import sys

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))

from ddp_train import launched_args  # noqa: E402
from recipe_run import model_shapes, tiny_recipe  # noqa: E402
from test_llama import CausalBlocks, tokens  # noqa: E402
from test_llama import tiny_decoder as llama_decoder  # noqa: E402
from utils import TinyDataset, batch, tiny_model  # noqa: E402

from hf_prune import PruningArguments, PruningTrainer  # noqa: E402

SCENARIOS = {
    # token-level distillation with the teacher's logits chunked; gradient accumulation under FSDP's no-sync steps
    "decoder": {"distill_alpha": 0.5, "distill_chunk_size": 7, "gradient_accumulation_steps": 2},
    # logits and hidden-state distillation; accelerate's default FSDP2 wrap shards BertEmbeddings (one of
    # `_no_split_modules`), then its word embeddings again, which fails: the layers are named instead
    "encoder": {
        "distill_alpha": 0.5,
        "distill_hidden_weight": 0.5,
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["BertLayer"]},
    },
}


def tiny_decoder(seed: int = 0):
    return llama_decoder("llama", seed=seed).train()


def checksums(state: dict) -> dict:
    return {k: [v.double().sum().item(), v.double().abs().sum().item()] for k, v in state.items()}


class Recorder(TrainerCallback):
    """After every optimizer step: the sum and absolute sum of the whole weights (gathered under FSDP)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        flat = torch.cat([v.double().flatten() for v in self.trainer.full_state_dict().values()])
        self.steps.append({"step": state.global_step, "sum": flat.sum().item(), "abs": flat.abs().sum().item()})


def run(name: str, overrides: dict, output_dir: str, world: int) -> dict:
    overrides = dict(overrides)
    accumulation = overrides.pop("gradient_accumulation_steps", 1)
    fsdp_config = overrides.pop("fsdp_config", {})
    sharded = {"fsdp": True, "fsdp_config": fsdp_config} if world > 1 else {}
    args = launched_args(os.path.join(output_dir, name), world, accumulation, max_steps=4, **sharded, **overrides)
    decoder = name == "decoder"
    build, data = (tiny_decoder, CausalBlocks(64)) if decoder else (tiny_model, TinyDataset(64))
    trainer = PruningTrainer(model=build(seed=0), args=args, teacher_model=build(seed=1), train_dataset=data)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, name, "final"))
    full = trainer.full_state_dict()
    gathered = build(seed=2).eval()  # another init: every weight has to come from the gathered state
    gathered.load_state_dict(full)
    with torch.no_grad():
        if decoder:
            ids, mask = tokens()
            logits = gathered(input_ids=ids, attention_mask=mask).logits
        else:
            logits = gathered(**batch()).logits
    logs = [{k: h[k] for k in ("loss", "distill_loss") if k in h} for h in trainer.state.log_history if "loss" in h]
    return {
        "fsdp": trainer.is_fsdp_enabled,
        "wrapped": type(trainer.model_wrapped).__name__,
        "teacher_wrapped": type(trainer.teacher).__name__,
        "logs": logs,
        "steps": recorder.steps,
        "final": checksums(full),
        "logits": logits.tolist(),
    }


def refusals(output_dir: str) -> dict:
    """What a run that cannot train under FSDP on the CPU raises, before any training."""
    found = {}
    cases = {
        "pruning": {"fsdp": True, "pruning_method": "movement", "target_sparsity": 0.5},
        "fsdp1": {"fsdp": True, "fsdp_config": {"version": 1}, "distill_alpha": 0.5},
    }
    for name, overrides in cases.items():
        args = PruningArguments(output_dir=os.path.join(output_dir, name), report_to=[], max_steps=1, **overrides)
        teacher = tiny_model(seed=1)
        try:
            PruningTrainer(model=tiny_model(), args=args, teacher_model=teacher, train_dataset=TinyDataset(8))
        except ValueError as err:
            found[name] = str(err)
    return found


def recipes(output_dir: str, assets: dict) -> dict:
    """A recipe whose finetune and distill stages train under FSDP, and one that asks a pruning stage for FSDP;
    `assets` as `recipe_run.make_tiny_assets` writes them."""
    from hf_prune.pipeline.recipe import run_recipe

    fsdp = {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["BertLayer"]}}
    recipe = tiny_recipe(assets, os.path.join(output_dir, "recipe"), max_steps=2, save_steps=1)
    recipe["stages"] = [{"stage": "finetune", "args": fsdp}, {"stage": "distill", "args": {"max_steps": 3, **fsdp}}]
    result = run_recipe(recipe)
    found = {
        "finished": [r["name"] for r in result.state["finished"]],
        "shapes": model_shapes(result.model),
        "final": checksums(result.model.state_dict()),
    }
    pruning = tiny_recipe(assets, os.path.join(output_dir, "pruning"), max_steps=2)
    pruning["stages"] = [{"stage": "movement", "args": {"target_sparsity": 0.5, "distill_alpha": 0.0, **fsdp}}]
    try:
        run_recipe(pruning)
    except ValueError as err:
        found["pruning_error"] = str(err)
    return found


def main(output_dir: str, assets: dict) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    results = {name: run(name, overrides, output_dir, world) for name, overrides in SCENARIOS.items()}
    if world > 1:
        results["refusals"] = refusals(output_dir)
        results["recipe"] = recipes(output_dir, assets)
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
