"""Per-row sampling: greedy, nucleus, seeded rows independent of their batch neighbours."""

from __future__ import annotations

import pytest
import torch

from llmray_workloads.serve.sampling import sample_next, top_p_filter

pytestmark = pytest.mark.unit


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    tokens = sample_next(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), [None, None])
    assert tokens.tolist() == [1, 0]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, torch.tensor([0.75]))
    assert (kept[0] > 0).tolist() == [True, True, False, False]
    assert kept.sum().item() == pytest.approx(1.0)
    assert (top_p_filter(probs, torch.tensor([0.1]))[0] > 0).tolist() == [True, False, False, False]


def test_tiny_top_p_is_effectively_greedy() -> None:
    logits = torch.randn(4, 50)
    tokens = sample_next(logits, torch.full((4,), 1.0), torch.full((4,), 1e-6), [None] * 4)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_seeded_row_does_not_depend_on_its_neighbours() -> None:
    row = torch.randn(1, 100)

    def draw(batch: torch.Tensor, seeded_row: int) -> int:
        generators: list[torch.Generator | None] = [None] * batch.shape[0]
        generators[seeded_row] = torch.Generator().manual_seed(7)
        n = batch.shape[0]
        return int(sample_next(batch, torch.full((n,), 1.0), torch.full((n,), 0.9), generators)[seeded_row])

    alone = draw(row, 0)
    for _ in range(5):
        assert draw(torch.cat([torch.randn(3, 100), row]), 3) == alone


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(6, 30)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 1.3])
    gens: list[torch.Generator | None] = [None, torch.Generator().manual_seed(1), None, None, None, None]
    tokens = sample_next(logits, temperature, torch.ones(6), gens)
    greedy = logits.argmax(-1)
    assert [tokens[i].item() for i in (0, 2, 4)] == [greedy[i].item() for i in (0, 2, 4)]
    assert all(0 <= t < 30 for t in tokens.tolist())


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    tokens = sample_next(logits, torch.ones(4000), torch.ones(4000), [None] * 4000)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert freq.tolist() == pytest.approx([0.7, 0.2, 0.1], abs=0.04)
