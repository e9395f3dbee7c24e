"""The staged runner end to end on a tiny BERT: every stage, resume after an interruption (an exception mid-stage and
SIGKILL), two processes under torchrun, and `hf-prune run` on the packaged demo made tiny with --set."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from recipe_run import StepRecorder, make_tiny_assets, model_shapes, run_on_two_processes, tiny_recipe
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_prune import load_pruned
from hf_prune.cli import main as cli_main
from hf_prune.pipeline.recipe import STATE_NAME, read_state, run_recipe


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Raises in the middle of the stage whose folder name contains `stage`, after optimizer step `step`."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.stage in args.output_dir and state.global_step == self.step:
            raise Interrupted(f"simulated interruption at step {self.step}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run of the tiny recipe."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_recipe(tiny_recipe(assets, out))
    return out, result


def _final(out: Path) -> dict:
    state = read_state(out)
    movement = next(r for r in state["finished"] if r["stage"] == "movement")
    masks = json.loads((out / movement["dir"] / "head_masks.json").read_text())
    config = json.loads((out / "final" / "config.json").read_text())
    return {
        "masks": masks,
        "heads": config["layer_num_attention_heads"],
        "ffn": config["layer_intermediate_sizes"],
        "weights": load_file(out / "final" / "model.safetensors"),
    }


def _assert_same_final(a: Path, b: Path) -> None:
    fa, fb = _final(a), _final(b)
    assert fa["masks"] == fb["masks"] and fa["heads"] == fb["heads"] and fa["ffn"] == fb["ffn"]
    assert fa["weights"].keys() == fb["weights"].keys()
    for k in fa["weights"]:
        torch.testing.assert_close(fa["weights"][k], fb["weights"][k], rtol=1e-4, atol=1e-5)


def test_full_run_writes_every_stage_and_exports(reference):
    out, result = reference
    state = read_state(out)
    names = [r["name"] for r in state["finished"]]
    assert names == ["finetune", "movement", "prune_heads", "distill", "taylor_ffn", "evaluate", "export"]
    assert state["running"] is None and len(state["recipe_hash"]) == 16
    assert all(r["wall_time_s"] > 0 for r in state["finished"])
    for r in state["finished"]:
        assert (out / r["dir"]).is_dir() or r["stage"] in ("evaluate", "export")
        assert not (out / r["dir"] / "checkpoints").exists()  # removed once the stage is recorded
    evaluate = state["finished"][5]["metrics"]
    assert set(evaluate) == {"teacher", "pruned"} and set(evaluate["pruned"]) == {"validation_matched"}
    heads = state["finished"][2]["summary"]
    assert sum(heads["heads_after"]) < sum(heads["heads_before"])  # the movement masks emptied some heads
    ffn = state["finished"][4]["summary"]
    assert ffn["ffn_after"] == [24, 24]
    report = result.report
    assert report["metrics"]["pruned"] == evaluate["pruned"]
    assert [s["name"] for s in report["stages"]] == names[:-1]
    assert [layer["ffn_kept"] for layer in report["layers"]] == [24, 24]
    model = load_pruned(out / "final")
    assert model_shapes(model) == model_shapes(result.model) == {"heads": heads["heads_after"], "ffn": [24, 24]}
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    assert not list(out.rglob(".*tmp*"))


def test_rerun_of_a_finished_run_does_nothing(assets, reference):
    out, _ = reference
    before = (out / STATE_NAME).read_text()
    result = run_recipe(tiny_recipe(assets, out))
    assert result.ran == [] and result.report is not None
    assert json.loads((out / STATE_NAME).read_text())["finished"] == json.loads(before)["finished"]


def test_resume_after_an_exception_mid_stage(assets, reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_recipe(tiny_recipe(assets, out), callbacks=[InterruptAt("02-movement", 3)])
    state = read_state(out)
    assert [r["name"] for r in state["finished"]] == ["finetune"]
    assert state["running"]["name"] == "movement" and state["running"]["attempt"] == 1
    assert (out / "02-movement" / "checkpoints" / "checkpoint-2" / "pruning_state.json").is_file()
    finetune = state["finished"][0]
    finetune_mtime = (out / "01-finetune" / "model" / "model.safetensors").stat().st_mtime_ns

    result = run_recipe(tiny_recipe(assets, out))
    assert result.ran == ["movement", "prune_heads", "distill", "taylor_ffn", "evaluate", "export"]
    state = read_state(out)
    assert state["finished"][0] == finetune  # not redone
    assert (out / "01-finetune" / "model" / "model.safetensors").stat().st_mtime_ns == finetune_mtime
    movement = state["finished"][1]
    assert movement["attempts"] == 2
    assert movement["metrics"]["resumed_from"] == os.path.join("02-movement", "checkpoints", "checkpoint-2")
    _assert_same_final(out, reference[0])


def test_resume_after_sigkill(assets, reference, tmp_path):
    out = tmp_path / "run"
    # a longer movement stage, so that the kill lands in it; the reference is run with the same recipe
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(assets, out, movement_steps=40)))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # the same thread count as this process, so the float sums match
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_prune.cli", "run", str(recipe_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = out / "02-movement" / "checkpoints" / "checkpoint-2" / "trainer_state.json"  # written last
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_state(out)
    assert [r["name"] for r in state["finished"]] == ["finetune"], "the kill should land in the movement stage"

    result = run_recipe(recipe_path)
    assert result.ran[0] == "movement" and "resumed_from" in result.state["finished"][1]["metrics"]
    ref = tmp_path / "reference"
    run_recipe(tiny_recipe(assets, ref, movement_steps=40))
    _assert_same_final(out, ref)


def _ddp_recipe(assets, out, world: int) -> dict:
    """The pruning stages as a user would launch them on a machine without GPU (no use_cpu): whole heads by global
    movement with a teacher, Taylor FFN with gradient accumulation; the same global batch for any `world`."""
    raw = tiny_recipe(assets, out)
    raw["defaults"].pop("use_cpu")
    raw["defaults"]["per_device_train_batch_size"] = 8 // world
    keep = ("finetune", "movement", "prune_heads", "distill", "taylor_ffn")
    raw["stages"] = [s for s in raw["stages"] if s["stage"] in keep]
    movement = raw["stages"][1]["args"]
    movement.update(attention_granularity="head", sparsity_mode="global", target_sparsity=0.5)
    movement.update(pruning_warmup_steps=1, pruning_cooldown_steps=1)
    raw["stages"][4]["args"].update(gradient_accumulation_steps=2, per_device_train_batch_size=4 // world)
    raw["stages"].insert(4, {"stage": "evaluate"})
    return raw


def test_two_processes_keep_the_same_masks_and_weights_at_every_step(assets, tmp_path):
    out = tmp_path / "run"
    ranks = run_on_two_processes(_ddp_recipe(assets, out, world=2), tmp_path, port=29547)
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    # every step of every training stage, recorded by each rank from its own weights before anything is reloaded
    steps = ranks[0]["steps"]
    assert set(steps) == {"01-finetune", "02-movement", "04-distill", "06-taylor_ffn"}
    assert steps == ranks[1]["steps"]
    # the masks did move within the stages, and match one process on the same global batch
    ref_recorder = StepRecorder()
    run_recipe(_ddp_recipe(assets, tmp_path / "single", world=1), callbacks=[ref_recorder])
    for stage, records in steps.items():
        ref = ref_recorder.stages[stage]
        assert [r["step"] for r in records] == [r["step"] for r in ref]
        for a, b in zip(records, ref):
            assert a["units"] == b["units"], f"{stage}: masks differ from one process at step {a['step']}"
            assert a["sum"] == pytest.approx(b["sum"], rel=1e-5, abs=1e-4)
            assert a["abs"] == pytest.approx(b["abs"], rel=1e-5)
    heads_masked = [sum(len(u["heads"]) for u in r["units"].values()) for r in steps["02-movement"]]
    assert heads_masked[0] == 0 and heads_masked[-1] == 4  # half the 8 heads of the tiny model, masked gradually
    neurons_masked = [sum(len(u["neurons"]) for u in r["units"].values()) for r in steps["06-taylor_ffn"]]
    assert neurons_masked[0] == 0 and neurons_masked[-1] > 0
    assert ranks[0]["shapes"] == ranks[1]["shapes"]
    assert ranks[0]["head_masks"] == ranks[1]["head_masks"]
    assert (
        ranks[0]["finished"]
        == ranks[1]["finished"]
        == ["finetune", "movement", "prune_heads", "distill", "evaluate", "taylor_ffn"]
    )
    saved = load_pruned(out / "06-taylor_ffn" / "model")
    assert model_shapes(saved) == ranks[0]["shapes"]
    state = read_state(out)
    assert [r["name"] for r in state["finished"]] == ranks[0]["finished"]
    assert set(state["finished"][4]["metrics"]["pruned"]) == {"validation_matched"}
    # only the main process wrote: one state, no stray temporary files
    assert not list(out.rglob(".*tmp*"))


def test_masked_head_fractions_read_the_zeroed_weights(assets):
    from transformers import AutoModelForSequenceClassification

    from hf_prune.models import structure
    from hf_prune.pipeline.stages import masked_head_fractions

    model = AutoModelForSequenceClassification.from_pretrained(assets["model"])
    size = structure.head_size(model)
    linears = structure.projections(model, 0, "attention")
    with torch.no_grad():
        for role in ("query", "key", "value"):
            linears[role].weight[size : 2 * size] = 0
        linears["attention_output"].weight[:, size : 2 * size] = 0
        linears["query"].weight[2 * size : 3 * size] = 0
    fractions = masked_head_fractions(model)
    assert fractions[0] == [0.0, 1.0, 0.25, 0.0] and fractions[1] == [0.0] * 4


def test_cli_runs_the_packaged_demo_made_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [
        "model=builtin:tiny-bert",
        "data.demo_train_size=48",
        "data.demo_eval_size=16",
        "stages.finetune.max_steps=4",
        "stages.movement.max_steps=4",
        "stages.distill.max_steps=2",
        "stages.taylor_ffn.max_steps=4",
        "defaults.save_steps=2",
        "defaults.disable_tqdm=true",
        "defaults.use_cpu=true",
        "stages.taylor_ffn.taylor_interval_steps=2",
        "stages.taylor_ffn.taylor_iterations=2",
        "stages.movement.pruning_warmup_steps=0",
        "stages.movement.pruning_cooldown_steps=0",
        "stages.movement.pruning_frequency=1",
        "stages.export.seq_len=16",
        "stages.export.batch_sizes=[1, 2]",
        "stages.export.repeats=1",
        "stages.export.figure=false",
    ]
    argv = ["run", "--output-dir", str(out)] + [x for o in overrides for x in ("--set", o)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Pruning report" in printed and "taylor_ffn" in printed and "Exported model" in printed
    assert (out / "final" / "pruning_report.json").is_file() and (out / "final" / "README.md").is_file()
    assert read_state(out)["finished"][0]["metrics"]["global_step"] == 4
    assert [r["stage"] for r in read_state(out)["finished"]][-1] == "export"
    # a different recipe in the same folder is refused with exit code 2, and the folder is kept
    assert cli_main(["run", "--output-dir", str(out), "--set", "seed=1"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert (out / "final" / "pruning_report.json").is_file()
