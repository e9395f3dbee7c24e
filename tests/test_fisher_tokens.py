"""The Fisher information of unit masks when the loss has one label per token (token classification, a causal LM's
next tokens): each example's gradient is its own, whatever batch it is in, against one example at a time."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
from utils import VOCAB, tiny_config

from hf_prune.models import structure
from hf_prune.posttrain.fisher import mask_fisher, mask_gradients, unit_masks

TAGS = 5


def _token_classifier():
    torch.manual_seed(0)
    return AutoModelForTokenClassification.from_config(tiny_config("bert", num_labels=TAGS)).eval()


def _tiny_llama():
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64, head_dim=8, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _rows(n: int, seed: int = 0, causal: bool = False) -> list[dict]:
    """Examples of 4 to 12 tokens with a varying share of labelled tokens (-100 on the others, as on later
    sub-tokens); one example has no labelled token at all."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + (3 * i) % 9
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        if causal:
            labels = ids.clone()
            labels[: int(torch.randint(0, length - 1, (1,), generator=g))] = -100  # an unscored prompt
        else:
            labels = torch.randint(0, TAGS, (length,), generator=g)
            labels[torch.rand(length, generator=g) < 0.4] = -100
            labels[0] = -100  # the [CLS] token
        if i == 2:
            labels[:] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding: input ids with 0, labels with -100, an attention mask."""
    length = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = length - len(r["input_ids"])
        batch["input_ids"].append(torch.cat([r["input_ids"], torch.zeros(pad, dtype=torch.long)]))
        batch["attention_mask"].append(torch.cat([torch.ones(len(r["input_ids"])), torch.zeros(pad)]).long())
        batch["labels"].append(torch.cat([r["labels"], torch.full((pad,), -100)]))
    return {k: torch.stack(v) for k, v in batch.items()}


def _scored(row: dict, causal: bool) -> int:
    labels = row["labels"][1:] if causal else row["labels"]
    return int((labels != -100).sum())


def _one_at_a_time(model, rows: list[dict], causal: bool) -> list[torch.Tensor]:
    """Brute force: each example alone, unpadded; its loss is the model's token mean times its labelled tokens, over
    the mean number of labelled tokens per example."""
    heads, neurons = structure.attention_units(model), structure.ffn_size(model)
    per_example = sum(_scored(r, causal) for r in rows) / len(rows)
    grads = []
    for row in rows:
        hm = [torch.ones(1, h, requires_grad=True) for h in heads]
        nm = [torch.ones(1, n, requires_grad=True) for n in neurons]
        if _scored(row, causal) == 0:  # nothing scored: no loss, no gradient
            grads.append([torch.zeros(1, m.shape[-1]) for m in hm + nm])
            continue
        single = {"input_ids": row["input_ids"][None], "labels": row["labels"][None]}
        with unit_masks(model, hm, nm):
            loss = model(**single).loss * _scored(row, causal) / per_example
        grads.append(list(torch.autograd.grad(loss, hm + nm)))
    return [torch.cat([g[k] for g in grads]) for k in range(len(heads) + len(neurons))]


@pytest.mark.parametrize("causal", [False, True], ids=["token-classification", "causal-lm"])
def test_fisher_of_per_token_losses_equals_one_example_at_a_time(causal):
    model = _tiny_llama() if causal else _token_classifier()
    rows = _rows(10, causal=causal)
    counts = [_scored(r, causal) for r in rows]
    assert len(set(counts)) > 3 and 0 in counts  # labelled tokens per example differ, one example has none
    batches = [_collate(rows[:3]), _collate(rows[3:])]  # batches of different sizes and token counts
    assert (batches[0]["attention_mask"] == 0).any()
    heads, neurons = mask_gradients(model, batches)
    expected = _one_at_a_time(model, rows, causal)
    for got, want in zip(heads + neurons, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert heads[0][2].abs().max() == 0 and neurons[0][2].abs().max() == 0  # the example without labels
    fisher = mask_fisher(heads + neurons)
    for got, want in zip(fisher, expected):
        torch.testing.assert_close(got, want.pow(2).sum(dim=0), atol=1e-6, rtol=1e-4)
    # another batching of the same examples: the same Fisher information (a batch mean weighted by the batch size
    # gives each example a weight that depends on the other examples of its batch)
    again = mask_fisher(sum(mask_gradients(model, [_collate(rows[i : i + 2]) for i in range(0, 10, 2)]), []))
    for got, want in zip(again, fisher):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())


def test_per_token_batches_without_any_label_are_refused():
    model = _token_classifier()
    rows = _rows(3)
    for r in rows:
        r["labels"][:] = -100
    with pytest.raises(ValueError, match="have no labelled token"):
        mask_gradients(model, [_collate(rows)])
