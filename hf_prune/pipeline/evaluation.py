"""Evaluation outside the Trainer: a model's predictions and task metric on a tokenized dataset, for a PyTorch model
and an ONNX Runtime one (`hf_prune.export.onnx.OnnxRuntimeModel`) alike, decoded and scored as the Trainer's
evaluation does (see `metrics.py`); a causal LM's perplexity over every predicted token (see `causal_lm.py`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .causal_lm import dataset_perplexity
from .metrics import decode_predictions, task_scores

__all__ = ["dataset_predictions", "dataset_metric", "split_evaluator"]


@torch.inference_mode()
def dataset_predictions(model, dataset, collator, batch_size: int = 64, task=None) -> tuple[list, list]:
    """Predictions and references of a model, PyTorch or `OnnxRuntimeModel` alike, on a tokenized dataset with
    `labels`.

    Batches are formed from examples of similar length (less padding), so both lists follow the dataset's examples
    sorted by length (an image task's: in its order): the same order for every model on the same dataset, which keeps
    two models' predictions paired.

    Args:
        model: called as `model(**batch).logits`.
        dataset: tokenized examples with `labels`.
        collator: pads a list of examples into a batch (e.g. `DataCollatorWithPadding`).
        batch_size: examples per forward pass.
        task: a `TaskSpec` (see `tasks.py`): predictions decoded as the Trainer's evaluation does (label ids,
            regression values, or tag sequences); without one, the argmax of the logits.

    Returns:
        `(predictions, references)`, one entry per example.
    """
    model.eval()
    if task is not None and task.is_image_classification:  # images of one size: in the dataset's order
        order = list(range(len(dataset)))
    else:
        order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    predictions, references = [], []
    for start in range(0, len(order), batch_size):
        batch = collator([dataset[i] for i in order[start : start + batch_size]])
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task is None:
            predictions += logits.argmax(-1).tolist()
            references += labels.tolist()
        else:
            decoded = decode_predictions(task, logits.numpy(), labels.numpy())
            predictions += decoded[0]
            references += decoded[1]
    return predictions, references


def dataset_metric(model, dataset, collator, batch_size: int = 64, task=None) -> float:
    """The task's main metric (accuracy without a task) of a model on a tokenized dataset with `labels` (see
    [`dataset_predictions`]); the result does not depend on the order.

    Args:
        model: called as `model(**batch).logits`.
        dataset: tokenized examples with `labels`.
        collator: pads a list of examples into a batch (e.g. `DataCollatorWithPadding`).
        batch_size: examples per forward pass.
        task: a `TaskSpec` (see `tasks.py`): its main metric, computed as the Trainer's evaluation does (a causal
            LM's perplexity: see `causal_lm.causal_lm_nll`).
    """
    if task is not None and task.is_causal_lm:
        return dataset_perplexity(model, dataset, collator, batch_size)
    predictions, references = dataset_predictions(model, dataset, collator, batch_size, task)
    if task is None:
        return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)
    return float(task_scores(task, predictions, references)[task.main_metric])


def split_evaluator(splits: Mapping, collator, batch_size: int = 64, task=None) -> Callable[[object], dict]:
    """`eval_fn` for `hf_prune.export.deploy.deployment_rows`: a form's main metric on every tokenized split of
    `splits` (see [`dataset_metric`])."""
    return lambda model: {name: dataset_metric(model, ds, collator, batch_size, task) for name, ds in splits.items()}
