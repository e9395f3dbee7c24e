"""Pruning on real hardware: steps the optimizer skips (fp16 overflow) stay out of the scores, bf16 gives the masks of
fp32, and sharded training or weights without gradients are refused instead of pruning on empty scores."""

import pytest
import torch
from utils import TinyDataset, tiny_model, train_args

from hf_prune import PruningTrainer
from hf_prune.pruning.masks import global_topk_masks
from hf_prune.pruning.scores import gradients_usable

PRUNERS = {
    "block-movement": dict(pruning_method="movement", target_sparsity=0.5),
    "head-movement": dict(pruning_method="movement", attention_granularity="head", target_sparsity=0.5),
    "taylor-ffn": dict(pruning_method="taylor", pruning_target="ffn", target_sparsity=0.5, taylor_iterations=2,
                       taylor_interval_steps=3),
    "heads-and-ffn": dict(pruning_method="taylor", pruning_target="heads_and_ffn", target_speedup=1.5,
                          speedup_seq_len=12, taylor_iterations=2, taylor_interval_steps=3),
}  # fmt: skip
SCHEDULE = dict(pruning_warmup_steps=1, pruning_cooldown_steps=1, pruning_frequency=1)


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips a step as a gradient scaler does (any non-finite gradient), or at the calls in `skip`."""

    def __init__(self, params, skip=(), **kwargs):
        super().__init__(params, **kwargs)
        self.skip, self.calls = set(skip), 0

    def step(self, closure=None):
        self.calls += 1
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.calls in self.skip or not all(torch.isfinite(g).all() for g in grads):
            return None
        return super().step(closure)


def _run(tmp_path, pruner: str, step: int | None = None, fill: float | None = None, **overrides):
    """8 steps in which the gradients of optimizer step `step` are replaced by `fill` (inf: an fp16 overflow; the
    optimizer skips the step) or zeroed with the step skipped on purpose (the run the scores must match)."""
    model = tiny_model()
    kwargs = {**SCHEDULE, **PRUNERS[pruner], **overrides}
    if "taylor_iterations" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pruning_") or k in PRUNERS[pruner]}
    args = train_args(tmp_path, max_steps=8, **kwargs)
    optimizer = SkippingAdamW(model.parameters(), skip={step} if fill == 0.0 else (), lr=1e-3)
    trainer = PruningTrainer(model=model, args=args, train_dataset=TinyDataset(64), optimizers=(optimizer, None))
    if step is not None:
        for p in model.parameters():
            p.register_hook(lambda g: torch.full_like(g, fill) if trainer.state.global_step + 1 == step else g)
    trainer.train()
    return trainer


def _masks_and_scores(trainer) -> tuple[dict, dict]:
    state = trainer.pruner.state_dict()
    masks = {k: v for k, v in state.items() if k.startswith("mask.")}
    scores = {k: v.float() for k, v in state.items() if not k.startswith("mask.") and v.is_floating_point()}
    return masks, scores


@pytest.mark.parametrize("pruner", list(PRUNERS))
def test_overflowed_steps_stay_out_of_the_scores(tmp_path, pruner):
    overflowed = _run(tmp_path / "inf", pruner, step=3, fill=float("inf"))
    skipped = _run(tmp_path / "skip", pruner, step=3, fill=0.0)
    masks, scores = _masks_and_scores(overflowed)
    ref_masks, ref_scores = _masks_and_scores(skipped)
    assert scores and all(torch.isfinite(s).all() for s in scores.values())
    assert any(bool((~m).any()) for m in masks.values())  # something was pruned
    assert masks.keys() == ref_masks.keys()
    for k in masks:
        assert torch.equal(masks[k], ref_masks[k]), k
    for k in scores:
        # a zeroed step adds nothing to the sums (Taylor means divide by one more step: compare directions)
        a, b = scores[k].flatten(), ref_scores[k].flatten()
        if a.norm() > 0:
            torch.testing.assert_close(a / a.norm(), b / b.norm(), rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_gives_the_masks_of_fp32(tmp_path):
    fp32 = _run(tmp_path / "fp32", "head-movement")
    bf16 = _run(tmp_path / "bf16", "head-movement", bf16=True)
    masks, _ = _masks_and_scores(fp32)
    other, scores = _masks_and_scores(bf16)
    assert all(torch.isfinite(s).all() for s in scores.values())
    total = sum(m.numel() for m in masks.values())
    same = sum(int((masks[k] == other[k]).sum()) for k in masks)
    assert same >= total - 1, f"{total - same} of {total} heads differ between bf16 and fp32"


def test_gradients_usable_reads_what_a_scaler_would_skip():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    w.grad, b.grad = torch.ones(2, 2), torch.ones(2)
    assert gradients_usable([w], [w, b])
    b.grad[0] = float("nan")  # any parameter, scored or not: the scaler skips the whole step
    assert not gradients_usable([w], [w, b])
    w.grad = None
    with pytest.raises(RuntimeError, match="No gradient reached 1 of the 1 weights"):
        gradients_usable([w], [w, b])


def test_global_ranking_keeps_a_block_with_an_infinite_score():
    scores = [torch.tensor([1.0, float("inf"), 2.0, 3.0])]
    keep = global_topk_masks(scores, [1], budget=2, pruned=[torch.tensor([True, False, False, False])])[0]
    assert keep.tolist() == [False, True, False, True]  # the pruned block, then the lowest: never the +inf one


def test_frozen_scored_weights_are_refused_before_any_mask(tmp_path):
    model = tiny_model()
    for name, p in model.named_parameters():
        if "attention" in name:
            p.requires_grad_(False)
    args = train_args(tmp_path, max_steps=4, pruning_method="movement", target_sparsity=0.5, **SCHEDULE)
    trainer = PruningTrainer(model=model, args=args, train_dataset=TinyDataset(32))
    with pytest.raises(RuntimeError, match="No gradient reached .* FSDP and DeepSpeed"):
        trainer.train()


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_sharded_training_is_refused_at_train_start(tmp_path, flag):
    args = train_args(tmp_path, max_steps=2, pruning_method="movement", target_sparsity=0.5)
    trainer = PruningTrainer(model=tiny_model(), args=args, train_dataset=TinyDataset(16))
    setattr(trainer, flag, True)  # what the Trainer sets when launched with --fsdp / --deepspeed
    with pytest.raises(ValueError, match="FSDP or DeepSpeed is not supported.*torchrun"):
        trainer.train()
