"""Greedy answers in padded batches and chat-formatted distillation text, on a tiny Llama built in code."""

import pytest
import torch
from test_causal_lm import word_tokenizer
from test_llama import tiny_decoder

from hf_prune.pipeline.causal_lm import pack_blocks
from hf_prune.pipeline.generation import chat_documents, generate_answer, teacher_answers

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
PROMPTS = ["the cat sees the dog", "the dog", "the cat sees the dog in the park . the owl", "a cat", "the owl sees"]


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["user", "assistant"])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_teacher_answers_in_padded_batches_equal_one_prompt_at_a_time():
    torch.manual_seed(0)
    for tokenizer in (chat_tokenizer(), word_tokenizer()):  # through the template, and plain text
        model = tiny_decoder("llama", vocab_size=len(tokenizer)).eval()
        expected = [generate_answer(model, tokenizer, p, max_new_tokens=6) for p in PROMPTS]
        # prompts of different lengths share a batch: left padding must not change any greedy answer
        assert teacher_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3) == expected
        assert len(set(expected)) > 1  # the answers depend on the prompt (the check is not vacuous)
        model.train()
        teacher_answers(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
        assert model.training is True  # the caller's mode is restored


def test_chat_documents_render_each_prompt_and_answer_as_one_conversation():
    tokenizer = chat_tokenizer()
    docs = chat_documents(tokenizer, ["the cat", "a dog"], ["the dog .", "the owl"])
    assert [tokenizer.decode(d) for d in docs] == [
        "[BOS] user the cat [EOS] assistant the dog . [EOS]",
        "[BOS] user a dog [EOS] assistant the owl [EOS]",
    ]
    blocks = pack_blocks(docs, 4, eos_id=tokenizer.eos_token_id)
    assert all(len(b) == 4 for b in blocks) and len(blocks) == (sum(len(d) for d in docs) + 1) // 4


def test_chat_documents_refusals_name_the_fix():
    with pytest.raises(ValueError, match="chat template"):
        chat_documents(word_tokenizer(), ["the cat"], ["the dog"])
    with pytest.raises(ValueError, match="one answer per prompt"):
        chat_documents(chat_tokenizer(), ["the cat", "a dog"], ["the dog"])
    with pytest.raises(ValueError, match="at least 1"):
        teacher_answers(None, chat_tokenizer(), ["the cat"], max_new_tokens=0)
