"""The teacher's metrics are cached by content: a second run distilling from the same teacher on the same split does
not evaluate it again, and a changed teacher or split never reuses an entry."""

import json
import shutil

import pytest
import torch
from datasets import Dataset
from recipe_run import make_tiny_assets, tiny_recipe
from utils import tiny_model

from hf_prune import load_pruned, save_pruned
from hf_prune.export.files import EVAL_CACHE_NAME
from hf_prune.pipeline import stage_outputs as stages_module
from hf_prune.pipeline.metrics_cache import MetricsCache, dataset_digest, model_digest
from hf_prune.pipeline.recipe import read_state, run_recipe


def test_model_digest_follows_the_weights():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b.classifier.weight[0, 0] += 1e-6
    assert model_digest(a) != model_digest(b)


def test_dataset_digest_follows_the_rows():
    rows = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [0, 1]}
    a, b = Dataset.from_dict(rows), Dataset.from_dict(dict(rows))
    assert dataset_digest(a) == dataset_digest(b)
    assert dataset_digest(a) != dataset_digest(Dataset.from_dict({**rows, "labels": [0, 2]}))
    assert dataset_digest(a) != dataset_digest(Dataset.from_dict({**rows, "input_ids": [[1, 2], [3, 4, 5]]}))
    # a select() view is hashed by the rows it shows
    first_row = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [0]})
    assert dataset_digest(a.select([0])) == dataset_digest(first_row)
    assert dataset_digest(a.select([1])) != dataset_digest(first_row)
    assert dataset_digest(a.select([1, 0])) != dataset_digest(a)


def test_cache_file_survives_a_corrupt_file(tmp_path):
    path = tmp_path / EVAL_CACHE_NAME
    path.write_text("{not json")
    cache = MetricsCache(path)
    assert cache.get("k") is None
    cache.put("k", 0.5, "validation", "accuracy")
    assert MetricsCache(path).get("k") == 0.5
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finetune + evaluate run: its teacher folder and the teacher's metric."""
    root = tmp_path_factory.mktemp("cache")
    assets = make_tiny_assets(root / "assets")
    raw = tiny_recipe(assets, root / "teacher")
    raw["stages"] = [{"stage": "finetune"}, {"stage": "evaluate"}]
    run_recipe(raw)
    state = read_state(root / "teacher")
    return assets, root, root / "teacher" / state["finished"][0]["dir"] / "model", state["finished"][1]["metrics"]


def _evaluate_run(assets, out, teacher, monkeypatch, **data):
    """An evaluate-only run of the teacher folder as its own student; returns (metrics, models evaluated)."""
    evaluated = []
    real = stages_module.evaluate_splits

    def counting(ctx, model, args, splits):
        evaluated.append((model_digest(model), sorted(splits)))
        return real(ctx, model, args, splits)

    monkeypatch.setattr(stages_module, "evaluate_splits", counting)
    raw = tiny_recipe(assets, out)
    raw.update(model=str(teacher), teacher=str(teacher), stages=[{"stage": "evaluate"}])
    raw["data"].update(data)
    run_recipe(raw)
    return read_state(out)["finished"][0]["metrics"], evaluated


def test_a_second_run_reads_the_teacher_metric_from_the_cache(teacher_run, monkeypatch, tmp_path):
    assets, _, teacher, first = teacher_run
    cache = json.loads((teacher / EVAL_CACHE_NAME).read_text())
    assert [e["value"] for e in cache["entries"].values()] == [first["teacher"]["validation_matched"]]
    metrics, evaluated = _evaluate_run(assets, tmp_path / "again", teacher, monkeypatch)
    assert metrics["teacher"] == first["teacher"]
    assert len(evaluated) == 1  # the student only
    # the student is the teacher's own weights here: evaluated for real, it gives the cached value
    assert metrics["pruned"] == first["teacher"]


def test_another_split_is_evaluated_and_cached_beside_the_first(teacher_run, monkeypatch, tmp_path):
    assets, _, teacher, first = teacher_run
    metrics, evaluated = _evaluate_run(assets, tmp_path / "fewer", teacher, monkeypatch, max_eval_samples=10)
    assert len(evaluated) == 2  # teacher and student: ten rows are another split
    assert metrics["teacher"] == metrics["pruned"]
    entries = json.loads((teacher / EVAL_CACHE_NAME).read_text())["entries"]
    assert len(entries) == 2 and first["teacher"]["validation_matched"] in [e["value"] for e in entries.values()]


def test_a_changed_teacher_is_evaluated_again(teacher_run, monkeypatch, tmp_path):
    assets, root, teacher, first = teacher_run
    labels = [json.loads(line)["label"] for line in assets["validation"].read_text().splitlines()]
    share = {c: labels.count(c) / len(labels) for c in range(3)}
    target = next(c for c in range(3) if share[c] != first["teacher"]["validation_matched"])
    changed = tmp_path / "changed-teacher"
    shutil.copytree(teacher, changed)  # the cache file comes along, as it would with a copied folder
    model = load_pruned(changed)
    with torch.no_grad():
        model.classifier.bias.fill_(0.0)[target] = 100.0  # predicts `target` for everything
    save_pruned(model, changed, overwrite=True, card=False, figure=False)
    shutil.copy(teacher / EVAL_CACHE_NAME, changed / EVAL_CACHE_NAME)
    metrics, evaluated = _evaluate_run(assets, tmp_path / "changed", changed, monkeypatch)
    assert len(evaluated) == 2 and evaluated[0][0] == model_digest(model)
    assert metrics["teacher"] == metrics["pruned"] == {"validation_matched": share[target]}
    entries = json.loads((changed / EVAL_CACHE_NAME).read_text())["entries"]
    assert sum(key.startswith(model_digest(model)) for key in entries) == 1
