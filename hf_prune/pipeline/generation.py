"""Greedy generation with a causal LM: the answer a model card shows, and a teacher's answers as distillation text.

A perplexity says how much a pruned model lost on average; an answer to a question shows whether it still talks.
[`generation_sample`] records both models' answers to one question for the report and the card.

Distilling an instruct model on plain text recovers the perplexity of that text but not the behaviour of the chat
turns (measured on SmolLM2-135M-Instruct: fluent, wrong answers after 0.5M tokens of MNLI sentences). Sequence-level
knowledge distillation (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation") trains the student on the teacher's
own outputs: [`teacher_answers`] generates them for a list of prompts and [`chat_documents`] renders each prompt and
its answer through the chat template as one document, to be packed into blocks ([`pack_blocks`]) beside plain text.
The token-level `T^2 KL` of the distillation then runs over conversations the teacher would have had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .causal_lm import model_device, pad_token_id

__all__ = ["SAMPLE_PROMPT", "has_chat_template", "generate_answer", "generation_sample", "teacher_answers",
           "chat_documents"]  # fmt: skip

SAMPLE_PROMPT = "What is the capital of France? Answer in one sentence."


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer renders chat messages (an instruct model's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids a user's message starts generation from: through the chat template with the assistant's turn
    opened when the tokenizer has one, else the plain text."""
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]  # fmt: skip
    else:
        ids = tokenizer(prompt)["input_ids"]
    return [int(i) for i in ids]


@torch.inference_mode()
def teacher_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16):
    """The greedy answers of a causal LM to many prompts, generated in padded batches with the KV cache.

    Prompts are padded on the left (so every row's new tokens start at the same position) and masked; a row stops at
    the model's end-of-sequence token. Greedy answers equal [`generate_answer`]'s one prompt at a time up to the
    rounding differences of padded batches.

    Args:
        model: a causal LM (the teacher).
        tokenizer: its tokenizer (chat template used when it has one).
        prompts: the users' messages.
        max_new_tokens: tokens generated at most per answer.
        batch_size: prompts per generation batch.

    Returns:
        One decoded answer per prompt, in order, special tokens left out, stripped.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be at least 1.")
    pad = pad_token_id(tokenizer)
    device = model_device(model)
    mode = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)  # fmt: skip
            answers += [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    finally:
        model.train(mode)
    return answers


def chat_documents(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    """Each prompt and its answer as one conversation's token ids (user turn, assistant turn, through the chat
    template), the documents of sequence-level distillation text.

    Args:
        tokenizer: a tokenizer with a chat template.
        prompts: the users' messages.
        answers: the assistant's answers (e.g. [`teacher_answers`]), one per prompt.

    Returns:
        One list of token ids per conversation.
    """
    if not has_chat_template(tokenizer):
        raise ValueError("chat_documents needs a tokenizer with a chat template (an instruct model's); for a base "
                         "model distil on plain text.")  # fmt: skip
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: give one answer per prompt.")
    return [
        [int(i) for i in tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}], return_dict=True)["input_ids"]]
        for p, a in zip(prompts, answers)
    ]  # fmt: skip


def generate_answer(model, tokenizer, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 32) -> str:
    """The greedy answer of a causal LM to one prompt, as a user of its model card would ask it.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer; the prompt goes through its chat template when it has one (an instruct model),
            else it is the plain start of the text.
        prompt: the user's message.
        max_new_tokens: tokens generated after the prompt.

    Returns:
        The decoded new tokens, special tokens left out, stripped.
    """
    return teacher_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]  # one row: no padding


def generation_sample(teacher, model, tokenizer, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 32) -> dict:
    """The dense and the pruned model's greedy answers to one prompt (see [`generate_answer`]), for the report and
    the model card: perplexity says how much was lost on average, the answer shows whether the model still talks."""
    return {
        "prompt": prompt,
        "max_new_tokens": int(max_new_tokens),
        "chat_template": has_chat_template(tokenizer),
        "teacher": generate_answer(teacher, tokenizer, prompt, max_new_tokens),
        "pruned": generate_answer(model, tokenizer, prompt, max_new_tokens),
    }
