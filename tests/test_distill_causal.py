"""Token-level distillation of causal LMs: the chunked loss against a hand computation on random tensors, and the
trainer's use of it (per-token mean, gradient accumulation, the teacher frozen)."""

import pytest
import torch
import torch.nn.functional as F
from test_llama import CausalBlocks, tiny_decoder
from utils import train_args

from hf_prune import PruningTrainer
from hf_prune.distill import causal_lm_distillation_loss


def hand_loss(hs, ht, head_s, head_t, labels, mask, alpha, temperature):
    """Every logit at once: position i predicts token i + 1; positions whose next token is -100 or padding skip."""
    s, t = head_s(hs)[:, :-1], head_t(ht)[:, :-1]
    targets = labels[:, 1:]
    keep = (targets != -100) & mask[:, 1:].bool()
    ce = F.cross_entropy(s[keep], targets[keep])
    kl = F.kl_div(F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1),
                  reduction="batchmean", log_target=True) * temperature**2  # fmt: skip
    return (1 - alpha) * ce + alpha * kl, ce, kl


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 7, 8, generator=g, requires_grad=True)
    ht = torch.randn(3, 7, 8, generator=g)
    head_s, head_t = torch.nn.Linear(8, 11), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :2] = -100  # a prompt
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0  # padding at the end
    labels[2, 5:] = -100
    return hs, ht, head_s, head_t, labels, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("alpha, temperature", [(0.5, 2.0), (1.0, 1.0), (0.0, 3.0)])
def test_chunked_loss_and_gradients_equal_the_hand_computation(chunk_size, alpha, temperature):
    hs, ht, head_s, head_t, labels, mask = random_case()
    expected, ce, kl = hand_loss(hs, ht, head_s, head_t, labels, mask, alpha, temperature)
    (g_expected,) = torch.autograd.grad(expected, hs)
    out = causal_lm_distillation_loss(hs, ht, head_s, head_t, labels, alpha, temperature, mask, chunk_size)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.task_loss, ce)
    torch.testing.assert_close(out.kd_loss, kl)
    (g,) = torch.autograd.grad(out.loss, hs)
    torch.testing.assert_close(g, g_expected)


def test_identical_models_have_no_distillation_term_and_no_token_gives_zero():
    hs, _, head_s, _, labels, mask = random_case()
    out = causal_lm_distillation_loss(hs, hs.detach(), head_s, head_s, labels, 1.0, 2.0, mask)
    assert float(out.kd_loss) == pytest.approx(0.0, abs=1e-6)
    nothing = torch.full_like(labels, -100)
    empty = causal_lm_distillation_loss(hs, hs.detach(), head_s, head_s, nothing, 0.5, 2.0, mask)
    assert float(empty.loss) == 0.0 and empty.loss.requires_grad


def test_bad_arguments_are_refused():
    hs, ht, head_s, head_t, labels, mask = random_case()
    with pytest.raises(ValueError, match="chunk_size"):
        causal_lm_distillation_loss(hs, ht, head_s, head_t, labels, chunk_size=0)
    with pytest.raises(ValueError, match="share"):
        causal_lm_distillation_loss(hs, ht, head_s, head_t, labels[:, :3])


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_distils_a_causal_lm_as_the_hand_computation(tmp_path):
    student, teacher = tiny_decoder("llama", seed=0), tiny_decoder("llama", seed=1)
    data = CausalBlocks(8)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        expected, _, _ = hand_loss(s.hidden_states[-1], t.hidden_states[-1], student.lm_head, teacher.lm_head,
                                   batch["labels"], batch["attention_mask"], 0.7, 2.0)  # fmt: skip
    args = train_args(tmp_path, per_device_train_batch_size=8, max_steps=1, distill_alpha=0.7, distill_chunk_size=5,
                      learning_rate=0.0)  # fmt: skip
    trainer = PruningTrainer(model=student, args=args, teacher_model=teacher, train_dataset=data)
    trainer.train()
    assert _losses(trainer)[0] == pytest.approx(float(expected), rel=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Equal-length blocks: per-batch token means divided by the accumulation steps equal one batch's mean (SGD, whose
    update is linear in the gradient, so the weights compare exactly)."""
    data, runs = CausalBlocks(16), []
    for bs, ga in ((8, 1), (4, 2)):
        student = tiny_decoder("qwen3", seed=0)
        args = train_args(tmp_path / f"ga{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                          distill_alpha=0.5, learning_rate=0.5, optim="sgd")  # fmt: skip
        trainer = PruningTrainer(model=student, args=args, teacher_model=tiny_decoder("qwen3", seed=1),
                                 train_dataset=data)  # fmt: skip
        trainer.train()
        runs.append((_losses(trainer), student.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for k, v in runs[0][1].items():
        assert torch.allclose(v, runs[1][1][k], atol=1e-6), k
