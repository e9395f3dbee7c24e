"""Task metrics as GLUE and seqeval define them, as pure functions of plain numbers, and the Trainer's
`compute_metrics` built from a task.

`f1` is the F1 of one class: `task.positive_label` (by name) against all the others, else label id 1 of a two-label
task; with more than two labels it needs `positive_label`, or one of the averages `f1_macro`, `f1_micro`,
`f1_weighted` (scikit-learn's `average`) instead. `check_task_metrics` refuses the rest before training.

`build_compute_metrics` computes them through `evaluate` (`evaluate.load("glue", name)`, `"seqeval"`, or one module
per metric) when it can load them, and with the functions below when it cannot (offline without a cached copy): the
definitions are the same (scikit-learn's F1 and Matthews correlation, scipy's Pearson and Spearman, seqeval's default
entity chunking), so either path gives the same numbers. A causal-LM task's perplexity is computed from per-block
sums (see `causal_lm.py`), not through `evaluate`. An image task's predictions are its classes ranked by logit, best
first (the 5 best); `accuracy` (and every other metric) reads the first, `top5_accuracy` whether the reference is
among them, computed here.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from transformers.utils import logging

from .causal_lm import compute_perplexity
from .entities import entity_scores, get_entities  # noqa: F401  (seqeval's definitions; importable from here too)
from .labels import is_iob_tagging
from .tasks import TaskSpec, parse_task

logger = logging.get_logger(__name__)

__all__ = [
    "accuracy",
    "top_k_accuracy",
    "TOP_K_METRICS",
    "f1_score",
    "F1_AVERAGES",
    "positive_label_id",
    "check_task_metrics",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "mean_squared_error",
    "LOADED_METRICS",
    "load_evaluate_metric",
    "task_scores",
    "decode_predictions",
    "build_compute_metrics",
]

ENTITY_METRICS = ("f1", "precision", "recall")  # seqeval's, over entity spans
# The F1 of every class averaged (scikit-learn's `average`), for more than two classes; `f1` is the F1 of one class.
F1_AVERAGES = {"f1_macro": "macro", "f1_micro": "micro", "f1_weighted": "weighted"}
# Whether the reference is among the k classes of highest logit (image tasks), and that k.
TOP_K_METRICS = {"top5_accuracy": 5}


# ----------------------------------------------------------------------------------------------------- classification
def accuracy(predictions, references) -> float:
    """The share of predictions equal to their reference (0 for no examples)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean()) if len(references) else 0.0


def top_k_accuracy(ranked, references, k: int = 5) -> float:
    """The share of examples whose reference is among the first `k` of their ranked classes (0 for no examples).

    Args:
        ranked: per example, class ids ranked by logit, best first (at least `k` of them, or every class).
        references: class ids.
        k: how many of the best classes count.
    """
    hits = [int(r) in [int(c) for c in row[:k]] for row, r in zip(ranked, np.asarray(references).tolist())]
    return float(np.mean(hits)) if hits else 0.0


def f1_score(predictions, references, pos_label: int = 1, average: str = "binary") -> float:
    """F1 as scikit-learn's `f1_score` computes it (its default `zero_division`: 0 where a class has no true or
    predicted example).

    Args:
        predictions / references: class ids.
        pos_label: the class of `average="binary"`: `2 TP / (2 TP + FP + FN)` of that class against all the others.
        average: `"binary"`, or over the classes present in `predictions` or `references`: `"macro"` (the mean of
            the per-class F1), `"micro"` (from the summed counts: accuracy for one label per example) or
            `"weighted"` (the mean weighted by each class's number of references).

    Returns:
        The F1, 0 for no examples.
    """
    if average not in ("binary", "macro", "micro", "weighted"):
        raise ValueError(f"average={average!r} is not one of binary, macro, micro, weighted.")
    predictions, references = np.asarray(predictions), np.asarray(references)
    classes = [pos_label] if average == "binary" else np.union1d(predictions, references)
    tp = np.array([((predictions == k) & (references == k)).sum() for k in classes], dtype=np.float64)
    fp = np.array([((predictions == k) & (references != k)).sum() for k in classes], dtype=np.float64)
    fn = np.array([((predictions != k) & (references == k)).sum() for k in classes], dtype=np.float64)
    if average == "micro":
        tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
    denominator = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    if not len(per_class):
        return 0.0
    if average == "weighted":
        support = tp + fn
        return float(per_class @ support / support.sum()) if support.sum() else 0.0
    return float(per_class.mean())


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


