"""`PruningTrainer`: `transformers.Trainer` with distillation against a frozen teacher and structured pruning.

The trainer only wires: the maths lives in `distill.py`, `scores.py`, `masks.py` and `surgery.py`. With
`pruning_method=None` and no teacher, every override falls through to `Trainer` unchanged.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import fields

import torch
from accelerate import __version__ as accelerate_version
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_utils import unwrap_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .config import PruningArguments, multi_process_launch, world_size
from .distill import causal_lm_distillation_loss, distillation_loss, freeze_teacher
from .export.persistence import load_teacher
from .models import structure
from .models.auto import is_causal_lm_class
from .models.hidden import hidden_width, prune_hidden_dims
from .models.surgery import prune_ffn_neurons, prune_heads
from .pruning.builder import build_pruner
from .pruning.scores import gradients_usable
from .sharding import cpu_fsdp_version, enable_fsdp_on_cpu, unsharded_class
from .utils import temporary_path, write_json_atomic

logger = logging.get_logger(__name__)

__all__ = ["PruningMixin", "PruningTrainer"]

PRUNING_STATE_NAME = "pruning_state.safetensors"
PRUNING_META_NAME = "pruning_state.json"

_PRUNING_DEFAULTS = {
    f.name: f.default for f in fields(PruningArguments) if f.name not in {g.name for g in fields(TrainingArguments)}
}


class PruningMixin:
    """Distillation from a frozen teacher and structured pruning for any `transformers.Trainer` subclass: put it in
    front of the trainer class (`class MyTrainer(PruningMixin, SFTTrainer)`); [`PruningTrainer`] is
    `PruningMixin` in front of `Trainer`. Every override keeps the upstream signature and calls `super()`.

    Args:
        *args / **kwargs: exactly those of `transformers.Trainer`. `args` should be a [`PruningArguments`]; a plain
            `TrainingArguments` is upgraded with the default (no pruning, no distillation) fields.
        teacher_model: the frozen teacher, as a model, a local folder or a Hub id. It is put in eval mode, its
            gradients are turned off, it runs on the student's device under `torch.no_grad()`, and it is never
            wrapped for gradient synchronisation.
    """

    def __init__(self, model=None, args=None, *pargs, teacher_model: nn.Module | str | None = None, **kwargs):
        super().__init__(model, args, *pargs, **kwargs)
        if not isinstance(self.args, PruningArguments):
            # A plain TrainingArguments works too: it gets the default (off) pruning and distillation fields.
            for name, value in _PRUNING_DEFAULTS.items():
                if not hasattr(self.args, name):
                    setattr(self.args, name, value)
        self.teacher = None
        if teacher_model is not None:
            # Validated before any training starts: wrong label count or a missing folder fail here.
            self.teacher = freeze_teacher(load_teacher(teacher_model, self.model), self.args.device)
            if self.args.distill_alpha == 0.0 and self.args.distill_hidden_weight == 0.0:
                logger.warning(
                    "A teacher was given but distill_alpha=0 and distill_hidden_weight=0: it will not be used. "
                    "Set distill_alpha (e.g. 0.9) to distill."
                )
        self._loss_components: dict[str, list[torch.Tensor]] = defaultdict(list)
        if self._owns_loss:
            _check_replicas_synchronised(self.accelerator.distributed_type)
        self.pruner = None
        if self.args.pruning_method is not None:
            _refuse_sharded_pruning(self)
            # Built now so that a block shape that does not tile the weights, or an unknown model type, fails here.
            self.pruner = build_pruner(self.model, self.args)
            self.add_callback(_PruningCallback(self))
        # When pruning or distilling, the loss is a per-batch mean that the Trainer divides by the accumulation steps
        # and DDP averages. The upstream path, for models that take loss kwargs, skips that division and multiplies
        # by the world size (average_tokens_across_devices), which is only right for losses normalised by a global
        # token count, not for the mean losses of classification heads.
        if self._owns_loss:
            self.loss_is_scaled_for_ga = False

    def create_accelerator_and_postprocess(self) -> None:
        fsdp_version = cpu_fsdp_version(self.args)
        if fsdp_version == 1:
            raise ValueError(
                f"FSDP1 (fsdp_config version 1) is not supported on the CPU: accelerate {accelerate_version} builds "
                "its FSDP1 plugin only with a GPU (or other accelerator) device to synchronise the module states on. "
                f"Use FSDP2 (fsdp_config={{'version': 2}}, the transformers default), which torch {torch.__version__} "
                "runs on the CPU with gloo, or DDP (torchrun without fsdp)."
            )
        super().create_accelerator_and_postprocess()
        if fsdp_version == 2 and self.accelerator.distributed_type == DistributedType.MULTI_CPU:
            enable_fsdp_on_cpu(self)

    @property
    def _distilling(self) -> bool:
        return self.teacher is not None and (self.args.distill_alpha > 0 or self.args.distill_hidden_weight > 0)

    @property
    def _owns_loss(self) -> bool:
        return self._distilling or self.args.pruning_method is not None or bool(self.args.mean_loss)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self._owns_loss and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not self._distilling:  # pruning alone: the task loss as a per-batch mean (see __init__)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
        args = self.args
        if _is_causal_lm(self.model):
            return self._causal_lm_distillation(model, inputs, return_outputs)
        want_hidden = args.distill_hidden_weight > 0
        student_inputs = {**inputs, "output_hidden_states": True} if want_hidden else inputs
        # `num_items_in_batch=None` keeps the task loss a per-batch mean: the upstream path would multiply it by the
        # world size under DDP (average_tokens_across_devices) for models that take loss kwargs, which a mean loss
        # must not be. The gradient is then averaged by DDP and divided by the accumulation steps by the Trainer.
        task_loss, outputs = super().compute_loss(model, student_inputs, return_outputs=True, num_items_in_batch=None)
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        with torch.no_grad():
            teacher_outputs = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)
        student_logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        parts = distillation_loss(
            student_logits,
            teacher_outputs.logits,
            labels=inputs.get("labels"),  # per-token logits: the soft term skips tokens labelled -100
            alpha=args.distill_alpha,
            temperature=args.distill_temperature,
            task_loss=task_loss,
            student_hidden_states=outputs.hidden_states if want_hidden else None,
            teacher_hidden_states=teacher_outputs.hidden_states if want_hidden else None,
            hidden_weight=args.distill_hidden_weight,
            attention_mask=inputs.get("attention_mask"),
        )
        self._loss_components["task_loss"].append(parts.task_loss.detach())
        self._loss_components["distill_loss"].append(parts.kd_loss.detach())
        if want_hidden:
            self._loss_components["hidden_loss"].append(parts.hidden_loss.detach())
        return (parts.loss, outputs) if return_outputs else parts.loss

    def _causal_lm_distillation(self, model, inputs, return_outputs: bool):
        """Token-level distillation of a causal LM ([`distill.causal_lm_distillation_loss`]): both models run with
        one position of logits, and the loss computes the rest chunk by chunk from their final hidden states (under
        FSDP or DeepSpeed, the student's logits come whole from its forward)."""
        args = self.args
        if args.distill_hidden_weight > 0:
            raise ValueError(
                "distill_hidden_weight applies to encoders; causal LMs distil token distributions only. Set "
                "distill_hidden_weight=0."
            )
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("Causal-LM distillation needs `labels` (the input ids, -100 where nothing is predicted).")
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # Sharded weights exist whole only inside the wrapped model's forward: the student's output head, called
            # by the loss outside it, would read freed or partial weights. The student's logits come whole from its
            # forward instead (batch x length x vocabulary; the teacher's stay chunked).
            outputs = model(**forward)
            student_states, student_head = outputs.logits, nn.Identity()
        else:
            # through the (possibly DDP-wrapped) model, so gradients synchronise; it makes one position of logits
            outputs = model(**forward, output_hidden_states=True, logits_to_keep=1)
            student_states, student_head = outputs.hidden_states[-1], unwrap_model(model).get_output_embeddings()
        with torch.no_grad():
            teacher_outputs = self.teacher(**forward, output_hidden_states=True, logits_to_keep=1)
        parts = causal_lm_distillation_loss(
            student_states,
            teacher_outputs.hidden_states[-1],
            student_head,
            self.teacher.get_output_embeddings(),
            labels,
            alpha=args.distill_alpha,
            temperature=args.distill_temperature,
            attention_mask=inputs.get("attention_mask"),
            chunk_size=args.distill_chunk_size,
        )
        self._loss_components["task_loss"].append(parts.task_loss.detach())
        self._loss_components["distill_loss"].append(parts.kd_loss.detach())
        return (parts.loss, outputs) if return_outputs else parts.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; add the mean of each component since the last log, averaged over processes
        # (every process reaches this point at the same step, so the collective is safe).
        if "loss" in logs and self._loss_components:
            names = sorted(self._loss_components)
            local = torch.stack([torch.stack(self._loss_components[n]).mean() for n in names])
            reduced = self.accelerator.reduce(local.to(self.args.device), reduction="mean")
            logs.update({n: round(v.item(), 6) for n, v in zip(names, reduced)})
            self._loss_components.clear()
        super().log(logs, start_time)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's whole weights on every process. Under FSDP they are gathered from the shards, a collective
        that every process must call; otherwise they are the model's own state dict."""
        if self.is_fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return unwrap_model(self.model).state_dict()

    # ------------------------------------------------------------------ pruning
    def _require_pruner(self, what: str):
        if self.pruner is None:
            raise ValueError(f"{what} needs pruning: set pruning_method in PruningArguments (e.g. 'movement').")
        return self.pruner

    def head_masks(self) -> dict[int, list[int]]:
        """`{layer: [heads]}` for the heads whose blocks are all masked in Q, K, V and the attention output."""
        pruner = self._require_pruner("head_masks()")
        if not hasattr(pruner, "head_masks"):
            raise ValueError("head_masks() needs attention masks: use pruning_target='attention'.")
        return pruner.head_masks(self.model)

    def removal_forecast(self) -> dict | None:
        """For block masks, what `prune()` will remove of the masked weights and the FLOPs ratio it gives (see
        [`BlockMaskPruner.removal_forecast`]); None for pruners whose masked units are all removed."""
        pruner = self._require_pruner("removal_forecast()")
        if not hasattr(pruner, "removal_forecast"):
            return None
        return pruner.removal_forecast(self.model, self.args.speedup_seq_len)

    def prune(self) -> dict:
        """Physically removes what the current masks removed: heads whose blocks are all masked, masked FFN neurons.

        Weights masked inside heads that stay are released (they train again if training continues), since scattered
        zeros give no speedup. The optimizer is rebuilt on the next `train()`; pruning stops for this trainer.

        Returns:
            A summary: heads and FFN width per layer before and after, parameters before and after, removed indices.
        """
        pruner = self._require_pruner("prune()")
        model = self.model
        before = {"heads": structure.num_heads(model), "ffn": structure.ffn_size(model)}
        params_before = sum(p.numel() for p in model.parameters())
        heads = pruner.head_masks(model) if hasattr(pruner, "head_masks") else {}
        neurons = pruner.pruned_neurons() if hasattr(pruner, "pruned_neurons") else {}
        dims = pruner.pruned_dims() if hasattr(pruner, "pruned_dims") else []
        if heads:
            prune_heads(model, heads)
        if neurons:
            prune_ffn_neurons(model, neurons)
        if hasattr(pruner, "remove_hooks"):  # the masked form (hooks) gives way to the removed dimensions
            pruner.remove_hooks()
        if dims:
            prune_hidden_dims(model, dims)
        self.pruner = None
        self.callback_handler.remove_callback(_PruningCallback)
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        summary = {
            "heads_before": before["heads"],
            "heads_after": structure.num_heads(model),
            "ffn_before": before["ffn"],
            "ffn_after": structure.ffn_size(model),
            "params_before": params_before,
            "params_after": sum(p.numel() for p in model.parameters()),
            "pruned_heads": {int(k): v for k, v in heads.items()},
            "pruned_neurons": {int(k): len(v) for k, v in neurons.items()},
            "pruned_hidden_dims": len(dims),
            "hidden_after": hidden_width(model),
        }
        logger.info(
            "Pruned %d heads and %d FFN neurons: %d -> %d parameters.",
            sum(map(len, heads.values())),
            sum(summary["pruned_neurons"].values()),
            summary["params_before"],
            summary["params_after"],
        )
        return summary

    def save_pruning_state(self, folder: str) -> None:
        """Writes the scores, masks and schedule position into `folder` (safetensors + json, nothing pickled)."""
        if self.pruner is None or not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        meta = {
            "method": self.args.pruning_method,
            "target": self.args.pruning_target,
            "global_step": self.state.global_step,
            "last_fraction": getattr(self.pruner, "last_fraction", None),
        }
        # each file written whole or not at all; the tensors last, since their presence marks a pruning state
        write_json_atomic(os.path.join(folder, PRUNING_META_NAME), meta)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.pruner.state_dict().items()}
        state_path = os.path.join(folder, PRUNING_STATE_NAME)
        tmp = temporary_path(state_path)
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, state_path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_pruning_state(self, folder: str) -> bool:
        """Restores the state written by `save_pruning_state`; returns False when `folder` holds none."""
        path = os.path.join(folder, PRUNING_STATE_NAME)
        if self.pruner is None or not os.path.isfile(path):
            return False
        self.pruner.load_state_dict(load_file(path, device=str(self.args.device)))
        with open(os.path.join(folder, PRUNING_META_NAME)) as f:
            meta = json.load(f)
        if hasattr(self.pruner, "last_fraction") and meta.get("last_fraction") is not None:
            self.pruner.last_fraction = meta["last_fraction"]
        self.pruner.apply_masks()
        return True

    def _save_checkpoint(self, model, trial):
        # The pruning state goes into the checkpoint folder before the Trainer's own files: a checkpoint whose
        # trainer_state.json exists (what marks it complete) always holds the masks it was trained with.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_pruning_state(folder)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self.pruner is not None:
            _refuse_sharded_pruning(self)
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False and self.pruner is not None:
            if isinstance(resume_from_checkpoint, bool):
                last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
                resume_from_checkpoint = last if last is not None else resume_from_checkpoint
            if isinstance(resume_from_checkpoint, str) and not self.load_pruning_state(resume_from_checkpoint):
                raise ValueError(
                    f"{resume_from_checkpoint} holds no pruning state ({PRUNING_STATE_NAME}): resuming would train on "
                    "with fresh scores and no masks. Resume from a checkpoint this PruningTrainer wrote, or start "
                    "over with resume_from_checkpoint=None."
                )
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )


class PruningTrainer(PruningMixin, Trainer):
    """A drop-in `Trainer` that distills from a frozen teacher and prunes attention heads and FFN neurons.

    Args:
        *args / **kwargs: exactly those of `transformers.Trainer`. `args` should be a [`PruningArguments`]; a plain
            `TrainingArguments` is upgraded with the default (no pruning, no distillation) fields.
        teacher_model: the frozen teacher, as a model, a local folder or a Hub id.
    """


def _refuse_sharded_pruning(trainer) -> None:
    """Refuses pruning under FSDP or DeepSpeed: sharded parameters have no full `.grad` on any process, so the
    pruning scores would stay empty."""
    if any(getattr(trainer, flag, False) for flag in ("is_fsdp_enabled", "is_deepspeed_enabled")):
        raise ValueError(
            "Pruning under FSDP or DeepSpeed is not supported: they shard the gradients the pruning scores read. "
            "Train on one process or with DDP (torchrun / accelerate launch --multi_gpu), which is what "
            "`scripts/prune_mnli.py` and `hf-prune run` do; distillation without pruning may use either."
        )


def _check_replicas_synchronised(distributed_type) -> None:
    """Refuses a multi-process launch that the Trainer set up as a single-process run: every process would train its
    own replica, unsynchronised, and prune different weights."""
    if distributed_type == DistributedType.NO and (multi_process_launch() or world_size() > 1):
        raise ValueError(
            "Several processes were launched, but the Trainer runs each one on its own (no gradient all-reduce): "
            "their masks and weights would drift apart. On a machine without GPU, pass use_cpu=True (PruningArguments "
            "does so by itself; a plain TrainingArguments does not) or launch one process."
        )


