import json
import logging
import statistics

import pytest
from huggingface_hub import ModelCard
from utils import tiny_model

import hf_prune.export.card
from hf_prune import prune_ffn_neurons, prune_heads, save_pruned
from hf_prune.cli import main
from hf_prune.export.card import make_model_card, plot_head_map, push_to_hub
from hf_prune.export.files import export_files
from hf_prune.export.report import build_report
from hf_prune.export.report_format import format_report

TOKEN = "hf_secretTOKEN1234567890"
METRICS = {
    "teacher": {"validation_matched": 0.84, "validation_mismatched": 0.85},
    "pruned": {"validation_matched": 0.8},
}
STAGES = [{"name": "finetune", "wall_time_s": 12.5}, {"name": "movement", "wall_time_s": 30.0}]


@pytest.fixture(scope="module")
def pair():
    dense = tiny_model("bert", seed=0, num_hidden_layers=3)
    pruned = tiny_model("bert", seed=0, num_hidden_layers=3)
    prune_heads(pruned, {0: [0, 1, 2, 3], 1: [2]})
    prune_ffn_neurons(pruned, {1: list(range(40)), 2: list(range(48))})
    return dense, pruned


@pytest.fixture(scope="module")
def report(pair):
    dense, pruned = pair
    return build_report(
        dense,
        pruned,
        seq_len=16,
        repeats=2,
        warmup=1,
        base_model="google-bert/bert-base-uncased",
        task="mnli",
        metrics=METRICS,
        stages=STAGES,
    )


@pytest.fixture(scope="module")
def export(pair, report, tmp_path_factory):
    return save_pruned(pair[1], tmp_path_factory.mktemp("report") / "export", report=report)


def test_build_report_measures_the_pair(pair, report):
    dense, pruned = pair
    assert json.loads(json.dumps(report)) == report
    params = report["parameters"]
    assert params["total_after"] < params["total_before"] and params["encoder_after"] < params["encoder_before"]
    assert params["total_before"] == sum(p.numel() for p in dense.parameters())
    assert params["total_before"] - params["encoder_before"] == params["total_after"] - params["encoder_after"]
    size = report["file_size"]
    assert 0 < size["after_bytes"] < size["before_bytes"] and size["method"] == "state_dict_nbytes"
    flops = report["flops"]
    assert flops["dense"] > flops["pruned"] > 0 and flops["ratio"] > 1 and flops["seq_len"] == 16
    assert [b["batch_size"] for b in report["latency"]["batches"]] == [1, 32]
    for b in report["latency"]["batches"]:
        assert len(b["dense_runs_ms"]) == len(b["pruned_runs_ms"]) == 2 and min(b["dense_runs_ms"]) > 0
        # the reported times are the medians of the recorded runs, and the speedup their ratio
        assert b["dense_ms"] == pytest.approx(statistics.median(b["dense_runs_ms"]))
        assert b["pruned_ms"] == pytest.approx(statistics.median(b["pruned_runs_ms"]))
        median_ratio = statistics.median(b["dense_runs_ms"]) / statistics.median(b["pruned_runs_ms"])
        assert b["speedup"] == pytest.approx(median_ratio)
    assert report["latency"]["order"] == "interleaved"
    assert [(r["heads_dense"], r["heads_kept"], r["ffn_dense"], r["ffn_kept"]) for r in report["layers"]] == [
        (4, 0, 48, 48),
        (4, 3, 48, 8),
        (4, 4, 48, 0),
    ]
    assert report["layers"][0]["heads_removed"] == [0, 1, 2, 3]
    assert report["metrics"] == METRICS and report["stages"] == STAGES and report["total_wall_time_s"] == 42.5
    assert report["base_model"] == "google-bert/bert-base-uncased" and report["task"] == "mnli"
    env = report["environment"]
    assert env["torch"] and env["transformers"] and env["num_threads"] >= 1