LOCAL_METRICS = {
    "accuracy": accuracy,
    "f1": f1_score,
    **{name: partial(f1_score, average=average) for name, average in F1_AVERAGES.items()},
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
    "mse": mean_squared_error,
}
# metric -> (evaluate module, key of its result)
EVALUATE_MODULES = {
    "accuracy": ("accuracy", "accuracy"),
    "f1": ("f1", "f1"),
    **{name: ("f1", "f1") for name in F1_AVERAGES},
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


# ----------------------------------------------------------------------------------------------------- checks
def positive_label_id(task: TaskSpec) -> int | None:
    """The label id whose F1 `f1` reports: `task.positive_label` matched by name (exactly, else without regard to
    case), else label id 1 of a two-label task (or of a task whose names are not known); None when there is none."""
    names = task.label_names
    if task.positive_label is None:
        return 1 if names is None or len(names) == 2 else None
    if names is None:
        raise ValueError(f"The label names of task {task.name!r} are not known yet: load its data first.")
    wanted = task.positive_label
    found = [i for i, n in enumerate(names) if n == wanted] or [
        i for i, n in enumerate(names) if n.lower() == wanted.lower()
    ]
    return found[0] if found else None


def check_task_metrics(task: TaskSpec, warn: bool = False) -> TaskSpec:
    """Fails before training when a metric of the task is not defined for its labels, naming the fix: `f1` of more
    than two classes without `positive_label` (the averages are `f1_macro`, `f1_micro`, `f1_weighted`), a
    `positive_label` that is not a label name or that no metric reads, entity scores of tags that are not IOB-style.

    Args:
        task: the task; the checks that need its label names wait until they are known.
        warn: log a warning when `f1`'s positive class is label id 1 only because the names were sorted.

    Returns:
        `task`, unchanged.
    """
    names, labels = task.metric_names, task.label_names
    if task.positive_label is not None:
        if task.problem_type != "single_label_classification":
            raise ValueError(
                f"task.positive_label names the class whose F1 `f1` reports, which applies to "
                f"single_label_classification, not to {task.problem_type}: remove task.positive_label."
            )
        if "f1" not in names:
            raise ValueError(
                f"task.positive_label={task.positive_label!r} names the class whose F1 `f1` reports, but the task's "
                f"metrics {list(names)} have no f1: add f1 to task.metrics, or remove task.positive_label."
            )
    if labels is None:
        return task
    few = [n for n in names if n in TOP_K_METRICS and len(labels) <= TOP_K_METRICS[n]]
    if few:
        raise ValueError(
            f"task.metrics has {few[0]}, but task {task.name!r} has {len(labels)} classes: the reference is always "
            f"among the {TOP_K_METRICS[few[0]]} best, so it is always 1. Remove it (it is given by default to image "
            f"tasks of more than {TOP_K_METRICS[few[0]]} classes)."
        )
    if task.is_token_classification and task.metrics and not is_iob_tagging(labels):
        entity = [n for n in task.metrics if n in ENTITY_METRICS]
        if entity:
            raise ValueError(
                f"task.metrics {entity} are seqeval's entity-level scores, but the tags of task {task.name!r} "
                f"({', '.join(labels)}) are not entity tags (O, B-X, I-X, ...): set task.metrics: [accuracy] (token "
                "accuracy), or give IOB tags."
            )
    if task.problem_type != "single_label_classification" or "f1" not in names:
        return task
    if task.positive_label is not None and positive_label_id(task) is None:
        raise ValueError(
            f"task.positive_label={task.positive_label!r} is not a label of task {task.name!r}: give one of its "
            f"label names {list(labels)}."
        )
    if task.positive_label is None and len(labels) > 2:
        raise ValueError(
            f"task.metrics has f1, the F1 of one class, but task {task.name!r} has {len(labels)} labels "
            f"({', '.join(labels)}). Name an average instead: f1_macro (the mean of the per-class F1), f1_micro (the "
            "F1 of the counts summed over the classes) or f1_weighted (the per-class F1 weighted by each class's "
            "examples); or set task.positive_label to the class whose F1 against all the others f1 should report, "
            f"one of {list(labels)}."
        )
    if warn and task.positive_label is None and task.labels_inferred and tuple(labels) != ("0", "1"):
        logger.warning(
            "Task %s: f1 is the F1 of the label %r, label id 1 of the sorted label names %s. Set "
            "task.positive_label to the class whose F1 to report.",
            task.name,
            labels[1],
            list(labels),
        )
    return task


def _metric_inputs(task: TaskSpec, name: str, predictions, references) -> tuple[list, list, dict]:
    """What one metric is computed on: `f1` on whether each id is the positive class (one class against all the
    others), an averaged F1 with its `average`, any other metric on the ids as they are."""
    if name == "f1" and not task.is_token_classification:
        positive = positive_label_id(task)
        if positive is None:
            check_task_metrics(task)  # raises, naming the fix
        predictions = [int(p == positive) for p in np.asarray(predictions).tolist()]
        references = [int(r == positive) for r in np.asarray(references).tolist()]
        return predictions, references, {"pos_label": 1}
    if name in F1_AVERAGES:
        return predictions, references, {"average": F1_AVERAGES[name]}
    return predictions, references, {}


def task_scores(task, predictions, references) -> dict[str, float]:
    """Every metric of `task` on decoded predictions (class ids, scores, or per-sentence tag lists).

    Args:
        task: a `TaskSpec` (its `metric_names`, `glue` and problem type are read).
        predictions / references: class ids or scores per example; tag-name lists per sentence for token
            classification with entity metrics, flat tag ids otherwise; an image task's predictions are per example
            its classes ranked best first (see [`decode_predictions`]).

    Returns:
        `{metric: value}` in the order of `task.metric_names`.
    """
    names, ranked = task.metric_names, None
    if task.is_image_classification:  # classes ranked best first: the metrics of ids read the best
        ranked, predictions = predictions, [row[0] for row in predictions]
    if _entity_level(task):
        keys = {n: f"overall_{n}" for n in names}
        out = _through_evaluate("seqeval", None, keys, predictions=predictions, references=references)
        scores = out or entity_scores(references, predictions)
        return {n: float(scores[n]) for n in names}
    if (
        task.glue is not None
        and task.positive_label is None
        and set(names) <= set(GLUE_METRIC_KEYS.get(task.glue, ()))
    ):
        out = _through_evaluate(
            "glue", task.glue, {n: n for n in names}, predictions=predictions, references=references
        )
        if out is not None:
            return out
        return {n: LOCAL_METRICS[n](predictions, references) for n in names}
    scores = {}
    for name in names:
        if name in TOP_K_METRICS:
            scores[name] = top_k_accuracy(ranked, references, TOP_K_METRICS[name])
            continue
        path, key = EVALUATE_MODULES[name]
        preds, refs, kwargs = _metric_inputs(task, name, predictions, references)
        out = _through_evaluate(path, None, {name: key}, predictions=preds, references=refs, **kwargs)
        scores[name] = out[name] if out is not None else LOCAL_METRICS[name](preds, refs, **kwargs)
    return scores


def _entity_level(task) -> bool:
    """Whether the task is scored on entity spans (seqeval) rather than label by label."""
    return task.is_token_classification and any(n in ENTITY_METRICS for n in task.metric_names)


def decode_predictions(task, logits: np.ndarray, labels: np.ndarray) -> tuple[list, list]:
    """Model outputs -> what the metrics compare: argmax class ids, scores (regression), an image task's 5 best
    classes per example (best first; every class when it has fewer), or for token classification the tags of the words
    that carry a label (`labels != -100`: the first sub-token of each word)."""
    if task.is_regression:
        scores = logits.reshape(len(logits), -1)[:, 0] if logits.ndim > 1 else logits
        return scores.astype(np.float64).tolist(), np.asarray(labels, dtype=np.float64).reshape(-1).tolist()
    if task.is_image_classification:
        ranked = np.argsort(-logits, axis=-1, kind="stable")[:, : max(TOP_K_METRICS.values())]
        return ranked.tolist(), np.asarray(labels).tolist()
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
    check_task_metrics(task)
    # loaded now, so an unavailable module is reported once, before evaluation starts
    if _entity_level(task):
        load_evaluate_metric("seqeval")
    elif (
        task.glue is not None
        and task.positive_label is None
        and set(task.metric_names) <= set(GLUE_METRIC_KEYS.get(task.glue, ()))
    ):
        load_evaluate_metric("glue", task.glue)
    else:
        for name in task.metric_names:
            if name in EVALUATE_MODULES:  # top-k accuracy is computed here alone
                load_evaluate_metric(EVALUATE_MODULES[name][0])

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions, references = decode_predictions(task, np.asarray(logits), np.asarray(labels))
        return task_scores(task, predictions, references)

    return compute_metrics
