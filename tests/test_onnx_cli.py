"""ONNX files that match the weights and survive a kill, and `hf-prune onnx` measuring what it writes: both token
types checked at export, int8 added only to a model.onnx of the current weights, a kill while adding int8 or while
writing the report and card completed by the next call, the deployed forms' sizes, latencies (interleaved with the
PyTorch export), accuracy and CPU in the report, the card and `hf-prune report`, and the fastest form named."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from recipe_run import make_tiny_assets
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from utils import KILLED_BEFORE_REPORT, tiny_model

from hf_prune import export_onnx, load_pruned, prune_ffn_neurons, prune_heads, save_pruned
from hf_prune.cli import main
from hf_prune.export import deploy, runtime
from hf_prune.export import onnx as onnx_export
from hf_prune.export import report as report_module
from hf_prune.export.deploy import deployment_rows, write_deployment
from hf_prune.export.onnx import export_digest, read_export_info
from hf_prune.export.quantize import quantized_ops
from hf_prune.export.report import build_report
from hf_prune.export.report_format import format_deployment, load_report
from hf_prune.export.runtime import OnnxRuntimeModel, cpu_has_vnni, cpu_info
from hf_prune.utils import recover_files_together

FORMS = ["dense PyTorch fp32", "pruned PyTorch fp32", "pruned ONNX fp32", "pruned ONNX int8"]
XEON = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16\n"
)
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("onnx-cli-assets"))


def pruned(assets):
    model = load_pruned(assets["model"])
    prune_heads(model, {0: [0, 1], 1: [3]})
    prune_ffn_neurons(model, {0: list(range(10)), 1: list(range(30))})
    return model.eval()


def export_with_report(folder, assets):
    """A pruned export with its tokenizer, report (the dense model's folder recorded) and card."""
    dense, model = load_pruned(assets["model"]).eval(), pruned(assets)
    report = build_report(
        dense, model, seq_len=16, batch_sizes=(1,), repeats=1, warmup=0, base_model="google-bert/bert-base-uncased",
        task="mnli", dense_path=assets["model"],
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    return save_pruned(model, folder, tokenizer, report=report, figure=False)


def plain_export(folder, seed=0):
    model = tiny_model("bert", seed=seed, num_hidden_layers=2)
    prune_heads(model, {0: [1]})
    return save_pruned(model, folder, card=False, figure=False)


def onnx_files(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "onnx").iterdir())}


def hidden(folder):
    return [p.name for p in [*folder.iterdir(), *(folder / "onnx").iterdir()] if p.name.startswith(".")]


@pytest.fixture
def logs():
    records, handler, logger = [], logging.Handler(logging.DEBUG), logging.getLogger("hf_prune")
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as `hf-prune run` shows them
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


# ----------------------------------------------------------------------------------------------------- export
def test_the_export_check_covers_both_token_types(tmp_path, monkeypatch):
    model = tiny_model("bert", num_hidden_layers=2, initializer_range=0.2)  # logits that the segments move clearly
    folder = save_pruned(model, tmp_path / "export", card=False, figure=False)
    info = read_export_info(export_onnx(folder))
    assert info["check"]["token_type_ids"] == [0, 1] and info["check"]["max_abs_diff"] < 1e-4
    before = onnx_files(folder)

    class OneSegment(OnnxRuntimeModel):
        """A graph that reads every token as one of the first segment."""

        def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **unused):
            return super().__call__(input_ids, attention_mask)

    monkeypatch.setattr(onnx_export, "OnnxRuntimeModel", OneSegment)
    with pytest.raises(RuntimeError, match="disagrees with PyTorch"):
        export_onnx(folder, overwrite=True)
    assert onnx_files(folder) == before and not hidden(folder)


