"""FSDP2 on the CPU: what accelerate does for accelerator devices only (it silently runs a multi-process CPU launch
under DDP), done for gloo, and the class of a model under FSDP2's generated wrapper class."""

from __future__ import annotations

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers.utils import logging

from .config import has_accelerator

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = None

logger = logging.get_logger(__name__)

__all__ = ["cpu_fsdp_version", "enable_fsdp_on_cpu", "unsharded_class"]


def cpu_fsdp_version(args) -> int | None:
    """The FSDP version asked for when the run trains on the CPU (use_cpu, or no accelerator), else None."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is None or not (args.use_cpu or not has_accelerator()):
        return None
    return int(plugin_args.get("fsdp_version", 2))


def enable_fsdp_on_cpu(trainer) -> None:
    """Turns on the FSDP2 that the arguments ask for in a multi-process CPU (gloo) run.

    accelerate enables an FSDP plugin only for accelerator devices and silently runs a CPU launch under DDP instead;
    torch's FSDP2 (`fully_shard`) shards and all-gathers over gloo all the same. This sets the accelerator state as
    accelerate does on a GPU (its own state and the process state it is copied from), so that `prepare` shards the
    student and saving gathers the full weights. The teacher is never prepared: each process keeps a full frozen copy.
    """
    args, state = trainer.args, trainer.accelerator.state
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    # the checks the Trainer makes when accelerate enables FSDP itself
    if plugin.activation_checkpointing and args.activation_checkpointing:
        raise ValueError(
            "`fsdp_config['activation_checkpointing']` (FSDP's own activation checkpointing) and the "
            "`activation_checkpointing` training argument can't both be set to True."
        )
    if args.save_only_model and (args.load_best_model_at_end or "SHARDED" in str(plugin.state_dict_type)):
        raise ValueError("save_only_model cannot be used under FSDP with load_best_model_at_end or a sharded state.")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info("FSDP2 on the CPU (gloo) over %d processes: the student is sharded.", args.world_size)


def unsharded_class(model) -> type:
    """The class of `model`, before FSDP2 (`fully_shard`) swapped it for a generated `FSDP<name>` subclass."""
    cls = type(model)
    if FSDPModule is not None and issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls
