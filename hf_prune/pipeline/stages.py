"""The stages of a recipe: what each one trains, prunes, measures or writes, and where its result goes.

A stage gets a `StageContext` (see `context.py`: the recipe, its folder, the data, the models of earlier stages) and
returns a record
`{"model_dir", "metrics", "summary"}`; `recipe.run_recipe` orders them, records them in `state.json` and resumes them.
Every process of a distributed run executes every stage; only the main process writes files, and the next stage on
every process loads what it wrote.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import set_seed
from transformers.utils import logging

from ..config import world_size
from ..models import structure
from ..models.adapter import ATTENTION
from ..models.surgery import prune_heads
from ..posttrain.search import prune_to_speedup
from ..pruning.units import layer_units, unit_sums
from ..trainer import PRUNING_META_NAME, PruningTrainer
from ..utils import write_json_atomic
from .context import CHECKPOINTS_SUBDIR, StageContext, barrier
from .generation import SAMPLE_PROMPT
from .stage_outputs import stage_evaluate, stage_export, stage_onnx

logger = logging.get_logger(__name__)

__all__ = [
    "STAGE_TYPES",
    "MODEL_STAGES",
    "STAGE_OPTIONS",
    "STAGE_ARG_RULES",
    "SPEEDUP_STAGES",
    "RUNNER_ARGS",
    "run_stage",
    "remove_checkpoints",
    "last_complete_checkpoint",
    "masked_head_fractions",
]

STAGE_TYPES = (
    "finetune", "movement", "prune_heads", "distill", "taylor_ffn", "taylor_hidden", "joint_prune", "prune_to_speedup",
    "evaluate", "export", "onnx",
)  # fmt: skip
# Stages whose result is a new model (the next stage starts from it).
MODEL_STAGES = (
    "finetune", "movement", "prune_heads", "distill", "taylor_ffn", "taylor_hidden", "joint_prune", "prune_to_speedup",
)  # fmt: skip
TRAINING_STAGES = ("finetune", "movement", "distill", "taylor_ffn", "taylor_hidden", "joint_prune")
# Stages that need `target_speedup` in their arguments.
SPEEDUP_STAGES = ("joint_prune", "prune_to_speedup")
# Stage keys besides `stage`, `name` and `args`, with their defaults.
STAGE_OPTIONS = {
    "prune_heads": {"min_masked": 1.0},
    "prune_to_speedup": {
        "num_samples": 2048,
        "tune": True,
        "tune_samples": 512,
        "batch_size": 32,
        "cost_model": "flops",
        "importance": "fisher",
        "uniform": False,
        "drop_layers": False,  # the search may remove whole layers
        "layer_counts": None,  # the numbers of layers it may keep (default: any)
        "prune_hidden": False,  # the search may narrow the residual stream
        "hidden_widths": None,  # the widths it may narrow to (default: down to half, in eighths)
        "tune_bias": False,  # the tuning also fits the output projections' biases (FLAP's compensation)
        "latency_batch_size": 32,
        "calibration_rounds": 4,
        "cost_device": None,  # where timed costs are measured (default: the training device)
        "cost_threads": None,  # CPU threads while timing (default: every core)
    },
    "export": {
        "path": "final",
        "seq_len": 128,
        "batch_sizes": [1, 32],
        "repeats": 10,
        "card": True,
        "figure": True,
        "sample_prompt": SAMPLE_PROMPT,  # a causal LM's: both models answer it greedily in the report and card
    },
    # path: the folder of an earlier export stage (default: the last one)
    "onnx": {
        "path": None,
        "int8": True,
        "opset": 17,
        "evaluate": True,
        "seq_len": 128,
        "batch_sizes": [1, 32],
        "repeats": 10,
    },
}
# Per stage: {argument: (default, allowed values)}. The default applies unless the stage's own `args` set another
# allowed value; `defaults` of the recipe never override these.
_OFF = (None, (None,))
STAGE_ARG_RULES = {
    "finetune": {"pruning_method": _OFF, "distill_alpha": (0.0, (0.0,)), "distill_hidden_weight": (0.0, (0.0,))},
    "movement": {
        "pruning_method": ("movement", ("movement", "magnitude")),
        "pruning_target": ("attention", ("attention",)),
    },
    "distill": {"pruning_method": _OFF},
    "taylor_ffn": {"pruning_method": ("taylor", ("taylor",)), "pruning_target": ("ffn", ("ffn",))},
    "taylor_hidden": {
        "pruning_method": ("taylor", ("taylor", "movement", "magnitude")),
        "pruning_target": ("hidden", ("hidden",)),
    },
    "joint_prune": {
        "pruning_method": ("taylor", ("taylor", "movement")),
        "pruning_target": ("heads_and_ffn", ("heads_and_ffn",)),
    },
    "prune_to_speedup": {"pruning_method": _OFF},
    "evaluate": {"pruning_method": _OFF},
    "export": {"pruning_method": _OFF},
    "onnx": {"pruning_method": _OFF},
    "prune_heads": {"pruning_method": _OFF},
}
# Trainer settings of every stage unless the recipe sets them.
RUNNER_ARGS = {
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "logging_steps": 10,
    "report_to": "none",
    "eval_strategy": "no",
    "dataloader_num_workers": 0,
    # Classification losses are per-batch means: scaling them by the process count (the upstream default for models
    # that take loss kwargs) would double the loss and the gradients of a 2-process run.
    "average_tokens_across_devices": False,
    # Every stage trains on the per-batch mean loss divided by the accumulation steps, the plain finetune stage too
    # (the upstream path skips that division for models taking loss kwargs: see PruningArguments.mean_loss).
    "mean_loss": True,
}
MASKS_NAME = "head_masks.json"


# ----------------------------------------------------------------------------------------------------- checkpoints
def last_complete_checkpoint(folder: str | os.PathLike, pruning: bool) -> str | None:
    """The newest `checkpoint-N` of `folder` that was written to the end (trainer state, and pruning state when
    `pruning`), or None. A process killed while saving leaves an incomplete checkpoint, which is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.rpartition("-")[2]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file() and (not pruning or (path / PRUNING_META_NAME).is_file()):
            return str(path)
        logger.warning("Skipping the incomplete checkpoint %s (the process stopped while writing it).", path)
    return None