def _check_same_masks(pruner, device, step: int) -> None:
    """After a mask update, compares the masks of all processes (one 8-byte all-gather) and stops on a difference.

    Under data parallelism every process sees the same all-reduced gradients and weights, so it computes the same
    scores and masks without communicating; a difference means the replicas are no longer the same model (NNI's
    unsynchronised TaylorFO scores, NNI #5205, were this failure).
    """
    world = world_size()
    if world == 1:
        return
    local = torch.tensor([pruner.fingerprint()], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    differ = [rank for rank, fp in enumerate(gathered) if int(fp) != int(gathered[0])]
    if differ:
        raise RuntimeError(
            f"At step {step} the pruning masks of process(es) {differ} differ from those of process 0: the replicas "
            "do not train the same model (gradients not all-reduced, or weights changed on one process only). "
            "Launch with torchrun / accelerate launch and let the Trainer wrap the model (on CPU: use_cpu=True)."
        )


class _PruningCallback(TrainerCallback):
    """Forwards the Trainer's events to the pruner: scores where the gradients are final, masks after each step."""

    def __init__(self, trainer: PruningMixin):
        self.trainer = trainer
        self.skipped = 0

    def on_train_begin(self, args, state, control, **kwargs):
        pruner = self.trainer.pruner
        if pruner is not None:
            pruner.schedule.total_steps = state.max_steps
            pruner.apply_masks()
            if not getattr(self, "_described", False) and state.is_world_process_zero:
                logger.info("Pruning targets:\n%s", pruner.describe())
                if hasattr(pruner, "removal_forecast"):
                    logger.warning(
                        "Block masks give a speedup only where they empty whole heads: prune() removes the heads "
                        "masked in all of Q, K, V and the attention output and releases every other masked block. "
                        "attention_granularity='head' (or pruning_target='heads_and_ffn', or the taylor FFN pruner) "
                        "masks only what prune() removes."
                    )
            self._described = True

    def on_train_end(self, args, state, control, **kwargs):
        pruner = self.trainer.pruner
        if pruner is not None and hasattr(pruner, "removal_forecast") and state.is_world_process_zero:
            forecast = pruner.removal_forecast(self.trainer.model, args.speedup_seq_len)
            logger.warning(
                "prune() will remove %.1f%% of the %d masked weights (%d whole heads); the rest is released. Expected "
                "FLOPs ratio after prune(): %.2fx.", 100 * forecast["removable_share"], forecast["masked_weights"],
                forecast["heads_removed"], forecast["expected_flops_ratio"],
            )  # fmt: skip

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Gradients here are summed over accumulation steps, all-reduced across processes, unscaled and clipped.
        pruner = self.trainer.pruner
        if pruner is None:
            return
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        if gradients_usable(pruner.scored_parameters(), params):
            pruner.accumulate()
        else:
            self.skipped += 1
            logger.warning(
                "Step %d: non-finite gradients (an fp16 overflow; the optimizer skips this step): the pruning scores "
                "skip it too (%d step(s) so far).", state.global_step + 1, self.skipped,
            )  # fmt: skip

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Re-zero masked weights right after the update: weight decay and Adam moments must not revive them.
        if self.trainer.pruner is not None:
            self.trainer.pruner.apply_masks()

    def on_step_end(self, args, state, control, **kwargs):
        pruner = self.trainer.pruner
        if pruner is not None and pruner.update(state.global_step):
            _check_same_masks(pruner, args.device, state.global_step)


def _is_causal_lm(model) -> bool:
    """Whether `model` is a causal LM with an output head (`...ForCausalLM`)."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return is_causal_lm_class(model_type, unsharded_class(model).__name__.removeprefix("Pruned"))
