"""From scores to masks: block pooling, top-k at a sparsity, sparsity schedules, head masks from block masks.

Pure functions of tensors; nothing here knows about models or the Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Schedule",
    "cubic_sparsity",
    "agp_iteration_sparsity",
    "check_block_shape",
    "pool_blocks",
    "expand_blocks",
    "topk_mask",
    "dead_heads",
    "global_topk_masks",
]


def cubic_sparsity(
    step: int, total_steps: int, target: float, warmup_steps: int = 0, cooldown_steps: int = 0, initial: float = 0.0
) -> float:
    """Cubic sparsity schedule of Zhu & Gupta (2017), as used by movement pruning (Sanh et al. 2020, section 5).

    `initial` during the first `warmup_steps`, `target` during the last `cooldown_steps`, and in between
    `target + (initial - target) * (1 - progress)^3`: pruning is fast early, when many weights are redundant, and slow
    at the end, when the network has less room to recover.

    Args:
        step: the current optimizer step (0-based count of steps done).
        total_steps: the total number of optimizer steps of the run.
        target: the final sparsity.
        warmup_steps / cooldown_steps: steps held at `initial` / `target`.
        initial: the starting sparsity.

    Returns:
        The sparsity at `step`.
    """
    span = total_steps - warmup_steps - cooldown_steps
    if step < warmup_steps:
        return initial
    if span <= 0 or step >= total_steps - cooldown_steps:
        return target
    progress = (step - warmup_steps) / span
    return target + (initial - target) * (1.0 - progress) ** 3


def agp_iteration_sparsity(iteration: int, iterations: int, target: float) -> float:
    """Sparsity after `iteration` of `iterations` equal pruning iterations (gradual pruning, Molchanov et al. 2019)."""
    return target * min(iteration, iterations) / iterations


def check_block_shape(weight_shape: tuple[int, int], block: tuple[int, int], name: str = "weight") -> None:
    """Raises a `ValueError` naming the fix when `block` does not tile `weight_shape` exactly."""
    rows, cols = weight_shape
    if rows % block[0] or cols % block[1]:
        divisors_r = [d for d in range(1, rows + 1) if rows % d == 0 and (cols == 0 or cols % d == 0)]
        raise ValueError(
            f"block_shape {list(block)} does not divide {name} of shape {list(weight_shape)}: every block must be "
            f"whole. Use a block whose rows divide {rows} and whose columns divide {cols}, e.g. square blocks of "
            f"{', '.join(map(str, divisors_r[-4:]))}."
        )


def pool_blocks(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Sums `scores` (rows, cols) over non-overlapping blocks: returns (rows // br, cols // bc).

    Summing (not averaging) the movement score `-W * dL/dW` of a block is the first-order estimate of the loss change
    when the whole block is removed (Lagunas et al. 2021, block movement pruning).
    """
    rows, cols = scores.shape
    br, bc = block
    return scores.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))


def expand_blocks(block_mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Expands a (rows // br, cols // bc) block mask to the element mask (rows, cols)."""
    return block_mask.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)


def topk_mask(scores: torch.Tensor, sparsity: float, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask of the highest scores, removing `round(sparsity * numel)` entries.

    Args:
        scores: any shape; higher means more important.
        sparsity: fraction of entries to remove, in [0, 1].
        pruned: optional bool tensor (same shape) of entries already removed; they stay removed (masks only grow),
            because their weights are already zero and cannot be brought back meaningfully.

    Returns:
        A bool tensor of `scores.shape`, True where kept.
    """
    n = scores.numel()
    n_prune = min(n, int(math.floor(sparsity * n + 0.5)))
    flat = scores.detach().flatten().float().clone()
    if pruned is not None:
        flat[pruned.flatten()] = float("-inf")
        n_prune = max(n_prune, int(pruned.sum()))
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        # stable sort so ties break by position, identically on every process
        prune_idx = torch.sort(flat, stable=True).indices[:n_prune]
        keep[prune_idx] = False
    return keep.view(scores.shape)


def dead_heads(
    q_mask: torch.Tensor, k_mask: torch.Tensor, v_mask: torch.Tensor, o_mask: torch.Tensor, head_size: int
) -> list[int]:
    """Heads whose weights are all masked in Q, K, V (rows) and in the attention output (columns).

    Args:
        q_mask / k_mask / v_mask: element keep-masks of shape (heads * head_size, hidden).
        o_mask: element keep-mask of the attention output, shape (hidden, heads * head_size).
        head_size: width of one head.

    Returns:
        Sorted indices of the heads that can be removed without changing the model's function beyond the masks.
    """
    heads = q_mask.shape[0] // head_size
    alive = torch.zeros(heads, dtype=torch.bool, device=q_mask.device)
    for m in (q_mask, k_mask, v_mask):
        alive |= m.reshape(heads, head_size, -1).any(dim=(1, 2))
    alive |= o_mask.reshape(o_mask.shape[0], heads, head_size).any(dim=(0, 2))
    return [h for h in range(heads) if not alive[h]]


def global_topk_masks(
    scores: list[torch.Tensor], block_sizes: list[int], budget: float, pruned: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """One ranking across several score tensors (NNI's total sparsity): removes the lowest blocks until `budget`
    weights are gone.

    Args:
        scores: per tensor, one score per block (summed over the block).
        block_sizes: number of weights in one block of each tensor; scores are compared per weight (score / size).
        budget: number of weights to remove in total.
        pruned: per tensor, blocks already removed; they stay removed and count towards the budget first.

    Returns:
        Per tensor, a bool keep-mask of its blocks.
    """
    flat = torch.cat([(s.detach().float() / b).flatten() for s, b in zip(scores, block_sizes)])
    sizes = torch.cat([torch.full((s.numel(),), float(b), device=flat.device) for s, b in zip(scores, block_sizes)])
    if pruned is not None:
        flat[torch.cat([p.flatten() for p in pruned])] = float("-inf")
    order = torch.sort(flat, stable=True).indices
    removed = torch.cumsum(sizes[order], 0) <= budget + 1e-6
    if pruned is not None:
        removed |= torch.isneginf(flat[order])  # the blocks already removed; a +inf score is kept
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[removed]] = False
    return [k.view(s.shape) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]


@dataclass
class Schedule:
    """When masks are recomputed and how far towards the target they are.

    Args:
        kind: "cubic" (Sanh et al. 2020) or "iterative" (equal steps, Molchanov et al. 2019).
        total_steps: optimizer steps of the run (cubic).
        warmup_steps / cooldown_steps / frequency: cubic schedule parameters.
        iterations / interval: iterative schedule: prune `1 / iterations` of the target every `interval` steps.
    """

    kind: str = "cubic"
    total_steps: int = 0
    warmup_steps: int = 0
    cooldown_steps: int = 0
    frequency: int = 10
    iterations: int = 1
    interval: int = 1

    def fraction(self, step: int) -> float | None:
        """Fraction of the target sparsity to reach at `step`, or None when the masks do not change at this step."""
        if self.kind == "iterative":
            if step > 0 and step % self.interval == 0 and step // self.interval <= self.iterations:
                return agp_iteration_sparsity(step // self.interval, self.iterations, 1.0)
            return None
        end = self.total_steps - self.cooldown_steps
        if step < self.warmup_steps or step > max(end, self.warmup_steps):
            return None
        if step % self.frequency == 0 or step in (end, self.total_steps):
            return cubic_sparsity(step, self.total_steps, 1.0, self.warmup_steps, self.cooldown_steps)
        return None