def test_build_report_uses_saved_file_sizes_and_checks_inputs(pair, export, tmp_path):
    dense, pruned = pair
    dense_dir = save_pruned(dense, tmp_path / "dense", card=False, figure=False)
    dense.train()
    pruned.eval()
    quick = dict(seq_len=8, batch_sizes=(2,), repeats=1, warmup=0)
    rep = build_report(dense, pruned, **quick, dense_path=dense_dir, pruned_path=export)
    assert dense.training and not pruned.training  # each model's train/eval mode is restored
    dense.eval()
    assert rep["file_size"]["method"] == "safetensors_file"
    assert rep["file_size"]["after_bytes"] == (export / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_report(dense, pruned, seq_len=1000, repeats=1)
    with pytest.raises(ValueError, match='"teacher" and/or "pruned"'):
        build_report(dense, pruned, seq_len=8, repeats=1, warmup=0, batch_sizes=(1,), metrics={"student": {}})
    with pytest.raises(ValueError, match="pruned version"):
        build_report(dense, tiny_model("roberta"), seq_len=8, repeats=1)


def test_format_report_and_cli(report, export, capsys):
    table = format_report(report)
    for needle in ("parameters (total)", "GFLOPs", "CPU latency batch 32", "validation_matched", "0/4", "movement"):
        assert needle in table
    assert main(["report", str(export)]) == 0
    assert capsys.readouterr().out.strip() == table


def test_report_of_a_folder_that_is_not_an_export(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pruning_report.json" in err and "save_pruned" in err and "hf-prune run" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_model_card(report, export):
    card = ModelCard((export / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == "google-bert/bert-base-uncased"
    assert data["datasets"] == ["nyu-mll/glue"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert {"pruning", "hf-prune"} <= set(data["tags"]) and data["metrics"] == ["accuracy"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.8
    text = card.text
    for needle in ("trust_remote_code=True", "load_pruned", "AutoModelForSequenceClassification", "head_map.png"):
        assert needle in text
    assert "| 0 | 0 / 4 | 48 / 48 |" in text and "| movement | 30.0 |" in text
    # Without a report (and without a figure) the card still renders.
    bare = make_model_card(None, tiny_model().config, repo_id="me/tiny", figure_name=None)
    assert "head_map.png" not in bare.text and 'snapshot_download("me/tiny")' in bare.text
    assert bare.data.to_dict()["tags"][:2] == ["pruning", "hf-prune"]


def test_plot_head_map(export, tmp_path):
    config = tiny_model().config
    prune_heads_config = tiny_model()
    prune_heads(prune_heads_config, {1: [0, 3]})
    path = plot_head_map(prune_heads_config.config, tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_head_map(config, tmp_path / "dense.png").stat().st_size > 0
    assert (export / "head_map.png").read_bytes()[:4] == b"\x89PNG"


class FakeApi:
    def __init__(self, token=None):
        self.token, self.calls = token, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, **kwargs):
        self.calls.append(("upload_folder", export_files(folder_path), kwargs))


@pytest.fixture
def logs():
    records, handler = [], logging.Handler(logging.DEBUG)
    handler.emit = records.append
    for name in ("hf_prune", "transformers", "huggingface_hub"):
        logging.getLogger(name).addHandler(handler)
    yield records
    for name in ("hf_prune", "transformers", "huggingface_hub"):
        logging.getLogger(name).removeHandler(handler)


def test_push_uploads_the_export(export, monkeypatch, logs, capsys):
    api = FakeApi()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_to_hub(export, "me/bert-pruned", private=True, api=api)
    assert url == "https://huggingface.co/me/bert-pruned"
    assert api.calls[0] == ("create_repo", "me/bert-pruned", {"private": True, "exist_ok": True, "repo_type": "model"})
    name, files, kwargs = api.calls[1]
    assert files == [
        "README.md",
        "config.json",
        "head_map.png",
        "model.safetensors",
        "modeling_hf_prune.py",
        "pruning_report.json",
    ]
    assert kwargs["repo_id"] == "me/bert-pruned" and kwargs["repo_type"] == "model" and kwargs["commit_message"]

    # The CLI resolves the token and hands it to HfApi only.
    made = []
    monkeypatch.setattr(hf_prune.export.card, "HfApi", lambda token=None: made.append(FakeApi(token)) or made[-1])
    assert main(["push", str(export), "--repo-id", "me/bert-pruned", "--token", TOKEN]) == 0
    assert made[0].token == TOKEN and made[0].calls[1][1] == files
    out = capsys.readouterr()
    assert "me/bert-pruned" in out.out and TOKEN not in out.out + out.err
    assert not [r for r in logs if TOKEN in r.getMessage()]
    assert not [f for f in export_files(export) if TOKEN.encode() in (export / f).read_bytes()]


def test_push_refuses_incomplete_exports_and_missing_tokens(export, tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks model\.safetensors, modeling_hf_prune\.py, README\.md.*save_pruned"):
        push_to_hub(tmp_path, "me/x", api=FakeApi())
    assert main(["push", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "lacks model.safetensors" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_prune.export.card, "get_token", lambda: None)
    api = FakeApi()
    with pytest.raises(ValueError, match="hf auth login.*HF_TOKEN"):
        push_to_hub(export, "me/x", api=api)
    assert api.calls == []


def test_names_moved_out_of_report_and_pruner_still_import_from_there():
    import hf_prune.pruner as pruner  # the 0.1 paths, served with a DeprecationWarning
    import hf_prune.report as report

    from hf_prune.export import report_format
    from hf_prune.pruning import head_pruner

    for name in ("format_report", "format_deployment", "deployment_table", "metric_rows", "cli_report"):
        assert getattr(report, name) is getattr(report_format, name)
    assert pruner.HeadMaskPruner is head_pruner.HeadMaskPruner
    with pytest.raises(AttributeError, match="no attribute 'format_table'"):
        _ = report.format_table
