"""Speed targets in the pipeline: `hf-prune compress` (retraining-free, ending in an export), the prune_to_speedup and
joint_prune stages, and `PruningTrainer` pruning heads and neurons jointly to a FLOPs ratio."""

import json
import time

import pytest
import torch
from recipe_run import make_tiny_assets, model_shapes, run_on_two_processes, tiny_recipe
from utils import TinyDataset, tiny_model, train_args

from hf_prune import PruningTrainer, load_pruned
from hf_prune.cli import main as cli_main
from hf_prune.models.costs import count_flops
from hf_prune.pipeline.recipe import read_state, run_recipe
from hf_prune.pipeline.schema import load_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("speed-assets"))


def test_compress_cli_prunes_to_the_speedup_and_exports(assets, tmp_path, capsys):
    out = tmp_path / "compressed"
    code = cli_main(
        [
            "compress", str(assets["model"]), "--speedup", "2",
            "--train-file", str(assets["train"]), "--validation-file", str(assets["validation"]),
            "--output-dir", str(out), "--num-samples", "96", "--tune-samples", "96", "--seq-len", "16",
            "--max-seq-length", "32", "--set", "defaults.per_device_eval_batch_size=16",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "final" / "pruning_report.json").read_text())
    assert 2.0 <= report["flops"]["ratio"] <= 2.04 and report["flops"]["seq_len"] == 16
    assert set(report["metrics"]) == {"teacher", "pruned"}
    state = read_state(out)
    assert [r["stage"] for r in state["finished"]] == ["prune_to_speedup", "evaluate", "export"]
    summary = state["finished"][0]["summary"]
    assert summary["flops_ratio"] == pytest.approx(report["flops"]["ratio"])
    assert (out / "final" / "README.md").is_file()
    assert "FLOPs without training" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags", [["--drop-layers"], ["--layer-counts", "1"], ["--prune-hidden"], ["--hidden-widths", "24"]]
)
def test_compress_cli_lets_the_search_drop_layers_or_narrow_the_stream(flags, assets, tmp_path):
    out = tmp_path / "compressed"
    code = cli_main(
        [
            "compress", str(assets["model"]), "--speedup", "2.5", *flags,
            "--train-file", str(assets["train"]), "--validation-file", str(assets["validation"]),
            "--output-dir", str(out), "--num-samples", "96", "--tune-samples", "96", "--seq-len", "16",
            "--max-seq-length", "32", "--set", "defaults.per_device_eval_batch_size=16",
        ]
    )  # fmt: skip
    assert code == 0
    state = read_state(out)
    stage = state["recipe"]["stages"][0]
    depth = flags[0] in ("--drop-layers", "--layer-counts")
    assert stage["drop_layers"] is depth and stage["prune_hidden"] is not depth
    summary = state["finished"][0]["summary"]
    if flags[0] == "--layer-counts":  # one depth named: the model keeps that many layers
        assert stage["layer_counts"] == [1] and len(summary["heads_after"]) == 1
    if flags[0] == "--hidden-widths":  # one width named: the stream is narrowed to it
        assert stage["hidden_widths"] == [24] and summary["hidden_after"] == 24
    report = json.loads((out / "final" / "pruning_report.json").read_text())
    assert 2.5 <= report["flops"]["ratio"] <= 2.5 * 1.02 and summary["hidden_after"] <= summary["hidden_before"]
    assert report["hidden_size"] == {"dense": summary["hidden_before"], "kept": summary["hidden_after"]}
    model = load_pruned(out / "final")
    assert len(model.bert.encoder.layer) == len(summary["heads_after"])


