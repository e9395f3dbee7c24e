"""`PruningArguments`: `TrainingArguments` plus the pruning, schedule and distillation fields of hf_prune."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "PruningArguments",
    "PRUNING_METHODS",
    "PRUNING_TARGETS",
    "FFN_SPARSITY_RULES",
    "multi_process_launch",
    "world_size",
    "has_accelerator",
]

PRUNING_METHODS = ("movement", "taylor", "magnitude")
PRUNING_TARGETS = ("attention", "ffn", "heads_and_ffn", "hidden")
FFN_SPARSITY_RULES = ("uniform", "global", "heads")
SPARSITY_MODES = ("per_layer", "global")
ATTENTION_GRANULARITIES = ("block", "head")


# Variables a launcher (torchrun, accelerate launch, mpirun) sets to the number of processes: the same ones accelerate
# reads to decide that a CPU run is distributed.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    """The number of processes of the initialised process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def multi_process_launch() -> bool:
    """Whether this process is one of several started by a launcher (`torchrun`, `accelerate launch`, `mpirun`)."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _WORLD_SIZE_VARS)


def has_accelerator() -> bool:
    """Whether torch sees a device to train on other than the CPU (CUDA, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


@dataclass
class PruningArguments(TrainingArguments):
    """Training arguments of [`PruningTrainer`].

    With the defaults (`pruning_method=None`, `distill_alpha=0.0`) they behave exactly as `TrainingArguments`. Every
    field below is also settable from the command line through `HfArgumentParser` and from a recipe stage.
    """

    # --- distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") ---
    distill_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the distillation term: loss = (1 - alpha) * task_loss + alpha * T^2 * KL(teacher || "
            "student). 0 turns distillation off even when a teacher is given; 1 trains on the teacher alone."
        },
    )
    distill_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the distillation term (> 0). The KL term is scaled by T^2."},
    )
    distill_hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an extra MSE between student and teacher hidden states of every layer (0 = off). "
            "Pruning keeps the hidden size, so layers match one to one."
        },
    )
    distill_chunk_size: int = field(
        default=512,
        metadata={
            "help": "Causal LMs: token positions whose vocabulary-sized logits are computed at once by the "
            "distillation loss (recomputed in the backward pass), which bounds its memory."
        },
    )
    mean_loss: bool = field(
        default=False,
        metadata={
            "help": "Train on the per-batch mean loss, divided by the gradient accumulation steps and averaged across "
            "processes, also when neither pruning nor distilling (which always do). Off, a plain run keeps the "
            "upstream Trainer's loss path, which for models that take loss kwargs (most transformers 5 models) "
            "skips that division and scales by the process count: their gradients under gradient accumulation k "
            "are k times those of one batch k times larger. The pipeline's stages turn it on."
        },
    )

    # --- what to prune and how ---
    pruning_method: str | None = field(
        default=None,
        metadata={
            "help": "None (no pruning), 'movement' (scores -W * dL/dW accumulated every optimizer step, Sanh et al. "
            "2020), 'magnitude' (|W|, the cheap baseline) or 'taylor' (first-order Taylor importance of FFN "
            "neurons, Molchanov et al. 2019)."
        },
    )
    pruning_target: str = field(
        default="attention",
        metadata={
            "help": "'attention' (block masks on the Q, K, V and attention output weights; heads whose blocks are "
            "all masked can then be removed), 'ffn' (FFN intermediate neurons), 'heads_and_ffn' (whole heads and "
            "FFN neurons together, under one FLOPs budget set by target_speedup) or 'hidden' (dimensions of the "
            "residual stream, one mask shared by every layer; BERT-family encoders). 'taylor' needs 'ffn', "
            "'heads_and_ffn' or 'hidden'."
        },
    )
    target_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the targeted weights (attention) or neurons (FFN) to remove, in [0, 1). Default 0.5 "
            "unless target_speedup is given instead."
        },
    )
    target_speedup: float | None = field(
        default=None,
        metadata={
            "help": "The speed to reach instead of sparsities: dense FLOPs / pruned FLOPs of one forward pass at "
            "speedup_seq_len tokens (> 1, e.g. 2). Heads and FFN neurons are allocated across all layers by "
            "importance per FLOP (pruning_target='heads_and_ffn', or the prune_to_speedup recipe stage)."
        },
    )
    speedup_seq_len: int = field(
        default=128,
        metadata={"help": "Sequence length at which the FLOPs of target_speedup are counted."},
    )
    block_shape: list[int] | None = field(
        default=None,
        metadata={
            "help": "Block shape (rows cols) of attention masks; one number means a square block. Default: one "
            "head's width, square (e.g. 64 64 for BERT-base), so that whole heads can be emptied."
        },
    )
    attention_granularity: str = field(
        default="block",
        metadata={
            "help": "'block': block masks on each of Q, K, V and the attention output (block_shape); a head is "
            "removed once all its blocks in the four are masked. 'head': one score per head, summed over its Q/K/V "
            "rows and attention-output columns, so whole heads are masked together and every masked head can be "
            "removed."
        },
    )
    pruning_warmup_steps: int = field(
        default=0,
        metadata={"help": "Cubic schedule: optimizer steps at sparsity 0 before pruning starts (Sanh et al. 2020)."},
    )
    pruning_cooldown_steps: int = field(
        default=0,
        metadata={"help": "Cubic schedule: final optimizer steps at the target sparsity, masks frozen."},
    )
    pruning_frequency: int = field(
        default=10,
        metadata={"help": "Recompute the masks every this many optimizer steps (scores accumulate every step)."},
    )
    taylor_iterations: int = field(
        default=4,
        metadata={"help": "Taylor: number of gradual pruning iterations; each removes an equal share of the target."},
    )
    taylor_interval_steps: int = field(
        default=50,
        metadata={
            "help": "Taylor: optimizer steps between two pruning iterations; importance is accumulated over them "
            "and the model trains (and distills) in between."
        },
    )
    ffn_sparsity_rule: str = field(
        default="uniform",
        metadata={
            "help": "Per-layer FFN sparsity: 'uniform' (every layer at target_sparsity), 'global' (one ranking of all "
            "neurons of all layers) or 'heads' (NNI's rule: layer sparsity = 1 - kept_heads / heads * 0.5, tying "
            "FFN width to the heads a layer kept; target_sparsity is then ignored)."
        },
    )

    uniform_shapes: bool = field(
        default=False,
        metadata={
            "help": "Keep the same number of attention units and of FFN neurons in every layer, so that a decoder's "
            "export is its family's own config (plain from_pretrained, serving engines). With "
            "'heads_and_ffn' the search chooses the best uniform shapes; 'ffn' needs ffn_sparsity_rule='uniform' "
            "and 'attention' needs attention_granularity='head', both with sparsity_mode='per_layer' and one "
            "sparsity for every layer."
        },
    )
    pruning_targets: list[dict] | str | None = field(
        default=None,
        metadata={
            "help": "What to prune, NNI config_list style: a list of entries (or its JSON), each selecting Linear "
            "modules by 'preset' ('attention', 'ffn' or 'linear' = every Linear), 'layers' (encoder layer indices), "
            "'names' (exact module names) and/or 'patterns' (regular expressions searched in module names, so a "
            "partial name works); all selectors given must match. Optional per entry: 'sparsity' (default "
            "target_sparsity) and 'block_shape' (default one head's width, square). Overrides pruning_target for "
            "block masks; with pruning_target='ffn' the entries choose FFN layers and their neuron sparsity."
        },
    )
    pruning_exclude: list[dict] | str | None = field(
        default=None,
        metadata={
            "help": "Entries (same selectors as pruning_targets) whose modules are removed from every target, e.g. "
            "[{'layers': [11]}] or [{'patterns': ['classifier']}]."
        },
    )
    sparsity_mode: str = field(
        default="per_layer",
        metadata={
            "help": "'per_layer': every selected module reaches its sparsity. 'global': one ranking of all blocks of "
            "all targets (NNI's total_sparsity), removing the same total number of weights."
        },
    )

    def _check_uniform_shapes(self) -> None:
        if not self.uniform_shapes or self.pruning_method is None:
            return
        why = None
        if self.sparsity_mode != "per_layer" and self.pruning_target != "heads_and_ffn":
            why = f"sparsity_mode={self.sparsity_mode!r} ranks all layers together: use 'per_layer'"
        elif self.pruning_target == "ffn" and self.ffn_sparsity_rule != "uniform":
            why = f"ffn_sparsity_rule={self.ffn_sparsity_rule!r} sets widths per layer: use 'uniform'"
        elif self.pruning_target == "attention" and self.attention_granularity != "head":
            why = "block masks empty heads layer by layer: use attention_granularity='head'"
        elif self.pruning_target != "heads_and_ffn" and self.pruning_targets:
            why = "pruning_targets entries give layers their own sparsities: remove them"
        if why:
            raise ValueError(f"uniform_shapes=True keeps every layer's shapes equal, but {why}.")

    def __post_init__(self):
        if multi_process_launch() and not self.use_cpu and not has_accelerator():
            # Without use_cpu, TrainingArguments sets up a multi-process launch on a CPU-only machine as a
            # non-distributed run: every process then trains its own replica on its own batches, with no gradient
            # all-reduce, and their pruning masks drift apart silently. Training on the CPU with gloo is what such a
            # launch can only mean.
            logger.warning_once(
                "Several processes were launched on a machine without GPU: training runs on the CPU with the gloo "
                "backend (use_cpu=True), so that the processes average their gradients and keep the same masks."
            )
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        super().__post_init__()
        from .pruning.selection import parse_entries

        self.pruning_targets = parse_entries(self.pruning_targets, "pruning_targets")
        self.pruning_exclude = parse_entries(self.pruning_exclude, "pruning_exclude")
        if self.sparsity_mode not in SPARSITY_MODES:
            raise ValueError(f"sparsity_mode={self.sparsity_mode!r} is not known. Use one of {SPARSITY_MODES}.")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(
                f"distill_alpha={self.distill_alpha} is outside [0, 1]: it weighs the distillation term against the "
                "task loss. Use 0 to turn distillation off, e.g. 0.9 to mostly follow the teacher."
            )
        if not self.distill_temperature > 0:
            raise ValueError(
                f"distill_temperature={self.distill_temperature} must be > 0 (it divides the logits). "
                "Use 1 for plain softmax, 2 to 4 for the usual softened targets."
            )
        if self.distill_chunk_size < 1:
            raise ValueError(f"distill_chunk_size={self.distill_chunk_size} must be >= 1 (positions per chunk).")
        if self.distill_hidden_weight < 0:
            raise ValueError(f"distill_hidden_weight={self.distill_hidden_weight} must be >= 0 (0 turns it off).")
        if self.pruning_method is not None and self.pruning_method not in PRUNING_METHODS:
            raise ValueError(
                f"pruning_method={self.pruning_method!r} is not known. Use one of {PRUNING_METHODS}, or None."
            )
        if self.pruning_target not in PRUNING_TARGETS:
            raise ValueError(f"pruning_target={self.pruning_target!r} is not known. Use one of {PRUNING_TARGETS}.")
        if self.pruning_method == "taylor" and self.pruning_target == "attention":
            raise ValueError(
                "pruning_method='taylor' scores FFN neurons, whole units and hidden dimensions: set "
                "pruning_target='ffn', 'heads_and_ffn' or 'hidden' (use 'movement' or 'magnitude' for attention "
                "blocks)."
            )
        if self.target_speedup is not None:
            if self.target_sparsity is not None:
                raise ValueError(
                    f"Both target_speedup={self.target_speedup} and target_sparsity={self.target_sparsity} are given: "
                    "the speed target decides the sparsities. Give one of them."
                )
            if not self.target_speedup > 1.0:
                raise ValueError(
                    f"target_speedup={self.target_speedup} must be > 1: it is dense FLOPs / pruned FLOPs, e.g. 2."
                )
            if self.pruning_method is not None and self.pruning_target != "heads_and_ffn":
                raise ValueError(
                    "target_speedup allocates heads and FFN neurons together: set pruning_target='heads_and_ffn' "
                    "(or give target_sparsity for attention or ffn alone)."
                )
        else:
            if self.pruning_method is not None and self.pruning_target == "heads_and_ffn":
                raise ValueError(
                    "pruning_target='heads_and_ffn' spends one FLOPs budget: set target_speedup (e.g. 2.0)."
                )
            if self.target_sparsity is None:
                self.target_sparsity = 0.5
        if self.speedup_seq_len < 1:
            raise ValueError(f"speedup_seq_len={self.speedup_seq_len} must be >= 1.")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(
                f"target_sparsity={self.target_sparsity} is outside [0, 1): it is the fraction removed, e.g. 0.5. "
                "To remove a whole layer's heads or neurons, call prune_heads / prune_ffn_neurons directly."
            )
        if self.block_shape is not None:
            shape = list(self.block_shape)
            if len(shape) == 1:
                shape = shape * 2
            if len(shape) != 2 or any(int(s) <= 0 for s in shape):
                raise ValueError(
                    f"block_shape={self.block_shape} must be one or two positive integers (rows cols), e.g. [32, 32]."
                )
            self.block_shape = [int(s) for s in shape]
        for name in ("pruning_warmup_steps", "pruning_cooldown_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("pruning_frequency", "taylor_iterations", "taylor_interval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        self._check_uniform_shapes()
        if self.attention_granularity not in ATTENTION_GRANULARITIES:
            raise ValueError(
                f"attention_granularity={self.attention_granularity!r} is not known. Use one of "
                f"{ATTENTION_GRANULARITIES}."
            )
        if self.ffn_sparsity_rule not in FFN_SPARSITY_RULES:
            raise ValueError(
                f"ffn_sparsity_rule={self.ffn_sparsity_rule!r} is not known. Use one of {FFN_SPARSITY_RULES}."
            )
