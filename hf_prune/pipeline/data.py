"""Task data of the staged pipeline: local files (jsonl, csv, tsv), datasets from the Hub, the generated demo, and
tokenization, all driven by a [`TaskSpec`] (see `tasks.py`).

Raw splits are `datasets.Dataset`s holding the task's text columns and a `label` column: a label id for
classification, a float for regression, a list of tag ids (one per word) for token classification. Label names are
the task's, else those of the dataset's `ClassLabel` feature, else the sorted distinct labels of the training split.
A causal-LM task's raw splits hold its text column alone (one document per row: see `causal_lm.read_documents`); an
image task's its image column and `label` (local data: folders of one sub-folder per class, see `images.py`).
`tokenize_splits` turns raw splits into model inputs (a causal LM's: blocks of `block_size` tokens, see
`causal_lm.py`; an image task's: pixel values made when read, see `images.pixel_splits`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path

from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from transformers.utils import logging

from .causal_lm import DEFAULT_BLOCK_SIZE, document_column, join_columns, read_documents, tokenize_text_splits
from .demo import make_demo_data
from .images import demo_image_folders, image_label_ids, pixel_splits, read_image_splits
from .labels import LabelMap, infer_label_names, regression_value
from .metrics import check_task_metrics
from .tasks import NLI_LABELS, TaskSpec, parse_task

logger = logging.get_logger(__name__)

__all__ = [
    "LABEL_NAMES",
    "load_task",
    "load_task_data",
    "read_local_file",
    "read_train_files",
    "validation_files",
    "normalize_label",
    "tokenize_splits",
    "train_files",
]

LABEL_NAMES = NLI_LABELS
LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
LABEL = "label"  # the column raw splits keep their labels in, whatever the data calls it


def _spec(task) -> TaskSpec:
    """The task's spec; no task means MNLI, what this module read before it knew other tasks."""
    return parse_task("mnli" if task is None else task)


# ----------------------------------------------------------------------------------------------------- local files
def normalize_label(value, path: str | os.PathLike, row: int) -> int:
    """Maps an NLI label given as an int, a digit string or a name (any case) to its index in `LABEL_NAMES`."""
    return LabelMap(LABEL_NAMES)(value, f"{path}: row {row}")


def _read_rows(path: Path) -> list[dict]:
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown data file format {path.suffix!r}. Use one of {sorted(LOCAL_FORMATS)} (JSON lines, "
            "comma- or tab-separated with a header row)."
        )
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            rows = []
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}: line {i} is not valid JSON ({err}). Write one object per line."
                    ) from err
            return rows
        return list(csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_MINIMAL))


def _words(value, where: str) -> list:
    """A token-classification cell: a list, or a whitespace-separated string (csv / tsv files)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return value
    raise ValueError(f"{where} must hold a list of words or tags (or a space-separated string), got {value!r}.")


def _read_raw(path: str | os.PathLike, spec: TaskSpec) -> dict[str, list]:
    """The task's columns of a local file, labels as written (`label` column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file {path} does not exist. Check data.train_file / data.validation_file in the recipe (relative "
            "paths in a recipe file are resolved against the recipe's folder, those given on the command line "
            "against the current directory)."
        )
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no rows. Give a file with a header (csv/tsv) or JSON objects, one per line.")
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; it has {sorted(rows[0])}. {spec.column_hint()}")
    columns: dict[str, list] = {}
    if spec.is_token_classification:
        (text,) = spec.text_columns
        columns[text], labels = [], []
        for i, r in enumerate(rows, start=1):
            words = [str(w) for w in _words(r[text], f"{path}: row {i}, column {text!r}")]
            tags = _words(r[spec.label_column], f"{path}: row {i}, column {spec.label_column!r}")
            if len(words) != len(tags):
                raise ValueError(
                    f"{path}: row {i} has {len(words)} words but {len(tags)} tags: give one tag per word."
                )
            columns[text].append(words)
            labels.append(tags)
        columns[LABEL] = labels
        return columns
    for c in spec.text_columns:
        columns[c] = ["" if r[c] is None else str(r[c]) for r in rows]
    columns[LABEL] = [r[spec.label_column] for r in rows]
    return columns


