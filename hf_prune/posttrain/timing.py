"""Timing pruned shapes against the dense model: paired interleaved speedups, the thread count they are timed with,
and untuned copies of candidate shapes (what the calibration of `prune_to_speedup` times)."""

from __future__ import annotations

import copy
import statistics
from contextlib import contextmanager

import torch
from torch import nn

from ..models.costs import prefill_inputs, time_decode, time_interleaved
from ..models.hidden import prune_hidden_dims
from ..models.surgery import prune_ffn_neurons, prune_heads, prune_layers

__all__ = ["removed_units", "empty_layers", "shaped_copy", "paired_speedups", "measured_speedup", "timing_threads"]


def removed_units(keeps: list[torch.Tensor]) -> dict[int, list[int]]:
    """`{layer: [unit indices to remove]}` of per-layer keep-masks (layers keeping every unit left out)."""
    return {i: (~k).nonzero().flatten().tolist() for i, k in enumerate(keeps) if not bool(k.all())}


def empty_layers(keep_heads: list[torch.Tensor], keep_neurons: list[torch.Tensor]) -> list[int]:
    """The layers whose keep-masks keep no attention unit and no MLP neuron."""
    return [i for i, (h, n) in enumerate(zip(keep_heads, keep_neurons)) if not bool(h.any()) and not bool(n.any())]


def shaped_copy(
    model: nn.Module,
    keep_heads: list[torch.Tensor],
    keep_neurons: list[torch.Tensor],
    dropped: list[int] | tuple[int, ...] = (),
    keep_hidden: torch.Tensor | None = None,
) -> nn.Module:
    """An untuned copy with the kept units only (without the layers `dropped`; with `keep_hidden`, only those
    residual dimensions): its forward time is the pruned model's (tuning changes values, not shapes)."""
    shaped = copy.deepcopy(model).eval()
    prune_heads(shaped, removed_units(keep_heads))
    prune_ffn_neurons(shaped, removed_units(keep_neurons))
    if dropped and len(dropped) < len(keep_heads):
        prune_layers(shaped, dropped)
    if keep_hidden is not None:
        prune_hidden_dims(shaped, (~keep_hidden).nonzero().flatten().tolist())
    return shaped


def paired_speedups(
    dense: nn.Module, pruned: nn.Module, batch_size: int, seq_len: int, repeats: int = 10, phase: str = "prefill"
) -> list[float]:
    """Per interleaved round, the forward time of `dense` over that of `pruned` at `batch_size` x `seq_len`; with
    `phase="decode"`, the ratio of their times per generated token at batch 1 after `seq_len` tokens (tokens/s of
    `pruned` over those of `dense`)."""
    if phase == "decode":
        dense_ms, pruned_ms = time_decode([dense, pruned], seq_len, repeats=repeats)
    else:
        inputs = prefill_inputs(dense, batch_size, seq_len)
        dense_ms, pruned_ms = time_interleaved([dense, pruned], inputs, repeats, warmup=2)
    return [d / p if p > 0 else float("inf") for d, p in zip(dense_ms, pruned_ms)]


def measured_speedup(
    dense: nn.Module, pruned: nn.Module, batch_size: int, seq_len: int, repeats: int = 10, phase: str = "prefill"
) -> float:
    """The median of [`paired_speedups`]."""
    return statistics.median(paired_speedups(dense, pruned, batch_size, seq_len, repeats, phase))


@contextmanager
def timing_threads(threads: int | None):
    """Runs the block with `threads` intra-op threads (None: unchanged), restoring the previous count after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


