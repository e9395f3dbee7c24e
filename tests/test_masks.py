import pytest
import torch

from hf_prune.pruning.masks import (
    Schedule,
    check_block_shape,
    cubic_sparsity,
    dead_heads,
    expand_blocks,
    pool_blocks,
    topk_mask,
)


def test_cubic_schedule_shape():
    total, warm, cool, target = 100, 10, 20, 0.6
    values = [cubic_sparsity(t, total, target, warm, cool) for t in range(total + 1)]
    assert values[:10] == [0.0] * 10
    assert all(v == target for v in values[80:])
    assert all(a <= b for a, b in zip(values, values[1:]))
    # Halfway through the pruning span, 1 - (1/2)^3 = 7/8 of the target is reached.
    assert values[45] == pytest.approx(target * (1 - 0.5**3))


def test_schedule_update_steps():
    cubic = Schedule("cubic", total_steps=20, warmup_steps=2, cooldown_steps=3, frequency=5)
    steps = [s for s in range(21) if cubic.fraction(s) is not None]
    assert steps == [5, 10, 15, 17]
    assert cubic.fraction(17) == 1.0
    it = Schedule("iterative", iterations=3, interval=4)
    assert [(s, it.fraction(s)) for s in range(16) if it.fraction(s) is not None] == [
        (4, pytest.approx(1 / 3)),
        (8, pytest.approx(2 / 3)),
        (12, 1.0),
    ]


def test_pool_expand_topk():
    scores = torch.arange(16.0).reshape(4, 4)
    pooled = pool_blocks(scores, (2, 2))
    assert pooled.tolist() == [[10.0, 18.0], [42.0, 50.0]]
    keep = topk_mask(pooled, 0.5)
    assert keep.tolist() == [[False, False], [True, True]]
    assert expand_blocks(keep, (2, 2)).sum() == 8
    # already-pruned entries stay pruned even when their score is high
    keep2 = topk_mask(pooled, 0.25, pruned=torch.tensor([[False, False], [False, True]]))
    assert keep2.tolist() == [[True, True], [True, False]]


def test_dead_heads_needs_all_four():
    hs, heads, hidden = 2, 3, 6
    q = torch.ones(heads * hs, hidden, dtype=torch.bool)
    k, v = q.clone(), q.clone()
    o = torch.ones(hidden, heads * hs, dtype=torch.bool)
    for m in (q, k, v):
        m[2:4] = False
    assert dead_heads(q, k, v, o, hs) == []
    o[:, 2:4] = False
    assert dead_heads(q, k, v, o, hs) == [1]


def test_block_shape_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        check_block_shape((32, 32), (5, 5), "query")