def _train_label_values(columns: dict[str, list], spec: TaskSpec) -> list:
    labels = columns[LABEL]
    return [t for tags in labels for t in tags] if spec.is_token_classification else labels


def _resolve_names(spec: TaskSpec, values: list, where: str) -> TaskSpec:
    """`spec` with its label names: its own, else read from `values` (the training labels)."""
    if spec.is_regression or spec.label_names is not None:
        return spec
    names = infer_label_names(values, where)
    logger.info("Task %s: %d labels read from %s: %s.", spec.name, len(names), where, list(names))
    return spec.with_label_names(names, inferred=True)


def _label_ids(columns: dict[str, list], spec: TaskSpec, where: str) -> Dataset:
    """The raw columns with their labels turned into ids (or floats for regression)."""
    labels = columns[LABEL]
    if spec.is_regression:
        ids = [regression_value(v, f"{where}: row {i}") for i, v in enumerate(labels, start=1)]
    elif spec.is_token_classification:
        to_id = LabelMap(spec.label_names)
        ids = [
            [to_id(t, f"{where}: row {i}, word {j}") for j, t in enumerate(tags, start=1)]
            for i, tags in enumerate(labels, start=1)
        ]
    else:
        to_id = LabelMap(spec.label_names)
        ids = [to_id(v, f"{where}: row {i}") for i, v in enumerate(labels, start=1)]
    return Dataset.from_dict({**{c: columns[c] for c in spec.text_columns}, LABEL: ids})


def read_local_file(path: str | os.PathLike, task=None) -> Dataset:
    """Reads a jsonl, csv or tsv file with the task's columns.

    Args:
        path: the file.
        task: the task (a name, a mapping or a `TaskSpec`; default MNLI: premise, hypothesis and label). When its
            label names are unknown, they are read from this file.

    Returns:
        A `Dataset` with the task's text columns and `label` (ids, floats, or lists of tag ids).
    """
    spec = _spec(task)
    columns = _read_raw(path, spec)
    spec = _resolve_names(spec, _train_label_values(columns, spec), str(path))
    return _label_ids(columns, spec, str(path))


def train_files(spec) -> list[str]:
    """`train_file` as a path or a list of paths (read one after the other) -> a list of paths."""
    if spec is None:
        return []
    return [str(spec)] if isinstance(spec, (str, os.PathLike)) else [str(p) for p in spec]


