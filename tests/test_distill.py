import math

import pytest
import torch
import torch.nn.functional as F
from utils import TinyDataset, tiny_model, train_args

from hf_prune import PruningArguments, PruningTrainer, distillation_loss


def test_alpha_zero_is_task_loss():
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    out = distillation_loss(s, t, labels, alpha=0.0, temperature=2.0)
    assert torch.allclose(out.loss, F.cross_entropy(s, labels))
    assert torch.allclose(out.task_loss, F.cross_entropy(s, labels))


def test_identical_logits_zero_kl():
    s = torch.randn(8, 3)
    out = distillation_loss(s, s.clone(), torch.zeros(8, dtype=torch.long), alpha=1.0, temperature=3.0)
    assert out.kd_loss.abs().item() < 1e-6
    assert out.loss.abs().item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_temperature_squared_scaling(temperature):
    torch.manual_seed(1)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    p_t = F.softmax(t / temperature, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temperature, -1))).sum(-1).mean()
    out = distillation_loss(s, t, torch.zeros(8, dtype=torch.long), alpha=1.0, temperature=temperature)
    assert torch.allclose(out.kd_loss, kl * temperature**2, atol=1e-6)
    mixed = distillation_loss(s, t, torch.zeros(8, dtype=torch.long), alpha=0.3, temperature=temperature)
    assert torch.allclose(mixed.loss, 0.7 * mixed.task_loss + 0.3 * kl * temperature**2, atol=1e-6)


def test_gradients_reach_student_not_teacher():
    s = torch.randn(8, 3, requires_grad=True)
    t = torch.randn(8, 3, requires_grad=True)
    hs = [torch.randn(8, 5, 4, requires_grad=True)]
    ht = [torch.randn(8, 5, 4, requires_grad=True)]
    out = distillation_loss(
        s,
        t,
        torch.zeros(8, dtype=torch.long),
        alpha=0.5,
        temperature=2.0,
        student_hidden_states=hs,
        teacher_hidden_states=ht,
        hidden_weight=0.1,
    )
    out.loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert hs[0].grad is not None and hs[0].grad.abs().sum() > 0
    assert t.grad is None and ht[0].grad is None
    assert out.hidden_loss > 0


def test_hidden_state_term_ignores_padding_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    hs, ht = [torch.randn(2, 5, 4) for _ in range(2)], [torch.randn(2, 5, 4) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kwargs = dict(labels=torch.zeros(2, dtype=torch.long), hidden_weight=1.0, attention_mask=mask)
    out = distillation_loss(s, t, student_hidden_states=hs, teacher_hidden_states=ht, **kwargs)
    # by hand: squared differences over the 8 real tokens x 4 features of each layer, then the mean over layers
    real = mask.bool()
    expected = torch.stack([((a - b)[real] ** 2).mean() for a, b in zip(hs, ht)]).mean()
    torch.testing.assert_close(out.hidden_loss, expected)
    # whatever the padded positions hold, the term is the same
    noisy = [h.clone() for h in hs]
    for h in noisy:
        h[0, 3:] += 100.0
    again = distillation_loss(s, t, student_hidden_states=noisy, teacher_hidden_states=ht, **kwargs)
    torch.testing.assert_close(again.hidden_loss, expected)
    # without a mask every position counts, as before
    plain = distillation_loss(s, t, labels=kwargs["labels"], student_hidden_states=hs, teacher_hidden_states=ht,
                              hidden_weight=1.0)  # fmt: skip
    torch.testing.assert_close(plain.hidden_loss, torch.stack([F.mse_loss(a, b) for a, b in zip(hs, ht)]).mean())
    with pytest.raises(ValueError, match="same hidden size"):
        distillation_loss(s, t, student_hidden_states=hs, teacher_hidden_states=[h[..., :2] for h in ht], **kwargs)


def test_regression_head_uses_mse():
    s, t = torch.randn(8, 1), torch.randn(8, 1)
    out = distillation_loss(s, t, torch.randn(8), alpha=1.0, temperature=2.0)
    assert torch.allclose(out.kd_loss, F.mse_loss(s, t))


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_drop_in_matches_trainer(tmp_path):
    from transformers import Trainer

    data = TinyDataset(48)
    results = []
    for cls in (Trainer, PruningTrainer):
        model = tiny_model(seed=0)
        trainer = cls(model=model, args=train_args(tmp_path / cls.__name__), train_dataset=data)
        trainer.train()
        results.append((_losses(trainer), {k: v.clone() for k, v in model.state_dict().items()}))
    (losses_a, weights_a), (losses_b, weights_b) = results
    assert len(losses_a) == 6
    assert losses_a == losses_b
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k


def test_plain_training_arguments_accepted(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, disable_tqdm=True)
    trainer = PruningTrainer(model=tiny_model(), args=args, train_dataset=TinyDataset(8))
    trainer.train()
    assert trainer.args.pruning_method is None


def test_teacher_frozen_and_components_logged(tmp_path):
    teacher = tiny_model(seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = train_args(tmp_path, distill_alpha=0.7, distill_temperature=2.0, distill_hidden_weight=0.1)
    trainer = PruningTrainer(model=tiny_model(seed=0), args=args, teacher_model=teacher, train_dataset=TinyDataset(32))
    trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all({"task_loss", "distill_loss", "hidden_loss"} <= set(h) for h in logs)
    first = logs[0]
    expected = 0.3 * first["task_loss"] + 0.7 * first["distill_loss"] + 0.1 * first["hidden_loss"]
    assert math.isclose(first["loss"], expected, rel_tol=1e-3)


def test_teacher_from_folder(tmp_path):
    teacher = tiny_model(seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    args = train_args(tmp_path / "run", distill_alpha=0.5, max_steps=2)
    trainer = PruningTrainer(
        model=tiny_model(), args=args, teacher_model=str(tmp_path / "teacher"), train_dataset=TinyDataset(16)
    )
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k])
    trainer.train()


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """A per-batch mean loss divided by the accumulation steps: GA 2 x 4 equals one batch of 8."""
    data = TinyDataset(32)
    runs = []
    for bs, ga in ((8, 1), (4, 2)):
        model = tiny_model(seed=0)
        args = train_args(
            tmp_path / f"ga{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            distill_alpha=0.5,
            learning_rate=1e-2,
        )
        trainer = PruningTrainer(model=model, args=args, teacher_model=tiny_model(seed=1), train_dataset=data)
        trainer.train()
        runs.append((_losses(trainer), model.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for k, v in runs[0][1].items():
        assert torch.allclose(v, runs[1][1][k], atol=1e-5), k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distill_alpha": 1.5}, "distill_alpha"),
        ({"distill_alpha": -0.1}, "distill_alpha"),
        ({"distill_temperature": 0.0}, "distill_temperature"),
        ({"distill_temperature": -1.0}, "distill_temperature"),
    ],
)
def test_bad_distillation_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningArguments(output_dir=str(tmp_path), **kwargs)


def test_teacher_label_mismatch(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        PruningTrainer(
            model=tiny_model(num_labels=3),
            args=train_args(tmp_path, distill_alpha=0.5),
            teacher_model=tiny_model(num_labels=2),
            train_dataset=TinyDataset(8),
        )


def test_missing_teacher_path(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        PruningTrainer(
            model=tiny_model(),
            args=train_args(tmp_path, distill_alpha=0.5),
            teacher_model=str(tmp_path / "no" / "such" / "teacher"),
            train_dataset=TinyDataset(8),
        )
