"""Image classification in the staged pipeline: folders of one sub-folder per class (as torchvision's `ImageFolder`),
pixel values made on the fly by the model's image processor, their collator, the checks that an image task meets an
image model (and a text task a text model), and the generated offline image task (for `builtin:tiny-vit`, see
`demo.py`).

Raw splits of an image task hold `image` (a `datasets.Image` feature: a folder's files are referenced by path and
decoded when read) and `label` (label ids); a folder's rows also hold `image_stamp`, each file's size and
modification time, so the teacher's metrics cache (which digests a split's rows) sees a changed file. [`pixel_splits`]
attaches a transform that opens each image as RGB and runs the image processor when the row is read: pixel values are
made on the fly, batch by batch, and never stored, so memory does not grow with the data.

The generated task (`task: demo_images`, with `model: builtin:tiny-vit`) draws small RGB images of 8 classes
(stripes in three directions, a checkerboard, a disc, a ring, a colour gradient, speckle), each with random colours
(and size, position, period or direction) and pixel noise, and with `label_noise` of the images filed under another
class, written once as PNG folders into `$HF_PRUNE_CACHE` (else `~/.cache/hf_prune`) and read back like any image
folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Image, Value, concatenate_datasets
from transformers.utils import logging

from ..utils import recover_interrupted, swap_into_place, temporary_folder
from .demo import DEMO_IMAGE_SIZE, tiny_vit_processor
from .labels import LabelMap, infer_label_names
from .tasks import TaskSpec

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "DEMO_IMAGE_CLASSES",
    "class_folders",
    "read_image_folder",
    "read_image_splits",
    "image_label_ids",
    "check_image_recipe",
    "is_image_config",
    "check_image_model",
    "load_image_processor",
    "pixel_splits",
    "ImageCollator",
    "make_demo_images",
    "demo_image_folders",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEMO_IMAGE_CLASSES = (
    "checkerboard", "circle", "diagonal_stripes", "gradient", "horizontal_stripes", "ring", "speckle",
    "vertical_stripes",
)  # fmt: skip
_DEMO_SIZES = (1600, 400)  # default training / validation images of the generated task
_LABEL = "label"  # the column raw splits keep their label ids in, as data.py's
_STAMP = "image_stamp"
_LAYOUT = "folder/<class>/<image>.png (one sub-folder per class, named after it)"
_PREPROCESSOR_FILE = "preprocessor_config.json"


# ----------------------------------------------------------------------------------------------------- folders
def _images(folder: Path):
    """The image files under `folder` (sub-folders too, links followed; hidden ones left out), as found."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))


