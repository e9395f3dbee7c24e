import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny Llama (context of 64 positions) saved with its word-level tokenizer (the causal-LM task and recipe
    tests; the stand-in for SmolLM2)."""
    from test_causal_lm import word_tokenizer
    from test_llama import tiny_decoder

    folder = tmp_path_factory.mktemp("lm") / "tiny-llama"
    tokenizer = word_tokenizer()
    tiny_decoder("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
