import ast
import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from utils import VOCAB, WITHOUT_HF_PRUNE, batch, tiny_config, tiny_model

import hf_prune
from hf_prune import load_pruned, prune_ffn_neurons, prune_heads, save_pruned
from hf_prune.export.files import export_files
from hf_prune.export.persistence import standalone_source
from hf_prune.models import remote_common, structure
from hf_prune.models.bert.adapter import BERT_LAYOUT

ARCHS = ["bert", "roberta", "xlm-roberta", "electra"]
HEADS = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}
NEURONS = {0: list(range(0, 48, 3)), 1: [5], 2: list(range(48))}
EXPORT = ["README.md", "config.json", "head_map.png", "model.safetensors", "modeling_hf_prune.py"]


def pruned_model(arch="bert", seed=0):
    model = tiny_model(arch, seed=seed, num_hidden_layers=3)
    prune_heads(model, HEADS)
    prune_ffn_neurons(model, NEURONS)
    return model.eval()


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**batch(pad=3)).logits


def tiny_tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(vocab_file=str(path))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def transformers_logs():
    """Every record the transformers loggers emit during the test (they do not propagate to the root logger)."""
    handler, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_identical_logits_without_warnings(arch, tmp_path, transformers_logs):
    model = pruned_model(arch)
    expected = logits(model)
    out = save_pruned(model, tmp_path / "export")
    assert export_files(out) == EXPORT
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith(f".Pruned{type(model).__name__}")
    assert config["layer_num_attention_heads"] == [2, 0, 3]
    assert config["layer_intermediate_sizes"] == [32, 47, 0]
    assert config["hf_prune_pruned_heads"] == {"0": [1, 3], "1": [0, 1, 2, 3], "2": [2]}

    transformers_logs.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_pruned(out)
    assert not [str(w.message) for w in caught]
    loud = [r.getMessage() for r in transformers_logs if r.levelno >= logging.WARNING]
    assert not loud, loud
    assert type(loaded).__name__ == f"Pruned{type(model).__name__}"
    assert isinstance(loaded, type(model))
    assert structure.num_heads(loaded) == [2, 0, 3]
    assert structure.ffn_size(loaded) == [32, 47, 0]
    assert torch.equal(logits(loaded), expected)

    # A loaded model exports again under the transformers class name, and loads again.
    again = save_pruned(loaded, tmp_path / "again", figure=False)
    assert json.loads((again / "config.json").read_text())["architectures"] == [type(model).__name__]
    assert torch.equal(logits(load_pruned(again)), expected)


def test_loads_with_transformers_only(tmp_path):
    """A fresh interpreter that cannot import hf_prune loads every export with trust_remote_code=True."""
    folders = {}
    for arch in ARCHS:
        model = pruned_model(arch, seed=1)
        folders[arch] = str(save_pruned(model, tmp_path / arch, card=False, figure=False))
        save_file({arch: logits(model).contiguous()}, str(tmp_path / f"{arch}.logits.safetensors"))
    code = WITHOUT_HF_PRUNE + textwrap.dedent(
        """
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification

        folders, batch = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        batch = {k: torch.tensor(v) for k, v in batch.items()}
        result = {}
        for arch, folder in folders.items():
            model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
            with torch.no_grad():
                out = model(**batch).logits
            expected = load_file(folder + ".logits.safetensors")[arch]
            result[arch] = [type(model).__name__, torch.equal(out, expected)]
        result["hf_prune_imported"] = any(m.split(".")[0] == "hf_prune" for m in sys.modules)
        print("RESULT " + json.dumps(result))
        """
    )
    inputs = json.dumps({k: v.tolist() for k, v in batch(pad=3).items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(folders), inputs],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result.pop("hf_prune_imported") is False
    for arch in ARCHS:
        base = type(tiny_model(arch)).__name__
        assert result[arch] == [f"Pruned{base}", True], (arch, result[arch])


FAMILY_MODELING = ("bert", "deberta", "distilbert", "llama", "modernbert", "vit")


@pytest.mark.parametrize("family", FAMILY_MODELING)
def test_every_family_modeling_file_exports_standalone_with_the_shared_part_once(family):
    module = importlib.import_module(f"hf_prune.models.{family}.modeling_hf_prune")
    source = standalone_source(module)
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "torch", "transformers"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert len(defined) == len(set(defined))  # no family repeats a shared function
    assert {"set_module", "resized", "apply_hidden_width"} <= set(defined)
    namespace = {}
    exec(compile(source, "modeling_hf_prune.py", "exec"), namespace)
    assert namespace["PrunedModelMixin"].__init__ is not None
    # inside hf_prune the family module uses the very functions the export inlines
    assert module.resized is remote_common.resized


def test_export_contents_tokenizer_report_and_no_pickle(tmp_path):
    model = pruned_model()
    report = {"base_model": "tiny-bert", "task": "mnli", "metrics": {}}
    out = save_pruned(model, tmp_path / "export", tiny_tokenizer(tmp_path), report=report)
    files = export_files(out)
    assert files == sorted(EXPORT + ["pruning_report.json", "tokenizer.json", "tokenizer_config.json"])
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert json.loads((out / "pruning_report.json").read_text()) == report
    assert transformers.AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"]
    # The modeling file imports only torch and transformers and defines the classes auto_map names.
    source = (out / "modeling_hf_prune.py").read_text()
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "torch", "transformers"}
    defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoModel": "modeling_hf_prune.PrunedBertModel",
        "AutoModelForSequenceClassification": "modeling_hf_prune.PrunedBertForSequenceClassification",
    }
    assert {ref.split(".")[1] for ref in auto_map.values()} <= defined
    # The in-memory model is left as it was: no auto_map pointing at a file it does not have.
    assert getattr(model.config, "auto_map", None) is None


