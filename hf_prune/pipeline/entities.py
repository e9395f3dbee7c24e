"""Entity-level scores of tagged sentences as seqeval defines them (its default, non-strict chunking), as pure
functions of tag lists."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["get_entities", "entity_scores"]


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks `(type, first, last)` of one tag sequence, as seqeval's default (non-strict) mode reads them.

    IOB1, IOB2 and IOBES tags all work: a chunk starts at `B-`/`S-`, at an `I-`/`E-` after `O` or after another type,
    and ends before `O`, `B-`, `S-`, a change of type, or after `E-`/`S-`.
    """
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval's overall scores of tagged sentences: entity-level (micro) precision, recall and F1, token accuracy.

    An entity counts as found when a predicted chunk has the same type, start and end as a reference chunk of the
    same sentence.

    Args:
        references / predictions: per sentence, the tag of every word (`"O"`, `"B-PER"`, `"I-PER"`, ...).

    Returns:
        `{"precision", "recall", "f1", "accuracy"}` (0 where a denominator is 0, as seqeval's `zero_division`).
    """
    true = {(s, *e) for s, tags in enumerate(references) for e in get_entities(list(tags))}
    pred = {(s, *e) for s, tags in enumerate(predictions) for e in get_entities(list(tags))}
    hits = len(true & pred)
    precision = hits / len(pred) if pred else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    pairs = [(t, p) for true_tags, pred_tags in zip(references, predictions) for t, p in zip(true_tags, pred_tags)]
    token_accuracy = sum(t == p for t, p in pairs) / len(pairs) if pairs else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": token_accuracy}
