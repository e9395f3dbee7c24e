"""Run by test_ddp.py, once on one process and once under `torchrun --nproc_per_node 2`: trains a tiny student with
every pruner (block, whole-head and FFN-neuron masks; movement, magnitude and Taylor; with and without a teacher; with
gradient accumulation) and writes, per rank, the masks and a weight checksum after every optimizer step.

Nothing here sets `use_cpu` or a backend: the processes are set up as a user's `torchrun` on a machine without GPU
would set them up.
"""

import json
import os
import sys

import torch
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))

from test_llama import CausalBlocks  # noqa: E402
from test_llama import tiny_decoder as llama_decoder  # noqa: E402
from utils import TinyDataset, tiny_model  # noqa: E402

from hf_prune import PruningArguments, PruningTrainer  # noqa: E402

GLOBAL_BATCH = 8
CUBIC = {"pruning_frequency": 1, "pruning_warmup_steps": 1, "pruning_cooldown_steps": 2}
TAYLOR = {"pruning_method": "taylor", "pruning_target": "ffn", "taylor_iterations": 3, "taylor_interval_steps": 2}
SCENARIOS = {
    "block_movement_teacher": {"pruning_method": "movement", "distill_alpha": 0.5, **CUBIC},
    "block_magnitude_global": {"pruning_method": "magnitude", "sparsity_mode": "global", **CUBIC},
    "head_movement_global_ga": {
        "pruning_method": "movement",
        "attention_granularity": "head",
        "sparsity_mode": "global",
        "gradient_accumulation_steps": 2,
        **CUBIC,
    },
    "head_magnitude_teacher": {
        "pruning_method": "magnitude",
        "attention_granularity": "head",
        "distill_alpha": 0.5,
        **CUBIC,
    },
    "ffn_taylor_teacher_ga": {**TAYLOR, "distill_alpha": 0.9, "gradient_accumulation_steps": 2},
    "ffn_taylor_global": {**TAYLOR, "ffn_sparsity_rule": "global"},
    "ffn_movement": {"pruning_method": "movement", "pruning_target": "ffn", **CUBIC},
    # a causal LM (tiny Llama with grouped-query attention): key/value groups masked whole, token-level distillation
    "decoder_group_movement_teacher_ga": {
        "decoder": True,
        "pruning_method": "movement",
        "attention_granularity": "head",
        "distill_alpha": 0.5,
        "distill_chunk_size": 7,
        "gradient_accumulation_steps": 2,
        **CUBIC,
    },
    "decoder_joint_taylor_teacher": {
        **TAYLOR,
        "decoder": True,
        "pruning_target": "heads_and_ffn",
        "target_speedup": 1.5,
        "speedup_seq_len": 12,
        "distill_alpha": 0.5,
    },
    "joint_taylor_teacher_ga": {
        **TAYLOR,
        "pruning_target": "heads_and_ffn",
        "target_speedup": 2.0,
        "speedup_seq_len": 12,
        "distill_alpha": 0.5,
        "gradient_accumulation_steps": 2,
    },
}


def tiny_decoder(seed: int = 0):
    return llama_decoder("llama", seed=seed).train()


class Recorder(TrainerCallback):
    """After every optimizer step (and the pruner's mask update, which runs before it): masks and weight sums."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        masks = {k: v.int().flatten().tolist() for k, v in self.trainer.pruner.state_dict().items() if "mask" in k}
        flat = torch.cat([p.detach().double().flatten() for p in self.trainer.model.parameters()])
        self.steps.append(
            {"step": state.global_step, "masks": masks, "sum": flat.sum().item(), "abs": flat.abs().sum().item()}
        )


class TamperOnRank1(TrainerCallback):
    """Changes rank 1's scores just before a mask update, as an unsynchronised gradient would."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if int(os.environ.get("RANK", 0)) == 1:
            for s in self.trainer.pruner.scorer.scores:
                s.neg_()


def launched_args(output_dir: str, world: int, accumulation: int, max_steps: int, **overrides) -> PruningArguments:
    """The arguments of a scenario: the same global batch of `GLOBAL_BATCH` on any number of processes, no saving."""
    return PruningArguments(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // (world * accumulation),
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **overrides,
    )


def run(name: str, overrides: dict, output_dir: str, world: int, tamper: bool = False) -> dict:
    overrides = dict(overrides)
    accumulation = overrides.pop("gradient_accumulation_steps", 1)
    decoder = overrides.pop("decoder", False)
    if "target_speedup" not in overrides:
        overrides["target_sparsity"] = 0.5
    args = launched_args(os.path.join(output_dir, name), world, accumulation, max_steps=8, **overrides)
    build, data = (tiny_decoder, CausalBlocks(64)) if decoder else (tiny_model, TinyDataset(64))
    teacher = build(seed=1) if args.distill_alpha > 0 else None
    trainer = PruningTrainer(model=build(seed=0), args=args, teacher_model=teacher, train_dataset=data)
    assert isinstance(trainer.model_wrapped, torch.nn.Module)
    if tamper:
        trainer.callback_handler.callbacks.insert(0, TamperOnRank1(trainer))  # before the pruner's update
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    result = {"world_size": trainer.args.world_size, "parallel_mode": str(trainer.args.parallel_mode)}
    try:
        trainer.train()
    except RuntimeError as err:
        return {**result, "error": str(err)}
    logs = [{k: h[k] for k in ("loss", "distill_loss") if k in h} for h in trainer.state.log_history if "loss" in h]
    return {**result, "logs": logs, "steps": recorder.steps}


def plain_arguments_with_teacher(output_dir: str) -> dict:
    """A plain `TrainingArguments` without use_cpu (upstream sets the processes up as separate runs), with
    distillation asked for by hand."""
    args = TrainingArguments(output_dir=os.path.join(output_dir, "plain"), report_to=[], max_steps=1)
    args.distill_alpha = 0.5
    try:
        PruningTrainer(model=tiny_model(), args=args, teacher_model=tiny_model(seed=1), train_dataset=TinyDataset(8))
    except ValueError as err:
        return {"error": str(err)}
    return {}


def main(output_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    results = {name: run(name, overrides, output_dir, world) for name, overrides in SCENARIOS.items()}
    if world > 1:
        results["tampered"] = run("tampered", SCENARIOS["head_movement_global_ga"], output_dir, world, tamper=True)
        results["plain_arguments"] = plain_arguments_with_teacher(output_dir)
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