def test_speed_stages_need_a_target_speedup(assets, tmp_path):
    raw = tiny_recipe(assets, tmp_path / "x")
    raw["stages"] = [{"stage": "finetune"}, {"stage": "prune_to_speedup"}]
    with pytest.raises(ValueError, match="set target_speedup in its args"):
        load_recipe(raw)
    speed = {"stage": "prune_to_speedup", "num_samples": 0, "args": {"target_speedup": 2}}
    raw["stages"] = [{"stage": "finetune"}, speed]
    with pytest.raises(ValueError, match="num_samples=0 must be a positive integer"):
        load_recipe(raw)
    raw["stages"][1] = {"stage": "prune_to_speedup", "drop_layers": "yes", "args": {"target_speedup": 2}}
    with pytest.raises(ValueError, match="drop_layers='yes' must be true or false"):
        load_recipe(raw)
    raw["stages"][1] = {"stage": "prune_to_speedup", "hidden_widths": [24], "args": {"target_speedup": 2}}
    with pytest.raises(ValueError, match="hidden_widths needs prune_hidden: true"):
        load_recipe(raw)
    raw["stages"][1] = {"stage": "prune_to_speedup", "prune_hidden": True, "hidden_widths": 24,
                        "args": {"target_speedup": 2}}  # fmt: skip
    with pytest.raises(ValueError, match="hidden_widths=24 must be a list of positive integers"):
        load_recipe(raw)
    raw["stages"][1] = {"stage": "prune_to_speedup", "layer_counts": [2], "args": {"target_speedup": 2}}
    with pytest.raises(ValueError, match="layer_counts needs drop_layers: true"):
        load_recipe(raw)
    raw["stages"][1] = {"stage": "prune_to_speedup", "drop_layers": True, "layer_counts": [0],
                        "args": {"target_speedup": 2}}  # fmt: skip
    with pytest.raises(ValueError, match=r"layer_counts=\[0\] must be a list of positive integers"):
        load_recipe(raw)
    raw["stages"][1] = {"stage": "prune_to_speedup", "calibration_rounds": -1, "args": {"target_speedup": 2}}
    with pytest.raises(ValueError, match="calibration_rounds=-1 must be an integer >= 0"):
        load_recipe(raw)
    joint = {"stage": "joint_prune", "args": {"target_speedup": 2, "target_sparsity": 0.5}}
    raw["stages"] = [{"stage": "finetune"}, joint]
    with pytest.raises(ValueError, match="Both target_speedup"):
        run_recipe(raw)


def test_joint_prune_stage_removes_heads_and_neurons_to_the_speedup(assets, tmp_path):
    raw = tiny_recipe(assets, tmp_path / "joint")
    raw["stages"] = [
        {"stage": "finetune", "args": {"max_steps": 2}},
        {
            "stage": "joint_prune",
            "args": {
                "target_speedup": 2.0, "speedup_seq_len": 16, "max_steps": 6,
                "taylor_iterations": 3, "taylor_interval_steps": 2,
            },
        },
        {"stage": "export", "seq_len": 16, "batch_sizes": [1], "repeats": 1, "figure": False},
    ]  # fmt: skip
    result = run_recipe(raw)
    assert 2.0 <= result.report["flops"]["ratio"] <= 2.04
    summary = read_state(tmp_path / "joint")["finished"][1]["summary"]
    assert sum(summary["heads_after"]) < sum(summary["heads_before"])
    assert sum(summary["ffn_after"]) < sum(summary["ffn_before"])


def test_two_processes_prune_to_speedup_once_and_train_the_same_model(assets, tmp_path):
    """Measured costs differ between processes: the main process chooses the shapes, every rank trains them."""
    raw = tiny_recipe(assets, tmp_path / "run")
    raw["defaults"].update(per_device_train_batch_size=4)
    raw["stages"] = [
        {"stage": "finetune", "args": {"max_steps": 2}},
        {
            "stage": "prune_to_speedup", "cost_model": "latency", "num_samples": 32, "tune_samples": 32,
            "batch_size": 16, "latency_batch_size": 16, "args": {"target_speedup": 1.15, "speedup_seq_len": 64},
        },
        {"stage": "distill", "args": {"max_steps": 2}},
    ]  # fmt: skip
    ranks = run_on_two_processes(raw, tmp_path, port=29553)
    assert ranks[0]["finished"] == ranks[1]["finished"] == ["finetune", "prune_to_speedup", "distill"]
    assert [r["prune_to_speedup_calls"] for r in ranks] == [1, 0]  # chosen once, by the main process
    assert ranks[0]["shapes"] == ranks[1]["shapes"]
    assert ranks[0]["steps"]["03-distill"] == ranks[1]["steps"]["03-distill"]  # the same weights at every step
    chosen = read_state(tmp_path / "run")["finished"][1]["summary"]
    assert ranks[0]["shapes"] == {"heads": chosen["heads_after"], "ffn": chosen["ffn_after"]}
    assert model_shapes(load_pruned(tmp_path / "run" / "03-distill" / "model")) == ranks[0]["shapes"]
    assert sum(chosen["heads_after"]) + sum(chosen["ffn_after"]) < sum(chosen["heads_before"]) + sum(
        chosen["ffn_before"]
    )


def test_a_failed_search_on_the_main_process_stops_every_rank(assets, tmp_path):
    raw = tiny_recipe(assets, tmp_path / "run")
    raw["stages"] = [{"stage": "prune_to_speedup", "num_samples": 32, "tune": False,
                      "args": {"target_speedup": 1.2, "distill_alpha": 0.0, "speedup_seq_len": 32}}]  # fmt: skip
    started = time.perf_counter()
    proc = run_on_two_processes(raw, tmp_path, port=29557, fail_search=True)
    assert proc.returncode != 0
    assert time.perf_counter() - started < 200  # not the process group's 30-minute timeout
    out = proc.stdout + proc.stderr
    assert "the search failed on purpose" in out
    assert "prune_to_speedup failed on the main process: ValueError: the search failed on purpose" in out