def test_int8_is_added_only_to_an_onnx_model_of_the_current_weights(tmp_path, capsys):
    folder = plain_export(tmp_path / "export")
    export_onnx(folder)
    source = read_export_info(folder / "onnx")["source"]
    assert source == export_digest(folder) and source["files"] == ["config.json", "model.safetensors"]
    # other weights copied into the export (another training run): model.onnx no longer matches them
    state = load_file(folder / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, folder / "model.safetensors")
    before = onnx_files(folder)
    with pytest.raises(ValueError, match=r"exported from other weights.*overwrite=True.*--overwrite"):
        export_onnx(folder, int8=True)
    assert main(["onnx", str(folder), "--int8"]) == 2
    assert "other weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="other weights"):  # nor are stale files measured
        deployment_rows(None, folder, batch_sizes=(1,), seq_len=8, repeats=1, warmup=0)
    assert onnx_files(folder) == before and not hidden(folder)
    export_onnx(folder, int8=True, overwrite=True)
    assert read_export_info(folder / "onnx")["source"] == export_digest(folder)
    # an onnx/ folder that records no digest (an older export) cannot be checked, so int8 is not added to it
    export_onnx(folder, overwrite=True)
    info = read_export_info(folder / "onnx")
    info.pop("source")
    (folder / "onnx" / "export_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="records no digest.*overwrite=True"):
        export_onnx(folder, int8=True)


def test_a_kill_while_adding_int8_leaves_a_folder_the_next_call_completes(tmp_path):
    folder = plain_export(tmp_path / "export")
    export_onnx(folder)
    fp32 = onnx_files(folder)["model.onnx"]
    # killed after quantizing, while writing the info file
    killed = (
        "import os, sys\n"
        "from hf_prune.export import onnx\n"
        "onnx.write_json_atomic = lambda *args, **kwargs: os._exit(9)\n"
        "onnx.export_onnx(sys.argv[1], int8=True)\n"
    )
    assert subprocess.run([sys.executable, "-c", killed, str(folder)]).returncode == 9
    assert sorted(onnx_files(folder)) == ["export_info.json", "model.onnx"]  # the folder as it was
    assert [p.name for p in folder.iterdir() if p.name.startswith(".onnx.hf-prune-tmp-")]  # and the new one's start
    export_onnx(folder, int8=True)  # not refused: the leftover is removed and int8 added
    files = onnx_files(folder)
    assert files["model.onnx"] == fp32 and quantized_ops(folder / "onnx" / "model_int8.onnx")
    assert read_export_info(folder / "onnx")["files"] == {"fp32": "model.onnx", "int8": "model_int8.onnx"}
    assert not hidden(folder)
    # killed right after the new folder was swapped in, before the old one was removed: the new one is complete
    export_onnx(folder, overwrite=True)
    killed = (
        "import os, sys\n"
        "from hf_prune import utils\n"
        "from hf_prune.export import onnx\n"
        "real = utils.exchange_paths\n"
        "def exchange(a, b):\n"
        "    os._exit(9 if real(a, b) else 3)\n"
        "utils.exchange_paths = exchange\n"
        "onnx.export_onnx(sys.argv[1], int8=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(folder)]).returncode
    if done == 3:
        pytest.skip("this filesystem has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    assert done == 9
    assert [p.name for p in folder.iterdir() if p.name.startswith(".onnx.hf-prune-tmp-")]  # the old folder
    assert "int8" in read_export_info(folder / "onnx")["files"] and (folder / "onnx" / "model_int8.onnx").is_file()
    with pytest.raises(FileExistsError, match="quantized already"):
        export_onnx(folder, int8=True)
    assert not hidden(folder)
    # an int8 file that the info does not record (what an interrupted older version left) is quantized again
    export_onnx(folder, overwrite=True)
    (folder / "onnx" / "model_int8.onnx").write_bytes(b"half a file")
    export_onnx(folder, int8=True)
    assert quantized_ops(folder / "onnx" / "model_int8.onnx")


def test_report_and_card_are_written_together(assets, tmp_path):
    folder = export_with_report(tmp_path / "export", assets)
    export_onnx(folder, int8=True)
    deployment = deployment_rows(None, folder, batch_sizes=(1,), seq_len=8, repeats=1, warmup=0)
    (tmp_path / "deployment.json").write_text(json.dumps(deployment))
    killed = (
        "import json, sys\n"
        "from hf_prune.export.deploy import write_deployment\n"
        + KILLED_BEFORE_REPORT
        + "write_deployment(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(folder), str(tmp_path / "deployment.json")])
    assert done.returncode == 9
    # killed between the two renames: the card is new and the report old, never the other way round
    assert "## Deploy on CPU" in (folder / "README.md").read_text()
    assert "deployment" not in json.loads((folder / "pruning_report.json").read_text())
    assert recover_files_together(folder) == ["pruning_report.json"]  # what the next call does first
    assert load_report(folder)["deployment"] == json.loads(json.dumps(deployment))
    assert hidden(folder) == [".pruning_report.json.hf-prune-lock"]  # the killed holder's, freed by the kernel
    write_deployment(folder, {**deployment, "repeats": 3})
    assert load_report(folder)["deployment"]["repeats"] == 3
    assert "Median of 3 runs" in (folder / "README.md").read_text()
    assert not hidden(folder)


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_measures_what_it_writes(assets, tmp_path, capsys, monkeypatch):
    folder = export_with_report(tmp_path / "export", assets)
    before = load_report(folder)
    timed, real = [], report_module.time_interleaved

    def spy(models, inputs, repeats, warmup):
        timed.append([type(m).__name__ for m in models])
        return real(models, inputs, repeats, warmup)

    monkeypatch.setattr(report_module, "time_interleaved", spy)
    argv = ["onnx", str(folder), "--int8", "--validation-file", str(assets["validation"])]
    assert main([*argv, "--batch-sizes", "1", "2", "--seq-len", "16", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    report = load_report(folder)
    deployment = report["deployment"]
    assert [f["name"] for f in deployment["forms"]] == FORMS  # the dense model of the report's dense_path first
    # every form timed in one interleaved call per batch size, the ONNX files beside the PyTorch export
    pytorch = "PrunedBertForSequenceClassification"
    assert timed == [[pytorch, pytorch, "OnnxRuntimeModel", "OnnxRuntimeModel"]] * 2
    files = [assets["model"] / "model.safetensors", folder / "model.safetensors"]
    files += [folder / "onnx" / "model.onnx", folder / "onnx" / "model_int8.onnx"]
    forms = {f["name"]: f for f in deployment["forms"]}
    for form, file in zip(deployment["forms"], files):
        assert form["file_bytes"] == file.stat().st_size
        assert [b["batch_size"] for b in form["latency"]] == [1, 2] and len(form["latency"][0]["runs_ms"]) == 2
        assert 0.0 <= form["metrics"]["validation_matched"] <= 1.0 and form["cpu"] == deployment["cpu"]
    assert forms[FORMS[2]]["metrics"] == forms[FORMS[1]]["metrics"]  # the same predictions from ONNX fp32
    assert deployment["metric_name"] == "accuracy" and deployment["seq_len"] == 16
    cpu = deployment["cpu"]
    assert cpu["threads"] == torch.get_num_threads() and cpu["model"] and set(cpu) >= {"avx512", "vnni", "amx"}
    assert set(deployment["fastest"]) == {"1", "2"} and set(deployment["fastest"].values()) <= set(FORMS)
    assert set(deployment["int8_gain"]) == {"1", "2"}
    assert report["flops"] == before["flops"] and report["metrics"] == before["metrics"]  # the rest is kept
    card = (folder / "README.md").read_text()
    assert "## Deploy on CPU" in card and "| pruned ONNX int8 | " in card and "accuracy validation_matched" in card
    assert f"Measured on {cpu['model']}" in card and "fastest here: " in card
    assert "pruned ONNX int8" in out and "measured on" in out and "pruning_report.json and its model card" in out
    assert main(["report", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "pruned ONNX int8" in printed and f"measured on {cpu['model']}" in printed


def test_cli_refuses_what_it_cannot_measure_before_any_work(assets, tmp_path, capsys):
    folder = plain_export(tmp_path / "export")  # no tokenizer, no report
    assert main(["onnx", str(folder), "--validation-file", str(assets["validation"])]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["onnx", str(folder), "--validation-file", str(assets["validation"]), "--task", "mnli"]) == 2
    assert "no tokenizer" in capsys.readouterr().err and not (folder / "onnx").exists()
    assert main(["onnx", str(folder), "--no-measure"]) == 0
    assert not (folder / "pruning_report.json").exists()


# ----------------------------------------------------------------------------------------------------- the CPU
def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: XEON)
    info = cpu_info()
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["machine"] == "x86_64"
    assert (info["avx512"], info["vnni"], info["amx"]) == (True, True, True) and cpu_has_vnni()
    assert info["flags"] == ["avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    assert info["threads"] == torch.get_num_threads()
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: EPYC)
    info = cpu_info()
    assert info["model"] == "AMD EPYC 7B13" and (info["avx512"], info["vnni"], info["amx"]) == (False, False, False)
    assert info["flags"] == ["avx2"] and not cpu_has_vnni()
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    info = cpu_info()
    assert (info["avx512"], info["vnni"], info["amx"]) == (None, None, None) and cpu_has_vnni()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = plain_export(tmp_path_factory.mktemp("onnx-cli") / "export")
    export_onnx(folder, int8=True)
    return folder


def test_the_fastest_form_is_named_and_a_slow_int8_is_warned_about(exported, monkeypatch, logs):
    ms = {"pruned PyTorch fp32": (10.0, 20.0), "pruned ONNX fp32": (8.0, 18.0), "pruned ONNX int8": (9.0, 9.0)}

    def fake_time_forms(forms, example, *, batch_sizes, **kwargs):
        assert list(forms) == list(ms)
        return {
            name: [{"batch_size": b, "ms": t, "speedup": ms[FORMS[1]][i] / t, "runs_ms": [t]} for i, (b, t) in
                   enumerate(zip(batch_sizes, ms[name]))]
            for name in forms
        }  # fmt: skip

    monkeypatch.setattr(deploy, "time_forms", fake_time_forms)
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: EPYC)
    deployment = deployment_rows(None, exported, batch_sizes=(1, 2), seq_len=8, repeats=1, warmup=0)
    assert deployment["fastest"] == {"1": "pruned ONNX fp32", "2": "pruned ONNX int8"}
    assert deployment["int8_gain"] == pytest.approx({"1": 8.0 / 9.0, "2": 2.0})
    warned = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "AMD EPYC 7B13" in warned[0] and "VNNI no" in warned[0]
    assert "pruned ONNX int8 is not faster than pruned ONNX fp32 at batch 1" in warned[0]
    told = [r.getMessage() for r in logs if "Fastest form on this machine" in r.getMessage()]
    assert told and "batch 1: pruned ONNX fp32 (8.00 ms)" in told[0] and "batch 2: pruned ONNX int8" in told[0]
    text = " ".join(" ".join(format_deployment(deployment)).split())  # the note is wrapped at 119 characters
    assert "fastest here: pruned ONNX fp32 at batch 1, pruned ONNX int8 at batch 2" in text
    assert "int8 is not faster than fp32 on this CPU at batch 1" in text
    # where int8 is the fastest everywhere, nothing is warned about
    logs.clear()
    ms["pruned ONNX int8"] = (4.0, 9.0)
    deployment_rows(None, exported, batch_sizes=(1, 2), seq_len=8, repeats=1, warmup=0)
    assert not [r for r in logs if r.levelno == logging.WARNING]
    shutil.rmtree(exported / "onnx")  # the module's export is not used after this test
