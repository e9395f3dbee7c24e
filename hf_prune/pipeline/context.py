"""What a stage of a recipe gets: a [`StageContext`] (its place in the recipe, its folder, the data, the models of the
stages before it), the folder names of a run, and the barrier at which the processes of a distributed run meet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from ..config import PruningArguments
from ..export.persistence import load_pruned, load_teacher, save_pruned
from ..trainer import PruningTrainer
from .causal_lm import CausalLMCollator, nll_per_example, pad_token_id
from .images import ImageCollator
from .metrics import build_compute_metrics
from .sources import BASE_MODEL_KEY, base_model_name, load_start_model, source_folder

__all__ = ["StageContext", "stage_folder", "barrier", "MODEL_SUBDIR", "CHECKPOINTS_SUBDIR"]

MODEL_SUBDIR = "model"
CHECKPOINTS_SUBDIR = "checkpoints"


def barrier() -> None:
    """Waits for every process of a distributed run (nothing to wait for in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass
class StageContext:
    """What a stage needs: its place in the recipe, the data, and the results of the stages before it.

    Args:
        recipe: the validated [`Recipe`].
        index: 1-based position of the stage.
        spec: the stage's entry (`stage`, `name`, `args` and its options, defaults filled in).
        finished: records of the stages finished so far (in order).
        data: tokenized splits (`train` and the validation splits), or a callable that loads them on first use.
        tokenizer: the recipe's tokenizer.
        callbacks: extra `TrainerCallback`s given to every training stage.
        is_main: whether this process writes files.
        task: the task's [`TaskSpec`] with its label names read from the data (default: the recipe's task as given).
    """

    recipe: object
    index: int
    spec: dict
    finished: list[dict]
    data: object
    tokenizer: object
    callbacks: list = field(default_factory=list)
    is_main: bool = True
    task: object = None

    def task_spec(self):
        return self.task if self.task is not None else self.recipe.task_spec

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def stage_dir(self) -> Path:
        return self.output_dir / stage_folder(self.index, self.spec)

    def splits(self) -> dict:
        if callable(self.data):
            self.data = self.data()
        return self.data

    def eval_splits(self) -> dict:
        return {k: v for k, v in self.splits().items() if k != "train"}

    def arguments(self, **overrides) -> PruningArguments:
        if self.task_spec().is_image_classification:  # the rows' images, which the pixel transform reads, stay
            overrides.setdefault("remove_unused_columns", False)
        return self.recipe.stage_arguments(self.index, **overrides)

    def current_model_dir(self) -> Path | None:
        dirs = [r["model_dir"] for r in self.finished if r.get("model_dir")]
        return self.output_dir / dirs[-1] if dirs else None

    def load_current_model(self):
        folder = self.current_model_dir()
        return load_pruned(folder) if folder else load_start_model(self.recipe, self.tokenizer, self.task_spec())

    def teacher_source(self) -> str | None:
        """The teacher's folder or Hub id: `teacher` of the recipe (a built-in name: its folder), else the last
        finished finetune stage."""
        if self.recipe.teacher:
            return source_folder(self.recipe.teacher)
        dirs = [r["model_dir"] for r in self.finished if r["stage"] == "finetune"]
        return str(self.output_dir / dirs[-1]) if dirs else None

    def load_teacher(self):
        """The teacher as a model (None when the recipe has none)."""
        source = self.teacher_source()
        return load_teacher(source) if source is not None else None

    def collator(self):
        if self.task_spec().is_image_classification:  # pixel values of one size: stacked
            return ImageCollator()
        if self.task_spec().is_causal_lm:  # blocks: input ids padded, labels -100 on padding
            return CausalLMCollator(pad_token_id(self.tokenizer))
        if self.task_spec().is_token_classification:  # pads the per-token labels too (with -100)
            return DataCollatorForTokenClassification(self.tokenizer)
        return DataCollatorWithPadding(self.tokenizer)

    def trainer(self, model, args, teacher=None, train: bool = True) -> PruningTrainer:
        """A `PruningTrainer` of `model` on the stage's data (`train=False`: evaluation only). A causal LM's
        evaluation reduces each batch's logits to per-block NLL sums at once (see `causal_lm.nll_per_example`)."""
        causal = self.task_spec().is_causal_lm
        return PruningTrainer(
            model=model,
            args=args,
            teacher_model=teacher,
            train_dataset=self.splits()["train"] if train else None,
            eval_dataset=self.eval_splits() or None,
            processing_class=self.tokenizer,
            data_collator=self.collator(),
            compute_metrics=build_compute_metrics(self.task_spec()),
            preprocess_logits_for_metrics=nll_per_example if causal else None,
            callbacks=list(self.callbacks) if train else None,
        )

    def model_dir(self) -> str:
        """`NN-name/model`, where the stage's model is saved, relative to the run (the same on every process)."""
        return str((self.stage_dir / MODEL_SUBDIR).relative_to(self.output_dir))

    def save_model(self, model) -> str:
        """Saves the stage's model to `NN-name/model` (main process) and returns its path relative to the run."""
        if self.is_main:
            if not getattr(model.config, BASE_MODEL_KEY, None):
                setattr(model.config, BASE_MODEL_KEY, base_model_name(self.recipe))
            save_pruned(
                model, self.output_dir / self.model_dir(), self.tokenizer, overwrite=True, card=False, figure=False
            )
        return self.model_dir()


def stage_folder(index: int, spec: dict) -> str:
    """`NN-name`, the folder of the stage at `index` (1-based)."""
    return f"{index:02d}-{spec['name']}"
