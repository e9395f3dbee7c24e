"""The one mapping from `config.model_type` to the adapter of its family (peft's architecture mapping)."""

from __future__ import annotations

from transformers.models.auto import modeling_auto

from .adapter import ArchitectureAdapter
from .bert.adapter import BertAdapter
from .deberta.adapter import DebertaV2Adapter
from .distilbert.adapter import DistilBertAdapter
from .llama.adapter import LlamaAdapter
from .modernbert.adapter import ModernBertAdapter
from .vit.adapter import ViTAdapter

__all__ = [
    "ADAPTER_MAPPING",
    "AUTO_CLASS_MAPPINGS",
    "register_adapter",
    "get_adapter",
    "supported_model_types",
    "auto_class_name",
    "is_causal_lm_class",
    "is_causal_lm",
]

ADAPTER_MAPPING: dict[str, ArchitectureAdapter] = {}

# Auto class name -> mapping from model_type to the transformers class it builds.
AUTO_CLASS_MAPPINGS = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForPreTraining": modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "AutoModelForMultipleChoice": modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
    "AutoModelForNextSentencePrediction": modeling_auto.MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES,
    "AutoModelForImageClassification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
}


def register_adapter(adapter: ArchitectureAdapter, model_types: tuple[str, ...] | None = None) -> None:
    """Makes hf_prune prune the model types `adapter` serves (default: its `model_types`).

    Args:
        adapter: an instance of an [`ArchitectureAdapter`] subclass.
        model_types: the `config.model_type` values to serve (replacing any adapter registered for them).
    """
    if not isinstance(adapter, ArchitectureAdapter):
        raise TypeError(f"register_adapter takes an ArchitectureAdapter instance, not {type(adapter).__name__}.")
    types = tuple(model_types or adapter.model_types)
    if not types:
        raise ValueError(f"{type(adapter).__name__} names no model_types; pass model_types=(...).")
    for model_type in types:
        ADAPTER_MAPPING[model_type] = adapter


register_adapter(BertAdapter())
register_adapter(DebertaV2Adapter())
register_adapter(LlamaAdapter())
register_adapter(ModernBertAdapter())
register_adapter(DistilBertAdapter())
register_adapter(ViTAdapter())


def supported_model_types() -> list[str]:
    return sorted(ADAPTER_MAPPING)


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The adapter of a model (or config, or `config.json` dict); a `ValueError` lists the supported model types."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in ADAPTER_MAPPING:
        raise ValueError(
            f"hf_prune cannot prune model_type={model_type!r}: it does not know where its attention heads and MLP "
            f"neurons live. Supported model types: {', '.join(supported_model_types())}. A new family is one "
            "ArchitectureAdapter subclass, registered with hf_prune.models.auto.register_adapter."
        )
    return ADAPTER_MAPPING[model_type]


def is_causal_lm_class(model_type: str | None, class_name: str) -> bool:
    """Whether `class_name` is the causal-LM class (`...ForCausalLM`) of `model_type`."""
    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return name is not None and class_name == name


def is_causal_lm(model) -> bool:
    """Whether `model` is its family's causal-LM class (what generates text)."""
    return is_causal_lm_class(getattr(model.config, "model_type", None), type(model).__name__)


def auto_class_name(model_type: str, class_name: str) -> str:
    """The transformers Auto class that builds `class_name` for `model_type` (e.g. `AutoModelForCausalLM` for
    `LlamaForCausalLM`), else `"AutoModel"`."""
    for auto_name, mapping in AUTO_CLASS_MAPPINGS.items():
        target = mapping.get(model_type)
        if auto_name != "AutoModel" and class_name in (target if isinstance(target, (list, tuple)) else (target,)):
            return auto_name
    return "AutoModel"
