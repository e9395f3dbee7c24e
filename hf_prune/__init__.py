"""hf_prune: structured pruning of Transformers as a drop-in part of the Hugging Face training stack."""

from .config import PruningArguments
from .distill import distillation_loss
from .trainer import PruningTrainer

__version__ = "0.1.0"

__all__ = ["PruningArguments", "PruningTrainer", "distillation_loss", "__version__"]
