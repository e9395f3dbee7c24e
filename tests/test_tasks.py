"""Tasks beyond MNLI: task specs, data of every format and problem type, label inference, metrics against hand
computations, distillation per token, bad specs refused before training, and recipes of each kind end to end."""

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from transformers import AutoModelForTokenClassification, BertModel, EvalPrediction
from utils import WITHOUT_HF_PRUNE, tiny_config

import hf_prune.pipeline.metrics as metrics_module
from hf_prune import distillation_loss, load_pruned, prune_ffn_neurons, prune_heads, save_pruned
from hf_prune.cli import main as cli_main
from hf_prune.export.report import build_report
from hf_prune.export.report_format import format_report
from hf_prune.pipeline.data import load_task, tokenize_splits
from hf_prune.pipeline.demo import build_wordlevel_tokenizer, demo_vocabulary, make_demo_data
from hf_prune.pipeline.metrics import (
    accuracy,
    build_compute_metrics,
    entity_scores,
    f1_score,
    get_entities,
    matthews_corrcoef,
    pearson,
    spearman,
)
from hf_prune.pipeline.recipe import read_state, run_recipe
from hf_prune.pipeline.schema import load_recipe
from hf_prune.pipeline.tasks import GLUE_TASKS, parse_task

REPO = Path(__file__).resolve().parent.parent
ANIMALS = ("cat", "dog", "fox", "owl", "bear", "wolf")
VERBS = ("sees", "likes", "chases", "finds", "avoids")
PLACES = ("park", "farm", "forest", "city", "garden", "lake")
NER = {
    "tokens": [["the", "big", "cat", "sees", "the", "dog", "in", "the", "park"]],
    "ner_tags": [["O", "B-ANI", "I-ANI", "O", "O", "B-ANI", "O", "O", "B-LOC"]],
}


# ----------------------------------------------------------------------------------------------------- generated data
def sentence_rows(n: int, seed: int) -> list[dict]:
    """Single sentences; positive when the animal likes or finds something and nothing is negated."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        verb, never = rng.choice(VERBS), rng.random() < 0.3
        text = f"the {rng.choice(ANIMALS)} {'never ' if never else ''}{verb} the {rng.choice(ANIMALS)}"
        rows.append(
            {"sentence": text, "label": "positive" if verb in ("likes", "finds") and not never else "negative"}
        )
    return rows


def pair_rows(n: int, seed: int) -> list[dict]:
    """Question / sentence pairs answered yes when the sentence names the animal asked about."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        asked, named = rng.choice(ANIMALS), rng.choice(ANIMALS)
        rows.append(
            {"question": f"a {asked} sees something", "sentence": f"the {named} sees the park",
             "answer": "yes" if asked == named else "no"}
        )  # fmt: skip
    return rows


