"""Pruning and distillation inside trl's SFTTrainer: a tiny Llama fine-tuned on text by trl, its key/value groups
masked whole by movement scores and distilled token by token from a teacher, then removed without changing the
model's function."""

import torch
from datasets import Dataset
from test_llama import tiny_decoder

from hf_prune.integrations.trl import PruningSFTConfig, PruningSFTTrainer  # trl comes with the dev and trl extras
from hf_prune.models import structure
from hf_prune.pipeline.demo import build_wordlevel_tokenizer

WORDS = "the a cat dog sat ran on under mat tree big small red blue and then".split()


def text_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (9,), generator=g)) for _ in range(n)]
    return Dataset.from_dict({"text": rows})


def test_sft_trainer_prunes_and_distils_a_causal_lm(tmp_path):
    tokenizer = build_wordlevel_tokenizer(WORDS, model_max_length=32)
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    size = len(tokenizer)
    student = tiny_decoder("llama", seed=0, vocab_size=size, pad_token_id=0, bos_token_id=2, eos_token_id=3).train()
    teacher = tiny_decoder("llama", seed=1, vocab_size=size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    args = PruningSFTConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=5e-3, logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_length=16, dataset_num_proc=None,
        pruning_method="movement", pruning_target="attention", attention_granularity="head", target_sparsity=0.25,
        pruning_warmup_steps=1, pruning_cooldown_steps=2, pruning_frequency=1, distill_alpha=0.5, seed=0,
    )  # fmt: skip
    trainer = PruningSFTTrainer(
        model=student, args=args, teacher_model=teacher, train_dataset=text_data(), processing_class=tokenizer
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("distill_loss" in h and "task_loss" in h for h in logged)
    assert not any(p.requires_grad for p in teacher.parameters())
    masks = trainer.head_masks()
    assert sum(map(len, masks.values())) == round(0.25 * 4) * 3  # a quarter of the 4 groups of each of 3 layers
    student.eval()
    batch = tokenizer(list(text_data(4, seed=1)["text"]), return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = student(**batch).logits
    trainer.prune()
    assert structure.attention_units(student) == [3, 3, 3]
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, before, atol=1e-5, rtol=1e-4)
