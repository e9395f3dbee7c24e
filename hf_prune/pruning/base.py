"""What every training-time pruner shares: scores accumulated where the gradients are final, masks moved on a
schedule, a fingerprint of the masks to check that every process holds the same ones."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .masks import Schedule, topk_mask

__all__ = ["ScheduledPruner", "keep_top_units"]


class ScheduledPruner:
    """What every pruner shares: scores accumulated where the gradients are final, masks moved on a schedule."""

    scorer = None
    schedule: Schedule

    def accumulate(self) -> None:
        if self.scorer is not None:
            self.scorer.accumulate()

    def scored_parameters(self) -> list[nn.Parameter]:
        """The weights whose gradients the scores read (none for magnitude scores)."""
        return self.scorer.parameters() if self.scorer is not None else []

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Recomputes the masks if the schedule says so at `step`; returns whether they were recomputed."""
        fraction = self.schedule.fraction(step)
        if fraction is None:
            return False
        self.set_fraction(fraction)
        return True

    def set_fraction(self, fraction: float) -> None:
        raise NotImplementedError

    def fingerprint(self) -> int:
        """A 63-bit digest of the current masks: equal on every process of a correctly synchronised run."""
        digest = hashlib.sha256()
        for name, mask in sorted(self.state_dict().items()):
            if name.startswith("mask."):
                digest.update(name.encode())
                digest.update(mask.to(torch.uint8).cpu().numpy().tobytes())
        return int.from_bytes(digest.digest()[:8], "little") >> 1


def keep_top_units(scores, sparsities, masks, fraction: float, global_ranking: bool) -> list[torch.Tensor]:
    """Keep-masks of equal units (heads, neurons) per layer: each layer at `fraction` of its sparsity, or one global
    ranking removing the same total number of units."""
    if global_ranking:
        budget = fraction * sum(sp * m.numel() for sp, m in zip(sparsities, masks))
        total = sum(m.numel() for m in masks)
        keep = topk_mask(torch.cat(scores), budget / max(total, 1), ~torch.cat(masks))
        return list(keep.split([m.numel() for m in masks]))
    return [topk_mask(s, fraction * sp, ~m) for s, sp, m in zip(scores, sparsities, masks)]