def similarity_rows(n: int, seed: int) -> list[dict]:
    """STS-B-like pairs: the score (0 to 5) counts the words the two sentences share."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = [rng.choice(ANIMALS), rng.choice(VERBS), rng.choice(PLACES)]
        b = [w if rng.random() < 0.6 else rng.choice(ANIMALS) for w in a]
        score = 5.0 * sum(x == y for x, y in zip(a, b)) / 3
        rows.append({"sentence1": "the {} {} the {}".format(*a), "sentence2": "the {} {} the {}".format(*b),
                     "label": round(score, 3)})  # fmt: skip
    return rows


def entity_rows(n: int, seed: int) -> list[dict]:
    """Tagged sentences: animals (with their adjective) are ANI entities, places LOC."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = ["the"], ["O"]
        if rng.random() < 0.5:
            tokens, tags = [*tokens, "big"], [*tags, "B-ANI"]
        tokens.append(rng.choice(ANIMALS))
        tags.append("I-ANI" if tags[-1] == "B-ANI" else "B-ANI")
        tokens += [rng.choice(VERBS), "the", rng.choice(ANIMALS), "in", "the", rng.choice(PLACES)]
        tags += ["O", "O", "B-ANI", "O", "O", "B-LOC"]
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    """Writes rows as jsonl, or csv / tsv (lists as space-separated cells), by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    sep = "," if path.suffix == ".csv" else "\t"
    cell = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    lines = [sep.join(rows[0])] + [sep.join(cell(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny BERT encoder without a task head, and its word-level tokenizer: each task gets a head of its own."""
    folder = tmp_path_factory.mktemp("base") / "tiny-encoder"
    tokenizer = build_wordlevel_tokenizer(demo_vocabulary(), model_max_length=64)
    torch.manual_seed(0)
    BertModel(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe(base_model, out, task, train, validation, stages) -> dict:
    return {
        "model": str(base_model),
        "task": task,
        "data": {"train_file": str(train), "validation_file": str(validation), "max_seq_length": 32},
        "seed": 0,
        "output_dir": str(out),
        "defaults": {
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 5e-3,
            "max_steps": 3, "save_steps": 50, "logging_steps": 2, "disable_tqdm": True, "distill_alpha": 0.5,
            "use_cpu": True,
        },
        "stages": stages,
    }  # fmt: skip


EXPORT = {"stage": "export", "seq_len": 16, "batch_sizes": [1], "repeats": 1, "figure": False}
PRUNE = {
    "stage": "prune_to_speedup", "num_samples": 32, "tune_samples": 32, "batch_size": 16,
    "args": {"target_speedup": 1.5, "speedup_seq_len": 16},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- specs
def test_glue_names_and_the_generic_form_parse():
    for name, glue in GLUE_TASKS.items():
        spec = parse_task(f"glue/{name}")
        assert (
            parse_task(name) == spec and spec.text_columns == glue.columns and spec.dataset == ("nyu-mll/glue", name)
        )
    assert parse_task("glue/stsb").is_regression and parse_task("glue/stsb").num_labels == 1
    assert parse_task("glue/cola").main_metric == "matthews_correlation"
    assert parse_task("glue/mrpc").metric_names == ("f1", "accuracy") == parse_task("glue/qqp").metric_names
    assert parse_task("glue/stsb").metric_names == ("pearson", "spearmanr")
    assert parse_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    spec = parse_task({"dataset": ["imdb"], "text_columns": "text"})
    assert (spec.name, spec.text_columns, spec.label_names, spec.main_metric) == ("imdb", ("text",), None, "accuracy")
    ner = parse_task({"text_columns": ["tokens"], "label_column": "ner_tags", "problem_type": "token_classification"})
    assert ner.main_metric == "f1" and ner.name == "custom"
    assert ner.with_label_names(["O", "NN", "VB"]).metric_names == ("accuracy",)  # tags without entities


@pytest.mark.parametrize(
    "raw, message",
    [
        ("glue/sst5", r"Unknown task 'glue/sst5' \(did you mean 'glue/sst2'\?\). Valid task names: demo, glue/cola"),
        ("imdb", "for another dataset give a mapping"),
        ({"text_columns": ["a"], "labels": "y"}, r"Unknown task key\(s\) \['labels'\]. Valid task keys: name"),
        ({"text_columns": ["a"], "problem_type": "ner"}, "Valid: single_label_classification, regression"),
        ({"label_column": "y"}, "no `text_columns`"),
        ({"text_columns": ["a", "b", "c"]}, "must list 1 to 2 name"),
        ({"text_columns": ["a", "b"], "problem_type": "token_classification"}, "must list exactly 1 name"),
        ({"text_columns": ["a"], "problem_type": "regression", "label_names": ["x", "y"]}, "does not apply"),
        ({"text_columns": ["a"], "metrics": ["pearson"]}, "do not apply to single_label_classification"),
    ],
)
def test_bad_task_specs_name_the_fix(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_task(raw)


def test_recipe_task_is_checked_before_anything_runs(tmp_path, base_model):
    train = write(tmp_path / "d" / "train.jsonl", sentence_rows(8, 0))
    raw = recipe(base_model, tmp_path / "out", "glue/sst5", train, train, [{"stage": "finetune"}])
    with pytest.raises(ValueError, match="glue/sst2"):
        run_recipe(raw)
    raw["task"] = {"text_columns": ["sentence"]}
    raw["data"] = {}
    with pytest.raises(ValueError, match="names no dataset: give data.train_file and data.validation_file"):
        run_recipe(raw)
    assert not (tmp_path / "out").exists()


def test_glue_recipe_takes_its_task_from_set(tmp_path, monkeypatch, capsys):
    """`hf-prune run recipes/glue-minilm-cpu.yaml --set task=glue/cola` runs CoLA; offline it stops before writing."""
    glue = REPO / "recipes" / "glue-minilm-cpu.yaml"
    assert load_recipe(glue).task_spec.name == "sst2"
    cola = load_recipe(glue, ["task=glue/cola"])
    assert cola.task_spec.main_metric == "matthews_correlation" and cola.hash != load_recipe(glue).hash
    ner = load_recipe(REPO / "recipes" / "ner-minilm-cpu.yaml").task_spec
    assert ner.is_token_classification and ner.label_names[:3] == ("O", "B-PER", "I-PER")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = tmp_path / "cola"
    assert cli_main(["run", str(glue), "--set", "task=glue/cola", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Could not load nyu-mll/glue (cola)" in err and "sentence, label" in err
    assert not out.exists()


def test_prune_glue_script_runs_the_glue_recipe_on_the_task(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import prune_glue
    finally:
        sys.path.remove(str(REPO / "scripts"))
    import hf_prune.pipeline.recipe

    calls = []
    monkeypatch.setattr(hf_prune.pipeline.recipe, "run_recipe", lambda *a, **k: calls.append((a, k)) or _NoResult())
    monkeypatch.chdir(tmp_path)
    assert prune_glue.main(["--task", "glue/STSB", "--train-file", "t.tsv", "--set", "seed=1"]) == 0
    ((args, kwargs),) = calls
    assert args[0].endswith("glue-minilm-cpu.yaml") and kwargs["output_dir"] == "runs/glue-minilm-cpu-stsb"
    assert kwargs["overrides"] == ["task=glue/stsb", f'data.train_file="{tmp_path / "t.tsv"}"', "seed=1"]
    with pytest.raises(SystemExit):
        prune_glue.main(["--task", "sst5"])


class _NoResult:
    is_main = False


# ----------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_label_names_are_inferred_from_the_training_data(tmp_path, fmt):
    rows = [{"text": "the cat", "stars": s} for s in (5, 1, 2, 5)]
    train = write(tmp_path / f"train.{fmt}", rows)
    valid = write(tmp_path / f"valid.{fmt}", [{"text": "a dog", "stars": 2}])
    task = {"text_columns": "text", "label_column": "stars"}
    splits, spec = load_task(task, {"train_file": str(train), "validation_file": str(valid)})
    assert spec.label_names == ("1", "2", "5") and spec.num_labels == 3  # sorted by value, as run_glue.py
    assert splits["train"]["label"] == [2, 0, 1, 2] and splits["valid"]["label"] == [1]


def test_label_names_of_every_kind(tmp_path):
    task = {"text_columns": ["question", "sentence"], "label_column": "answer"}
    rows = pair_rows(20, 0)
    train, valid = write(tmp_path / "train.csv", rows), write(tmp_path / "dev.csv", [{**rows[0], "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"dev.csv: row 1 has label 'maybe'.*0 or 'no', 1 or 'yes'"):
        load_task(task, {"train_file": str(train), "validation_file": str(valid)})
    splits, spec = load_task(task, {"train_file": str(train), "validation_file": str(train)})
    assert spec.label_names == ("no", "yes") and set(splits["train"]["label"]) == {0, 1}
    scores = write(tmp_path / "scores.jsonl", [{"question": "a", "sentence": "b", "answer": v} for v in (0.5, 1.0)])
    with pytest.raises(ValueError, match="fractional labels .* set task.problem_type: regression"):
        load_task(task, {"train_file": str(scores), "validation_file": str(scores)})
    single = write(tmp_path / "one.jsonl", [{"question": "a", "sentence": "b", "answer": "yes"}])
    with pytest.raises(ValueError, match="a single label value"):
        load_task(task, {"train_file": str(single), "validation_file": str(single)})
    # given names: ids and names both read, case does not matter
    given = write(tmp_path / "given.jsonl", [{"question": "a", "sentence": "b", "answer": v} for v in (1, "NO")])
    splits, _ = load_task(
        {**task, "label_names": ["no", "yes"]}, {"train_file": str(given), "validation_file": str(given)}
    )  # noqa: E501
    assert splits["train"]["label"] == [1, 0]


def test_missing_columns_list_the_present_ones(tmp_path, base_model):
    bad = write(tmp_path / "d" / "train.jsonl", [{"text": "the cat", "label": 0}, {"text": "a dog", "label": 1}])
    raw = recipe(base_model, tmp_path / "out", "glue/sst2", bad, bad, [{"stage": "finetune"}])
    with pytest.raises(ValueError, match=r"has no column\(s\) \['sentence'\]; it has \['label', 'text'\]"):
        run_recipe(raw)
    raw["task"] = {"text_columns": ["text"], "label_column": "stars"}
    with pytest.raises(ValueError, match=r"no column\(s\) \['stars'\].*Set task.text_columns and task.label_column"):
        run_recipe(raw)
    assert not (tmp_path / "out").exists()


def test_hub_datasets_with_class_labels(monkeypatch):
    import datasets

    def fake_load_dataset(*args, **kwargs):
        if args[0] == "nyu-mll/glue":  # STS-B: float scores, an unlabelled test split
            rows = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 1.0], "idx": [0, 1]}
            return DatasetDict({n: Dataset.from_dict(rows) for n in ("train", "validation", "test")})
        tags = Features({"id": Value("string"), "tokens": List(Value("string")),
                         "ner_tags": List(ClassLabel(names=["O", "B-PER", "I-PER"]))})  # fmt: skip
        rows = {"id": ["0"], "tokens": [["Ada", "Lovelace", "wrote"]], "ner_tags": [[1, 2, 0]]}
        return DatasetDict({n: Dataset.from_dict(rows, features=tags) for n in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits, spec = load_task("glue/stsb")
    assert list(splits) == ["train", "validation"] and splits["train"].features["label"].dtype == "float32"
    task = {"dataset": ["someone/ner"], "text_columns": "tokens", "label_column": "ner_tags",
            "problem_type": "token_classification"}  # fmt: skip
    splits, spec = load_task(task)
    assert spec.label_names == ("O", "B-PER", "I-PER") and splits["validation"]["label"] == [[1, 2, 0]]
    with pytest.raises(ValueError, match=r"has no column\(s\) \['words'\]; it has \['id', 'tokens', 'ner_tags'\]"):
        load_task({**task, "text_columns": "words"})
    with pytest.raises(ValueError, match=r"no split\(s\) \['dev'\]; it has \['train', 'validation', 'test'\]"):
        load_task({**task, "validation_splits": ["dev"]})
    with pytest.raises(ValueError, match="lists 2 labels but someone/ner's 'ner_tags' has 3"):
        load_task({**task, "label_names": ["O", "X"]})


def test_token_classification_files_and_word_alignment(tmp_path):
    task = {"text_columns": "tokens", "label_column": "ner_tags", "problem_type": "token_classification"}
    jsonl = write(tmp_path / "train.jsonl", [{"tokens": t, "ner_tags": g} for t, g in zip(*NER.values())])
    csv_file = write(tmp_path / "dev.csv", [{"tokens": t, "ner_tags": g} for t, g in zip(*NER.values())])
    splits, spec = load_task(task, {"train_file": str(jsonl), "validation_file": str(csv_file)})
    assert spec.label_names == ("B-ANI", "B-LOC", "I-ANI", "O") and splits["dev"][0] == splits["train"][0]
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # A WordPiece vocabulary that splits "garden" into "gar ##den": only its first sub-token carries the tag.
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "in", "gar", "##den"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )  # noqa: E501
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    raw = DatasetDict(train=Dataset.from_dict({"tokens": [["the", "cat", "in", "garden"]], "label": [[3, 0, 3, 1]]}))
    enc = tokenize_splits(raw, tokenizer, 16, spec)["train"][0]
    assert enc["input_ids"] == [2, 4, 5, 6, 7, 8, 3] and enc["labels"] == [-100, 3, 0, 3, 1, -100, -100]
    bad = write(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    with pytest.raises(ValueError, match="row 1 has 2 words but 1 tags"):
        load_task(task, {"train_file": str(bad), "validation_file": str(bad)})


def test_the_demo_task_is_hard_and_its_noise_fixed_by_the_seed():
    noisy, clean = make_demo_data(2000, 10, seed=0), make_demo_data(2000, 10, seed=0, label_noise=0.0)
    assert noisy["train"]["hypothesis"] == clean["train"]["hypothesis"]
    flipped = np.mean(np.array(noisy["train"]["label"]) != np.array(clean["train"]["label"]))
    assert 0.08 < flipped < 0.12 and noisy["train"]["label"] == make_demo_data(2000, 10, seed=0)["train"]["label"]
    for row in clean["train"]:  # the rules: negation of the subject's own verb contradicts; of another, is neutral
        subject, verb = row["premise"].split()[2:4]
        if row["hypothesis"].startswith(f"the {subject} never "):
            assert row["label"] == (2 if row["hypothesis"].split()[3] == verb else 1)


# ----------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computations():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    p, r = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, FP 1, FN 1, TN 1
    assert f1_score(p, r) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(p, r) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert f1_score([0, 0], [0, 0]) == 0.0 and matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    # multi-class MCC: the correlation of the one-hot prediction and reference matrices (Gorodkin 2004)
    pred, true = [0, 2, 1, 0, 0, 1, 2], [0, 1, 2, 0, 1, 2, 2]
    x, y = np.eye(3)[pred], np.eye(3)[true]
    x, y = x - x.mean(0), y - y.mean(0)
    assert matthews_corrcoef(pred, true) == pytest.approx((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    # ties share their average rank: x ranks 1, 2.5, 2.5, 4
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_entity_scores_match_hand_computations():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC", "I-ORG"]) == [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 4, 4)]
    assert get_entities(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)]
    assert get_entities(["S-PER", "B-LOC", "E-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]  # 2 of 3 entities found, 2 of 3 found are right
    scores = entity_scores(refs, preds)
    assert scores == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "accuracy": 5 / 6})
    partial = entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])  # a wrong span counts as a miss
    assert partial == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.5})


def test_compute_metrics_of_each_task_offline():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # predicts 0, 1, 1, 0, 1
    labels = np.array([0, 1, 0, 1, 1])  # TP 2, FP 1, FN 1, TN 1
    mrpc = build_compute_metrics(parse_task("glue/mrpc"))(EvalPrediction(predictions=logits, label_ids=labels))
    assert list(mrpc) == ["f1", "accuracy"] and mrpc == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    cola = build_compute_metrics(parse_task("glue/cola"))(EvalPrediction(predictions=logits, label_ids=labels))
    assert cola == pytest.approx({"matthews_correlation": 1 / 6})
    scores = np.array([[1.0], [2.0], [3.0], [4.0]])
    stsb = build_compute_metrics(parse_task("glue/stsb"))(
        EvalPrediction(predictions=scores, label_ids=np.array([2.0, 4.0, 5.0, 9.0]))
    )
    assert stsb == pytest.approx({"pearson": 11 / math.sqrt(130), "spearmanr": 1.0})
    spec = parse_task({"text_columns": "t", "problem_type": "token_classification"}).with_label_names(["O", "B-X"])
    token_logits = np.array([[[0, 9], [9, 0], [0, 9], [9, 0]]], dtype=float)  # B-X, O, B-X, O
    token_labels = np.array([[-100, 0, 1, -100]])  # two labelled words: O (predicted O), B-X (predicted B-X)
    ner = build_compute_metrics(spec)(EvalPrediction(predictions=token_logits, label_ids=token_labels))
    assert ner == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}


def test_metrics_go_through_evaluate_when_it_loads(monkeypatch):
    import evaluate

    loaded = []

    class FakeGlue:
        def compute(self, predictions, references):
            return {"matthews_correlation": 0.123}

    def fake_load(path, config_name=None):
        loaded.append((path, config_name))
        if path == "glue":
            return FakeGlue()
        raise FileNotFoundError(f"Couldn't find a module script for {path}")

    monkeypatch.setattr(evaluate, "load", fake_load)
    monkeypatch.setattr(metrics_module, "LOADED_METRICS", {})
    logits, labels = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0])
    cola = build_compute_metrics(parse_task("glue/cola"))(EvalPrediction(predictions=logits, label_ids=labels))
    assert cola == {"matthews_correlation": 0.123} and loaded == [("glue", "cola")]
    demo = build_compute_metrics(parse_task("demo"))(EvalPrediction(predictions=logits, label_ids=labels))
    assert demo == {"accuracy": 0.5} and ("accuracy", None) in loaded  # not loadable: the local definition


# ----------------------------------------------------------------------------------------------------- distillation
def test_token_distillation_is_a_kl_per_labelled_token():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3)
    labels = torch.tensor([[-100, 1, 2, -100], [0, -100, 1, 1]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the last token of row 2 is padding
    T = 2.0
    out = distillation_loss(student, teacher, labels, alpha=1.0, temperature=T, attention_mask=attention)
    kept = [(0, 1), (0, 2), (1, 0), (1, 2)]
    kl = []
    for b, t in kept:
        p = [math.exp(v / T) for v in teacher[b, t].tolist()]
        q = [math.exp(v / T) for v in student[b, t].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert out.kd_loss.item() == pytest.approx(T**2 * sum(kl) / len(kl), rel=1e-5)
    out.kd_loss.backward()
    ignored = torch.ones(2, 4, dtype=torch.bool)
    ignored[tuple(zip(*kept))] = False
    assert student.grad[ignored].abs().max() == 0 and student.grad[~ignored].abs().min() > 0
    # the task term ignores -100 too; regression keeps the MSE to the teacher
    mixed = distillation_loss(student, teacher, labels, alpha=0.0, temperature=T)
    assert mixed.loss.item() == pytest.approx(F.cross_entropy(student.reshape(-1, 3), labels.reshape(-1)).item())
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    assert distillation_loss(s, t, torch.tensor([0.0, 0.0]), alpha=1.0).kd_loss.item() == pytest.approx(2.5)


# ----------------------------------------------------------------------------------------------------- persistence
def test_pruned_token_classifier_reloads_with_plain_transformers(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(tiny_config(num_labels=5)).eval()
    prune_heads(model, {0: [1, 3], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {0: list(range(20))})
    folder = save_pruned(model, tmp_path / "ner", card=False, figure=False)
    inputs = {"input_ids": torch.tensor([[2, 5, 9, 11, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(load_pruned(folder).eval()(**inputs).logits, expected)
    code = WITHOUT_HF_PRUNE + textwrap.dedent(
        """
        import torch
        from transformers import AutoModelForTokenClassification

        inputs = {k: torch.tensor(v) for k, v in json.loads(sys.argv[2]).items()}
        model = AutoModelForTokenClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            print("RESULT " + json.dumps([type(model).__name__, model(**inputs).logits.tolist()]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), json.dumps({k: v.tolist() for k, v in inputs.items()})],
        capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, logits = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert name == "PrunedBertForTokenClassification"
    torch.testing.assert_close(torch.tensor(logits), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- labels vs model
def test_a_model_for_other_labels_is_refused_before_training(tmp_path, base_model):
    from transformers import AutoModelForSequenceClassification

    train = write(tmp_path / "d" / "train.jsonl", sentence_rows(16, 0))
    teacher = tmp_path / "nli-teacher"
    AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=3).save_pretrained(teacher)
    raw = recipe(base_model, tmp_path / "out", "glue/sst2", train, train, [{"stage": "distill"}, EXPORT])
    raw["teacher"] = str(teacher)
    with pytest.raises(ValueError, match=r"predicts 3 label\(s\) but task 'sst2' has 2 labels \(negative, positive\)"):
        run_recipe(raw)
    swapped = tmp_path / "swapped"
    AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=2, id2label={0: "positive", 1: "negative"}
    ).save_pretrained(swapped)
    raw["teacher"] = str(swapped)
    with pytest.raises(ValueError, match=r"Set task.label_names: \['positive', 'negative'\]"):
        run_recipe(raw)
    raw["teacher"] = None
    raw["model"] = str(teacher)  # a trained head of another task as the starting model
    raw["stages"] = [{"stage": "finetune"}, EXPORT]
    with pytest.raises(ValueError, match="Start from a base model without a task head"):
        run_recipe(raw)
    ner = tmp_path / "ner"
    AutoModelForTokenClassification.from_pretrained(base_model, num_labels=2).save_pretrained(ner)
    raw["model"] = str(ner)
    with pytest.raises(ValueError, match="is a token classification model but task 'sst2' is sequence classification"):
        run_recipe(raw)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- end to end
def _export_logits(folder: Path, model, tokenizer_texts: list) -> None:
    """The export reloads with load_pruned and gives the logits of the run's model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    split = isinstance(tokenizer_texts[0], list)
    enc = tokenizer(tokenizer_texts, is_split_into_words=split, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**enc).logits
        torch.testing.assert_close(load_pruned(folder).eval()(**enc).logits, expected, rtol=0, atol=1e-6)


def test_single_sentence_recipe_end_to_end(tmp_path, base_model):
    train = write(tmp_path / "d" / "train.jsonl", sentence_rows(64, 0))
    valid = write(tmp_path / "d" / "validation.jsonl", sentence_rows(24, 1))
    stages = [{"stage": "finetune"}, PRUNE, {"stage": "distill", "args": {"max_steps": 2}}, EXPORT]
    result = run_recipe(recipe(base_model, tmp_path / "out", "glue/sst2", train, valid, stages))
    report = result.report
    assert report["task"] == "sst2" and report["dataset"] == "nyu-mll/glue" and report["metric_name"] == "accuracy"
    assert set(report["metrics"]["pruned"]) == {"validation"} and report["flops"]["ratio"] >= 1.5
    assert json.loads((result.export_dir / "config.json").read_text())["id2label"] == {
        "0": "negative",
        "1": "positive",
    }
    _export_logits(result.export_dir, result.model, ["the cat likes the dog", "a fox never sees"])


def test_pair_recipe_end_to_end_with_inferred_labels(tmp_path, base_model):
    train = write(tmp_path / "d" / "train.csv", pair_rows(64, 0))
    valid = write(tmp_path / "d" / "dev.csv", pair_rows(24, 1))
    task = {"name": "animal-qa", "text_columns": ["question", "sentence"], "label_column": "answer",
            "metrics": ["f1", "accuracy", "matthews_correlation"]}  # fmt: skip
    taylor = {"stage": "taylor_ffn", "args": {"max_steps": 4, "target_sparsity": 0.5, "taylor_iterations": 2,
                                              "taylor_interval_steps": 2}}  # fmt: skip
    stages = [{"stage": "finetune"}, taylor, {"stage": "evaluate"}, EXPORT]
    result = run_recipe(recipe(base_model, tmp_path / "out", task, train, valid, stages))
    evaluate = read_state(result.output_dir)["finished"][2]
    assert evaluate["summary"]["metric"] == "f1" and set(evaluate["metrics"]) == {"teacher", "pruned"}
    every = evaluate["summary"]["all_metrics"]["pruned"]["dev"]
    assert set(every) == {"f1", "accuracy", "matthews_correlation"}
    assert evaluate["metrics"]["pruned"]["dev"] == every["f1"]
    report = result.report
    assert report["metric_name"] == "f1" and report["all_metrics"] == evaluate["summary"]["all_metrics"]
    text = format_report(report)
    assert "f1 dev" in text and "accuracy dev" in text and "matthews_correlation dev" in text
    card = (result.export_dir / "README.md").read_text()
    assert "### f1" in card and "dev (accuracy)" in card
    assert json.loads((result.export_dir / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}


def test_regression_recipe_end_to_end(tmp_path, base_model):
    train = write(tmp_path / "d" / "train.tsv", similarity_rows(64, 0))
    valid = write(tmp_path / "d" / "validation.tsv", similarity_rows(24, 1))
    stages = [{"stage": "finetune"}, PRUNE, {"stage": "distill", "args": {"max_steps": 2}}, {"stage": "evaluate"}]
    result = run_recipe(recipe(base_model, tmp_path / "out", "glue/stsb", train, valid, [*stages, EXPORT]))
    report = result.report
    assert report["metric_name"] == "pearson" and list(report["all_metrics"]["pruned"]["validation"]) == [
        "pearson", "spearmanr"
    ]  # fmt: skip
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "LABEL_0"} and config["problem_type"] == "regression"
    assert load_pruned(result.export_dir).config.num_labels == 1
    assert "pearson validation" in format_report(report) and "spearmanr validation" in format_report(report)
    _export_logits(result.export_dir, result.model, ["the cat sees the park"])


def test_token_classification_recipe_end_to_end(tmp_path, base_model):
    train = write(tmp_path / "d" / "train.jsonl", entity_rows(64, 0))
    valid = write(tmp_path / "d" / "validation.jsonl", entity_rows(24, 1))
    task = {"name": "animals", "text_columns": ["tokens"], "label_column": "ner_tags",
            "problem_type": "token_classification"}  # fmt: skip
    # retraining-free pruning (per-token Fisher scores), movement pruning, head removal, per-token distillation
    movement = {"stage": "movement", "args": {"max_steps": 4, "target_sparsity": 0.9, "pruning_frequency": 1}}
    distill = {"stage": "distill", "args": {"max_steps": 2}}
    stages = [{"stage": "finetune"}, PRUNE, movement, {"stage": "prune_heads"}, distill, {"stage": "evaluate"}]
    result = run_recipe(recipe(base_model, tmp_path / "out", task, train, valid, [*stages, EXPORT]))
    state = read_state(result.output_dir)
    assert state["finished"][1]["summary"]["flops_ratio"] >= 1.5
    heads = state["finished"][3]["summary"]
    assert sum(heads["heads_after"]) < sum(heads["heads_before"])
    distilled = state["finished"][4]["metrics"]
    assert math.isfinite(distilled["train_loss"]) and distilled["global_step"] == 2
    report = result.report
    assert report["metric_name"] == "f1" and list(report["all_metrics"]["teacher"]["validation"]) == [
        "f1", "precision", "recall", "accuracy"
    ]  # fmt: skip
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["auto_map"]["AutoModelForTokenClassification"].endswith("PrunedBertForTokenClassification")
    assert config["id2label"] == {"0": "B-ANI", "1": "B-LOC", "2": "I-ANI", "3": "O"}
    assert "pipeline_tag: token-classification" in (result.export_dir / "README.md").read_text()
    words = [["the", "big", "cat", "sees", "the", "dog"], ["a", "fox", "in", "the", "lake"]]
    _export_logits(result.export_dir, result.model, words)


def test_reports_without_every_metric_still_read():
    """Reports written before the task's other metrics were recorded format as before."""
    old = {"task": "mnli", "metric_name": "accuracy", "metrics": {"teacher": {"validation_matched": 0.8},
           "pruned": {"validation_matched": 0.75}}}  # fmt: skip
    assert "accuracy validation_matched  0.8000  0.7500" in format_report(old)
    assert build_report.__kwdefaults__["metric_name"] == "accuracy"
