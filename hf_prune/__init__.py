"""hf_prune: structured pruning of Transformers as a drop-in part of the Hugging Face training stack."""

import sys

from . import _deprecated
from .config import PruningArguments
from .distill import distillation_loss
from .export.onnx import export_onnx, quantize_onnx
from .export.persistence import load_pruned, save_pruned
from .models import structure
from .models.hidden import prune_hidden_dims
from .models.surgery import prune_ffn_neurons, prune_heads, prune_layers
from .posttrain.rounds import prune_in_rounds
from .posttrain.search import prune_to_speedup
from .trainer import PruningTrainer

__version__ = "0.1.0"

__all__ = [
    "PruningArguments",
    "PruningTrainer",
    "distillation_loss",
    "prune_ffn_neurons",
    "prune_heads",
    "prune_layers",
    "prune_hidden_dims",
    "prune_to_speedup",
    "prune_in_rounds",
    "save_pruned",
    "load_pruned",
    "export_onnx",
    "quantize_onnx",
    "structure",
    "__version__",
]

_deprecated.install()
# `hf_prune.structure` is public API (the model queries): importable as a module path too
sys.modules.setdefault(f"{__name__}.structure", structure)
