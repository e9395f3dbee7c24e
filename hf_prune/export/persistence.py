"""Exports of pruned models that load anywhere: safetensors weights, per-layer shapes in the config, remote code.

An export folder holds:

- `model.safetensors` and `config.json`: `architectures` names the transformers class (e.g.
  `BertForSequenceClassification`), the per-layer head counts / FFN widths are recorded by
  the family's adapter (`hf_prune.models.surgery.record_shapes`), and `auto_map` points the Auto classes at
  `modeling_hf_prune.py`;
- `modeling_hf_prune.py`: the family's modeling file (torch and transformers only, e.g.
  `hf_prune/models/bert/modeling_hf_prune.py`) plus one `Pruned<Class>` per Auto
  class, so `AutoModelFor...from_pretrained(folder, trust_remote_code=True)` works without hf_prune installed;
- the tokenizer files, `pruning_report.json`, `README.md` (the model card) and `head_map.png` when asked for.

Exports are atomic: everything is written to a temporary folder beside the target and renamed into place, so an export
that fails or is interrupted leaves the previous folder as it was. Nothing is pickled.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.modeling_utils import unwrap_model
from transformers.utils import logging

from ..models import remote_common
from ..models.adapter import ArchitectureAdapter
from ..models.auto import AUTO_CLASS_MAPPINGS, get_adapter
from ..models.surgery import prune_ffn_neurons, prune_heads, record_shapes
from ..utils import (
    file_lock,
    recover_files_together,
    recover_interrupted,
    swap_into_place,
    temporary_folder,
    write_files_together,
)
from . import card as cards
from .files import (
    CARD_NAME,
    CONFIG_NAME,
    FIGURE_NAME,
    MODELING_NAME,
    PICKLE_SUFFIXES,
    REPORT_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    export_files,
    portable_paths,
)
from .report_format import load_report

logger = logging.get_logger(__name__)

__all__ = ["save_pruned", "load_pruned", "load_teacher", "pruned_class", "modeling_source", "rebuild_card"]

_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type, adapter: ArchitectureAdapter) -> type:
    """`Pruned<Base>`: `base` with the family's `PrunedModelMixin` in front, which builds the recorded shapes before
    the weights are loaded."""
    mixin = adapter.modeling_module.PrunedModelMixin
    if issubclass(base, mixin):
        return base
    if base not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[base] = type(f"Pruned{base.__name__}", (mixin, base), {"__module__": __name__})
    return _PRUNED_CLASSES[base]


def _base_class(model) -> type:
    """The transformers class a (possibly `Pruned...`) model is an instance of."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise ValueError(
        f"{type(model).__name__} does not derive from a transformers model class; save_pruned exports transformers "
        "models (e.g. BertForSequenceClassification) and their pruned versions."
    )


def _auto_map(model_type: str, base_name: str) -> dict[str, str]:
    """`{Auto class: "modeling_hf_prune.Pruned<Class>"}` for every Auto class that builds `base_name` or the base."""
    auto_map = {}
    for auto_name, mapping in AUTO_CLASS_MAPPINGS.items():
        target = mapping.get(model_type)
        if isinstance(target, (list, tuple)):  # several classes of one Auto class (DeiT's two image classifiers)
            target = base_name if base_name in target else None
        if isinstance(target, str) and (target == base_name or auto_name == "AutoModel"):
            if hasattr(transformers, target):
                auto_map[auto_name] = f"{MODELING_NAME[:-3]}.Pruned{target}"
    return auto_map


def standalone_source(module) -> str:
    """The source of a family's modeling file with its import of `hf_prune.models.remote_common` replaced by that
    module's code, so the file imports nothing of hf_prune (it runs as remote code where hf_prune is not installed)."""
    source = inspect.getsource(module)
    lines = source.splitlines(keepends=True)
    name = remote_common.__name__.rpartition(".")[2]
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module == name:
            break
    else:
        return source
    common = inspect.getsource(remote_common)
    body = ast.parse(common).body
    start = body[1].lineno if isinstance(body[0], ast.Expr) else body[0].lineno  # after the module docstring
    shared = "".join(common.splitlines(keepends=True)[start - 1 :])
    shared = (
        f"# ---- shared by the modeling files of every family (hf_prune.models.remote_common)\n{shared.rstrip()}\n"
        "# ---- end of the shared part\n"
    )
    return "".join(lines[: node.lineno - 1]) + shared + "".join(lines[node.end_lineno :])