def class_folders(path: str | os.PathLike) -> list[str]:
    """The class names of an image folder: its sub-folders, sorted, each holding at least one image.

    Raises a `ValueError` naming the layout when `path` is not a folder, has no class sub-folders (images lying in it
    directly included) or has a class sub-folder without images (`.png`, `.jpg`, `.jpeg`, `.bmp`, `.webp`).
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ValueError(
            f"Image folder {path} {what}: an image task reads data.train_file / data.validation_file as folders laid "
            f"out as {_LAYOUT}."
        )
    names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        loose = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        found = "holds images but no class sub-folders" if loose else "has no class sub-folders"
        raise ValueError(
            f"Image folder {path} {found}: put each class's images into a sub-folder named after the class, "
            f"{_LAYOUT}."
        )
    empty = [n for n in names if next(_images(path / n), None) is None]
    if empty:
        raise ValueError(
            f"Image folder {path}: the class sub-folder(s) {empty} hold no images. Supported files: "
            f"{', '.join(IMAGE_SUFFIXES)}; remove the empty folders or add their images."
        )
    return names


def _stamp(path: Path) -> str:
    info = path.stat()
    return f"{info.st_size}:{info.st_mtime_ns}"


def read_image_folder(path: str | os.PathLike, task: TaskSpec) -> Dataset:
    """The images of one folder (see [`class_folders`]) with their label ids.

    Args:
        path: a folder with one sub-folder per class.
        task: the image task; its label names (else this folder's class names, sorted) give the label ids.

    Returns:
        A `Dataset` with the task's image column (files by path, decoded when read), `label` and `image_stamp`.
    """
    names = class_folders(path)
    labels = task.label_names or tuple(names)
    to_id = LabelMap(labels)
    unknown = [n for n in names if n not in to_id.exact and n.lower() not in to_id.folded]
    if unknown:
        raise ValueError(
            f"Image folder {path} has the class sub-folder(s) {unknown}, which are not labels of task {task.name!r} "
            f"({', '.join(labels)}). Rename or remove them, or set task.label_names to every class."
        )
    files, ids = [], []
    for name in names:
        found = sorted(_images(Path(path) / name))
        files += found
        ids += [to_id(name, f"{path}/{name}")] * len(found)
    column = task.image_column or "image"
    features = Features({column: Image(), _LABEL: Value("int64"), _STAMP: Value("string")})
    rows = {column: [str(f) for f in files], _LABEL: ids, _STAMP: [_stamp(f) for f in files]}
    return Dataset.from_dict(rows, features=features)


def read_image_splits(task: TaskSpec, train_folders, validation: Mapping[str, str]) -> tuple[dict, TaskSpec]:
    """An image task's local splits: `train` from one or several folders (their images one after the other), and
    one split per validation folder, its label names read from the training folders' class names when the task gives
    none.

    Args:
        task: the image task.
        train_folders: a folder or a list of folders (or None: validation folders alone, with the task's names).
        validation: `{split: folder}`.

    Returns:
        `({split: Dataset}, task with its label names)`.
    """
    trains = _folders(train_folders)
    if task.label_names is None:
        if not trains:
            raise ValueError("An image task without task.label_names reads them from data.train_file: give it.")
        names = sorted({n for folder in trains for n in class_folders(folder)})
        where = ", ".join(trains)
        if len(names) < 2:
            raise ValueError(f"{where} hold(s) the one class {names}: a classifier needs two or more.")
        logger.info("Task %s: %d classes read from %s: %s.", task.name, len(names), where, names)
        task = task.with_label_names(names, inferred=True)
    splits = {}
    if trains:
        parts = [read_image_folder(folder, task) for folder in trains]
        splits["train"] = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    splits.update({name: read_image_folder(folder, task) for name, folder in validation.items()})
    return splits, task


def image_label_ids(splits: Mapping[str, Dataset], task: TaskSpec, where: str) -> tuple[dict, TaskSpec]:
    """Hub image splits whose labels are values (names, ids, digit strings) rather than a `ClassLabel`: their label
    column replaced by label ids (the images are not read), the names read from the training split when the task
    gives none (the sorted distinct values)."""
    if task.label_names is None:
        names = infer_label_names(list(splits["train"][_LABEL]), f"{where} [train]")
        task = task.with_label_names(names, inferred=True)
    to_id = LabelMap(task.label_names)
    out = {}
    for name, ds in splits.items():
        ids = [to_id(v, f"{where} [{name}]: row {i}") for i, v in enumerate(ds[_LABEL], start=1)]
        out[name] = ds.remove_columns(_LABEL).add_column(_LABEL, ids)
    return out, task


# ----------------------------------------------------------------------------------------------------- checks
def _folders(value) -> list[str]:
    if not value:
        return []
    if isinstance(value, Mapping):
        return [str(v) for v in value.values()]
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def check_image_recipe(recipe) -> None:
    """Fails before any work when an image recipe's data cannot be read: a data folder without class sub-folders or
    images, or `data.max_seq_length` (a text setting) given."""
    task = recipe.task_spec
    if not task.is_image_classification:
        return
    for key in ("train_file", "validation_file"):
        for folder in _folders(recipe.data.get(key)):
            class_folders(folder)
    if "max_seq_length" in recipe.data:
        raise ValueError(
            "data.max_seq_length applies to text; an image task's images take the size of its image processor: "
            "remove it."
        )


def is_image_config(config: Mapping) -> bool:
    """Whether a `config.json` (as a dict) is an image model's: it has `image_size` and `num_channels`."""
    return config.get("image_size") is not None and config.get("num_channels") is not None


def _processor_size(folder: Path) -> tuple[int, int] | None:
    """The `(height, width)` a folder's image processor resizes to, when it says so plainly (no crop)."""
    path = folder / _PREPROCESSOR_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    size = saved.get("size")
    if not saved.get("do_resize", True) or saved.get("do_center_crop") or not isinstance(size, Mapping):
        return None
    return (size["height"], size["width"]) if "height" in size and "width" in size else None


def check_image_model(what: str, name: str, config: Mapping, task: TaskSpec, processor: str | None = None) -> None:
    """Fails before any work when a model does not fit an image task, or an image model a text task.

    Args:
        what: `"model"` or `"teacher"`, for the message.
        name: the model's folder or Hub id.
        config: its `config.json` as a dict.
        task: the recipe's task.
        processor: where the image processor comes from (the recipe's `tokenizer`, else the model), checked for a
            `preprocessor_config.json` when it is a folder; None to skip (a teacher uses the model's processor).
    """
    architecture = ", ".join(map(str, config.get("architectures") or [config.get("model_type")]))
    if not task.is_image_classification:
        if is_image_config(config):
            raise ValueError(
                f"{what} {name} is an image model ({architecture}, image_size {config['image_size']}) but task "
                f"{task.name!r} is {task.problem_type}, which reads text. Set task: {{problem_type: "
                "image_classification, image_column: image, label_column: label}, or give a text model."
            )
        return
    if not is_image_config(config):
        raise ValueError(
            f"{what} {name} is a {architecture} model, not an image model (its config has no image_size / "
            f"num_channels), but task {task.name!r} is image_classification. Give an image model (e.g. a ViT folder "
            "with its preprocessor_config.json, or builtin:tiny-vit), or a text task."
        )
    if config["num_channels"] != 3:
        raise ValueError(
            f"{what} {name} takes images of {config['num_channels']} channel(s); an image task reads images as RGB "
            "(3 channels). Give a model with num_channels: 3."
        )
    if processor is None or not os.path.isdir(processor):
        return
    if not (Path(processor) / _PREPROCESSOR_FILE).is_file():
        raise FileNotFoundError(_missing_processor(processor, config))
    size, wanted = _processor_size(Path(processor)), config["image_size"]
    wanted = tuple(wanted) if isinstance(wanted, (list, tuple)) else (wanted, wanted)
    if size is not None and tuple(size) != wanted:
        raise ValueError(
            f"The image processor of {processor} resizes images to {size[0]}x{size[1]}, but {what} {name} takes "
            f"{wanted[0]}x{wanted[1]} (image_size). Save a processor of that size there, or give a model of that size."
        )


def _missing_processor(folder, config: Mapping | None = None) -> str:
    side = (config or {}).get("image_size", 224)
    return (
        f"{folder} has no {_PREPROCESSOR_FILE}, so it has no image processor for an image task. Save the model's "
        f"processor there, e.g. ViTImageProcessor(size={{'height': {side}, 'width': {side}}})"
        ".save_pretrained(folder), or set the recipe's `tokenizer:` to a folder or Hub id that has one."
    )


def load_image_processor(name: str):
    """The image processor of a model: `AutoImageProcessor.from_pretrained(name)`, or the built-in tiny ViT's."""
    from transformers import AutoImageProcessor

    if name == "builtin:tiny-vit":
        return tiny_vit_processor()
    if os.path.isdir(name) and not (Path(name) / _PREPROCESSOR_FILE).is_file():
        raise FileNotFoundError(_missing_processor(name))
    try:
        return AutoImageProcessor.from_pretrained(name)
    except OSError as err:  # offline, an unknown id, a Hub model without a processor
        raise FileNotFoundError(
            f"Could not load the image processor of {name} ({str(err).splitlines()[0] if str(err) else err!r}). Give "
            f"a folder or Hub id with a {_PREPROCESSOR_FILE}, or set the recipe's `tokenizer:` to one."
        ) from err


# ----------------------------------------------------------------------------------------------------- pixels
class _PixelValues:
    """The transform of a split: each row's image as RGB, through the image processor, with its label."""

    def __init__(self, processor, image_column: str):
        self.processor, self.image_column = processor, image_column

    def __call__(self, batch: dict) -> dict:
        from PIL import Image as PILImage

        images = []
        for value in batch[self.image_column]:
            if isinstance(value, str):  # a column of paths rather than images
                with PILImage.open(value) as image:
                    images.append(image.convert("RGB"))
            else:
                images.append(value.convert("RGB"))
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": batch[_LABEL]}


def pixel_splits(raw: DatasetDict | Mapping, processor, task: TaskSpec) -> DatasetDict:
    """Raw image splits made model inputs: reading a row (or a batch of rows) returns `pixel_values` (one
    `(channels, height, width)` tensor per image, from `processor`) and `labels`, computed when read (see the module
    docstring).

    Args:
        raw: splits with the task's image column and `label`.
        processor: the model's image processor (e.g. a `ViTImageProcessor`).
        task: the image task.

    Returns:
        A `DatasetDict` of the same rows with the transform attached.
    """
    transform = _PixelValues(processor, task.image_column)
    return DatasetDict({name: ds.with_transform(transform) for name, ds in raw.items()})


class ImageCollator:
    """Stacks examples' `pixel_values` into one `(batch, channels, height, width)` tensor and their `labels`."""

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])
        labels = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