def test_tied_weights_of_a_masked_lm(tmp_path, transformers_logs):
    model = transformers.BertForMaskedLM(tiny_config("bert", num_hidden_layers=3)).eval()
    prune_heads(model, HEADS)
    prune_ffn_neurons(model, NEURONS)
    out = save_pruned(model, tmp_path / "mlm", card=False, figure=False)
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoModel": "modeling_hf_prune.PrunedBertModel",
        "AutoModelForMaskedLM": "modeling_hf_prune.PrunedBertForMaskedLM",
    }
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "decoder.weight" in k]  # stored once, as the word embeddings
    transformers_logs.clear()
    loaded = load_pruned(out)
    assert not [r.getMessage() for r in transformers_logs if r.levelno >= logging.WARNING]
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(logits(loaded), logits(model))


def test_unpruned_model_records_its_shapes(tmp_path):
    model = tiny_model("roberta")
    out = save_pruned(model, tmp_path / "dense", card=False, figure=False)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_num_attention_heads"] == [4, 4]
    assert config["layer_intermediate_sizes"] == [48, 48]
    assert config["hf_prune_layout"] == BERT_LAYOUT
    assert config["hf_prune_pruned_heads"] == {}
    assert torch.equal(logits(load_pruned(out)), logits(model))


def test_overwrite_protection(tmp_path):
    target = tmp_path / "export"
    target.mkdir()  # an empty folder is fine
    save_pruned(pruned_model(seed=0), target, card=False, figure=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(pruned_model(seed=1), target)
    replacement = pruned_model(seed=2)
    save_pruned(replacement, target, overwrite=True)
    assert export_files(target) == EXPORT
    assert torch.equal(logits(load_pruned(target)), logits(replacement))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_pruned(replacement, tmp_path / "file", overwrite=True)


@pytest.mark.parametrize(
    "where", ["hf_prune.export.card.make_model_card", "hf_prune.export.persistence.swap_into_place"]
)
def test_interrupted_export_keeps_previous_folder(tmp_path, monkeypatch, where):
    target = tmp_path / "export"
    first = pruned_model(seed=0)
    save_pruned(first, target)
    before = {f: (target / f).read_bytes() for f in export_files(target)}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(where, boom)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(pruned_model(seed=3), target, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(pruned_model(seed=3), tmp_path / "fresh")
    assert {f: (target / f).read_bytes() for f in export_files(target)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert torch.equal(logits(load_pruned(target)), logits(first))


def test_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "export"
    first = pruned_model(seed=0)
    save_pruned(first, target, card=False, figure=False)
    before = {f: (target / f).read_bytes() for f in export_files(target)}
    real_replace = os.replace

    def replace(src, dst):
        if ".hf-prune-tmp-" in str(src):  # the new export moving in, after the old one was moved aside
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        save_pruned(pruned_model(seed=3), target, overwrite=True)
    monkeypatch.undo()
    assert {f: (target / f).read_bytes() for f in export_files(target)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_leftovers_of_a_killed_export_are_cleaned_up(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".export.hf-prune-tmp-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    save_pruned(pruned_model(), tmp_path / "export", card=False, figure=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    # Killed between moving the previous export aside and moving the new one in: the previous one comes back.
    first = pruned_model(seed=4)
    save_pruned(first, tmp_path / "other", card=False, figure=False)
    (tmp_path / "other").rename(tmp_path / f".other.hf-prune-old-{dead.pid}-xyz789")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(pruned_model(seed=5), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "other"]
    assert torch.equal(logits(load_pruned(tmp_path / "other")), logits(first))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return save_pruned(pruned_model(), tmp_path_factory.mktemp("shared") / "export", card=False, figure=False)


def copy_export(export, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in export_files(export):
        (folder / name).write_bytes((export / name).read_bytes())
    return folder


def test_missing_inputs_are_named(export, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder.*save_pruned"):
        load_pruned(tmp_path / "nope")
    folder = copy_export(export, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*save_pruned"):
        load_pruned(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*save_pruned"):
        load_pruned(folder)


def test_weights_the_model_has_no_place_for_fail_loudly(export, tmp_path):
    from safetensors.torch import load_file

    folder = copy_export(export, tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "bert.encoder.layer.9.output.dense.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not match the model .*unexpected_keys.*layer\.9\.output"):
        load_pruned(folder)


def test_corrupt_weights_are_named(export, tmp_path):
    folder = copy_export(export, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        load_pruned(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pruned(folder)


def test_config_disagreeing_with_weights(export, tmp_path):
    folder = copy_export(export, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["layer_num_attention_heads"] = [4, 4, 4]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json disagrees with the weights.*config \[32, 32\] vs weights \[16, 32\]"
    ):
        load_pruned(folder)
    config["architectures"] = ["NotAModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures"):
        load_pruned(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pruned(folder)


def test_figure_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    handler = Records()
    logging.getLogger("hf_prune").addHandler(handler)
    try:
        out = save_pruned(pruned_model(), tmp_path / "export")
    finally:
        logging.getLogger("hf_prune").removeHandler(handler)
    assert "head_map.png" not in export_files(out)
    assert "head_map.png" not in (out / "README.md").read_text()
    assert any("matplotlib" in r.getMessage() and r.levelno == logging.WARNING for r in handler.records)


def test_bad_report_and_unsupported_model(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_pruned(pruned_model(), tmp_path / "a", report={"x": object()})
    gpt2 = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="Supported model types"):
        save_pruned(gpt2, tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_public_exports():
    assert hf_prune.save_pruned is save_pruned and hf_prune.load_pruned is load_pruned


def test_an_export_written_by_hf_prune_0_1_still_loads(tmp_path):
    """`fixtures/export-0.1.0` holds the `config.json` and `modeling_hf_prune.py` hf_prune 0.1.0 wrote (flat package,
    one architecture table) for a tiny BERT with heads and FFN neurons removed and one layer without heads, and the
    logits it gave for one input. The weights are built here, as 0.1.0 built them: the same seed, the same cuts."""
    fixture = Path(__file__).parent / "fixtures" / "export-0.1.0"
    expected = json.loads((fixture / "expected.json").read_text())
    source = tiny_model("bert", seed=3).eval()
    prune_heads(source, {0: [1, 3], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(source, {0: list(range(0, 48, 2)), 1: [5]})
    folder = tmp_path / "export-0.1.0"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "model.safetensors"))
    for name in ("config.json", "modeling_hf_prune.py"):
        (folder / name).write_text((fixture / name).read_text())
    ids = torch.tensor(expected["input_ids"])
    model = load_pruned(folder).eval()
    assert structure.num_heads(model) == [2, 0] and structure.ffn_size(model) == [24, 47]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, torch.tensor(expected["logits"]), atol=1e-6, rtol=1e-5)
    # and it is exported again by this release with the same function and the same layout keys
    config_before = json.loads((folder / "config.json").read_text())
    again = save_pruned(model, tmp_path / "again", card=False, figure=False)
    config_after = json.loads((again / "config.json").read_text())
    for key in ("hf_prune_layout", "layer_num_attention_heads", "layer_intermediate_sizes", "hf_prune_pruned_heads"):
        assert config_after[key] == config_before[key]
    with torch.no_grad():
        reloaded = load_pruned(again).eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(reloaded, got)
