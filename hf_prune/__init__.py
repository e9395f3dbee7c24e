"""hf_prune: structured pruning of Transformers as a drop-in part of the Hugging Face training stack."""

from . import structure
from .config import PruningArguments
from .distill import distillation_loss
from .surgery import prune_ffn_neurons, prune_heads
from .trainer import PruningTrainer

__version__ = "0.1.0"

__all__ = [
    "PruningArguments",
    "PruningTrainer",
    "distillation_loss",
    "prune_ffn_neurons",
    "prune_heads",
    "structure",
    "__version__",
]

from .deploy import export_onnx, quantize_onnx  # noqa: E402
from .persistence import load_pruned, save_pruned  # noqa: E402
from .posttrain import prune_to_speedup  # noqa: E402

__all__ += ["load_pruned", "save_pruned", "prune_to_speedup", "export_onnx", "quantize_onnx"]
