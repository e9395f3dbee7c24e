"""Task metrics as GLUE and seqeval define them, as pure functions of plain numbers, and the Trainer's
`compute_metrics` built from a task.

`build_compute_metrics` computes them through `evaluate` (`evaluate.load("glue", name)`, `"seqeval"`, or one module
per metric) when it can load them, and with the functions below when it cannot (offline without a cached copy): the
definitions are the same (scikit-learn's F1 and Matthews correlation, scipy's Pearson and Spearman, seqeval's default
entity chunking), so either path gives the same numbers. A causal-LM task's perplexity is computed from per-block
sums (see `causal_lm.py`), not through `evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers.utils import logging

from .causal_lm import compute_perplexity
from .tasks import parse_task

logger = logging.get_logger(__name__)

__all__ = [
    "accuracy",
    "f1_score",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "mean_squared_error",
    "get_entities",
    "entity_scores",
    "LOADED_METRICS",
    "load_evaluate_metric",
    "task_scores",
    "decode_predictions",
    "build_compute_metrics",
]

ENTITY_METRICS = ("f1", "precision", "recall")  # seqeval's, over entity spans


# ----------------------------------------------------------------------------------------------------- classification
def accuracy(predictions, references) -> float:
    """The share of predictions equal to their reference (0 for no examples)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean()) if len(references) else 0.0


