"""Deployment on CPU: ONNX export of pruned models (uneven layers, a layer without heads, one without FFN neurons),
int8 quantization with ONNX Runtime, the checks on bad input, the CLI command, the recipe stage and the report."""

import json
import subprocess
import sys

import pytest
import torch
from recipe_run import make_tiny_assets, tiny_recipe
from utils import batch, tiny_model

from hf_prune import export_onnx, load_pruned, prune_ffn_neurons, prune_heads, quantize_onnx, save_pruned
from hf_prune.cli import main
from hf_prune.export import onnx as onnx_export
from hf_prune.export import quantize
from hf_prune.export.deploy import deployment_rows
from hf_prune.export.onnx import OnnxRuntimeModel, quantized_ops, read_export_info
from hf_prune.export.report_format import format_report, load_report
from hf_prune.pipeline.recipe import format_summary, run_recipe
from hf_prune.pipeline.schema import load_recipe

ARCHS = ["bert", "roberta", "xlm-roberta", "electra"]
HEADS = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}  # layer 1 keeps no head
NEURONS = {0: list(range(0, 48, 3)), 1: [5], 2: list(range(48))}  # layer 2 keeps no FFN neuron


def pruned_export(folder, arch="bert"):
    """A pruned tiny model saved to `folder`, and the model. Dropout is on in the config: the export must run the
    model in eval mode to match it."""
    model = tiny_model(arch, num_hidden_layers=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    prune_heads(model, HEADS)
    prune_ffn_neurons(model, NEURONS)
    return save_pruned(model, folder, card=False, figure=False), model.eval()


def inputs_for(arch, n, seq_len, pad, seed):
    inputs = batch(n, seq_len, seed=seed, pad=pad)
    if arch in ("bert", "electra"):  # a second segment, so that token_type_ids count
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        inputs["token_type_ids"][:, seq_len // 2 :] = 1
    return inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One bert export with its fp32 and int8 ONNX files, shared by the tests that only read it."""
    folder, model = pruned_export(tmp_path_factory.mktemp("deploy") / "bert")
    export_onnx(folder, int8=True)
    return folder, model


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "onnx").iterdir())}


# ----------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_logits_agree_with_pytorch_at_any_batch_and_length(arch, tmp_path):
    folder, model = pruned_export(tmp_path / arch, arch)
    onnx_dir = export_onnx(folder)
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["export_info.json", "model.onnx"]
    runner = OnnxRuntimeModel(onnx_dir / "model.onnx")
    expected_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch in ("bert", "electra") else [])
    assert runner.input_names == expected_inputs and runner.output_name == "logits"
    assert [i.shape for i in runner.session.get_inputs()] == [["batch", "sequence"]] * len(expected_inputs)
    for n, seq_len, pad in ((1, 7, 0), (5, 23, 4)):  # neither is the traced shape (2 x 8)
        inputs = inputs_for(arch, n, seq_len, pad, seed=n)
        with torch.no_grad():
            expected = model(**inputs).logits
        torch.testing.assert_close(runner(**inputs).logits, expected, atol=1e-4, rtol=0)
    info = read_export_info(onnx_dir)
    assert info["opset"] == 17 and "TorchScript" in info["exporter"] and info["inputs"] == expected_inputs
    assert info["check"]["max_abs_diff"] < 1e-4 and info["model_type"] == arch
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_int8_model_runs_close_to_fp32(exported):
    folder, model = exported
    fp32, int8 = folder / "onnx" / "model.onnx", folder / "onnx" / "model_int8.onnx"
    assert quantized_ops(fp32) == [] and "MatMulInteger" in quantized_ops(int8)
    assert int8.stat().st_size < fp32.stat().st_size  # the graph, not the weights, makes most of a tiny model's file
    inputs = inputs_for("bert", 64, 16, 3, seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    got = OnnxRuntimeModel(int8)(**inputs).logits
    assert got.shape == expected.shape
    # int8 weights move the logits a little, not the predictions of most rows
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    info = read_export_info(folder / "onnx")["int8"]
    assert info["weight_type"] == "qint8" and info["per_channel"] is True
    assert info["reduce_range"] is (not onnx_export.cpu_has_vnni())  # 7-bit weights where int16 sums saturate
    # numpy inputs work, and missing optional ones mean zero token types and a full attention mask
    runner, ids = OnnxRuntimeModel(int8), inputs["input_ids"][:1]
    full = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    torch.testing.assert_close(runner(input_ids=ids.numpy()).logits, runner(input_ids=ids, **full).logits)


def test_int8_quantizes_an_existing_fp32_export_and_leaves_it_as_is(tmp_path):
    folder, _ = pruned_export(tmp_path / "export")
    export_onnx(folder)
    before = file_bytes(folder)["model.onnx"]
    export_onnx(folder, int8=True)
    after = file_bytes(folder)
    assert after["model.onnx"] == before and "model_int8.onnx" in after
    assert read_export_info(folder / "onnx")["files"] == {"fp32": "model.onnx", "int8": "model_int8.onnx"}


def test_deployment_rows_without_a_dense_model_and_the_report_table(exported):
    folder, _ = exported
    calls = []

    def evaluate(model):
        calls.append(type(model).__name__)
        return 0.5

    deployment = deployment_rows(None, folder, evaluate, batch_sizes=(1, 3), seq_len=8, repeats=1, warmup=0)
    assert [f["name"] for f in deployment["forms"]] == ["pruned PyTorch fp32", "pruned ONNX fp32", "pruned ONNX int8"]
    assert calls == ["PrunedBertForSequenceClassification", "OnnxRuntimeModel", "OnnxRuntimeModel"]
    assert deployment["reference"] == "pruned PyTorch fp32" and deployment["forms"][2]["metrics"] == {"eval": 0.5}
    sizes = [f["file_bytes"] for f in deployment["forms"]]
    assert sizes == [(folder / f["file"]).stat().st_size for f in deployment["forms"]]
    table = format_report({"deployment": deployment})
    assert "pruned ONNX int8" in table and "batch 3 (ms)" in table and "speedup against pruned PyTorch fp32" in table


# ----------------------------------------------------------------------------------------------------- bad input
def test_a_folder_that_is_not_an_export_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        export_onnx(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json and no model.safetensors.*save_pruned.*hf-prune run"):
        export_onnx(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_existing_onnx_files_are_never_overwritten_without_asking(exported, tmp_path):
    folder, _ = exported
    before = file_bytes(folder)
    with pytest.raises(FileExistsError, match="already exists and is not empty.*overwrite=True"):
        export_onnx(folder)
    with pytest.raises(FileExistsError, match="model_int8.onnx already exists.*quantized already"):
        export_onnx(folder, int8=True)
    with pytest.raises(ValueError, match="already quantized.*MatMulInteger"):
        quantize_onnx(folder / "onnx" / "model_int8.onnx", tmp_path / "again.onnx")
    with pytest.raises(FileExistsError, match="already exists"):
        quantize_onnx(folder / "onnx" / "model.onnx")
    with pytest.raises(ValueError, match="opset=30 must be an integer from 11 to 20"):
        export_onnx(folder, opset=30, overwrite=True)
    assert file_bytes(folder) == before and not (tmp_path / "again.onnx").exists()


def test_a_failure_midway_leaves_no_onnx_folder_and_keeps_an_old_one(tmp_path, monkeypatch):
    folder, _ = pruned_export(tmp_path / "export")

    def broken(*args, **kwargs):
        raise RuntimeError("quantizer died")

    monkeypatch.setattr(quantize, "quantize_file", broken)
    with pytest.raises(RuntimeError, match="quantizer died"):
        export_onnx(folder, int8=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "modeling_hf_prune.py"]
    monkeypatch.undo()
    export_onnx(folder)
    before = file_bytes(folder)
    monkeypatch.setattr(quantize, "quantize_file", broken)
    with pytest.raises(RuntimeError, match="quantizer died"):
        export_onnx(folder, int8=True, overwrite=True)  # a whole new folder, swapped in only when complete
    with pytest.raises(RuntimeError, match="quantizer died"):
        export_onnx(folder, int8=True)  # int8 added to the existing folder
    assert file_bytes(folder) == before
    assert not [p.name for p in [*folder.iterdir(), *(folder / "onnx").iterdir()] if p.name.startswith(".")]
    monkeypatch.undo()
    export_onnx(folder, int8=True, overwrite=True, opset=18)
    assert sorted(file_bytes(folder)) == ["export_info.json", "model.onnx", "model_int8.onnx"]
    assert read_export_info(folder / "onnx")["opset"] == 18


def test_a_quantization_killed_midway_leaves_nothing_behind_the_next_call(exported, tmp_path):
    """A process killed between writing the int8 file and moving it into place (no `finally` runs) leaves a hidden
    temporary file; the next quantization to that path removes it."""
    folder, _ = exported
    output = tmp_path / "model_int8.onnx"
    killed = (
        "import os, sys\n"
        "from hf_prune import onnx_export\n"
        "onnx_export.os.replace = lambda *args: os._exit(9)\n"
        "onnx_export.quantize_onnx(sys.argv[1], sys.argv[2])\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(folder / "onnx" / "model.onnx"), str(output)])
    assert done.returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model_int8.onnx.hf-prune-tmp-") and not output.exists()
    quantize_onnx(folder / "onnx" / "model.onnx", output)
    assert [p.name for p in tmp_path.iterdir()] == ["model_int8.onnx"]
    assert quantized_ops(output)


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch, capsys):
    folder, _ = pruned_export(tmp_path / "export")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf-prune\[onnx\]"'):
        export_onnx(folder)
    assert main(["onnx", str(folder)]) == 2
    assert 'pip install "hf-prune[onnx]"' in capsys.readouterr().err
    assert not (folder / "onnx").exists()
    # the package and this module import without onnx and onnxruntime
    code = (
        "import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None; import hf_prune, hf_prune.export.deploy"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_exports_quantizes_and_refuses(tmp_path, capsys):
    folder, _ = pruned_export(tmp_path / "export")
    assert main(["onnx", str(folder)]) == 0
    assert "model.onnx" in capsys.readouterr().out
    assert main(["onnx", str(folder), "--int8"]) == 0  # adds the int8 model
    assert (folder / "onnx" / "model_int8.onnx").is_file()
    assert main(["onnx", str(folder), "--int8"]) == 2
    assert "quantized already" in capsys.readouterr().err
    assert main(["onnx", str(folder / "onnx" / "model_int8.onnx"), "--int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["onnx", str(folder), "--overwrite", "--opset", "18"]) == 0
    assert sorted(file_bytes(folder)) == ["export_info.json", "model.onnx"]
    assert main(["onnx", str(tmp_path)]) == 2
    assert "not a model export" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- recipe
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("deploy-assets"))


def test_onnx_stage_must_follow_an_export_stage(assets, tmp_path):
    raw = tiny_recipe(assets, tmp_path / "run")
    raw["teacher"] = str(assets["model"])
    raw["stages"] = [{"stage": "onnx"}, {"stage": "export"}]
    with pytest.raises(ValueError, match="put an export stage before it"):
        load_recipe(raw)
    raw["stages"] = [{"stage": "export", "path": "final"}, {"stage": "onnx", "path": "other"}]
    with pytest.raises(ValueError, match=r"path='other'.*\['final'\]"):
        load_recipe(raw)
    for bad, message in (({"opset": 30}, "opset=30"), ({"int8": "yes"}, "int8='yes'"), ({"repeats": 0}, "repeats=0")):
        raw["stages"] = [{"stage": "export"}, {"stage": "onnx", **bad}]
        with pytest.raises(ValueError, match=message):
            load_recipe(raw)
    raw["stages"] = [{"stage": "export"}, {"stage": "onnx", "int8": False, "path": "final"}]
    assert load_recipe(raw).stages[1]["int8"] is False


def test_onnx_stage_exports_measures_and_reports_every_form(assets, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = load_pruned(assets["model"])
    prune_heads(model, {0: [0, 1], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {0: list(range(10)), 1: list(range(48))})
    start = save_pruned(model, tmp_path / "pruned", AutoTokenizer.from_pretrained(assets["model"]), card=False)
    raw = tiny_recipe(assets, tmp_path / "run")
    raw.update(model=str(start), teacher=str(assets["model"]))
    raw["stages"] = [
        {"stage": "export", "seq_len": 16, "batch_sizes": [1, 2], "repeats": 1, "figure": False},
        {"stage": "onnx", "seq_len": 16, "batch_sizes": [1, 4], "repeats": 2},
    ]
    result = run_recipe(raw)
    export = tmp_path / "run" / "final"
    assert sorted(file_bytes(export)) == ["export_info.json", "model.onnx", "model_int8.onnx"]
    deployment = result.report["deployment"]
    names = [f["name"] for f in deployment["forms"]]
    assert names == ["dense PyTorch fp32", "pruned PyTorch fp32", "pruned ONNX fp32", "pruned ONNX int8"]
    assert deployment["reference"] == "dense PyTorch fp32" and deployment["onnx"]["opset"] == 17
    forms = {f["name"]: f for f in deployment["forms"]}
    for form in forms.values():
        assert [b["batch_size"] for b in form["latency"]] == [1, 4] and len(form["latency"][0]["runs_ms"]) == 2
    assert forms["pruned ONNX int8"]["file_bytes"] < forms["pruned ONNX fp32"]["file_bytes"]
    # the same predictions give the same accuracy, measured here and by the evaluation of the export stage
    accuracy = {name: f["metrics"]["validation_matched"] for name, f in forms.items()}
    assert accuracy["pruned ONNX fp32"] == accuracy["pruned PyTorch fp32"]
    assert accuracy["dense PyTorch fp32"] == pytest.approx(result.report["metrics"]["teacher"]["validation_matched"])
    assert accuracy["pruned PyTorch fp32"] == pytest.approx(result.report["metrics"]["pruned"]["validation_matched"])
    on_disk = json.loads((export / "pruning_report.json").read_text())
    assert load_report(export)["deployment"] == deployment and on_disk["flops"] == result.report["flops"]
    assert str(tmp_path) not in json.dumps(on_disk)  # the dense model's file named relative to the export
    dense_file = (export / forms["dense PyTorch fp32"]["file"]).resolve()  # as the export's own files are named
    assert dense_file == (assets["model"] / "model.safetensors").resolve()
    card = (export / "README.md").read_text()
    assert "## Deploy on CPU" in card and "onnx/model_int8.onnx" in card
    # the CPU beside every form, and the fastest form of this machine, in the report and the card
    assert deployment["cpu"]["model"] and all(f["cpu"] == deployment["cpu"] for f in deployment["forms"])
    assert set(deployment["fastest"]) == {"1", "4"} and set(deployment["int8_gain"]) == {"1", "4"}
    assert f"Measured on {deployment['cpu']['model']}" in card and "fastest here: " in card
    assert str(tmp_path) not in card  # the teacher and the start model are local folders: named, never by path
    assert "|---:|\n| dense PyTorch fp32 | " in card and "| pruned ONNX int8 | " in card  # one markdown table
    stage = result.state["finished"][-1]
    assert stage["stage"] == "onnx" and stage["summary"]["files"] == ["model.onnx", "model_int8.onnx"]
    assert "pruned ONNX int8: " in format_summary(result)
    assert main(["report", str(export)]) == 0
    printed = capsys.readouterr().out
    assert "pruned ONNX int8" in printed and "speedup b4" in printed and "deployed forms: median of 2 runs" in printed