def modeling_source(adapter: ArchitectureAdapter, auto_map: dict[str, str]) -> str:
    """The remote-code modeling file: the family's modeling file (its shared part inlined, `standalone_source`) plus
    one `Pruned<Class>` per class in `auto_map`."""
    source = standalone_source(adapter.modeling_module).rstrip() + "\n"
    classes = sorted({ref.rpartition(".Pruned")[2] for ref in auto_map.values()})
    source += "\n\n# Classes of this export (loaded by the Auto classes through config.json's auto_map).\n"
    source += f"from transformers import {', '.join(classes)}  # noqa: E402\n"
    for name in classes:
        source += f"\n\nclass Pruned{name}(PrunedModelMixin, {name}):\n    pass\n"
    return source


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; save_pruned needs a folder path. Pass another path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} already exists and is not empty. Pass overwrite=True to replace it (the old folder is only "
            "removed once the new export is complete), or choose another path."
        )


def _written_config(model):
    """The config an export of `model` writes: its own, naming the transformers class, with the `auto_map` of the
    remote code when the family's config cannot describe the layers."""
    base = _base_class(model)
    written = copy.deepcopy(model.config)
    written.architectures = [base.__name__]
    needs_code = get_adapter(model).needs_remote_code(model.config)
    written.auto_map = _auto_map(model.config.model_type, base.__name__) if needs_code else None
    return written


def _write_weights_and_config(model, folder: Path):
    """Writes the weights, `config.json` and the modeling file; returns the config as written."""
    written = _written_config(model)
    architectures = model.config.architectures
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model.save_pretrained(folder)
    model.config.architectures = architectures
    config_path = folder / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["architectures"] = written.architectures
    if written.auto_map:
        config["auto_map"] = written.auto_map
        adapter = get_adapter(model)
        (folder / MODELING_NAME).write_text(modeling_source(adapter, config["auto_map"]), encoding="utf-8")
    else:  # the family's own config describes every layer: plain from_pretrained loads it, no remote code
        config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def _write_extras(config, folder: Path, tokenizer, report: dict | None, card: bool, figure: bool) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is not None:  # local paths relative to the folder: a published report names no folder of this machine
        text = json.dumps(portable_paths(report, folder), indent=2) + "\n"
        (folder / REPORT_NAME).write_text(text, encoding="utf-8")
    figure_name = None
    if figure:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.warning(
                "matplotlib is not installed, so no %s is written: pip install 'hf-prune[plot]'.", FIGURE_NAME
            )
        else:
            cards.plot_head_map(config, folder / FIGURE_NAME)
            figure_name = FIGURE_NAME
    if card:
        cards.make_model_card(report, config, figure_name=figure_name).save(folder / CARD_NAME)


def save_pruned(
    model,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    report: dict | None = None,
    overwrite: bool = False,
    card: bool = True,
    figure: bool = True,
) -> Path:
    """Exports a (pruned) model to a folder that plain transformers can load.

    Args:
        model: a model of a supported family (`hf_prune.models.auto.supported_model_types()`), pruned or not.
        path: the export folder. It must not exist or be empty, unless `overwrite=True`.
        tokenizer: saved with the model when given.
        report: a report from `hf_prune.export.report.build_report`, written as `pruning_report.json`.
        overwrite: replace an existing non-empty folder. The old folder is removed only once the new export is
            complete.
        card: write the model card `README.md`.
        figure: write the head-map figure `head_map.png` (needs matplotlib; skipped with a warning without it).

    Returns:
        The export folder.
    """
    model = unwrap_model(model)
    get_adapter(model)  # an unsupported model type fails here, naming the supported ones
    target = Path(path).absolute()
    recover_interrupted(target)
    _check_target(target, overwrite)
    if report is not None:
        try:
            json.dumps(report)
        except (TypeError, ValueError) as err:
            raise ValueError(f"report is not JSON-serialisable ({err}); pass the dict from build_report.") from err
    record_shapes(model)
    tmp = temporary_folder(target)
    try:
        config = _write_weights_and_config(model, tmp)
        _write_extras(config, tmp, tokenizer, report, card, figure)
        pickled = [f for f in export_files(tmp) if f.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise RuntimeError(f"The export would contain pickled files {pickled}; exports hold safetensors only.")
        _check_target(target, overwrite)
        # moved aside, moved in, restored on failure (tests/test_persistence.py pins that path for exports)
        swap_into_place(tmp, target, exchange=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Saved the pruned model to %s (%s).", target, ", ".join(export_files(target)))
    return target


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({err}); export the model again.") from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks the weight shards {missing} listed in {index.name}.")
        return [folder / s for s in shards]
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS_NAME}. Export the model with hf_prune.save_pruned(model, folder), which writes "
        "its weights as safetensors (pickled .bin checkpoints are not loaded)."
    )


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{file} is not a readable safetensors file ({err}); it is truncated or corrupt. Export the model "
                "again with hf_prune.save_pruned, or copy the file again."
            ) from err
    return shapes