# ----------------------------------------------------------------------------------------------------- stages
def _train(ctx: StageContext) -> tuple[PruningTrainer, dict]:
    args = ctx.arguments()
    set_seed(args.seed)
    model = ctx.load_current_model()
    distilling = args.distill_alpha > 0 or args.distill_hidden_weight > 0
    teacher = ctx.load_teacher() if distilling else None
    if (
        args.pruning_method == "taylor"
        and args.max_steps > 0
        and args.max_steps < args.taylor_iterations * args.taylor_interval_steps
    ):
        logger.warning(
            "Stage %s: max_steps=%d < taylor_iterations * taylor_interval_steps = %d: the FFN masks stop short of "
            "target_sparsity. Raise max_steps or lower taylor_interval_steps.",
            ctx.spec["name"],
            args.max_steps,
            args.taylor_iterations * args.taylor_interval_steps,
        )
    trainer = ctx.trainer(model, args, teacher)
    resume = last_complete_checkpoint(args.output_dir, pruning=args.pruning_method is not None)
    if resume:
        logger.info("Stage %s resumes from %s.", ctx.spec["name"], resume)
    output = trainer.train(resume_from_checkpoint=resume)
    metrics = {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = output.global_step
    if resume:
        metrics["resumed_from"] = os.path.relpath(resume, ctx.output_dir)
    return trainer, metrics


def _whole_model(ctx: StageContext, trainer):
    """The trained model; under FSDP every process gathers the sharded weights into a whole copy of it."""
    if not trainer.is_fsdp_enabled:
        return trainer.model
    state = trainer.full_state_dict()
    model = ctx.load_current_model()
    model.load_state_dict(state)
    return model


def stage_finetune(ctx: StageContext) -> dict:
    """Dense fine-tuning; its model is the frozen teacher of the later stages (under FSDP too, see README)."""
    trainer, metrics = _train(ctx)
    model = _whole_model(ctx, trainer)
    return {"model_dir": ctx.save_model(model), "metrics": metrics, "summary": {}, "_model": model}


def stage_distill(ctx: StageContext) -> dict:
    """Retraining of the current (pruned) model with distillation from the teacher (under FSDP too, see README)."""
    trainer, metrics = _train(ctx)
    model = _whole_model(ctx, trainer)
    return {"model_dir": ctx.save_model(model), "metrics": metrics, "summary": {}, "_model": model}


def stage_movement(ctx: StageContext) -> dict:
    """Movement pruning of the attention blocks; saves the masked model and the heads whose blocks are all masked."""
    trainer, metrics = _train(ctx)
    heads = {int(k): [int(h) for h in v] for k, v in trainer.head_masks().items()}
    fractions = masked_head_fractions(trainer.model)
    summary = {
        "head_masks": {str(k): v for k, v in heads.items()},
        "heads_masked": sum(len(v) for v in heads.values()),
        "masked_fraction": {str(k): v for k, v in fractions.items()},
    }
    forecast = trainer.removal_forecast()
    if forecast is not None:  # block masks: the share prune_heads will remove, and what it is worth
        summary["removal_forecast"] = forecast
    model_dir = ctx.save_model(trainer.model)
    if ctx.is_main:
        masks = {"head_masks": summary["head_masks"], "masked_fraction": summary["masked_fraction"]}
        write_json_atomic(ctx.stage_dir / MASKS_NAME, masks)
    logger.info("Stage %s: %d heads fully masked: %s.", ctx.spec["name"], summary["heads_masked"], heads)
    return {"model_dir": model_dir, "metrics": metrics, "summary": summary, "_model": trainer.model}


@torch.no_grad()
def masked_head_fractions(model) -> dict[int, list[float]]:
    """`{layer: [fraction of each head's Q/K/V rows and attention-output columns that is masked (zero)]}`."""
    fractions = {}
    for lu in layer_units(model, ATTENTION):
        zeros = unit_sums(lu, lambda linear: (linear.weight == 0).to(torch.int64))
        per_unit = sum(s.parameters_per_unit(linear) for s, linear in zip(lu.group.slices, lu.linears))
        fractions[lu.layer] = [round(int(z) / max(per_unit, 1), 4) for z in zeros]
    return fractions


def stage_prune_heads(ctx: StageContext) -> dict:
    """Physically removes the heads that the last movement stage masked (read from its `head_masks.json`).

    With the stage option `min_masked` < 1, heads with at least that fraction of their attention weights masked go
    too (their remaining weights are lost; a distill stage after this one recovers the accuracy).
    """
    movement = [r for r in ctx.finished if r["stage"] == "movement"]
    masks_file = ctx.output_dir / movement[-1]["dir"] / MASKS_NAME
    if not masks_file.is_file():
        raise FileNotFoundError(
            f"{masks_file} is missing: the movement stage's head masks are needed. Delete its entry from "
            f"{ctx.output_dir / 'state.json'} or use a new --output-dir to run it again."
        )
    saved = json.loads(masks_file.read_text())
    heads = {int(k): v for k, v in saved["head_masks"].items()}
    threshold = float(ctx.spec["min_masked"])
    if threshold < 1.0:
        for k, fractions in saved["masked_fraction"].items():
            chosen = sorted(set(heads.get(int(k), [])) | {h for h, f in enumerate(fractions) if f >= threshold})
            if chosen:
                heads[int(k)] = chosen
    model = ctx.load_current_model()
    before, params_before = structure.num_heads(model), sum(p.numel() for p in model.parameters())
    prune_heads(model, heads)
    summary = {
        "heads_before": before,
        "heads_after": structure.num_heads(model),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "pruned_heads": {str(k): v for k, v in heads.items()},
    }
    logger.info("Stage %s: heads per layer %s -> %s.", ctx.spec["name"], before, summary["heads_after"])
    return {"model_dir": ctx.save_model(model), "metrics": {}, "summary": summary, "_model": model}


def stage_taylor_ffn(ctx: StageContext) -> dict:
    """Gradual Taylor pruning of FFN neurons (as `joint_prune`, of heads and neurons under one FLOPs budget; as
    `taylor_hidden`, of the residual stream's dimensions) with distillation, then their physical removal."""
    trainer, metrics = _train(ctx)
    summary = trainer.prune()
    summary["pruned_neurons"] = {str(k): v for k, v in summary["pruned_neurons"].items()}
    summary["pruned_heads"] = {str(k): v for k, v in summary["pruned_heads"].items()}
    logger.info(
        "Stage %s: heads per layer %s -> %s, FFN width per layer %s -> %s.",
        ctx.spec["name"],
        summary["heads_before"],
        summary["heads_after"],
        summary["ffn_before"],
        summary["ffn_after"],
    )
    return {
        "model_dir": ctx.save_model(trainer.model),
        "metrics": metrics,
        "summary": summary,
        "_model": trainer.model,
    }


def stage_prune_to_speedup(ctx: StageContext) -> dict:
    """Retraining-free pruning of heads and FFN neurons to `target_speedup` (see
    [`hf_prune.posttrain.search.prune_to_speedup`]) on a sample of the training split, on the training device."""
    args, opts = ctx.arguments(), ctx.spec
    if world_size() > 1:
        # One process chooses and the others load its choice: measured costs (cost_model="latency") and the order of
        # reductions differ between processes, and ranks that prune differently cannot train together.
        outcome, failure = [None], None
        if ctx.is_main:
            try:
                outcome = [{"summary": _prune_to_speedup(ctx, args, opts)[1]}]
            except Exception as err:  # every rank stops with it, instead of waiting for the group's timeout
                failure, outcome = err, [{"error": f"{type(err).__name__}: {err}"}]
        barrier()  # the main process has written the model (or failed); the next stage loads it from model_dir
        torch.distributed.broadcast_object_list(outcome, src=0)
        if "error" in outcome[0]:
            if failure is not None:
                raise failure
            raise RuntimeError(f"prune_to_speedup failed on the main process: {outcome[0]['error']}")
        return {"model_dir": ctx.model_dir(), "metrics": {}, "summary": outcome[0]["summary"]}
    pruned, summary = _prune_to_speedup(ctx, args, opts)
    return {"model_dir": ctx.model_dir(), "metrics": {}, "summary": summary, "_model": pruned}


def _prune_to_speedup(ctx: StageContext, args, opts) -> tuple:
    # the Fisher pass and the tuning run where training runs; timed costs where cost_device says (default: there)
    model = ctx.load_current_model().to(args.device)
    pruned, summary = prune_to_speedup(
        model,
        ctx.splits()["train"],
        args.target_speedup,
        int(opts["num_samples"]),
        seq_len=args.speedup_seq_len,
        tune=bool(opts["tune"]),
        tune_samples=int(opts["tune_samples"]),
        batch_size=int(opts["batch_size"]),
        data_collator=ctx.collator(),
        seed=args.seed,
        cost_model=str(opts["cost_model"]),
        importance=str(opts["importance"]),
        uniform=bool(opts["uniform"]),
        drop_layers=bool(opts["drop_layers"]),
        layer_counts=opts["layer_counts"],
        prune_hidden=bool(opts["prune_hidden"]),
        hidden_widths=opts["hidden_widths"],
        tune_bias=bool(opts["tune_bias"]),
        latency_batch_size=int(opts["latency_batch_size"]),
        calibration_rounds=int(opts["calibration_rounds"]),
        cost_device=opts["cost_device"],
        cost_threads=opts["cost_threads"],
    )
    ctx.save_model(pruned)
    return pruned, summary


STAGE_FUNCTIONS = {
    "finetune": stage_finetune,
    "movement": stage_movement,
    "prune_heads": stage_prune_heads,
    "distill": stage_distill,
    "taylor_ffn": stage_taylor_ffn,
    "taylor_hidden": stage_taylor_ffn,
    "joint_prune": stage_taylor_ffn,
    "prune_to_speedup": stage_prune_to_speedup,
    "evaluate": stage_evaluate,
    "export": stage_export,
    "onnx": stage_onnx,
}


def run_stage(ctx: StageContext) -> dict:
    """Runs one stage on this process; returns its record (`model_dir`, `metrics`, `summary`, and `_model`: the
    stage's model on this process, not saved in the state)."""
    record = STAGE_FUNCTIONS[ctx.spec["stage"]](ctx)
    gc.collect()
    return record


def remove_checkpoints(ctx: StageContext) -> None:
    """Deletes a finished stage's Trainer checkpoints (main process; they are only needed to resume it)."""
    folder = ctx.stage_dir / CHECKPOINTS_SUBDIR
    if ctx.is_main and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
