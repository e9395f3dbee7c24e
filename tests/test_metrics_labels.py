"""F1 of more than two classes needs an average or a positive label named by its name, refused before training
otherwise; label names that contradict a Hub dataset's ClassLabel are refused with both lists."""

import json
import logging

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import BertModel, EvalPrediction
from utils import tiny_config

import hf_prune.pipeline.metrics as metrics_module
from hf_prune.pipeline.data import load_task
from hf_prune.pipeline.demo import build_wordlevel_tokenizer, demo_vocabulary
from hf_prune.pipeline.metrics import build_compute_metrics, check_task_metrics, f1_score, positive_label_id
from hf_prune.pipeline.recipe import run_recipe
from hf_prune.pipeline.schema import load_recipe
from hf_prune.pipeline.tasks import parse_task

PRED, TRUE = [0, 2, 1, 0, 0, 1, 2, 2], [0, 1, 2, 0, 1, 2, 2, 2]
# per class: 0: TP 2 FP 1 FN 0 (F1 4/5); 1: TP 0 (F1 0); 2: TP 2 FP 1 FN 2 (F1 4/7); supports 2, 2, 4
MACRO, MICRO, WEIGHTED = (4 / 5 + 0 + 4 / 7) / 3, 4 / 8, (4 / 5 * 2 + 0 * 2 + 4 / 7 * 4) / 8


def _task(**extra) -> dict:
    return {"name": "three", "text_columns": ["text"], **extra}


def _rows(labels) -> list[dict]:
    return [{"text": f"example {i}", "label": y} for i, y in enumerate(labels)]


def _files(tmp_path, labels) -> dict:
    for name in ("train", "dev"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(labels)))
    return {"train_file": str(tmp_path / "train.jsonl"), "validation_file": str(tmp_path / "dev.jsonl")}


def _logits(ids, classes: int = 3) -> np.ndarray:
    return np.eye(classes)[np.asarray(ids)] * 5.0


@pytest.fixture
def offline_metrics(monkeypatch):
    """`evaluate` cannot load any module: the local definitions compute every metric."""
    import evaluate

    def unavailable(path, config_name=None):
        raise FileNotFoundError(f"Couldn't find a module script for {path}")

    monkeypatch.setattr(evaluate, "load", unavailable)
    monkeypatch.setattr(metrics_module, "LOADED_METRICS", {})


# ----------------------------------------------------------------------------------------------------- definitions
def test_f1_averages_match_hand_computations():
    assert f1_score(PRED, TRUE, average="macro") == pytest.approx(MACRO)
    assert f1_score(PRED, TRUE, average="micro") == pytest.approx(MICRO)
    assert f1_score(PRED, TRUE, average="weighted") == pytest.approx(WEIGHTED)
    assert len({round(v, 6) for v in (MACRO, MICRO, WEIGHTED)}) == 3
    assert f1_score(PRED, TRUE, pos_label=2) == pytest.approx(4 / 7)  # binary F1 of one class against the others
    assert f1_score([0, 3], [0, 1], average="macro") == pytest.approx(1 / 3)  # a class only predicted counts too
    assert f1_score([], [], average="macro") == 0.0 and f1_score([1], [0], average="weighted") == 0.0
    with pytest.raises(ValueError, match="not one of binary, macro, micro, weighted"):
        f1_score(PRED, TRUE, average="samples")


def test_averaged_and_one_class_f1_of_a_three_class_task(offline_metrics):
    task = parse_task(_task(label_names=["a", "b", "c"], metrics=["f1_macro", "f1_micro", "f1_weighted", "accuracy"]))
    scores = build_compute_metrics(task)(EvalPrediction(predictions=_logits(PRED), label_ids=np.array(TRUE)))
    assert scores == pytest.approx({"f1_macro": MACRO, "f1_micro": MICRO, "f1_weighted": WEIGHTED, "accuracy": 0.5})
    # f1 with a positive label: that class against all the others, whatever its id
    for name, expected in (("c", 4 / 7), ("A", 4 / 5), ("b", 0.0)):
        task = parse_task(_task(label_names=["a", "b", "c"], metrics=["f1"], positive_label=name))
        scores = build_compute_metrics(task)(EvalPrediction(predictions=_logits(PRED), label_ids=np.array(TRUE)))
        assert scores == pytest.approx({"f1": expected})
    # two labels: the positive label may be id 0
    two = parse_task(_task(label_names=["yes", "no"], metrics=["f1"], positive_label="yes"))
    pred, true = [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]  # "yes" (id 0): TP 2, FP 1, FN 1
    scores = build_compute_metrics(two)(EvalPrediction(predictions=_logits(pred, 2), label_ids=np.array(true)))
    assert positive_label_id(two) == 0 and scores == pytest.approx({"f1": 4 / 6})