# ----------------------------------------------------------------------------------------------------- generated
def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour at least 200 apart (sum over the channels)."""
    while True:
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(bg - fg).sum() >= 200:
            return bg, fg


def _draw(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One `(size, size, 3)` uint8 image of class `kind`, with Gaussian pixel noise."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    bg, fg = _colours(rng)
    period, phase = int(rng.integers(3, 6)), int(rng.integers(0, 6))
    distance = np.hypot(*(np.stack([x, y]) - rng.uniform(0.4, 0.6, (2, 1, 1)) * size))
    radius = rng.uniform(0.28, 0.42) * size
    stripes = lambda v: (np.floor(v) + phase) % period < period / 2  # noqa: E731
    if kind == "gradient":  # from the background to the foreground colour, in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(((x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)) / size + 0.5, 0, 1)[..., None]
        image = bg * (1 - t) + fg * t
    else:
        masks = {
            "horizontal_stripes": lambda: stripes(y),
            "vertical_stripes": lambda: stripes(x),
            "diagonal_stripes": lambda: stripes((x + y) / 1.5),
            "checkerboard": lambda: (np.floor(x / (period - 1)) + np.floor(y / (period - 1)) + phase) % 2 == 0,
            "circle": lambda: distance <= radius,
            "ring": lambda: (distance <= radius) & (distance >= radius * 0.5),
            "speckle": lambda: rng.random((size, size)) < 0.5,
        }
        if kind not in masks:
            raise ValueError(f"Unknown generated image class {kind!r}; classes: {', '.join(DEMO_IMAGE_CLASSES)}.")
        image = np.where(masks[kind]()[..., None], fg, bg)
    return np.clip(np.rint(image + rng.normal(0.0, 12.0, (size, size, 3))), 0, 255).astype(np.uint8)


def make_demo_images(
    folder: str | os.PathLike,
    num_train: int = _DEMO_SIZES[0],
    num_eval: int = _DEMO_SIZES[1],
    seed: int = 0,
    image_size: int = DEMO_IMAGE_SIZE,
    label_noise: float = 0.1,
) -> Path:
    """Writes the generated image task as PNG folders: `folder/train/<class>/*.png`, `folder/validation/<class>/*.png`.

    The classes of [`DEMO_IMAGE_CLASSES`] take turns (the splits are balanced); each image is drawn with random
    colours (background and foreground), position, size, stripe period, cell or direction, and Gaussian pixel noise;
    `label_noise` of the images (in both splits) are filed under another class, so no model scores above about
    `1 - label_noise`. The same seed writes the same images.

    Args:
        folder: where to write (created).
        num_train / num_eval: images of the training and validation splits.
        seed: generator seed (the validation split uses its own stream).
        image_size: pixels a side.
        label_noise: share of images filed under a wrong class, in [0, 1).

    Returns:
        `folder`.
    """
    from PIL import Image as PILImage

    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise={label_noise} must be in [0, 1).")
    folder = Path(folder)
    for split, count, stream in (("train", num_train, seed), ("validation", num_eval, seed + 1_000_003)):
        rng = np.random.default_rng(stream)
        for name in DEMO_IMAGE_CLASSES:  # every class folder exists, even when a tiny split draws none of it
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            kind = i % len(DEMO_IMAGE_CLASSES)
            pixels = _draw(DEMO_IMAGE_CLASSES[kind], rng, image_size)
            # both draws happen for every image, so the same seed gives the same images whatever the noise
            flip, other = rng.random() < label_noise, int(rng.integers(len(DEMO_IMAGE_CLASSES) - 1))
            label = (other + (other >= kind)) if flip else kind
            PILImage.fromarray(pixels).save(folder / split / DEMO_IMAGE_CLASSES[label] / f"{i:06d}.png")
    for split in ("train", "validation"):  # a class left without images (tiny splits) gets one, so the folder reads
        for name in DEMO_IMAGE_CLASSES:
            if not any((folder / split / name).iterdir()):
                rng = np.random.default_rng([seed, DEMO_IMAGE_CLASSES.index(name)])
                PILImage.fromarray(_draw(name, rng, image_size)).save(folder / split / name / "extra.png")
    return folder


def demo_image_folders(data: Mapping, seed: int, cache_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """The generated image task's folders, written once per seed and size into the cache and reused after.

    Args:
        data: the recipe's `data` (`demo_train_size`, `demo_eval_size`: images per split, default 1600 and 400).
        seed: the generator seed.
        cache_dir: where to keep them (default: `$HF_PRUNE_CACHE`, else `~/.cache/hf_prune`).

    Returns:
        `(train folder, {"validation": folder})`, as `data.train_file` / `data.validation_file` give them.
    """
    sizes = int(data.get("demo_train_size", _DEMO_SIZES[0])), int(data.get("demo_eval_size", _DEMO_SIZES[1]))
    root = Path(cache_dir or os.environ.get("HF_PRUNE_CACHE") or Path.home() / ".cache" / "hf_prune")
    target = root / "demo_images" / f"v1-{DEMO_IMAGE_SIZE}px-seed{seed}-{sizes[0]}-{sizes[1]}"
    recover_interrupted(target)
    if not target.is_dir():
        logger.info("Writing the generated image task to %s.", target)
        tmp = temporary_folder(target)
        try:
            make_demo_images(tmp, *sizes, seed=seed)
            swap_into_place(tmp, target)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target / "train"), {"validation": str(target / "validation")}