def test_the_search_runs_on_the_training_device_with_the_named_timing(assets, tmp_path, monkeypatch):
    from hf_prune.pipeline import stages
    from hf_prune.pipeline.context import StageContext

    moved, seen = [], {}
    load = StageContext.load_current_model

    def spied_load(self):
        model = load(self)
        to = model.to

        def spy(*args, **kwargs):
            moved.append(args[0] if args else kwargs.get("device"))
            return to(*args, **kwargs)

        model.to = spy
        return model

    search = stages.prune_to_speedup

    def spied_search(model, *args, **kwargs):
        seen.update(device=next(model.parameters()).device, **kwargs)
        return search(model, *args, **kwargs)

    monkeypatch.setattr(StageContext, "load_current_model", spied_load)
    monkeypatch.setattr(stages, "prune_to_speedup", spied_search)
    raw = tiny_recipe(assets, tmp_path / "run")
    raw["stages"] = [{"stage": "prune_to_speedup", "num_samples": 32, "tune": False, "cost_threads": 1,
                      "cost_device": "cpu",
                      "args": {"target_speedup": 1.2, "distill_alpha": 0.0, "speedup_seq_len": 32}}]  # fmt: skip
    run_recipe(raw)
    assert [torch.device(d) for d in moved] == [torch.device("cpu")]  # args.device of this machine
    assert seen["device"] == torch.device("cpu") and seen["cost_threads"] == 1 and seen["cost_device"] == "cpu"
    raw["stages"][0]["cost_threads"] = 0
    with pytest.raises(ValueError, match="cost_threads=0 must be a positive integer"):
        run_recipe(raw)


@pytest.mark.parametrize("method", ["taylor", "movement"])
def test_trainer_prunes_heads_and_neurons_jointly_to_the_flops_ratio(tmp_path, method):
    model = tiny_model()
    dense = count_flops(model, 16)
    schedule = (
        {"taylor_iterations": 3, "taylor_interval_steps": 2}
        if method == "taylor"
        else {"pruning_frequency": 1, "pruning_cooldown_steps": 2}
    )
    args = train_args(
        tmp_path, pruning_method=method, pruning_target="heads_and_ffn", target_speedup=3.0, speedup_seq_len=16,
        max_steps=8, **schedule,
    )  # fmt: skip
    trainer = PruningTrainer(model=model, args=args, train_dataset=TinyDataset(64))
    trainer.train()
    expected = trainer.pruner.expected_flops()
    summary = trainer.prune()
    assert count_flops(trainer.model, 16) == expected
    assert 3.0 <= dense / expected <= 3.0 * 1.02
    assert summary["heads_after"] != summary["heads_before"] or summary["ffn_after"] != summary["ffn_before"]


def test_a_recipe_starts_from_a_pruned_export(assets, tmp_path):
    """`model:` may be a pruned export (per-layer shapes): naive baselines and further training start from one."""
    from transformers import AutoTokenizer

    from hf_prune import prune_ffn_neurons, prune_heads, save_pruned

    model = load_pruned(assets["model"])
    prune_heads(model, {0: [0, 1]})
    prune_ffn_neurons(model, {1: list(range(10))})
    export = save_pruned(model, tmp_path / "pruned", AutoTokenizer.from_pretrained(assets["model"]), card=False)
    raw = tiny_recipe(assets, tmp_path / "run")
    raw["model"] = str(export)
    raw["stages"] = [{"stage": "finetune", "args": {"max_steps": 1}}]
    result = run_recipe(raw)
    assert model_shapes(result.model) == model_shapes(model)


def test_taylor_hidden_stage_narrows_the_stream_and_the_export_reloads(assets, tmp_path):
    raw = tiny_recipe(assets, tmp_path / "hidden")
    raw["stages"] = [
        {"stage": "finetune", "args": {"max_steps": 2}},
        {"stage": "taylor_hidden", "args": {"target_sparsity": 0.25, "max_steps": 4, "taylor_iterations": 2,
                                            "taylor_interval_steps": 2}},
        {"stage": "export", "seq_len": 16, "batch_sizes": [1], "repeats": 1, "figure": False},
    ]  # fmt: skip
    result = run_recipe(raw)
    summary = read_state(tmp_path / "hidden")["finished"][1]["summary"]
    assert summary["pruned_hidden_dims"] > 0
    assert result.report["hidden_size"]["kept"] == summary["hidden_after"] < result.report["hidden_size"]["dense"]
    assert load_pruned(tmp_path / "hidden" / "final").config.hf_prune_hidden["size"] == summary["hidden_after"]