def test_evaluate_gets_the_average_and_the_positive_class(monkeypatch):
    import evaluate

    calls = []

    class FakeF1:
        def compute(self, predictions, references, **kwargs):
            calls.append((list(predictions), list(references), kwargs))
            return {"f1": 0.25}

    monkeypatch.setattr(evaluate, "load", lambda path, config_name=None: FakeF1())
    monkeypatch.setattr(metrics_module, "LOADED_METRICS", {})
    task = parse_task(_task(label_names=["a", "b", "c"], metrics=["f1_weighted", "f1"], positive_label="c"))
    scores = build_compute_metrics(task)(EvalPrediction(predictions=_logits(PRED), label_ids=np.array(TRUE)))
    assert scores == {"f1_weighted": 0.25, "f1": 0.25}
    assert calls[0] == (PRED, TRUE, {"average": "weighted"})
    assert calls[1] == ([int(p == 2) for p in PRED], [int(t == 2) for t in TRUE], {"pos_label": 1})


# ----------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "extra, message",
    [
        ({"label_names": ["a", "b", "c"], "metrics": ["f1"]},
         r"has f1, the F1 of one class, but task 'three' has 3 labels \(a, b, c\)\. Name an average instead: "
         r"f1_macro .* f1_micro .* f1_weighted .* set task.positive_label .* one of \['a', 'b', 'c'\]"),
        ({"label_names": ["a", "b", "c"], "metrics": ["accuracy", "f1"]}, "f1_macro"),
        ({"label_names": ["a", "b", "c"], "metrics": ["f1"], "positive_label": "d"},
         r"positive_label='d' is not a label of task 'three': give one of its label names \['a', 'b', 'c'\]"),
        ({"label_names": ["neg", "pos"], "metrics": ["f1"], "positive_label": 1}, "is not a label"),  # names only
        ({"label_names": ["a", "b", "c"], "positive_label": "a"}, "have no f1: add f1 to task.metrics, or remove"),
        ({"problem_type": "regression", "metrics": ["pearson"], "positive_label": "a"}, "not to regression"),
        ({"problem_type": "token_classification", "label_names": ["O", "NN", "VB"], "metrics": ["f1", "accuracy"]},
         r"\['f1'\] are seqeval's entity-level scores, but the tags .* set task.metrics: \[accuracy\]"),
        ({"positive_label": ["a"], "metrics": ["f1"]}, "must be a label name"),
    ],
)  # fmt: skip
def test_undefined_metrics_are_refused_naming_the_fix(extra, message):
    with pytest.raises(ValueError, match=message):
        check_task_metrics(parse_task(_task(**extra)))


