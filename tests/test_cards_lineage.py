"""Model cards that trace their lineage: the model the teacher was fine-tuned from in the text and in `base_model`,
the teacher by Hub id or by a relative name (never an absolute path), a title named after them, and cards rebuilt
from a report alone (the published cards of model_cards/)."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard
from utils import tiny_model

from hf_prune import prune_ffn_neurons, prune_heads, save_pruned
from hf_prune.export.card import lineage, make_model_card
from hf_prune.export.persistence import load_teacher, rebuild_card
from hf_prune.export.report import build_report
from hf_prune.export.report_format import load_report

BASE = "google-bert/bert-base-uncased"
QUICK = dict(seq_len=8, batch_sizes=(1,), repeats=1, warmup=0, task="mnli")


def pruned_student(seed=0):
    model = tiny_model("bert", seed=seed, num_hidden_layers=2)
    prune_heads(model, {0: [0, 1], 1: [2]})
    prune_ffn_neurons(model, {1: list(range(20))})
    return model


def teacher_folder(path, base=None):
    """A fine-tuned teacher saved in a local folder; `base`: the model it records it was fine-tuned from, as the
    stages of `hf-prune run` write it into its config."""
    teacher = tiny_model("bert", seed=1, num_hidden_layers=2)
    if base is not None:
        teacher.config.hf_prune_base_model = base
    return save_pruned(teacher, path, card=False, figure=False)


def card_of(folder):
    text = (folder / "README.md").read_text()
    return ModelCard(text), text


def test_a_local_teacher_is_named_relatively_and_its_base_model_is_credited(tmp_path):
    teacher_dir = teacher_folder(tmp_path / "runs" / "teacher", base=BASE)
    assert teacher_dir.is_absolute()
    teacher = load_teacher(str(teacher_dir))  # as a recipe's `teacher: /abs/path` loads it
    # the recipe's `model` is the teacher's folder too: the report credits an absolute path
    report = build_report(teacher, pruned_student(), base_model=str(teacher_dir), dense_path=teacher_dir, **QUICK)
    assert report["lineage"] == {"teacher": str(teacher_dir), "base_model": BASE}
    export = save_pruned(pruned_student(), tmp_path / "export", report=report, figure=False)
    card, text = card_of(export)
    assert str(tmp_path) not in text and "/runs/teacher" not in text
    data = card.data.to_dict()
    assert data["base_model"] == BASE
    assert card.data.model_name == "bert-base-uncased-mnli-pruned"
    assert "# bert-base-uncased-mnli-pruned" in text and "teacher-pruned" not in text
    assert f"A structurally pruned version of `teacher`, which is [`{BASE}`](https://huggingface.co/{BASE})" in text
    assert "fine-tuned on mnli" in text


def test_the_teacher_is_named_relative_to_the_working_folder(tmp_path, monkeypatch):
    teacher_dir = teacher_folder(tmp_path / "runs" / "curve" / "teacher", base=BASE)
    monkeypatch.chdir(tmp_path)
    report = {"base_model": str(teacher_dir), "dense_path": str(teacher_dir), "task": "mnli"}
    assert lineage(report) == {"base_model": BASE, "teacher": "runs/curve/teacher", "teacher_id": None}
    # no record in the report: the base comes from the teacher folder's config
    card = make_model_card(report, pruned_student().config, figure_name=None)
    assert card.data.base_model == BASE and "`runs/curve/teacher`" in card.text and str(tmp_path) not in str(card)


def test_the_recipe_model_as_a_hub_id_is_the_base_of_a_teacher_that_records_none(tmp_path):
    teacher_dir = teacher_folder(tmp_path / "teacher")  # records no base
    teacher = load_teacher(str(teacher_dir))
    report = build_report(teacher, pruned_student(), base_model="org/minilm", dense_path=teacher_dir, **QUICK)
    card = make_model_card(report, pruned_student().config, figure_name=None)
    assert card.data.base_model == "org/minilm" and card.data.model_name == "minilm-mnli-pruned"
    assert str(tmp_path) not in str(card) and "`teacher`, which is [`org/minilm`]" in card.text
    # nothing names a Hub model: no base_model, the model type names the card, still no absolute path
    report = build_report(teacher, pruned_student(), base_model=str(teacher_dir), dense_path=teacher_dir, **QUICK)
    card = make_model_card(report, pruned_student().config, figure_name=None)
    assert card.data.base_model is None and card.data.model_name == "bert-mnli-pruned"
    assert str(tmp_path) not in str(card)
    assert "A structurally pruned version of `teacher`, fine-tuned on mnli" in card.text


def test_a_hub_teacher_is_one_model_with_its_base(tmp_path):
    report = build_report(tiny_model("bert", num_hidden_layers=2), pruned_student(), base_model=BASE, **QUICK)
    card = make_model_card(report, pruned_student().config, figure_name=None)
    assert card.data.base_model == BASE
    assert f"A structurally pruned version of `{BASE}`, fine-tuned on mnli." in card.text


def test_a_card_is_rebuilt_from_its_report_alone(tmp_path):
    """A published card folder (README, report, figure; no weights, no config): the card of today's code, the base
    model recorded in the report's lineage."""
    teacher_dir = teacher_folder(tmp_path / "teacher")
    report = build_report(load_teacher(str(teacher_dir)), pruned_student(), dense_path=teacher_dir, **QUICK)
    report.pop("lineage")  # a report written before lineage was recorded
    export = save_pruned(pruned_student(), tmp_path / "export", report=report)
    published = tmp_path / "card"
    published.mkdir()
    for name in ("README.md", "pruning_report.json", "head_map.png"):
        shutil.copy2(export / name, published / name)
    expected = card_of(export)[1]
    rebuild_card(published, base_model=BASE)
    card, text = card_of(published)
    assert card.data.base_model == BASE and str(tmp_path) not in text
    assert json.loads((published / "pruning_report.json").read_text())["lineage"] == {"base_model": BASE}
    # the structure, loading and results sections are those of the export's own card
    for section in ("## Results", "## Structure", "## How to load"):
        start = expected.index(section)
        assert text[text.index(section) :][:400] == expected[start:][:400]
    assert "| 0 | 2 / 4 | 48 / 48 |" in text and "| 1 | 3 / 4 | 28 / 48 |" in text and "trust_remote_code=True" in text
    assert sorted(p.name for p in published.iterdir()) == ["README.md", "head_map.png", "pruning_report.json"]
    with pytest.raises(FileNotFoundError, match="no pruning_report.json"):
        rebuild_card(tmp_path / "teacher")


def test_a_report_names_local_folders_relative_to_its_export(tmp_path):
    teacher_dir = teacher_folder(tmp_path / "runs" / "teacher", base=BASE)
    report = build_report(load_teacher(str(teacher_dir)), pruned_student(), dense_path=teacher_dir,
                          pruned_path=tmp_path / "runs" / "student", **QUICK)  # fmt: skip
    assert report["dense_path"] == str(teacher_dir)  # in memory: where it is
    export = save_pruned(pruned_student(), tmp_path / "runs" / "final", report=report, figure=False)
    written = json.loads((export / "pruning_report.json").read_text())
    assert str(tmp_path) not in json.dumps(written)  # published with the export: no folder of this machine
    assert written["dense_path"] == written["lineage"]["teacher"] == "../teacher"
    assert written["pruned_path"] == "../student"
    assert load_report(export)["dense_path"] == str(teacher_dir.resolve())  # read back: found again
    shutil.move(tmp_path / "runs", tmp_path / "moved")  # the run moved as a whole: still found
    assert load_report(tmp_path / "moved" / "final")["dense_path"] == str((tmp_path / "moved" / "teacher").resolve())
    # a card folder published without the teacher: the card names it by its own name, its base from the report
    published = tmp_path / "cards" / "model"
    published.mkdir(parents=True)
    for name in ("README.md", "pruning_report.json"):
        shutil.copy2(tmp_path / "moved" / "final" / name, published / name)
    rebuild_card(published)
    card, text = card_of(published)
    assert card.data.base_model == BASE and "A structurally pruned version of `teacher`" in text and ".." not in text
    assert json.loads((published / "pruning_report.json").read_text())["dense_path"] == "../teacher"


def test_portable_paths_touch_only_local_absolute_paths(tmp_path):
    from hf_prune.export.files import portable_paths, resolved_paths

    (tmp_path / "teacher").mkdir()
    (tmp_path / "runs" / "final").mkdir(parents=True)  # the export the report is written into
    forms = [{"name": "dense", "file": str(tmp_path / "teacher" / "model.safetensors")},
             {"name": "pruned", "file": "model.safetensors"}]  # fmt: skip
    teacher = str(tmp_path / "teacher")
    report = {"base_model": BASE, "dense_path": teacher, "pruned_path": None,
              "lineage": {"teacher": teacher, "base_model": BASE}, "deployment": {"forms": forms}}  # fmt: skip
    written = portable_paths(report, tmp_path / "runs" / "final")
    assert report["dense_path"] == str(tmp_path / "teacher")  # the argument is left as it was
    assert written["base_model"] == written["lineage"]["base_model"] == BASE and written["pruned_path"] is None
    assert written["dense_path"] == written["lineage"]["teacher"] == "../../teacher"
    files = [f["file"] for f in written["deployment"]["forms"]]
    assert files == ["../../teacher/model.safetensors", "model.safetensors"]
    read = resolved_paths(written, tmp_path / "runs" / "final")
    assert read["dense_path"] == str((tmp_path / "teacher").resolve()) and read["base_model"] == BASE
    assert read["deployment"] == written["deployment"]  # forms' files stay relative to the export, as its own are
    assert portable_paths(written, tmp_path / "runs" / "final") == written  # written twice: the same