def read_train_files(files, task=None) -> Dataset:
    """The training rows of one or several local files, in order (see [`read_local_file`])."""
    spec = _spec(task)
    raws = [_read_raw(path, spec) for path in train_files(files)]
    values = [v for raw in raws for v in _train_label_values(raw, spec)]
    spec = _resolve_names(spec, values, ", ".join(train_files(files)))
    parts = [_label_ids(raw, spec, path) for raw, path in zip(raws, train_files(files))]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def validation_files(spec) -> dict[str, str]:
    """`validation_file` as a path, a list of paths or `{split: path}` -> `{split: path}` (split = file stem)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    paths = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    splits = {}
    for p in paths:
        name = Path(p).stem
        if name in splits:
            raise ValueError(
                f"Two validation files share the split name {name!r}: give data.validation_file as a mapping "
                "{split_name: path}."
            )
        splits[name] = str(p)
    return splits


def _read_local_splits(spec: TaskSpec, train_file, val_files: dict[str, str]) -> tuple[dict, TaskSpec]:
    """Local training and validation files, with the label names read from the training files when needed."""
    if spec.is_image_classification:  # folders of one sub-folder per class
        return read_image_splits(spec, train_file, val_files)
    raws = {}
    if train_file:
        raws["train"] = [(path, _read_raw(path, spec)) for path in train_files(train_file)]
    raws.update({name: [(path, _read_raw(path, spec))] for name, path in val_files.items()})
    if "train" in raws:
        values = [v for _, raw in raws["train"] for v in _train_label_values(raw, spec)]
        spec = _resolve_names(spec, values, ", ".join(path for path, _ in raws["train"]))
    splits = {}
    for name, parts in raws.items():
        sets = [_label_ids(raw, spec, path) for path, raw in parts]
        splits[name] = sets[0] if len(sets) == 1 else concatenate_datasets(sets)
    return splits, spec


# ----------------------------------------------------------------------------------------------------- the Hub
def _class_names(feature) -> list[str] | None:
    """The names of a `ClassLabel` feature, or of the `ClassLabel` inside a list feature (per-word tags)."""
    inner = getattr(feature, "feature", feature)
    names = getattr(inner, "names", None)
    return list(names) if names else None


def _dataset_label(spec: TaskSpec) -> str:
    args = spec.dataset or (spec.dataset_kwargs.get("path"), spec.dataset_kwargs.get("name"))
    return f"{args[0]} ({args[1]})" if len(args) > 1 and args[1] else str(args[0])


def _validation_names(spec: TaskSpec, available: list[str]) -> list[str]:
    if spec.validation_splits is not None:
        missing = [s for s in spec.validation_splits if s not in available]
        if missing:
            raise ValueError(
                f"{_dataset_label(spec)} has no split(s) {missing}; it has {available}. Fix task.validation_splits."
            )
        return list(spec.validation_splits)
    names = [s for s in available if s.startswith("validation")]
    if not names and "test" in available:
        logger.warning("%s has no validation split: evaluating on its test split.", _dataset_label(spec))
        names = ["test"]
    if not names:
        raise ValueError(
            f"{_dataset_label(spec)} has no validation split (its splits: {available}). Name the splits to evaluate "
            "on with task.validation_splits, or give data.validation_file."
        )
    return names


def _hub_splits(spec: TaskSpec, columns: list[str]) -> tuple:
    """The dataset of `load_dataset`, the names of its training and validation splits, checked for `columns`."""
    from datasets import load_dataset

    try:
        raw = load_dataset(*(spec.dataset or ()), **spec.dataset_kwargs)
    except Exception as err:  # network, offline mode, missing cache: all end here
        kinds = "jsonl or txt" if spec.is_causal_lm else "jsonl, csv or tsv"
        kinds = "folders of one sub-folder per class" if spec.is_image_classification else kinds
        raise ValueError(
            f"Could not load {_dataset_label(spec)} for task {spec.name!r}: {err}. Without Hub access, give local "
            f"files: data.train_file and data.validation_file ({kinds} with {', '.join(columns)})."
        ) from err
    available = list(raw)
    if spec.train_split not in raw:
        raise ValueError(
            f"{_dataset_label(spec)} has no split {spec.train_split!r}; it has {available}. Fix task.train_split."
        )
    names = [spec.train_split, *_validation_names(spec, available)]
    present = list(raw[spec.train_split].column_names)
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(f"{_dataset_label(spec)} has no column(s) {missing}; it has {present}. {spec.column_hint()}")
    return raw, names


def _load_hub(spec: TaskSpec) -> tuple[dict, TaskSpec]:
    raw, names = _hub_splits(spec, [*spec.input_columns, spec.label_column])
    feature = raw[spec.train_split].features[spec.label_column]
    class_names = None if spec.is_regression else _class_names(feature)
    if class_names is not None:
        if spec.label_names is not None and len(spec.label_names) != len(class_names):
            raise ValueError(
                f"task.label_names lists {len(spec.label_names)} labels but {_dataset_label(spec)}'s "
                f"{spec.label_column!r} has {len(class_names)}: {class_names}. Remove task.label_names to use these."
            )
        if spec.label_names is not None and [n.lower() for n in spec.label_names] != [n.lower() for n in class_names]:
            # the data holds ids in the ClassLabel's order: other names would relabel every example
            raise ValueError(
                f"task.label_names {list(spec.label_names)} differ from the names of {_dataset_label(spec)}'s "
                f"{spec.label_column!r} ClassLabel feature {class_names}, whose order the data's label ids follow. "
                f"Set task.label_names: {class_names} (or remove it to use these)."
            )
        if spec.label_names is None:
            spec = spec.with_label_names(class_names)
    splits = {}
    for name in names:
        ds = raw[name].select_columns([*spec.input_columns, spec.label_column])
        if spec.label_column != LABEL:
            ds = ds.rename_column(spec.label_column, LABEL)
        if class_names is not None and not spec.is_token_classification:
            ds = ds.filter(lambda y: y >= 0, input_columns=LABEL)  # GLUE's test splits are unlabelled (-1)
        splits["train" if name == spec.train_split else name] = ds
    numeric = str(getattr(feature, "dtype", None) or "").startswith(("float", "int"))
    if spec.is_regression and numeric:  # float targets as the MSE loss takes them
        return {k: ds.cast_column(LABEL, Value("float32")) for k, ds in splits.items()}, spec
    if class_names is None and spec.is_image_classification:  # label ids made without reading the images
        return image_label_ids(splits, spec, _dataset_label(spec))
    if class_names is None:  # labels as values (names, other ids, text scores): turn them into ids like local files
        columns = {k: ds.to_dict() for k, ds in splits.items()}
        spec = _resolve_names(spec, _train_label_values(columns["train"], spec), _dataset_label(spec))
        splits = {k: _label_ids(c, spec, f"{_dataset_label(spec)} [{k}]") for k, c in columns.items()}
    return splits, spec


def _load_text(spec: TaskSpec, train_file, val_files: dict[str, str]) -> dict[str, Dataset]:
    """A causal-LM task's documents: local files (the training files one after the other), the Hub's splits where
    local files give none; several text columns are joined by a newline per row (see `causal_lm.join_columns`)."""
    columns, column = spec.text_columns, document_column(spec.text_columns)
    splits = {}
    if train_file:
        docs = [d for path in train_files(train_file) for d in read_documents(path, spec)]
        splits["train"] = Dataset.from_dict({column: docs})
    splits.update({name: Dataset.from_dict({column: read_documents(p, spec)}) for name, p in val_files.items()})
    if train_file and val_files:
        return splits
    raw, names = _hub_splits(spec, list(columns))

    def join(batch):
        rows = zip(*(batch[c] for c in columns))
        return {column: [join_columns(r, columns, f"{_dataset_label(spec)}: a row") for r in rows]}

    hub = {}
    for n in names:
        ds = raw[n].select_columns(list(columns))
        if len(columns) > 1:
            ds = ds.map(join, batched=True, remove_columns=list(columns), desc=f"Joining the text columns of {n}")
        hub["train" if n == spec.train_split else n] = ds
    train = splits.pop("train", hub["train"])
    return {"train": train, **(splits or {k: v for k, v in hub.items() if k != "train"})}


# ----------------------------------------------------------------------------------------------------- loading
def _subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(int(n)))


def load_task(task, data: Mapping | None = None, seed: int = 0) -> tuple[DatasetDict, TaskSpec]:
    """Raw splits of a task, `train` plus one or more validation splits, and its spec with the label names known.

    Args:
        task: a task name (`"mnli"`, `"glue/sst2"`, `"demo"`), a task mapping or a `TaskSpec` (see `tasks.py`).
        data: the recipe's `data` section: `train_file` (a path or a list of paths, concatenated) and `validation_file`
            (local files override the Hub data; a validation file's split is named after its stem, or give
            `{split: path}`), `max_train_samples`, `max_eval_samples` (random subsets, drawn with `seed`),
            `demo_train_size` / `demo_eval_size` (generated tasks). A causal-LM task reads documents (see
            `causal_lm.read_documents`; the subsets are of documents); an image task folders of one sub-folder per
            class (see `images.read_image_folder`).
        seed: seed of the subsets and of the demo generator.

    Returns:
        `(splits, spec)`: a `DatasetDict` with the task's text columns and `label` (a causal-LM task: its text column
        alone), and the task's [`TaskSpec`].
    """
    spec = parse_task(task)
    data = dict(data or {})
    train_file, val_files = data.get("train_file"), validation_files(data.get("validation_file"))
    has_hub = spec.dataset is not None or bool(spec.dataset_kwargs)
    if spec.generated and spec.is_image_classification and not train_file:  # PNG folders, written once
        train_file, val_files = demo_image_folders(data, seed)
    if spec.generated and not spec.is_image_classification and not train_file:
        splits = dict(
            make_demo_data(int(data.get("demo_train_size", 2000)), int(data.get("demo_eval_size", 400)), seed)
        )
    elif not has_hub and not (train_file and val_files):
        named = " and ".join(map(repr, spec.text_columns))
        kinds = f" (jsonl with a {named} column, or txt)" if spec.is_causal_lm else ""
        kinds = " (folders of one sub-folder per class)" if spec.is_image_classification else kinds
        raise ValueError(
            f"Task {spec.name!r} has no dataset to load: give both data.train_file and data.validation_file{kinds}, "
            "or task.dataset (the arguments of datasets.load_dataset)."
        )
    elif spec.is_causal_lm:
        splits = _load_text(spec, train_file, val_files)
    elif train_file and val_files:
        splits, spec = _read_local_splits(spec, train_file, val_files)
    else:
        splits, spec = _load_hub(spec)
        if train_file or val_files:  # local files replace the Hub's splits, read with the Hub's label names
            local, spec = _read_local_splits(spec, train_file, val_files)
            train = local.pop("train", splits["train"])
            splits = {"train": train, **(local or {k: v for k, v in splits.items() if k != "train"})}
    check_task_metrics(spec, warn=True)  # the label names are known now
    splits["train"] = _subsample(splits["train"], data.get("max_train_samples"), seed)
    for name in [n for n in splits if n != "train"]:
        splits[name] = _subsample(splits[name], data.get("max_eval_samples"), seed)
    logger.info("Task %s: %s.", spec.name, ", ".join(f"{k} {len(v)} rows" for k, v in splits.items()))
    return DatasetDict(splits), spec


def load_task_data(task, data: Mapping | None = None, seed: int = 0) -> DatasetDict:
    """The raw splits of [`load_task`], without the spec."""
    return load_task(task, data, seed)[0]


# ----------------------------------------------------------------------------------------------------- tokenization
def _align_word_labels(word_ids: list[int | None], labels: list[int]) -> list[int]:
    """One label per token: the word's on its first sub-token, -100 (ignored by the loss and the metrics) on special
    tokens and later sub-tokens, as transformers' `run_ner.py` does by default."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(-100 if word is None or word == previous else labels[word])
        previous = word
    return aligned