def test_a_recipe_with_f1_of_three_labels_is_refused_before_anything_runs(tmp_path):
    folder = tmp_path / "tiny-encoder"
    tokenizer = build_wordlevel_tokenizer(demo_vocabulary(), model_max_length=64)
    torch.manual_seed(0)
    BertModel(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for task in (_task(label_names=["a", "b", "c"], metrics=["f1"]), _task(metrics=["accuracy", "f1"])):
        raw = {"model": str(folder), "task": task, "stages": [{"stage": "finetune", "args": {"max_steps": 1}}],
               "data": _files(tmp_path, ["a", "b", "c"]), "output_dir": str(tmp_path / "out"),
               "defaults": {"use_cpu": True, "report_to": []}}  # fmt: skip
        assert load_recipe(raw).task_spec.metrics == tuple(task["metrics"])
        with pytest.raises(ValueError, match=r"has 3 labels \(a, b, c\)\. Name an average instead: f1_macro"):
            run_recipe(raw)
        assert not (tmp_path / "out").exists()  # refused before any stage, before the run folder is written


def test_inferred_labels_are_checked_once_the_data_is_read(tmp_path, caplog):
    data = _files(tmp_path, ["dog", "cat", "owl", "cat"])
    with pytest.raises(ValueError, match=r"has 3 labels \(cat, dog, owl\)\. Name an average instead"):
        load_task(_task(metrics=["f1"]), data)
    _, spec = load_task(_task(metrics=["f1"], positive_label="owl"), data)
    assert spec.labels_inferred and spec.label_names == ("cat", "dog", "owl") and positive_label_id(spec) == 2
    with pytest.raises(ValueError, match=r"positive_label='bird' is not a label .* \['cat', 'dog', 'owl'\]"):
        load_task(_task(metrics=["f1"], positive_label="bird"), data)
    # integer labels: the positive label is the name "5", not label id 5 nor the id of a sort position
    _, spec = load_task(_task(metrics=["f1"], positive_label=5), _files(tmp_path, [5, 1, 2, 1]))
    assert spec.label_names == ("1", "2", "5") and positive_label_id(spec) == 2
    # two sorted names: f1 reads label id 1, and says so
    with caplog.at_level(logging.WARNING, logger="hf_prune"):
        _, spec = load_task(_task(metrics=["f1"]), _files(tmp_path, ["yes", "no", "no"]))
    assert spec.label_names == ("no", "yes") and positive_label_id(spec) == 1
    assert "f1 is the F1 of the label 'yes', label id 1 of the sorted label names ['no', 'yes']" in caplog.text
    assert "Set task.positive_label" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_prune"):
        load_task(_task(metrics=["f1"], positive_label="yes"), _files(tmp_path, ["yes", "no", "no"]))
        load_task(_task(metrics=["f1"]), _files(tmp_path, [0, 1, 1]))  # 0 / 1: 1 is the positive class
    assert "positive_label" not in caplog.text


def test_check_task_metrics_waits_for_the_label_names():
    spec = parse_task(_task(metrics=["f1"], positive_label="x"))
    assert spec.label_names is None and check_task_metrics(spec) is spec
    with pytest.raises(ValueError, match="has f1, the F1 of one class"):
        check_task_metrics(parse_task(_task(metrics=["f1"])).with_label_names(["a", "b", "c"]))
    with pytest.raises(ValueError, match="has f1, the F1 of one class"):  # a spec built in code
        build_compute_metrics(parse_task(_task(metrics=["f1"])).with_label_names(["a", "b", "c"]))
    assert build_compute_metrics(parse_task("glue/mrpc")) is not None  # GLUE's binary F1 of label id 1 stays


# ----------------------------------------------------------------------------------------------------- ClassLabel
def test_label_names_that_contradict_the_hub_class_label_are_refused(monkeypatch):
    import datasets

    def fake_load_dataset(*args, **kwargs):
        features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "neu", "pos"])})
        rows = {"text": ["a", "b", "c"], "label": [0, 1, 2]}
        return DatasetDict({n: Dataset.from_dict(rows, features=features) for n in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = _task(dataset=["someone/sentiment"], metrics=["f1_macro"])
    for names in (["pos", "neu", "neg"], ["negative", "neutral", "positive"]):
        with pytest.raises(ValueError) as err:
            load_task({**task, "label_names": names})
        message = str(err.value)
        assert f"task.label_names {names} differ from the names of someone/sentiment's 'label' ClassLabel" in message
        assert "['neg', 'neu', 'pos']" in message and "Set task.label_names: ['neg', 'neu', 'pos']" in message
    with pytest.raises(ValueError, match="lists 2 labels but someone/sentiment's 'label' has 3"):
        load_task({**task, "label_names": ["neg", "pos"]})
    _, spec = load_task({**task, "label_names": ["Neg", "Neu", "Pos"]})  # the same names, written in other case
    assert spec.label_names == ("Neg", "Neu", "Pos")
    splits, spec = load_task(task)
    assert spec.label_names == ("neg", "neu", "pos") and not spec.labels_inferred
    assert splits["validation"]["label"] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"has 3 labels \(neg, neu, pos\)\. Name an average"):
        load_task({**task, "metrics": ["f1"]})
    _, spec = load_task({**task, "metrics": ["f1"], "positive_label": "pos"})
    assert positive_label_id(spec) == 2
