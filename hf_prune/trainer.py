"""`PruningTrainer`: `transformers.Trainer` with distillation against a frozen teacher and structured pruning.

The trainer only wires: the maths lives in `distill.py`, `scores.py`, `masks.py` and `surgery.py`. With
`pruning_method=None` and no teacher, every override falls through to `Trainer` unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import fields

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .config import PruningArguments
from .distill import distillation_loss, freeze_teacher, load_teacher

logger = logging.get_logger(__name__)

__all__ = ["PruningTrainer"]

_PRUNING_DEFAULTS = {
    f.name: f.default for f in fields(PruningArguments) if f.name not in {g.name for g in fields(TrainingArguments)}
}


class PruningTrainer(Trainer):
    """A drop-in `Trainer` that distills from a frozen teacher and prunes attention heads and FFN neurons.

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
        # Per-batch means for the distillation path: the Trainer must divide them by the accumulation steps itself.
        if self._distilling:
            self.loss_is_scaled_for_ga = False
        self._loss_components: dict[str, list[torch.Tensor]] = defaultdict(list)

    @property
    def _distilling(self) -> bool:
        return self.teacher is not None and (self.args.distill_alpha > 0 or self.args.distill_hidden_weight > 0)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self._distilling and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        args = self.args
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
            alpha=args.distill_alpha,
            temperature=args.distill_temperature,
            task_loss=task_loss,
            student_hidden_states=outputs.hidden_states if want_hidden else None,
            teacher_hidden_states=teacher_outputs.hidden_states if want_hidden else None,
            hidden_weight=args.distill_hidden_weight,
        )
        self._loss_components["task_loss"].append(parts.task_loss.detach())
        self._loss_components["distill_loss"].append(parts.kd_loss.detach())
        if want_hidden:
            self._loss_components["hidden_loss"].append(parts.hidden_loss.detach())
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