def f1_score(predictions, references, pos_label: int = 1) -> float:
    """Binary F1 of the class `pos_label`: `2 TP / (2 TP + FP + FN)`, 0 when there is no positive at all (as
    scikit-learn's `f1_score` with its default `zero_division`)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    tp = int(((predictions == pos_label) & (references == pos_label)).sum())
    fp = int(((predictions == pos_label) & (references != pos_label)).sum())
    fn = int(((predictions != pos_label) & (references == pos_label)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation coefficient for any number of classes (Gorodkin's R_K, as scikit-learn computes it).

    With the confusion matrix `C`, `t` the true counts per class, `p` the predicted counts and `n` the examples:
    `(c n - t.p) / sqrt((n^2 - p.p) (n^2 - t.t))`, where `c` is the number of correct predictions; 0 when either
    factor of the denominator is 0 (a constant prediction or a single true class).
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    classes = np.union1d(predictions, references)
    t = np.array([(references == k).sum() for k in classes], dtype=np.float64)
    p = np.array([(predictions == k).sum() for k in classes], dtype=np.float64)
    n, correct = float(len(references)), float((predictions == references).sum())
    cov_tp = correct * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


# ----------------------------------------------------------------------------------------------------- regression
def pearson(predictions, references) -> float:
    """Pearson correlation; NaN when either side is constant (as scipy's `pearsonr`)."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator > 0 else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (scipy's `rankdata(method="average")`)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(predictions, references) -> float:
    """Spearman rank correlation: Pearson's on average ranks (as scipy's `spearmanr`)."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    return pearson(_average_ranks(x), _average_ranks(y))


def mean_squared_error(predictions, references) -> float:
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    return float(((x - y) ** 2).mean()) if len(y) else 0.0


# ----------------------------------------------------------------------------------------------------- entities
def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks `(type, first, last)` of one tag sequence, as seqeval's default (non-strict) mode reads them.

    IOB1, IOB2 and IOBES tags all work: a chunk starts at `B-`/`S-`, at an `I-`/`E-` after `O` or after another type,
    and ends before `O`, `B-`, `S-`, a change of type, or after `E-`/`S-`.
    """
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval's overall scores of tagged sentences: entity-level (micro) precision, recall and F1, token accuracy.

    An entity counts as found when a predicted chunk has the same type, start and end as a reference chunk of the
    same sentence.

    Args:
        references / predictions: per sentence, the tag of every word (`"O"`, `"B-PER"`, `"I-PER"`, ...).

    Returns:
        `{"precision", "recall", "f1", "accuracy"}` (0 where a denominator is 0, as seqeval's `zero_division`).
    """
    true = {(s, *e) for s, tags in enumerate(references) for e in get_entities(list(tags))}
    pred = {(s, *e) for s, tags in enumerate(predictions) for e in get_entities(list(tags))}
    hits = len(true & pred)
    precision = hits / len(pred) if pred else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    flat_true = [t for tags in references for t in tags]
    flat_pred = [t for tags in predictions for t in tags]
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy(flat_pred, flat_true)}


LOCAL_METRICS = {
    "accuracy": accuracy,
    "f1": f1_score,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
    "mse": mean_squared_error,
}
# metric -> (evaluate module, key of its result)
EVALUATE_MODULES = {
    "accuracy": ("accuracy", "accuracy"),
    "f1": ("f1", "f1"),
    "matthews_correlation": ("matthews_correlation", "matthews_correlation"),
    "pearson": ("pearsonr", "pearsonr"),
    "spearmanr": ("spearmanr", "spearmanr"),
    "mse": ("mse", "mse"),
}


# ----------------------------------------------------------------------------------------------------- evaluate
# What `evaluate.load("glue", name)` returns for each GLUE task.
GLUE_METRIC_KEYS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}

# The `evaluate` modules loaded by this process: `(path, config name)` -> the module, or None when it cannot be loaded.
LOADED_METRICS: dict = {}


def load_evaluate_metric(path: str, config_name: str | None = None):
    """`evaluate.load(path, config_name)`, once per process; None (with a warning) when it cannot be loaded."""
    key = (path, config_name)
    if key not in LOADED_METRICS:
        try:
            import evaluate

            LOADED_METRICS[key] = evaluate.load(path, config_name) if config_name else evaluate.load(path)
        except Exception as err:  # offline without a cached copy, a missing scipy/scikit-learn, evaluate's own errors
            logger.warning(
                "evaluate could not load the %r metric (%s: %s); computing it locally with the same definition.",
                path if config_name is None else f"{path}/{config_name}",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            LOADED_METRICS[key] = None
    return LOADED_METRICS[key]


def _through_evaluate(path: str, config_name: str | None, keys: dict[str, str], **inputs) -> dict[str, float] | None:
    module = load_evaluate_metric(path, config_name)
    if module is None:
        return None
    try:
        out = module.compute(**inputs)
        return {name: float(out[key]) for name, key in keys.items()}
    except Exception as err:  # a module that loads but fails on these inputs: the local definition still works
        logger.warning("evaluate's %r metric failed (%s: %s); computing it locally.", path, type(err).__name__, err)
        return None


def task_scores(task, predictions, references) -> dict[str, float]:
    """Every metric of `task` on decoded predictions (class ids, scores, or per-sentence tag lists).

    Args:
        task: a `TaskSpec` (its `metric_names`, `glue` and problem type are read).
        predictions / references: class ids or scores per example; tag-name lists per sentence for token
            classification with entity metrics, flat tag ids otherwise.

    Returns:
        `{metric: value}` in the order of `task.metric_names`.
    """
    names = task.metric_names
    if _entity_level(task):
        keys = {n: f"overall_{n}" for n in names}
        out = _through_evaluate("seqeval", None, keys, predictions=predictions, references=references)
        scores = out or entity_scores(references, predictions)
        return {n: float(scores[n]) for n in names}
    if task.glue is not None and set(names) <= set(GLUE_METRIC_KEYS.get(task.glue, ())):
        out = _through_evaluate(
            "glue", task.glue, {n: n for n in names}, predictions=predictions, references=references
        )
        if out is not None:
            return out
        return {n: LOCAL_METRICS[n](predictions, references) for n in names}
    scores = {}
    for name in names:
        path, key = EVALUATE_MODULES[name]
        out = _through_evaluate(path, None, {name: key}, predictions=predictions, references=references)
        scores[name] = out[name] if out is not None else LOCAL_METRICS[name](predictions, references)
    return scores


def _entity_level(task) -> bool:
    """Whether the task is scored on entity spans (seqeval) rather than label by label."""
    return task.is_token_classification and any(n in ENTITY_METRICS for n in task.metric_names)


def decode_predictions(task, logits: np.ndarray, labels: np.ndarray) -> tuple[list, list]:
    """Model outputs -> what the metrics compare: argmax class ids, scores (regression), or for token classification
    the tags of the words that carry a label (`labels != -100`: the first sub-token of each word)."""
    if task.is_regression:
        scores = logits.reshape(len(logits), -1)[:, 0] if logits.ndim > 1 else logits
        return scores.astype(np.float64).tolist(), np.asarray(labels, dtype=np.float64).reshape(-1).tolist()
    ids = np.argmax(logits, axis=-1)
    if not task.is_token_classification:
        return ids.tolist(), np.asarray(labels).tolist()
    keep = labels != -100
    if not _entity_level(task):  # token accuracy alone: flat ids of the labelled words
        return ids[keep].tolist(), labels[keep].tolist()
    names = task.label_names
    predictions = [[names[p] for p, k in zip(row_p, row_k) if k] for row_p, row_k in zip(ids, keep)]
    references = [[names[t] for t, k in zip(row_t, row_k) if k] for row_t, row_k in zip(labels, keep)]
    return predictions, references


def build_compute_metrics(task=None):
    """A `compute_metrics` for the Trainer that returns every metric of the task.

    Args:
        task: a `TaskSpec` with its label names known (default: a three-class classification scored by accuracy).
            A causal-LM task's gives `{"perplexity": ...}` from the rows of `causal_lm.nll_per_example`, which must
            be the Trainer's `preprocess_logits_for_metrics`.

    Returns:
        A function of an `EvalPrediction` returning `{metric: float}`.
    """
    if task is None:
        task = parse_task("mnli")
    if task.is_causal_lm:
        return compute_perplexity
    # loaded now, so an unavailable module is reported once, before evaluation starts
    if _entity_level(task):
        load_evaluate_metric("seqeval")
    elif task.glue is not None and set(task.metric_names) <= set(GLUE_METRIC_KEYS.get(task.glue, ())):
        load_evaluate_metric("glue", task.glue)
    else:
        for name in task.metric_names:
            load_evaluate_metric(EVALUATE_MODULES[name][0])

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions, references = decode_predictions(task, np.asarray(logits), np.asarray(labels))
        return task_scores(task, predictions, references)

    return compute_metrics