def tokenize_splits(
    raw: DatasetDict, tokenizer, max_seq_length: int = 128, task=None, block_size: int | None = None
) -> DatasetDict:
    """Tokenizes the task's text (one text or a pair; word lists for token classification), truncated to
    `max_seq_length` and padded later by the collator; a causal-LM task's text is packed into blocks instead.

    Args:
        raw: splits from [`load_task`].
        tokenizer: the model's tokenizer (a fast one for token classification: words are mapped to tokens); an
            image task's image processor.
        max_seq_length: the longest tokenized sequence (not for causal-LM tasks).
        task: the task (default MNLI: premise / hypothesis pairs).
        block_size: a causal-LM task's tokens per block (default 128; see `causal_lm.tokenize_text_splits`).

    Returns:
        A `DatasetDict` with `input_ids`, `attention_mask`, `token_type_ids` (when the tokenizer makes them), `labels`.
    """
    spec = _spec(task)
    if spec.is_image_classification:  # `tokenizer` is the image processor
        return pixel_splits(raw, tokenizer, spec)
    if spec.is_causal_lm:
        return tokenize_text_splits(
            raw, tokenizer, block_size or DEFAULT_BLOCK_SIZE, document_column(spec.text_columns)
        )
    if spec.is_token_classification and not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Token classification needs a fast tokenizer (it maps words to tokens); {type(tokenizer).__name__} is "
            "not one. Use a model whose tokenizer has a fast version, or set `tokenizer:` in the recipe."
        )

    def encode(batch):
        texts = [batch[c] for c in spec.text_columns]
        if spec.is_token_classification:
            enc = tokenizer(texts[0], truncation=True, max_length=max_seq_length, is_split_into_words=True)
            enc["labels"] = [_align_word_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch[LABEL])]
            return enc
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        enc["labels"] = batch[LABEL]
        return enc

    return DatasetDict(
        {
            name: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {name}")
            for name, ds in raw.items()
        }
    )
