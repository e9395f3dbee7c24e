"""A keep-mask over the residual stream during training (`pruning_target="hidden"`): CoFi's hidden dimensions, scored
by Taylor, movement or magnitude importance and removed physically by `PruningTrainer.prune()`."""

from __future__ import annotations

import torch
from torch import nn

from ..models.hidden import hidden_module_objects, hidden_width, masked_norm
from .base import ScheduledPruner
from .masks import Schedule, topk_mask
from .scores import movement_importance, taylor_importance

__all__ = ["HiddenMaskPruner", "hidden_products", "hidden_magnitude"]


def _norm_parameters(norm: nn.Module) -> list[nn.Parameter]:
    """A norm's weight and bias, those it has (an RMSNorm has no bias)."""
    return [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]


def hidden_products(norms: list[nn.LayerNorm], sources: list[nn.Linear]) -> torch.Tensor:
    """Per residual dimension, `sum_s W_s * dL/dW_s` over the parameters that scale it where the stream is written
    (each LayerNorm's weight and bias entry, each source projection's output row and bias): the first-order change of
    the loss when a mask on that dimension goes from one to zero (the gradient of `hidden_scale` at one)."""
    total = None
    for norm in norms:
        for p in _norm_parameters(norm):
            if p.grad is not None:
                part = p.detach().float() * p.grad.detach().float()
                total = part if total is None else total + part
    for linear in sources:
        part = (linear.weight.detach().float() * linear.weight.grad.detach().float()).sum(dim=1)
        if linear.bias is not None and linear.bias.grad is not None:
            part = part + linear.bias.detach().float() * linear.bias.grad.detach().float()
        total = part if total is None else total + part
    return total


@torch.no_grad()
def hidden_magnitude(modules: dict[str, list[nn.Module]]) -> torch.Tensor:
    """Per residual dimension, the L1 norm of every weight that reads or writes it (embedding columns, reader
    columns, writer and source rows or output channels, the last axis of the stream's parameters): the magnitude
    baseline of hidden-dimension pruning.

    Args:
        modules: `{role: [modules]}` of the stream (the adapter's `hidden_modules`, resolved to modules; the
            `parameters` role to parameters).
    """
    parts = [emb.weight.detach().float().abs().sum(dim=0) for emb in modules["embeddings"]]
    parts += [lin.weight.detach().float().abs().sum(dim=0) for lin in modules["readers"]]
    # flattened: a Conv2d writer's kernel sums into its output channel as a Linear's row does
    writers = modules["writers"] + modules["sources"]
    parts += [lin.weight.detach().float().abs().flatten(1).sum(dim=1) for lin in writers]
    parts += [p.detach().float().abs().reshape(-1, p.shape[-1]).sum(dim=0) for p in modules.get("parameters", [])]
    return torch.stack(parts).sum(dim=0)


class HiddenMaskPruner(ScheduledPruner):
    """A keep-mask over the residual stream's dimensions, shared by every layer.

    While a dimension is masked the model runs as with it removed: its LayerNorms normalise over the kept
    dimensions (forward hooks, [`hf_prune.models.hidden.masked_norm`]) and the projections that write the
    stream without a LayerNorm zero it, so `PruningTrainer.prune()` (`prune_hidden_dims`) changes no output.

    Args:
        model: a model whose family supports hidden-dimension pruning (`ArchitectureAdapter.hidden_modules`).
        method: "taylor", "movement" or "magnitude" (the L1 norm of every weight the dimension touches).
        schedule: when and how far the mask moves.
        sparsity: the fraction of dimensions removed in the end.
    """

    def __init__(self, model: nn.Module, method: str, schedule: Schedule, sparsity: float):
        self.modules = hidden_module_objects(model)
        self.method, self.schedule, self.target = method, schedule, float(sparsity)
        width = hidden_width(model)
        device = next(model.parameters()).device
        self.mask = torch.ones(width, dtype=torch.bool, device=device)
        self.scores = torch.zeros(width, device=device)
        self.steps = 0
        self._handles = []

    # ------------------------------------------------------------------------------------------------ scores
    def scored_parameters(self) -> list[nn.Parameter]:
        if self.method == "magnitude":
            return []
        params = [p for n in self.modules["norms"] for p in _norm_parameters(n)]
        return params + [p for lin in self.modules["sources"] for p in (lin.weight, lin.bias) if p is not None]

    @torch.no_grad()
    def accumulate(self) -> None:
        if self.method == "magnitude":
            return
        products = hidden_products(self.modules["norms"], self.modules["sources"])
        if products is None:
            return
        fn = taylor_importance if self.method == "taylor" else movement_importance
        self.scores.add_(fn(products).to(self.scores.device))
        self.steps += 1

    # ------------------------------------------------------------------------------------------------ masks
    @torch.no_grad()
    def set_fraction(self, fraction: float) -> None:
        scores = hidden_magnitude(self.modules) if self.method == "magnitude" else self.scores / max(self.steps, 1)
        self.mask = topk_mask(scores, fraction * self.target, ~self.mask)
        self.last_fraction = fraction
        if self.schedule.kind == "iterative" and self.method != "magnitude":
            self.scores.zero_()  # each iteration ranks on the importance gathered since the last one
            self.steps = 0
        self.apply_masks()

    def apply_masks(self) -> None:
        """Registers the hooks that run the model as with the masked dimensions removed (once; they read the
        current mask)."""
        if self._handles:
            return

        def norm_hook(module, args, output):
            if bool(self.mask.all()):
                return None
            return masked_norm(module, args[0], self.mask)

        def zero_hook(module, args, output):
            if bool(self.mask.all()):
                return None
            return output * self.mask.to(device=output.device, dtype=output.dtype)

        self._handles = [n.register_forward_hook(norm_hook) for n in self.modules["norms"]]
        self._handles += [lin.register_forward_hook(zero_hook) for lin in self.modules["sources"]]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pruned_dims(self) -> list[int]:
        """The masked residual dimensions, to remove."""
        return (~self.mask).nonzero().flatten().tolist()

    def sparsity(self) -> list[float]:
        """The fraction of residual dimensions masked (one value: the mask is shared by every layer)."""
        return [1.0 - self.mask.float().mean().item()]

    def describe(self) -> str:
        return (
            f"{self.method} hidden-dimension pruning: {self.mask.numel()} residual dimensions, target sparsity "
            f"{self.target:.3f} ({round(self.target * self.mask.numel())} removed), shared by every layer"
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mask.hidden": self.mask.to(torch.uint8), "score.hidden": self.scores,
                "score_steps": torch.tensor(self.steps)}  # fmt: skip

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mask = state["mask.hidden"].to(torch.bool).to(self.mask.device)
        self.scores.copy_(state["score.hidden"])
        self.steps = int(state["score_steps"])
