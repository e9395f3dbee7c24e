"""Tasks of the staged pipeline: what a recipe's `task` names, how its labels are read, and its metrics.

A task is a [`TaskSpec`]: the text columns (one or two; an image task's image column instead), the label column, the
problem type (`single_label_classification`, `regression`, `token_classification`, `causal_lm` or
`image_classification`), the label names, the metrics and where the data comes from. [`parse_task`] builds one from a
recipe's `task` value:

```yaml
task: glue/sst2          # cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli: load_dataset("nyu-mll/glue", name)
task: mnli               # a GLUE name alone works too; `demo` is the generated offline task
task:                    # any dataset with its own columns, from the Hub or from data.train_file / validation_file
  dataset: [imdb]                       # optional: the arguments of datasets.load_dataset
  text_columns: [text]                  # one or two (token classification: one column of word lists)
  label_column: label
  problem_type: single_label_classification   # or regression, token_classification
  label_names: [neg, pos]               # optional: read from the data when not given
  metrics: [f1, accuracy]               # optional; f1 of more than two labels: f1_macro, f1_micro or f1_weighted,
  positive_label: pos                   # or the class (by name) whose F1 against all the others f1 reports
task:                    # language modeling: text packed into data.block_size blocks, scored by perplexity
  problem_type: causal_lm
  text_column: text                     # default text; a .txt file has none (each non-empty line is a document)
  # text_column: [premise, hypothesis]  # several columns: one document per row, their texts joined by a newline
task:                    # images: a Hub dataset's image column, or folders of one sub-folder per class
  problem_type: image_classification
  image_column: image                   # default image; label_column default label
task: demo_images        # the generated offline image task (see images.py)
```

Metrics are those GLUE defines (accuracy; F1 and accuracy for MRPC and QQP; Matthews correlation for CoLA; Pearson and
Spearman for STS-B) and seqeval's entity-level precision, recall and F1 for token classification. They are computed
through `evaluate` when it can load them, and with the same definitions here when it cannot (offline): see
`metrics.py`. A causal-LM task is scored by perplexity (see `causal_lm.py`), lower being better; an image task by
accuracy, and top-5 accuracy too when it has more than 5 classes.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from transformers.utils import logging

# the label helpers lived here before labels.py: they stay importable from this module
from .labels import LabelMap, infer_label_names, is_iob_tagging, regression_value  # noqa: F401

logger = logging.get_logger(__name__)

__all__ = [
    "PROBLEM_TYPES",
    "DEFAULT_METRICS",
    "VALID_METRICS",
    "NLI_LABELS",
    "GLUE_DATASET",
    "GLUE_TASKS",
    "TaskSpec",
    "parse_task",
    "task_names",
    "DEMO_IMAGES_TASK",
]

PROBLEM_TYPES = (
    "single_label_classification", "regression", "token_classification", "causal_lm", "image_classification",
)  # fmt: skip
# The metrics of a problem type when the task names none (the first is the main one), and those it may name.
DEFAULT_METRICS = {
    "single_label_classification": ("accuracy",),
    "regression": ("pearson", "spearmanr"),
    "token_classification": ("f1", "precision", "recall", "accuracy"),
    "causal_lm": ("perplexity",),
    "image_classification": ("accuracy",),  # and top5_accuracy with more than 5 classes (TaskSpec.metric_names)
}
VALID_METRICS = {
    "single_label_classification": ("accuracy", "f1", "f1_macro", "f1_micro", "f1_weighted", "matthews_correlation"),
    "regression": ("pearson", "spearmanr", "mse"),
    "token_classification": ("f1", "precision", "recall", "accuracy"),
    "causal_lm": ("perplexity",),
    "image_classification": (
        "accuracy", "top5_accuracy", "f1_macro", "f1_micro", "f1_weighted", "matthews_correlation",
    ),  # fmt: skip
}
NLI_LABELS = ("entailment", "neutral", "contradiction")
GLUE_DATASET = "nyu-mll/glue"
TASK_KEYS = (
    "name", "dataset", "text_columns", "label_column", "problem_type", "label_names", "metrics", "train_split",
    "validation_splits", "text_column", "positive_label", "image_column",
)  # fmt: skip
# Keys of one kind of task that do not apply to the other, and why.
_NOT_FOR_CAUSAL_LM = {
    "text_columns": "it reads text_column: write text_column: <name>, or a list of names (default text)",
    "label_column": "a causal LM predicts each next token of the text, so there are no labels: remove it",
    "label_names": "a causal LM predicts each next token of the text, so there are no labels: remove it",
}
_ONLY_FOR_CAUSAL_LM = (
    "it names the text of a problem_type: causal_lm task; set problem_type: causal_lm for language modeling, or "
    "name this task's text with text_columns: [...] (one or two columns)"
)
_IMAGES_HAVE_NO_TEXT = "an image task reads its images from image_column (default image): remove it"
_NOT_FOR_IMAGES = {"text_columns": _IMAGES_HAVE_NO_TEXT, "text_column": _IMAGES_HAVE_NO_TEXT}
_ONLY_FOR_IMAGES = (
    "it names the images of a problem_type: image_classification task; set problem_type: image_classification, or "
    "remove it"
)


@dataclass(frozen=True)
class _Glue:
    columns: tuple[str, ...]
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]  # the first is the task's main metric
    validation: tuple[str, ...] = ("validation",)


# The label names are those of the ClassLabel features of nyu-mll/glue (their order is the label ids').
GLUE_TASKS = {
    "cola": _Glue(("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "sst2": _Glue(("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": _Glue(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    "qqp": _Glue(("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    "stsb": _Glue(("sentence1", "sentence2"), None, ("pearson", "spearmanr")),
    "mnli": _Glue(
        ("premise", "hypothesis"), NLI_LABELS, ("accuracy",), ("validation_matched", "validation_mismatched")
    ),
    "qnli": _Glue(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": _Glue(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": _Glue(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}


def task_names() -> list[str]:
    """The task names a recipe may give as a string."""
    return ["demo", *(f"glue/{name}" for name in GLUE_TASKS), "demo_images"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its columns, problem type, labels, metrics and data source.

    Args:
        name: the task's name in reports and model cards (`"sst2"`, `"mnli"`, `"demo"`, a dataset id, `"custom"`).
        text_columns: one or two text columns (token classification: one column of word lists; causal LM: its text
            column, or several whose texts are joined by a newline per row); none for an image task.
        label_column: the column holding the labels (class names or ids, scores, or per-word tags); unused by a
            causal LM, whose labels are its input ids.
        problem_type: `single_label_classification`, `regression`, `token_classification`, `causal_lm` or
            `image_classification`.
        label_names: class (or tag) names in label-id order; None until read from the data. None for regression.
        metrics: metric names, the first being the main one; None for the problem type's defaults. `f1` is the F1
            of one class (`positive_label`, else label id 1 of two); `f1_macro`, `f1_micro`, `f1_weighted` average it.
        dataset: positional arguments of `datasets.load_dataset`, or None (local files or generated data).
        dataset_kwargs: keyword arguments of `datasets.load_dataset`.
        train_split: the dataset's training split.
        validation_splits: the splits evaluated on; None for every `validation*` split of the dataset (else `test`).
        glue: the GLUE task name (selects `evaluate.load("glue", name)`), or None.
        generated: the offline demo task, whose data hf_prune generates.
        positive_label: the name of the class whose F1 `f1` reports (against all the others), or None.
        labels_inferred: whether the label names are the sorted distinct labels of the training data.
        image_column: an image task's column of images (a Hub dataset's image feature; folders: the file paths).
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    problem_type: str = "single_label_classification"
    label_names: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None
    dataset: tuple | None = None
    dataset_kwargs: dict = field(default_factory=dict, hash=False)
    train_split: str = "train"
    validation_splits: tuple[str, ...] | None = None
    glue: str | None = None
    generated: bool = False
    positive_label: str | None = None
    labels_inferred: bool = False
    image_column: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def is_token_classification(self) -> bool:
        return self.problem_type == "token_classification"

    @property
    def is_causal_lm(self) -> bool:
        return self.problem_type == "causal_lm"

    @property
    def is_image_classification(self) -> bool:
        return self.problem_type == "image_classification"

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The columns a model's inputs are made from: the text columns, or an image task's image column."""
        return (self.image_column,) if self.is_image_classification else self.text_columns

    @property
    def num_labels(self) -> int | None:
        """1 for regression, the number of label names otherwise (None while they are unknown or for a causal LM)."""
        if self.is_regression:
            return 1
        if self.is_causal_lm:
            return None
        return None if self.label_names is None else len(self.label_names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics computed on every validation split; the first is the main one.

        Token classification reports seqeval's entity scores when the tags are IOB-style (`O`, `B-X`, `I-X`, ...), and
        token accuracy alone otherwise (e.g. part-of-speech tags), since entity spans mean nothing there. An image
        task reports accuracy, then top-5 accuracy when it has more than 5 classes.
        """
        if self.metrics:
            return self.metrics
        if self.is_token_classification and self.label_names is not None and not is_iob_tagging(self.label_names):
            return ("accuracy",)
        if self.is_image_classification and self.label_names is not None and len(self.label_names) > 5:
            return ("accuracy", "top5_accuracy")
        return DEFAULT_METRICS[self.problem_type]

    @property
    def main_metric(self) -> str:
        return self.metric_names[0]

    @property
    def hub_dataset(self) -> str | None:
        """The Hub id of the task's dataset (for model cards), or None."""
        if self.dataset:
            return str(self.dataset[0])
        return str(self.dataset_kwargs["path"]) if self.dataset_kwargs.get("path") else None

    def with_label_names(self, names: Sequence[str], inferred: bool = False) -> TaskSpec:
        return dataclasses.replace(self, label_names=tuple(str(n) for n in names), labels_inferred=inferred)

    def config_kwargs(self) -> dict:
        """`num_labels`, `id2label`, `label2id` (and `problem_type` for regression) for `from_pretrained` / configs;
        nothing for a causal LM, whose head is its vocabulary."""
        if self.is_causal_lm:
            return {}
        if self.is_regression:  # one output; id2label given too, so a checkpoint's own label map cannot linger
            return {"id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0}, "problem_type": "regression"}
        if self.label_names is None:
            raise ValueError(f"The label names of task {self.name!r} are not known yet: load its data first.")
        # no num_labels: id2label sets it, and both given warn when the checkpoint's config has another count
        return {
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {n: i for i, n in enumerate(self.label_names)},
        }

    def column_hint(self) -> str:
        """How to fix a file or dataset that lacks the task's columns."""
        if self.is_causal_lm:
            return (
                f"Set task.text_column to the data's text column or a list of them (now: "
                f"{', '.join(self.text_columns)}), or give a .txt file (each non-empty line is a document)."
            )
        needed = ", ".join([*self.input_columns, self.label_column])
        if self.is_image_classification and not self.generated:
            return f"Set task.image_column and task.label_column to the data's column names (now: {needed})."
        if self.glue or self.generated:
            return f"Task {self.name!r} reads the columns {needed}."
        return f"Set task.text_columns and task.label_column to the data's column names (now: {needed})."


# ----------------------------------------------------------------------------------------------------- parsing
def _glue_spec(name: str) -> TaskSpec:
    glue = GLUE_TASKS[name]
    return TaskSpec(
        name=name,
        text_columns=glue.columns,
        problem_type="regression" if glue.labels is None else "single_label_classification",
        label_names=glue.labels,
        metrics=glue.metrics,
        dataset=(GLUE_DATASET, name),
        validation_splits=glue.validation,
        glue=name,
    )


DEMO_TASK = TaskSpec(
    name="demo",
    text_columns=("premise", "hypothesis"),
    label_names=NLI_LABELS,
    metrics=("accuracy",),
    validation_splits=("validation",),
    generated=True,
)


DEMO_IMAGES_TASK = TaskSpec(
    name="demo_images",
    text_columns=(),
    problem_type="image_classification",
    validation_splits=("validation",),
    generated=True,
    image_column="image",
)  # its label names are the generated class folders' names (see images.py)


def _unknown_task(raw) -> ValueError:
    hint = difflib.get_close_matches(str(raw).lower(), [*task_names(), *GLUE_TASKS], n=1)
    return ValueError(
        f"Unknown task {raw!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}. Valid task names: "
        f"{', '.join(task_names())} (a GLUE name alone, e.g. mnli, works too); for another dataset give a mapping, "
        "e.g. task: {dataset: [imdb], text_columns: [text], label_column: label}."
    )


def _strings(value, key: str, min_len: int = 1, max_len: int | None = None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"task.{key} must be a string or a list of strings, got {value!r}.")
    if len(items) < min_len or (max_len is not None and len(items) > max_len):
        if max_len is None:
            count = f"at least {min_len}"
        else:
            count = f"exactly {min_len}" if max_len == min_len else f"{min_len} to {max_len}"
        raise ValueError(f"task.{key} must list {count} name(s), got {list(items)}.")
    return tuple(items)


def _dataset_args(value) -> tuple[tuple | None, dict]:
    if value is None:
        return None, {}
    if isinstance(value, Mapping):
        if not value.get("path"):
            raise ValueError(f"task.dataset as a mapping holds load_dataset keywords and needs `path`; got {value!r}.")
        return None, dict(value)
    args = _strings(value, "dataset", 1)
    return args, {}


def _label_names(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = _strings(value, "label_names", 2)
    if len(set(names)) != len(names):
        raise ValueError(f"task.label_names lists a name twice: {list(names)}.")
    return names


def _parse_mapping(raw: Mapping) -> TaskSpec:
    unknown = [k for k in raw if k not in TASK_KEYS]
    if unknown:
        raise ValueError(f"Unknown task key(s) {sorted(map(str, unknown))}. Valid task keys: {', '.join(TASK_KEYS)}.")
    problem = raw.get("problem_type", "single_label_classification")
    if problem not in PROBLEM_TYPES:
        raise ValueError(f"task.problem_type={problem!r} is not supported. Valid: {', '.join(PROBLEM_TYPES)}.")
    if problem == "causal_lm":
        wrong = {**_NOT_FOR_CAUSAL_LM, "image_column": _ONLY_FOR_IMAGES}
    elif problem == "image_classification":
        wrong = _NOT_FOR_IMAGES
    else:
        wrong = {"text_column": _ONLY_FOR_CAUSAL_LM, "image_column": _ONLY_FOR_IMAGES}
    for key, why in wrong.items():
        if key in raw:
            raise ValueError(f"task.{key} does not apply to problem_type: {problem}: {why}.")
    image_column = None
    if problem == "causal_lm":
        column = raw.get("text_column", "text")
        many = isinstance(column, Sequence) and not isinstance(column, str) and len(column) > 0
        if not (isinstance(column, str) and column) and not (many and all(isinstance(c, str) and c for c in column)):
            raise ValueError(
                f"task.text_column must be a column name or a list of them, e.g. text or [premise, hypothesis]; got "
                f"{column!r}."
            )
        columns, label_column, names = ((column,) if isinstance(column, str) else tuple(column)), "label", None
        if len(set(columns)) != len(columns):
            raise ValueError(f"task.text_column lists a column twice: {list(columns)}.")
    elif problem == "image_classification":
        columns, names = (), _label_names(raw.get("label_names"))
        image_column, label_column = raw.get("image_column", "image"), raw.get("label_column", "label")
        for key, value in (("image_column", image_column), ("label_column", label_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"task.{key} must be a column name, got {value!r}.")
    elif raw.get("text_columns") in (None, "", []):
        raise ValueError(
            "The task mapping has no `text_columns`: name the one or two columns holding the text, e.g. "
            "text_columns: [question, sentence] (token classification: the one column of word lists, e.g. [tokens]; "
            "language modeling: problem_type: causal_lm with text_column)."
        )
    else:
        columns = _strings(raw["text_columns"], "text_columns", 1, 1 if problem == "token_classification" else 2)
        label_column, names = raw.get("label_column", "label"), raw.get("label_names")
        if not isinstance(label_column, str) or not label_column:
            raise ValueError(f"task.label_column must be a column name, got {label_column!r}.")
        if names is not None and problem == "regression":
            raise ValueError("task.label_names does not apply to regression (one score per example): remove it.")
        names = _label_names(names)
    metrics = raw.get("metrics")
    if metrics is not None:
        metrics = _strings(metrics, "metrics", 1)
        valid = VALID_METRICS[problem]
        bad = [m for m in metrics if m not in valid]
        if bad:
            raise ValueError(f"task.metrics {bad} do not apply to {problem}. Valid: {', '.join(valid)}.")
    positive = raw.get("positive_label")
    if positive is not None and (isinstance(positive, bool) or not isinstance(positive, (str, int)) or positive == ""):
        raise ValueError(f"task.positive_label must be a label name, e.g. positive_label: yes; got {positive!r}.")
    dataset, dataset_kwargs = _dataset_args(raw.get("dataset"))
    splits = raw.get("validation_splits")
    default_name = (dataset or (dataset_kwargs.get("path"),))[0] or "custom"
    name = raw.get("name") or default_name
    return TaskSpec(
        name=str(name),
        text_columns=columns,
        label_column=label_column,
        problem_type=problem,
        label_names=names,
        metrics=metrics,
        dataset=dataset,
        dataset_kwargs=dataset_kwargs,
        train_split=str(raw.get("train_split", "train")),
        validation_splits=None if splits is None else _strings(splits, "validation_splits", 1),
        positive_label=None if positive is None else str(positive),
        image_column=image_column,
    )


def parse_task(raw) -> TaskSpec:
    """The [`TaskSpec`] a recipe's `task` value names.

    Args:
        raw: `"demo"`, `"demo_images"`, `"glue/<name>"` or a GLUE name alone (e.g. `"mnli"`), a mapping (`dataset`,
            `text_columns`, `label_column`, `problem_type`, `label_names`, `metrics`, `positive_label`, `name`,
            `train_split`, `validation_splits`; for `problem_type: causal_lm`, `text_column`, a name or a list,
            instead of the text and label keys; for `problem_type: image_classification`, `image_column` instead of
            `text_columns`), or a `TaskSpec` (returned as is).

    Returns:
        The task's spec; label names stay None until the data is read, unless the task fixes them.
    """
    if isinstance(raw, TaskSpec):
        return raw
    if isinstance(raw, Mapping):
        return _parse_mapping(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(
            f"`task` must be a task name or a mapping, got {raw!r}. Valid names: {', '.join(task_names())}."
        )
    name = raw.strip().lower()
    if name == "demo":
        return DEMO_TASK
    if name == "demo_images":
        return DEMO_IMAGES_TASK
    glue = name[len("glue/") :] if name.startswith("glue/") else name
    if glue in GLUE_TASKS:
        return _glue_spec(glue)
    raise _unknown_task(raw)