def _check_shapes(cls: type, config, checkpoint: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Raises if the shapes `config.json` describes disagree with the shapes stored in the weights."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    bad = [(k, expected[k], shape) for k, shape in checkpoint.items() if k in expected and expected[k] != shape]
    if bad:
        listed = "; ".join(f"{k}: config {list(e)} vs weights {list(s)}" for k, e, s in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        heads, ffn = get_adapter(config).config_shapes(config)
        raise ValueError(
            f"{folder / CONFIG_NAME} disagrees with the weights in {folder}: {listed}{more}. The config records "
            f"attention units per layer {heads} and MLP widths {ffn}. Use the config.json that was "
            "exported with these weights, or export the model again with hf_prune.save_pruned."
        )


def load_pruned(path: str | os.PathLike, **from_pretrained_kwargs):
    """Loads a folder written by `save_pruned`, rebuilding every layer's shapes before the weights are loaded.

    Args:
        path: the export folder.
        from_pretrained_kwargs: passed to `from_pretrained` (e.g. `dtype`, `device_map`, `attn_implementation`).

    Returns:
        The model, an instance of `Pruned<Class>` (a subclass of the transformers class in `config.json`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Pass the folder written by hf_prune.save_pruned.")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_NAME}, so it is not a model export. Export the model with "
            "hf_prune.save_pruned(model, folder)."
        )
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); export the model again.") from err
    architectures = config_dict.get("architectures") or []
    base = getattr(transformers, architectures[0], None) if architectures else None
    if not isinstance(base, type):
        raise ValueError(
            f"{config_path} must name a transformers model class in `architectures` (e.g. "
            f'["BertForSequenceClassification"]), got {architectures!r}. Export the model with hf_prune.save_pruned, '
            "which writes it."
        )
    checkpoint = _checkpoint_shapes(_weight_files(folder))
    adapter = get_adapter(config_dict)
    cls = pruned_class(base, adapter)
    config = from_pretrained_kwargs.pop("config", None) or cls.config_class.from_pretrained(folder)
    _check_shapes(cls, config, checkpoint, folder)
    want_info = from_pretrained_kwargs.pop("output_loading_info", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model, info = cls.from_pretrained(folder, config=config, output_loading_info=True, **from_pretrained_kwargs)
    # every key counts: a weight the model has no place for means the file and the config describe different models
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise ValueError(
            f"The weights in {folder} do not match the model {config_path.name} describes: {problems}. Export the "
            "model again with hf_prune.save_pruned."
        )
    return (model, info) if want_info else model


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_local_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (absolute, ~, ./, deeper paths) is meant as a folder."""
    return _HUB_ID.match(name) is None


def load_teacher(teacher: nn.Module | str | os.PathLike, student: nn.Module | None = None) -> nn.Module:
    """The teacher as a module: loaded when given a folder or Hub id, then checked against the student.

    The one loader of teachers, for `PruningTrainer(teacher_model=...)` and the recipe stages alike.

    Args:
        teacher: a model, a local folder (dense, or pruned by hf_prune: its per-layer shapes are rebuilt), or a Hub
            model id.
        student: the model being trained, if known: a Hub teacher is loaded with its class (else as
            `AutoModelForSequenceClassification`) and must predict the same labels.

    Returns:
        The teacher (not yet frozen: see [`distill.freeze_teacher`]).
    """
    if isinstance(teacher, (str, os.PathLike)):
        name = os.fspath(teacher)
        if os.path.isdir(os.path.expanduser(name)):
            name = os.path.expanduser(name)
        elif os.path.exists(name) or _looks_like_local_path(name):
            raise ValueError(
                f"teacher_model={name!r} is not a folder holding a saved model. Pass the output folder of the "
                "fine-tuning run (with config.json and model.safetensors), a Hub model id, or the model itself."
            )
        try:
            if os.path.isdir(name):
                # load_pruned also rebuilds a teacher that was itself pruned (per-layer shapes in its config.json)
                teacher = load_pruned(name)
            else:
                model_class = type(student) if student is not None else AutoModelForSequenceClassification
                teacher = model_class.from_pretrained(name)
        except OSError as err:
            raise ValueError(
                f"Could not load the teacher from {name!r}: {err}. Pass a folder written by save_pretrained or a Hub "
                "model id you can reach (check HF_HUB_OFFLINE and your network)."
            ) from err
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be an nn.Module, a folder or a Hub id, not {type(teacher).__name__}.")
    t_labels = getattr(getattr(teacher, "config", None), "num_labels", None)
    s_labels = getattr(getattr(student, "config", None), "num_labels", None)
    if t_labels is not None and s_labels is not None and t_labels != s_labels:
        raise ValueError(
            f"The teacher predicts {t_labels} labels but the student {s_labels}: distillation compares their logits "
            "label by label. Fine-tune the teacher on the student's task first (the `finetune` stage), or give the "
            "student the teacher's `num_labels` and label mapping."
        )
    return teacher


# ----------------------------------------------------------------------------------------------------- cards
def _config_from_report(report: dict):
    """The config of the model a report describes, rebuilt from its `layers` (heads and FFN widths kept per layer,
    the heads removed) on a stand-in of the report's architecture: what a card needs, not the weights' sizes."""
    layers, name = report.get("layers") or [], report.get("architecture")
    base = getattr(transformers, name, None) if isinstance(name, str) else None
    if not layers or not isinstance(base, type) or any(layer.get("removed") for layer in layers):
        raise ValueError(
            "The report names no per-layer shapes of a transformers architecture (or layers were removed whole), so "
            "the card cannot be rebuilt from it alone: put the export's config.json beside it."
        )
    heads, ffn = layers[0]["heads_dense"], layers[0]["ffn_dense"]
    fields = {"num_hidden_layers": len(layers), "num_attention_heads": heads, "num_key_value_heads": heads}
    fields.update(intermediate_size=ffn, hidden_size=4 * heads, head_dim=4, vocab_size=16, max_position_embeddings=32)
    config = transformers.AutoConfig.for_model(report["model_type"], **fields)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = base(config)
        prune_heads(model, {i: layer["heads_removed"] for i, layer in enumerate(layers)})
        prune_ffn_neurons(model, {i: range(layer["ffn_dense"] - layer["ffn_kept"]) for i, layer in enumerate(layers)})
    record_shapes(model)
    return _written_config(model)


def rebuild_card(folder: str | os.PathLike, *, base_model: str | None = None, repo_id: str | None = None) -> Path:
    """Writes the model card of an export again from its `pruning_report.json`, without its weights: after a change
    of the card's code, or in a folder that publishes only the card, its figure and its report.

    Args:
        folder: an export, or a folder with `pruning_report.json` (and `head_map.png`); its `config.json` is used
            when there is one, else the config is rebuilt from the report's per-layer shapes.
        base_model: the Hub id of the model the teacher was fine-tuned from, recorded in the report's `lineage`
            when the report does not name it (reports written before lineage was recorded).
        repo_id: the Hub repo the card is for.

    Returns:
        The card written (`README.md`), together with the report (see `hf_prune.utils.write_files_together`).
    """
    folder = Path(folder)
    report_path, card_path = folder / REPORT_NAME, folder / CARD_NAME
    if not report_path.is_file():
        raise FileNotFoundError(f"{folder} has no {REPORT_NAME}: rebuild_card writes a card from an export's report.")
    with file_lock(report_path):
        recover_files_together(folder)
        report = load_report(folder)
        if base_model is not None:
            report.setdefault("lineage", {})["base_model"] = base_model
        if (folder / CONFIG_NAME).is_file():
            config = transformers.AutoConfig.from_pretrained(folder)
        else:
            config = _config_from_report(report)
        figure = FIGURE_NAME if (folder / FIGURE_NAME).is_file() else None
        card = cards.make_model_card(report, config, repo_id=repo_id, figure_name=figure)
        text = json.dumps(portable_paths(report, folder), indent=2) + "\n"
        write_files_together({card_path: str(card), report_path: text})
    logger.info("Wrote the model card %s from %s.", card_path, report_path)
    return card_path
