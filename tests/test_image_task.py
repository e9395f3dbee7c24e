"""Image classification: the task form, folders of one sub-folder per class, pixel values and their collator, top-5
accuracy, the generated image task, recipes end to end on a tiny ViT (fine-tuned, pruned without training, evaluated,
exported), and bad input refused before any work with the fix named."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertModel, EvalPrediction, ViTConfig, ViTModel
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from utils import tiny_config

from hf_prune import load_pruned
from hf_prune.cli import main as cli_main
from hf_prune.pipeline.data import load_task, tokenize_splits
from hf_prune.pipeline.demo import build_wordlevel_tokenizer
from hf_prune.pipeline.images import (
    DEMO_IMAGE_CLASSES,
    ImageCollator,
    check_image_model,
    class_folders,
    demo_image_folders,
    load_image_processor,
    make_demo_images,
)
from hf_prune.pipeline.metrics import build_compute_metrics, check_task_metrics, task_scores, top_k_accuracy
from hf_prune.pipeline.recipe import read_state, run_recipe
from hf_prune.pipeline.schema import load_recipe
from hf_prune.pipeline.tasks import parse_task

REPO = Path(__file__).resolve().parent.parent
IMAGES = {"problem_type": "image_classification"}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these models are tiny, and on a shared 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """The generated image task is written into a fresh cache."""
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def save_vit(folder: Path, processor_size: int | None = 16) -> Path:
    """The tiny ViT encoder (no task head: each task gets one), its image processor beside it."""
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    if processor_size:
        ViTImageProcessorPil(size={"height": processor_size, "width": processor_size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


def write_images(folder: Path, per_class: dict[str, int], size: int = 16, suffix: str = ".png") -> Path:
    """`per_class` images of plain colour per class folder (class i: value 30 * i), of `size` pixels."""
    for i, (name, count) in enumerate(per_class.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            pixels = np.full((size, size, 3), 30 * i + j, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{j}{suffix}")
    return folder


def recipe(model, out, stages, **data) -> dict:
    return {
        "model": str(model),
        "task": "demo_images",
        "data": {"demo_train_size": 48, "demo_eval_size": 16, **data},
        "seed": 0,
        "output_dir": str(out),
        "defaults": {
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 5e-3,
            "max_steps": 3, "save_steps": 50, "logging_steps": 2, "disable_tqdm": True, "use_cpu": True,
        },
        "stages": stages,
    }  # fmt: skip


EXPORT = {"stage": "export", "batch_sizes": [2], "repeats": 1, "figure": False}


# ----------------------------------------------------------------------------------------------------- the task
def test_the_image_task_form_and_its_defaults():
    spec = parse_task(IMAGES)
    assert (spec.image_column, spec.label_column, spec.text_columns) == ("image", "label", ())
    assert spec.is_image_classification and spec.input_columns == ("image",) and spec.metric_names == ("accuracy",)
    assert spec.with_label_names("abcdef").metric_names == ("accuracy", "top5_accuracy")  # more than 5 classes
    assert spec.with_label_names("abcde").metric_names == ("accuracy",)
    own = parse_task({**IMAGES, "image_column": "img", "label_column": "fine_label", "label_names": ["cat", "dog"],
                      "metrics": ["f1_macro", "accuracy"], "dataset": ["someone/pets"]})  # fmt: skip
    assert (own.image_column, own.label_column, own.name) == ("img", "fine_label", "someone/pets")
    assert own.main_metric == "f1_macro" and own.label_names == ("cat", "dog")
    demo = parse_task("demo_images")
    assert demo.generated and demo.is_image_classification and demo.validation_splits == ("validation",)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**IMAGES, "text_columns": ["text"]}, "text_columns does not apply to problem_type: image_classification"),
        ({**IMAGES, "text_column": "text"}, "an image task reads its images from image_column"),
        ({"text_columns": ["text"], "image_column": "image"}, "image_column does not apply .* image_classification"),
        ({**IMAGES, "image_column": ""}, "task.image_column must be a column name"),
        ({**IMAGES, "metrics": ["pearson"]}, "do not apply to image_classification. Valid: accuracy, top5_accuracy"),
        ({**IMAGES, "label_names": ["cat", "cat"]}, "lists a name twice"),
    ],
)
def test_bad_image_tasks_name_the_fix(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_task(raw)


# ----------------------------------------------------------------------------------------------------- folders
def test_folders_read_as_image_folder_does(tmp_path):
    train = write_images(tmp_path / "train", {"dog": 2, "cat": 3})
    write_images(train / "dog" / "more", {"puppies": 1}, suffix=".jpg")  # nested folders inside a class count
    for suffix in (".jpeg", ".bmp", ".webp"):
        write_images(tmp_path / "spare", {"cat": 1}, suffix=suffix)
        (tmp_path / "spare" / "cat" / f"0{suffix}").rename(train / "cat" / f"x{suffix}")
    (train / "cat" / "notes.txt").write_text("not an image")
    (train / ".cache").mkdir()  # hidden: not a class
    valid = write_images(tmp_path / "valid", {"cat": 1})
    assert class_folders(train) == ["cat", "dog"]
    splits, spec = load_task(IMAGES, {"train_file": str(train), "validation_file": str(valid)})
    assert spec.label_names == ("cat", "dog") and spec.labels_inferred  # sub-folder names, sorted
    assert splits["train"]["label"] == [0] * 6 + [1] * 3 and splits["valid"]["label"] == [0]
    names = [Path(p["path"]).name for p in splits["train"].with_format(None).data.table.column("image").to_pylist()]
    assert names == ["0.png", "1.png", "2.png", "x.bmp", "x.jpeg", "x.webp", "0.png", "1.png", "0.jpg"]
    assert splits["train"].column_names == ["image", "label", "image_stamp"]  # no pixels stored
    # given label names set the ids; a validation class outside them is refused
    folders = {"train_file": str(train), "validation_file": str(valid)}
    splits, _ = load_task({**IMAGES, "label_names": ["dog", "cat", "bird"]}, folders)
    assert set(splits["train"]["label"]) == {0, 1} and splits["valid"]["label"] == [1]
    write_images(tmp_path / "odd", {"cat": 1, "fox": 1})
    with pytest.raises(ValueError, match=r"class sub-folder\(s\) \['fox'\], which are not labels .*\(cat, dog\)"):
        load_task(IMAGES, {"train_file": str(train), "validation_file": str(tmp_path / "odd")})


def test_folders_without_classes_or_images_are_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(loose / "a.png")
    with pytest.raises(ValueError, match="holds images but no class sub-folders: put each class's images into a"):
        class_folders(loose)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders.*folder/<class>/<image>.png"):
        class_folders(tmp_path / "bare")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    write_images(tmp_path / "empty", {"dog": 1})
    with pytest.raises(ValueError, match=r"sub-folder\(s\) \['cat'\] hold no images. Supported files: .png, .jpg"):
        class_folders(tmp_path / "empty")
    with pytest.raises(ValueError, match="is a file: an image task reads data.train_file"):
        class_folders(loose / "a.png")


# ----------------------------------------------------------------------------------------------------- pixels
def test_pixel_values_are_made_when_read_and_stacked_by_the_collator(tmp_path, vit):
    train = write_images(tmp_path / "train", {"a": 2, "b": 1}, size=20)
    Image.fromarray(np.full((9, 12), 200, np.uint8)).save(train / "b" / "gray.png")  # grayscale, another size
    raw, spec = load_task(IMAGES, {"train_file": str(train), "validation_file": str(train)})
    splits = tokenize_splits(raw, load_image_processor(str(vit)), task=spec)
    row = splits["train"][3]
    assert set(row) == {"pixel_values", "labels"} and row["pixel_values"].shape == (3, 16, 16) and row["labels"] == 1
    torch.testing.assert_close(row["pixel_values"], torch.full((3, 16, 16), 200 / 255 * 2 - 1))  # RGB, normalised
    batch = ImageCollator()([splits["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].tolist() == [0, 0, 1, 1]
    assert batch["labels"].dtype == torch.long
    assert splits["train"].with_format(None).column_names == ["image", "label", "image_stamp"]


def test_hub_datasets_with_an_image_column(tmp_path, vit, monkeypatch):
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    files = sorted(str(f) for f in write_images(tmp_path / "hub", {"a": 2, "b": 2}).rglob("*.png"))
    features = Features({"img": ImageFeature(), "fine": ClassLabel(names=["ant", "bee"]), "id": Value("int64")})
    rows = {"img": files, "fine": [0, 0, 1, -1], "id": [0, 1, 2, 3]}  # -1: unlabelled
    named = {"img": files, "fine": ["bee", "ant", "bee", "ant"]}  # labels as names, images as paths
    loaded = {
        "someone/ants": DatasetDict({n: Dataset.from_dict(rows, features=features) for n in ("train", "test")}),
        "someone/named": DatasetDict({n: Dataset.from_dict(named) for n in ("train", "validation")}),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: loaded[args[0]])
    task = {**IMAGES, "image_column": "img", "label_column": "fine", "dataset": ["someone/ants"]}
    splits, spec = load_task(task)
    assert spec.label_names == ("ant", "bee") and list(splits) == ["train", "test"]  # no validation split: test
    assert splits["train"]["label"] == [0, 0, 1] and splits["train"].column_names == ["img", "label"]
    pixels = tokenize_splits(splits, load_image_processor(str(vit)), task=spec)
    assert pixels["test"][2]["pixel_values"].shape == (3, 16, 16)
    splits, spec = load_task({**task, "dataset": ["someone/named"]})
    assert spec.label_names == ("ant", "bee") and splits["validation"]["label"] == [1, 0, 1, 0]
    assert tokenize_splits(splits, load_image_processor(str(vit)), task=spec)["train"][0]["labels"] == 1
    with pytest.raises(ValueError, match=r"has no column\(s\) \['image'\].*Set task.image_column"):
        load_task({**IMAGES, "label_column": "fine", "dataset": ["someone/named"]})


def test_top5_accuracy_against_hand_computations():
    ranked = [[3, 1, 0, 2, 4], [0, 1, 2, 3, 4], [5, 4, 3, 2, 1]]
    assert top_k_accuracy(ranked, [3, 4, 0], k=5) == pytest.approx(2 / 3)
    assert top_k_accuracy(ranked, [3, 4, 0], k=1) == pytest.approx(1 / 3) and top_k_accuracy([], [], 5) == 0.0
    spec = parse_task(IMAGES).with_label_names([f"c{i}" for i in range(7)])
    logits = np.array([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [0, 0, 9, 0, 0, 0, 1]], dtype=np.float32)
    scores = build_compute_metrics(spec)(EvalPrediction(predictions=logits, label_ids=np.array([6, 6, 6])))
    # classes by logit: [6, 5, 4, 3, 2], [0, 1, 2, 3, 4], [2, 6, 0, 1, 3]: right at rank 1, absent, at rank 2
    assert scores == {"accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}
    three = parse_task({**IMAGES, "metrics": ["accuracy", "f1_macro"]}).with_label_names(["a", "b", "c"])
    assert task_scores(three, [[0, 1, 2], [2, 0, 1]], [0, 1]) == {"accuracy": 0.5, "f1_macro": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="top5_accuracy, but task 'custom' has 5 classes: .* always 1. Remove it"):
        check_task_metrics(parse_task({**IMAGES, "metrics": ["top5_accuracy"]}).with_label_names("abcde"))


# ----------------------------------------------------------------------------------------------------- generated
def test_the_generated_task_is_balanced_noisy_and_fixed_by_the_seed(tmp_path, cache):
    first = make_demo_images(tmp_path / "a", 32, 16, seed=3)
    again = make_demo_images(tmp_path / "b", 32, 16, seed=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert len([f for f in files if f.name != "extra.png"]) == 48  # and one for a class the noise left empty
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert class_folders(first / "train") == list(DEMO_IMAGE_CLASSES) == class_folders(first / "validation")
    other = make_demo_images(tmp_path / "c", 32, 16, seed=4, label_noise=0.0)
    assert {len(list((other / "train" / c).iterdir())) for c in DEMO_IMAGE_CLASSES} == {4}  # classes take turns
    with Image.open(other / "train" / "ring" / "000005.png") as image:  # class 5 of 8
        assert (image.size, image.mode) == ((16, 16), "RGB")
    train, validation = demo_image_folders({"demo_train_size": 16, "demo_eval_size": 8}, seed=0)
    stamp = Path(train, "circle").stat().st_mtime_ns
    assert Path(train).parent.parent == cache / "demo_images"
    assert validation == {"validation": str(Path(train).parent / "validation")}
    assert demo_image_folders({"demo_train_size": 16, "demo_eval_size": 8}, seed=0)[0] == train  # written once
    assert Path(train, "circle").stat().st_mtime_ns == stamp
    raw, spec = load_task("demo_images", {"demo_train_size": 16, "demo_eval_size": 8})
    assert spec.label_names == DEMO_IMAGE_CLASSES and spec.metric_names == ("accuracy", "top5_accuracy")
    assert len(raw["train"]) >= 16 and list(raw) == ["train", "validation"]


# ----------------------------------------------------------------------------------------------------- recipes
def test_finetune_evaluate_export_on_the_generated_task(tmp_path, vit):
    out = tmp_path / "run"
    result = run_recipe(recipe(vit, out, [{"stage": "finetune"}, {"stage": "evaluate"}, EXPORT]))
    finished = read_state(out)["finished"]
    assert [r["stage"] for r in finished] == ["finetune", "evaluate", "export"]
    assert finished[0]["metrics"]["global_step"] == 3
    scores = finished[1]["summary"]["all_metrics"]
    assert set(scores["teacher"]["validation"]) == {"accuracy", "top5_accuracy"} == set(scores["pruned"]["validation"])
    export = out / "final"
    assert (export / "preprocessor_config.json").is_file()
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["metric_name"] == "accuracy" and report["task"] == "demo_images"
    assert report["flops"]["seq_len"] == 17 == report["latency"]["seq_len"]  # 16 patches and the class token
    assert report["all_metrics"] == scores
    card = (export / "README.md").read_text()
    assert "top5_accuracy" in card and "pipeline_tag: image-classification" in card
    assert "AutoImageProcessor.from_pretrained" in card and "AutoTokenizer" not in card
    model = load_pruned(export)
    assert model.config.id2label[0] == "checkerboard" and type(result.model).__name__.endswith("ImageClassification")


def test_pruning_path_on_the_generated_task(tmp_path, vit):
    out = tmp_path / "run"
    prune = {"stage": "prune_to_speedup", "num_samples": 32, "tune_samples": 32, "batch_size": 16,
             "args": {"target_speedup": 1.3}}  # fmt: skip
    run_recipe(recipe(vit, out, [{"stage": "finetune"}, prune, {"stage": "evaluate"}, EXPORT]))
    finished = read_state(out)["finished"]
    assert finished[1]["summary"]["flops_ratio"] >= 1.3
    report = json.loads((out / "final" / "pruning_report.json").read_text())
    parameters = report["parameters"]
    assert report["flops"]["ratio"] >= 1.3 and parameters["total_after"] < parameters["total_before"]
    pruned = load_pruned(out / "final").eval()
    with torch.no_grad():
        assert pruned(pixel_values=torch.zeros(2, 3, 16, 16)).logits.shape == (2, len(DEMO_IMAGE_CLASSES))


def test_the_onnx_stage_deploys_an_image_export(tmp_path, vit):
    out = tmp_path / "run"
    onnx = {"stage": "onnx", "batch_sizes": [2], "repeats": 1}
    run_recipe(recipe(vit, out, [{"stage": "finetune"}, EXPORT, onnx], demo_eval_size=8))
    deployment = json.loads((out / "final" / "pruning_report.json").read_text())["deployment"]
    assert deployment["seq_len"] == 17 and (out / "final" / "onnx" / "model_int8.onnx").is_file()
    accuracy = {form["name"]: form["metrics"]["validation"] for form in deployment["forms"]}
    assert set(accuracy) == {"dense PyTorch fp32", "pruned PyTorch fp32", "pruned ONNX fp32", "pruned ONNX int8"}
    assert accuracy["pruned ONNX fp32"] == accuracy["pruned PyTorch fp32"]
    card = (out / "final" / "README.md").read_text()
    assert "(dynamic batch axis)" in card and 'image_processor(images=[image], return_tensors="np")' in card


def test_the_shipped_image_recipe_is_valid():
    loaded = load_recipe(REPO / "recipes" / "demo-images.yaml")
    assert loaded.model == "builtin:tiny-vit" and loaded.task_spec.name == "demo_images"
    assert [s["stage"] for s in loaded.stages] == ["finetune", "prune_to_speedup", "distill", "evaluate", "export"]


# ----------------------------------------------------------------------------------------------------- refusals
def test_bad_input_is_refused_before_any_work(tmp_path, vit):
    text_model = tmp_path / "bert"
    tokenizer = build_wordlevel_tokenizer(model_max_length=64)
    BertModel(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(text_model)
    tokenizer.save_pretrained(text_model)
    out = tmp_path / "out"
    stages = [{"stage": "finetune"}, EXPORT]
    with pytest.raises(ValueError, match="bert is a BertModel model, not an image model .* no image_size / num_chan"):
        run_recipe(recipe(text_model, out, stages))
    text = recipe(vit, out, stages)
    text["task"], text["data"] = "mnli", {"train_file": str(tmp_path / "t.jsonl"), "validation_file": "v.jsonl"}
    with pytest.raises(ValueError, match="tiny-vit is an image model .* but task 'mnli' is single_label_classifica"):
        run_recipe(text)
    with pytest.raises(ValueError, match="builtin:tiny-vit is an image model built in code, but task 'mnli'"):
        run_recipe({**text, "model": "builtin:tiny-vit"})
    with pytest.raises(ValueError, match="builtin:tiny-bert is a text model built in code.*model: builtin:tiny-vit"):
        run_recipe(recipe("builtin:tiny-bert", out, stages))
    bare = save_vit(tmp_path / "bare-vit", processor_size=None)
    with pytest.raises(FileNotFoundError, match=r"has no preprocessor_config.json.*ViTImageProcessor\(size=\{'hei"):
        run_recipe(recipe(bare, out, stages))
    big = save_vit(tmp_path / "big-vit", processor_size=32)
    with pytest.raises(ValueError, match="resizes images to 32x32, but model .* takes 16x16"):
        run_recipe(recipe(big, out, stages))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(loose / "a.png")
    folders = recipe(vit, out, stages)
    folders["task"], folders["data"] = IMAGES, {"train_file": str(loose), "validation_file": str(loose)}
    with pytest.raises(ValueError, match="loose holds images but no class sub-folders"):
        run_recipe(folders)
    with pytest.raises(ValueError, match="data.max_seq_length applies to text"):
        run_recipe(recipe(vit, out, stages, max_seq_length=32))
    with pytest.raises(ValueError, match="text_columns does not apply to problem_type: image_classification"):
        run_recipe({**folders, "task": {**IMAGES, "text_columns": ["text"]}})
    with pytest.raises(ValueError, match="takes images of 1 channel"):
        check_image_model("model", "gray", {"image_size": 16, "num_channels": 1}, parse_task(IMAGES))
    assert not out.exists()


def test_the_cli_runs_the_image_demo_made_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [
        "data.demo_train_size=32", "data.demo_eval_size=16", "stages.finetune.max_steps=2",
        "stages.distill.max_steps=1", "stages.prune_to_speedup.num_samples=32",
        "stages.prune_to_speedup.tune_samples=32", "stages.prune_to_speedup.batch_size=16",
        "stages.export.batch_sizes=[2]", "stages.export.repeats=1", "stages.export.figure=false",
        "defaults.disable_tqdm=true", "defaults.use_cpu=true", "defaults.per_device_train_batch_size=8",
    ]  # fmt: skip
    argv = ["run", str(REPO / "recipes" / "demo-images.yaml"), "--output-dir", str(out)]
    assert cli_main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert "builtin:tiny-vit on demo_images" in printed and "top5_accuracy validation" in printed


def test_compress_prunes_an_image_classifier_from_image_folders(tmp_path, capsys):
    """`hf-prune compress` on a ViT classifier reads the task from its config and the data from image folders."""
    from transformers import ViTForImageClassification

    classes = {"a": 6, "b": 6, "c": 6}
    train = write_images(tmp_path / "train", classes)
    val = write_images(tmp_path / "val", {k: 3 for k in classes})
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, id2label=dict(enumerate(classes)),
                       label2id={c: i for i, c in enumerate(classes)})  # fmt: skip
    folder = tmp_path / "classifier"
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    out = tmp_path / "run"
    argv = ["compress", str(folder), "--speedup", "1.3", "--train-file", str(train), "--validation-file", str(val),
            "--num-samples", "18", "--tune-samples", "18", "--output-dir", str(out)]  # fmt: skip
    sets = ["stages.export.repeats=1", "stages.export.figure=false", "stages.prune_to_speedup.batch_size=6"]
    assert cli_main(argv + [x for s in sets for x in ("--set", s)]) == 0
    report = json.loads((out / "final" / "pruning_report.json").read_text())
    assert report["flops"]["ratio"] >= 1.3 and report["metric_name"] == "accuracy"
    pruned = load_pruned(out / "final").eval()
    with torch.no_grad():
        assert pruned(pixel_values=torch.zeros(1, 3, 16, 16)).logits.shape == (1, 3)
    capsys.readouterr()
    assert cli_main(["compress", str(folder), "--speedup", "1.3", "--output-dir", str(tmp_path / "x")]) == 2
    assert "needs --train-file and --validation-file: image folders" in capsys.readouterr().err
